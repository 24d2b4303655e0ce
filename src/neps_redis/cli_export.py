"""``neps-redis export`` and ``neps-redis import``, as plain click commands.

They are attached to the ``neps-redis`` group with one line each
(``main.add_command(export_command)``); standing alone they work too. The
server is the command's own ``--redis``, else the group's ``--redis``, else
NEPS_REDIS_URL, else the embedded server or the local default. Errors a
person can fix end the command with one line and exit code 1 (2 for a
refused argument, such as a bad URL or run name); no output holds a
password.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from neps_redis.cli_output import (
    URL_META,
    click_error,
    counted,
    plain_warnings,
    progress_bar,
)
from neps_redis.connection import URL_ENV, resolve_url
from neps_redis.errors import NePSError, RunExistsError, TrialAlreadyExistsError
from neps_redis.export import (
    DEFAULT_KEEP,
    ExportResult,
    ImportResult,
    export_periodically,
    export_run,
    import_run,
)
from neps_redis.state import RedisNePSState

_redis_option = click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    envvar=URL_ENV,
    show_envvar=True,
    help="The Redis server of the run (default: the neps-redis group's --redis).",
)


def _url(redis_url: str | None) -> str:
    """The command's --redis, else the group's (either may come from
    NEPS_REDIS_URL), else the usual default order."""
    context = click.get_current_context(silent=True)
    if context is not None:
        given = context.get_parameter_source("redis_url") == ParameterSource.COMMANDLINE
        root = context.find_root()
        if not given and root is not context and root.params.get("redis_url"):
            redis_url = root.params["redis_url"]
    url = resolve_url(redis_url or None)
    if context is not None:
        context.meta[URL_META] = url
    return url


@contextmanager
def _one_line_errors(url: str) -> Iterator[None]:
    try:
        with plain_warnings():
            yield
    except (NePSError, RedisError) as error:
        raise click_error(error, url) from None


_quiet_option = click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Print nothing but errors: no progress, no report.",
)


def _export_line(result: ExportResult) -> str:
    consistent = "" if result.consistent else " (the run kept changing: see the log)"
    return (
        f"{result.directory} -> {result.snapshot.name}:"
        f" {counted(result.trials, 'trial')} ({result.encoded:,} encoded),"
        f" {counted(result.files_written, 'file')} written,"
        f" {result.files_linked:,} linked,"
        f" {counted(result.errors, 'shared error')}, {result.seconds:.2f} s{consistent}"
    )


@click.command("export")
@click.argument("run")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--every",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Export again every SECONDS, re-encoding only what changed, until Ctrl-C.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=DEFAULT_KEEP,
    show_default=True,
    help="Snapshots to keep beside DIRECTORY, the newest included.",
)
@click.option(
    "--force", is_flag=True, help="Replace DIRECTORY even if it is not an export."
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Also write pipeline_space.pkl, the run's stored pickle (copied unread).",
)
@_quiet_option
@_redis_option
def export_command(
    run: str,
    directory: Path,
    every: float | None,
    keep: int,
    force: bool,
    allow_pickle: bool,
    quiet: bool,
    redis_url: str | None,
) -> None:
    """Write RUN as a NePS run directory at DIRECTORY.

    DIRECTORY becomes a symlink to a complete snapshot in
    DIRECTORY.snapshots/, switched atomically, so NePS's tools (neps.status,
    load_config) can read it at any time. On a terminal, a one-shot export
    shows its progress on stderr.
    """
    url = _url(redis_url)
    # A line is not wrapped at the terminal's width: scripts read it whole.
    console = Console(highlight=False, soft_wrap=True, quiet=quiet)
    with _one_line_errors(url):
        state = RedisNePSState.create_or_load(
            run, redis=url, load_only=True, allow_pickle=allow_pickle or None
        )
        if every is None:
            with progress_bar(quiet=quiet) as progress:
                result = export_run(
                    state, directory, keep=keep, force=force, progress=progress
                )
            console.print(f"Exported run '{run}': {_export_line(result)}")
            return

        console.print(
            f"Exporting run '{run}' to {directory} every {every:g} s; Ctrl-C stops."
        )
        stop = threading.Event()
        try:
            export_periodically(
                state,
                directory,
                every=every,
                stop_event=stop,
                keep=keep,
                force=force,
                on_round=lambda result: console.print(_export_line(result)),
            )
        except KeyboardInterrupt:
            stop.set()
            console.print("Stopped.")


# What `ImportResult.optimizer_state` means, for the import's report.
_STATE_SOURCES = {
    "imported": "imported from optimizer_state.pkl",
    "fresh": "fresh (new RNG snapshot, no budget, no shared state)",
    "kept": "the run's own, kept as it was",
}


def _import_report(result: ImportResult, console: Console) -> None:
    console.print(
        f"Imported {result.directory} into run '{result.run}':"
        f" {counted(result.trials, 'trial')},"
        f" {counted(result.errors, 'shared error')}."
    )
    table = Table()
    table.add_column("state")
    table.add_column("trials", justify="right")
    for state, count in sorted(result.counts.items()):
        table.add_row(state, f"{count:,}")
    console.print(table)
    workers = ", ".join(result.worker_ids) or "none"
    console.print(f"Worker ids: {workers}")
    console.print(f"Optimizer state: {_STATE_SOURCES[result.optimizer_state]}")
    if result.skipped:
        skipped = Table(title=f"Skipped ({len(result.skipped)})", title_justify="left")
        skipped.add_column("file")
        skipped.add_column("line", justify="right")
        skipped.add_column("reason", overflow="fold")
        for item in result.skipped:
            line = "" if item.line is None else str(item.line)
            skipped.add_row(item.path, line, item.reason)
        console.print(skipped)
    for note in result.notes:
        console.print(f"Note: {note}")


@click.command("import")
@click.argument(
    "directory", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.argument("run")
@click.option(
    "--into-existing",
    is_flag=True,
    help="Add to RUN if it exists (same optimizer; trial ids must be new).",
)
@click.option(
    "--skip-corrupt",
    is_flag=True,
    help="Import what is readable and list what was skipped, instead of failing.",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read optimizer_state.pkl (RNG, budget, worker ids) and keep"
    " pipeline_space.pkl. Unpickling runs code: only for directories you trust.",
)
@_quiet_option
@_redis_option
def import_command(
    directory: Path,
    run: str,
    into_existing: bool,
    skip_corrupt: bool,
    allow_pickle: bool,
    quiet: bool,
    redis_url: str | None,
) -> None:
    """Load the NePS run directory DIRECTORY into RUN, all or nothing.

    Without --skip-corrupt, a file NePS could not read either (a torn line
    in shared_errors.jsonl, a report with unknown keys...) stops the import
    with its name and line, and nothing is written.
    """
    url = _url(redis_url)
    with _one_line_errors(url), progress_bar(quiet=quiet) as progress:
        try:
            result = import_run(
                directory,
                run,
                redis=url,
                into_existing=into_existing,
                skip_corrupt=skip_corrupt,
                allow_pickle=allow_pickle,
                progress=progress,
            )
        except RunExistsError:
            raise click.ClickException(
                f"Run '{run}' exists already; import into a new run name, or pass"
                " --into-existing to add the directory's trials to it."
            ) from None
        except TrialAlreadyExistsError as error:
            raise click.ClickException(
                f"Trial '{error.trial_id}' of {directory} exists already in run"
                f" '{run}'; nothing was imported. Trial ids must be new to the"
                " run: import into a new run name instead."
            ) from None
    _import_report(result, Console(highlight=False, soft_wrap=True, quiet=quiet))
