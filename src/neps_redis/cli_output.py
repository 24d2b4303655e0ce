"""What the command line tells a person besides a command's result.

Errors a person can act on become one line (`readable`), results for
scripts strict JSON (`echo_json`), warnings one
``warning: ...`` line each, shown once (`plain_warnings`), long operations
a progress bar on stderr when it is a terminal (`progress_bar`), and tables
fit the terminal's width by leaving out their least important columns
(`fitted_table`). Nothing here ever shows a password: every URL goes
through `redact_url`, every message through `redact_text`.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import click
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console, JustifyMethod
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from neps_redis import defaults
from neps_redis.connection import redact_text, redact_url, tls_failure
from neps_redis.errors import InvalidArgumentError

# Where a command records the URL it settled on, in click's context meta
# (shared by a group and its commands), so that an error names the server.
URL_META = "neps_redis.url"


# --- errors ----------------------------------------------------------------


def authentication_failed(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, AuthenticationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def readable(error: Exception, url: str | None) -> str:
    """One line for `error`, met while talking to the server at `url`."""
    where = redact_url(url) if url else "(no server chosen)"
    tls = tls_failure(error, where)
    if tls is not None:
        message = tls
    elif authentication_failed(error):
        # redis-py makes a refused password a ConnectionError; "cannot
        # reach" would send a person to look at the network.
        message = (
            f"Authentication failed at the Redis server at {where}:"
            f" {str(error).rstrip('.')}. Check the user name and password in"
            " the URL (--redis or NEPS_REDIS_URL)."
        )
    elif isinstance(error, RedisConnectionError | RedisTimeoutError):
        message = f"Cannot reach the Redis server at {where}: {str(error).rstrip('.')}."
        if url == defaults.FALLBACK_URL:
            message += (
                " Nothing is configured (no --redis, no NEPS_REDIS_URL) and your"
                " embedded server is not running: start it with `neps-redis server"
                " start` if your runs are there."
            )
    elif isinstance(error, RedisError):
        message = f"The Redis server at {where} refused: {error}"
    else:
        message = str(error)
    return redact_text(message, url)


class UsageFailure(click.ClickException):
    """A refused argument, said in one line: exit code 2, as click's own
    usage errors, but without the usage text, which would bury the line."""

    exit_code = 2


def click_error(error: Exception, url: str | None) -> click.ClickException:
    """The one-line CLI error for `error`: exit code 2 for an argument that
    was refused as such (`InvalidArgumentError`), else 1."""
    if isinstance(error, InvalidArgumentError):
        return UsageFailure(redact_text(str(error), url))
    return click.ClickException(readable(error, url))


def counted(count: int, noun: str) -> str:
    """``1 trial``, ``2 trials``: a count and its noun, in the right number."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


# --- JSON ------------------------------------------------------------------


def plain(value: Any) -> Any:
    """`value` as strict JSON allows it: NaN and infinities become strings,
    anything unknown its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return plain(value.item())
    return str(value)


def echo_json(value: Any) -> None:
    """Print `value` as one JSON document on stdout."""
    click.echo(json.dumps(plain(value), indent=2))


# --- warnings --------------------------------------------------------------


@contextmanager
def plain_warnings(stream: TextIO | None = None) -> Iterator[None]:
    """Show each distinct warning once, as one ``warning: ...`` line on
    stderr, instead of Python's two lines with a source path.

    The same warning can come from several call sites (each client that
    checks the server warns), which Python's filters count apart.
    """
    seen: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = " ".join(str(message).split())
        if text in seen:
            return
        seen.add(text)
        click.echo(f"warning: {text}", file=stream or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# --- progress --------------------------------------------------------------

# What the library's steps are called on the progress bar.
_STEPS = {
    "read": "Reading trials",
    "encode": "Encoding trials",
    "write": "Writing trials",
    "store": "Storing trials",
}


@contextmanager
def progress_bar(*, quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(step, done, total)`` callback drawing one bar a step on
    stderr, or None when stderr is not a terminal or `quiet` is set, so
    that piped and scripted output stays clean. The bars vanish when done.
    """
    if quiet or not sys.stderr.isatty():
        yield None
        return

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def progress(step: str, done: int, total: int) -> None:
        if step not in tasks:
            tasks[step] = bars.add_task(_STEPS.get(step, step), total=total)
        bars.update(tasks[step], completed=done, total=total)

    with bars:
        yield progress


# --- tables ----------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A table column. One with a `drop_order` may be left out when the
    table is wider than the terminal, 1 first; one without never is."""

    name: str
    drop_order: int | None = None
    justify: JustifyMethod = "left"


Layout = tuple[Sequence[Column], Sequence[Sequence[str]]]


def _table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    shown: list[int],
    options: dict[str, Any],
) -> Table:
    table = Table(**options)
    for index in shown:
        column = columns[index]
        table.add_column(column.name, justify=column.justify, overflow="fold")
    for row in rows:
        table.add_row(*(row[index] for index in shown))
    return table


def fitted_table(
    console: Console, *layouts: Layout, **table_options: Any
) -> tuple[Table, list[str]]:
    """A table as wide as `console` allows, and the names of the columns it
    left out to get there.

    Each layout is columns and rows; the first that fits wins. In each,
    columns are left out by their `drop_order` while the table is too wide.
    When none fits, the last layout folds its cells onto more lines: no id
    or value is ever cut short with an ellipsis.
    """
    # Measured without the terminal's limit: the table's natural width.
    unlimited = console.options.update_width(1_000_000)
    for columns, rows in layouts:
        shown = list(range(len(columns)))
        while True:
            table = _table(columns, rows, shown, table_options)
            fits = Measurement.get(console, unlimited, table).maximum <= console.width
            droppable = [i for i in shown if columns[i].drop_order is not None]
            if fits or not droppable:
                break
            shown.remove(min(droppable, key=lambda i: columns[i].drop_order or 0))
        if fits:
            break
    left_out = [c.name for i, c in enumerate(columns) if i not in shown]
    return table, left_out


def left_out_note(left_out: Sequence[str]) -> str:
    """The line under a table that left columns out."""
    return (
        f"(left out for the terminal's width: {', '.join(left_out)};"
        " --json shows everything)"
    )
