"""The ``neps-redis`` commands that look into runs and tend them.

``runs``, ``trials``, ``show``, ``errors``, ``workers`` and ``watch`` only
read; ``reset``, ``remove`` and ``delete`` change a run through the Lua
transitions that do it (``delete --force`` resets the trials being
evaluated, then deletes). Every command takes ``--redis`` after its name as
well as before it, prints tables for people and ``--json`` for scripts, and
exits 0 when it did what was asked, 1 when the run or trial does not exist
or the server failed, 2 on a usage error (click's own, or a malformed URL
or run name). Nothing here prints a password.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from neps_redis import defaults
from neps_redis.cli_export import _redis_option, _url
from neps_redis.cli_output import (
    Column,
    Layout,
    counted,
    echo_json,
    fitted_table,
    left_out_note,
    plain,
)
from neps_redis.codec import decode_hash, json_to_budget, loads_json
from neps_redis.connection import client_from_url, connect, redact_url
from neps_redis.errors import NePSError, RunInUseError, TrialNotFoundError
from neps_redis.keys import PREFIX, RunKeys
from neps_redis.model import State, Trial
from neps_redis.state import RedisNePSState

# The meta hash is the one key every run has from creation to deletion.
_META_PATTERN = f"{PREFIX}:{{*}}:meta"
_META_KEY = re.compile(rf"^{PREFIX}:\{{(?P<run>[^{{}}]*)\}}:meta$")

_SORTS = ("objective", "id", "time")

# How far back `watch` looks for the latest results before following.
_RECENT_EVENTS = 200
_STATES = [s.value for s in State]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _when(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _when_short(seconds: Any) -> str:
    # Tables of many trials: the date is rarely news, the time is.
    text = _when(seconds)
    return text[5:] if text != "-" else text


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping | list | tuple):
        # As --json shows it, not as Python's repr.
        return json.dumps(plain(value))
    return str(value)


def _load(run: str, url: str) -> RedisNePSState:
    """The run, read-only: no heartbeat, no worker registered."""
    return RedisNePSState.create_or_load(
        run, redis=url, load_only=True, heartbeat=False
    )


# --- runs ------------------------------------------------------------------


def _primaries(client: Any) -> list[Any]:
    """One plain client per primary: the server itself, or every primary of
    a cluster (SCAN only sees the keys of the node it is sent to)."""
    if hasattr(client, "get_primaries"):
        return [
            node.redis_connection or client.get_redis_connection(node)
            for node in client.get_primaries()
        ]
    return [client]


def run_names(client: Any) -> list[str]:
    """Every run on the server (all primaries of a cluster), sorted."""
    names: set[str] = set()
    for node in _primaries(client):
        for key in node.scan_iter(match=_META_PATTERN, count=1000):
            text = key.decode() if isinstance(key, bytes) else key
            if match := _META_KEY.match(text):
                names.add(match["run"])
    return sorted(names)


def evaluation_budget(client: Any, keys: RunKeys) -> int | None:
    """The run's evaluation budget, read without loading the optimizer state
    (whose RNG snapshot may need libraries this machine lacks)."""
    raw = client.hget(keys.optimizer_state, "budget")
    return None if raw is None else json_to_budget(raw).total_evaluations_to_spend


def _run_row(client: Any, run: str) -> dict[str, Any]:
    keys = RunKeys(run)
    counts = {k: int(v) for k, v in decode_hash(client.hgetall(keys.counts)).items()}
    return {
        "run": run,
        "counts": {s: counts.get(s, 0) for s in _STATES},
        "total": sum(counts.values()),
        "evaluation_budget": evaluation_budget(client, keys),
        "workers": int(client.zcard(keys.workers)),
    }


@click.command("runs")
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def runs_command(redis_url: str | None, as_json: bool) -> None:
    """List every run on the server (every primary of a cluster) with its
    trials by state."""
    url = _url(redis_url)
    client = connect(url)
    rows = [_run_row(client, run) for run in run_names(client)]

    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"No runs at {redact_url(url)}.")
        return
    # A state no run has a trial in would only take room from the names.
    states = [s for s in _STATES if any(row["counts"][s] for row in rows)]
    columns = [
        Column("run"),
        *(Column(name, justify="right") for name in states),
        Column("total", justify="right"),
        Column("budget", drop_order=2, justify="right"),
        Column("workers", drop_order=1, justify="right"),
    ]
    cells = [
        [
            row["run"],
            *(str(row["counts"][s]) for s in states),
            str(row["total"]),
            _short(row["evaluation_budget"]),
            str(row["workers"]),
        ]
        for row in rows
    ]
    # Too narrow for a column a state: the counts as one line of text.
    narrow = [
        Column("run"),
        Column("trials"),
        Column("total", justify="right"),
        Column("budget", drop_order=2, justify="right"),
        Column("workers", drop_order=1, justify="right"),
    ]
    narrow_cells = [
        [
            row["run"],
            ", ".join(f"{s} {row['counts'][s]}" for s in states if row["counts"][s]),
            *cells[index][-3:],
        ]
        for index, row in enumerate(rows)
    ]
    _print_table((columns, cells), (narrow, narrow_cells))


def _print_table(*layouts: Layout, heading: str | None = None) -> None:
    """A table that fits the terminal, under an optional heading line."""
    console = _console()
    table, left_out = fitted_table(console, *layouts)
    parts: list[Any] = [Text(heading)] if heading is not None else []
    parts.append(table)
    if left_out:
        parts.append(Text(left_out_note(left_out), style="dim"))
    console.print(Group(*parts))


# --- trials ----------------------------------------------------------------


def _objective(trial: Trial) -> Any:
    return None if trial.report is None else trial.report.objective_to_minimize


def _trial_row(trial: Trial) -> dict[str, Any]:
    meta = trial.metadata
    report = trial.report
    return {
        "id": trial.id,
        "state": meta.state.value,
        "objective_to_minimize": _objective(trial),
        "cost": None if report is None else report.cost,
        "sampling_worker_id": meta.sampling_worker_id,
        "evaluating_worker_id": meta.evaluating_worker_id,
        "time_sampled": meta.time_sampled,
        "time_started": meta.time_started,
        "time_end": meta.time_end,
        "evaluation_duration": meta.evaluation_duration,
        "config": dict(trial.config),
    }


def _numeric_id(trial_id: str) -> tuple[int, Any]:
    # Ids are usually numbers ("1", "2", "10"), which must not sort as text.
    return (0, int(trial_id)) if trial_id.isdigit() else (1, trial_id)


def _sort_key(sort: str) -> Any:
    if sort == "id":
        return lambda t: _numeric_id(t.id)
    if sort == "time":
        return lambda t: (t.metadata.time_sampled or 0.0, _numeric_id(t.id))

    def by_objective(trial: Trial) -> tuple[int, float, Any]:
        value = _objective(trial)
        if isinstance(value, int | float) and not math.isnan(float(value)):
            return (0, float(value), _numeric_id(trial.id))
        # Trials without a number to rank come last, by id.
        return (1, 0.0, _numeric_id(trial.id))

    return by_objective


@click.command("trials")
@click.argument("run")
@_redis_option
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(_STATES),
    help="Only trials in this state (repeat for several).",
)
@click.option(
    "--worker",
    metavar="WORKER_ID",
    help="Only trials this worker sampled or evaluated.",
)
@click.option(
    "--sort",
    type=click.Choice(_SORTS),
    default="id",
    show_default=True,
    help="Order: lowest objective first, by id, or by time sampled.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Show at most N trials.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one trial a row.")
def trials_command(
    run: str,
    redis_url: str | None,
    states: tuple[str, ...],
    worker: str | None,
    sort: str,
    limit: int | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """List RUN's trials: state, objective, cost, workers, times."""
    if as_json and as_csv:
        raise click.UsageError("Choose one of --json and --csv.")
    state = _load(run, _url(redis_url))
    trials = list(state.lock_and_read_trials().values())
    if states:
        trials = [t for t in trials if t.metadata.state.value in states]
    if worker is not None:
        trials = [
            t
            for t in trials
            if worker
            in (t.metadata.sampling_worker_id, t.metadata.evaluating_worker_id)
        ]
    trials.sort(key=_sort_key(sort))
    rows = [_trial_row(t) for t in trials[:limit]]

    if as_json:
        echo_json(rows)
    elif as_csv:
        _write_csv(rows)
    else:
        _print_trials(run, rows, shown=len(rows), matching=len(trials))


def _write_csv(rows: list[dict[str, Any]]) -> None:
    params = sorted({name for row in rows for name in row["config"]})
    columns = [c for c in (rows[0] if rows else _trial_row_columns()) if c != "config"]
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([*columns, *(f"config.{p}" for p in params)])
    for row in rows:
        cells = [_csv_cell(row[c]) for c in columns]
        cells += [_csv_cell(row["config"].get(p)) for p in params]
        writer.writerow(cells)


def _trial_row_columns() -> list[str]:
    return [
        "id",
        "state",
        "objective_to_minimize",
        "cost",
        "sampling_worker_id",
        "evaluating_worker_id",
        "time_sampled",
        "time_started",
        "time_end",
        "evaluation_duration",
    ]


def _csv_cell(value: Any) -> str:
    value = plain(value)
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _print_trials(
    run: str, rows: list[dict[str, Any]], *, shown: int, matching: int
) -> None:
    # On a narrow terminal the sampler goes first (usually the evaluator
    # too), the id, state and objective never.
    columns = [
        Column("id"),
        Column("state"),
        Column("objective", justify="right"),
        Column("cost", drop_order=2, justify="right"),
        Column("sampler", drop_order=1),
        Column("evaluator", drop_order=5),
        Column("sampled (UTC)", drop_order=3),
        Column("seconds", drop_order=4, justify="right"),
    ]
    cells = [
        [
            row["id"],
            row["state"],
            _short(row["objective_to_minimize"]),
            _short(row["cost"]),
            _short(row["sampling_worker_id"]),
            _short(row["evaluating_worker_id"]),
            _when_short(row["time_sampled"]),
            _short(row["evaluation_duration"]),
        ]
        for row in rows
    ]
    more = f" (first {shown} of {matching})" if shown < matching else ""
    heading = f"Run '{run}': {counted(matching, 'trial')}{more}"
    _print_table((columns, cells), heading=heading)


# --- show ------------------------------------------------------------------


@click.command("show")
@click.argument("run")
@click.argument("trial_id", metavar="TRIAL")
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show_command(run: str, trial_id: str, redis_url: str | None, as_json: bool) -> None:
    """Show everything about one trial of RUN: metadata, config, report,
    error and traceback, and the attempts that lost their lease."""
    state = _load(run, _url(redis_url))
    trial = state.lock_and_get_trial_by_id(trial_id)
    history = state.attempt_history(trial_id)
    report = trial.report
    record: dict[str, Any] = {
        "run": run,
        "id": trial.id,
        "source": trial.source,
        "metadata": {
            name: getattr(trial.metadata, name)
            for name in trial.metadata.__dataclass_fields__
        },
        "config": dict(trial.config),
        "report": None
        if report is None
        else {
            "reported_as": report.reported_as,
            "objective_to_minimize": report.objective_to_minimize,
            "cost": report.cost,
            "learning_curve": report.learning_curve,
            "extra": dict(report.extra),
            "evaluation_duration": report.evaluation_duration,
            "err": None if report.err is None else str(report.err),
            "tb": report.tb,
        },
        "attempts": history,
    }
    record["metadata"]["state"] = trial.metadata.state.value
    if as_json:
        echo_json(record)
        return
    _print_trial(record)


def _pairs(title: str, values: Mapping[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in values.items():
        shown = _when(value) if name.startswith("time_") else _short(value)
        table.add_row(name, shown)
    return table


def _print_trial(record: dict[str, Any]) -> None:
    parts: list[Any] = [
        Text(f"Trial {record['id']} of run '{record['run']}'", style="bold"),
        _pairs("metadata", record["metadata"]),
        _pairs("config", record["config"]),
    ]
    report = record["report"]
    if report is None:
        parts.append(Text("No report yet."))
    else:
        parts.append(_pairs("report", {k: v for k, v in report.items() if k != "tb"}))
        if report["tb"]:
            parts += [Text("traceback", style="bold"), Text(report["tb"].rstrip())]
    if record["attempts"]:
        table = Table(title="attempts that lost their lease", title_justify="left")
        for name in ("attempt", "worker id", "started", "reason"):
            table.add_column(name)
        for attempt in record["attempts"]:
            table.add_row(
                _short(attempt.get("attempt")),
                _short(attempt.get("worker_id")),
                _when(attempt.get("time_started")),
                _short(attempt.get("reason")),
            )
        parts.append(table)
    _console().print(Group(*parts))


# --- errors ----------------------------------------------------------------


@click.command("errors")
@click.argument("run")
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def errors_command(run: str, redis_url: str | None, as_json: bool) -> None:
    """Show RUN's shared errors, newest last."""
    state = _load(run, _url(redis_url))
    errors = [
        {
            "trial_id": e.trial_id,
            "worker_id": e.worker_id,
            "err_type": e.err_type,
            "err": e.err,
            "tb": e.tb,
        }
        for e in state.lock_and_get_errors().errs
    ]
    if as_json:
        echo_json(errors)
        return
    if not errors:
        click.echo(f"Run '{run}': no shared errors.")
        return
    parts: list[Any] = [Text(f"Run '{run}': {counted(len(errors), 'shared error')}")]
    for error in errors:
        parts.append(
            Text(
                f"trial {error['trial_id']} (worker {error['worker_id']}):"
                f" {error['err_type']}: {error['err']}",
                style="bold",
            )
        )
        if error["tb"]:
            parts.append(Text(error["tb"].rstrip(), style="dim"))
    _console().print(Group(*parts))


# --- workers ---------------------------------------------------------------


def _worker_rows(state: RedisNePSState) -> list[dict[str, Any]]:
    raw = decode_hash(state.client.hgetall(state.keys.worker_info))
    current: dict[str, list[str]] = {}
    for trial in state.lock_and_get_current_evaluating_trials():
        worker_id = trial.metadata.evaluating_worker_id or ""
        current.setdefault(worker_id, []).append(trial.id)
    rows = []
    for worker_id in state.worker_ids():
        info = loads_json(raw[worker_id]) if worker_id in raw else {}
        rows.append(
            {
                "worker_id": worker_id,
                "host": info.get("host"),
                "pid": info.get("pid"),
                "started": info.get("started"),
                "last_heartbeat": info.get("last_heartbeat"),
                "evaluating": current.get(worker_id, []),
            }
        )
    return rows


@click.command("workers")
@click.argument("run")
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def workers_command(run: str, redis_url: str | None, as_json: bool) -> None:
    """Show RUN's workers: where they run, their last heartbeat (server
    clock) and the trials they are evaluating."""
    state = _load(run, _url(redis_url))
    rows = _worker_rows(state)
    if as_json:
        echo_json(rows)
        return
    now = time.time()
    columns = [
        Column("worker id"),
        Column("host", drop_order=3),
        Column("pid", drop_order=2),
        Column("started (UTC)", drop_order=1),
        Column("heartbeat"),
        Column("trial"),
    ]
    cells = []
    for row in rows:
        beat = row["last_heartbeat"]
        ago = f"{now - beat:.0f} s ago" if isinstance(beat, int | float) else "never"
        cells.append(
            [
                row["worker_id"],
                _short(row["host"]),
                _short(row["pid"]),
                _when(row["started"]),
                ago,
                ", ".join(row["evaluating"]) or "-",
            ]
        )
    _print_table(
        (columns, cells), heading=f"Run '{run}': {counted(len(rows), 'worker')}"
    )


# --- watch -----------------------------------------------------------------


@dataclass
class _View:
    """What `watch` shows, updated from the event stream."""

    run: str
    server: str  # never holds a password
    budget: int | None
    counts: dict[str, int]
    started: float = field(default_factory=time.monotonic)
    reported: int = 0
    latest: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5))

    @property
    def finished(self) -> int:
        busy = self.counts.get("pending", 0) + self.counts.get("evaluating", 0)
        return sum(self.counts.values()) - busy

    def render(self, *, rate: bool = True) -> Group:
        minutes = max(time.monotonic() - self.started, 1e-9) / 60
        progress = (
            f"{self.finished} of {self.budget}"
            f" ({100 * self.finished / self.budget:.0f} %)"
            if self.budget
            else str(self.finished)
        )
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        lines = [
            Text(f"Run '{self.run}': finished {progress}", style="bold"),
            Text(f"trials: {counts or 'none'}"),
            Text("latest results:" if self.latest else "no results yet"),
            *(Text(f"  {_result_line(result)}") for result in self.latest),
        ]
        if rate:
            lines.insert(
                2, Text(f"throughput: {self.reported / minutes:.1f} reports a minute")
            )
        return Group(*lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "server": self.server,
            "evaluation_budget": self.budget,
            "finished": self.finished,
            "counts": self.counts,
            "latest_results": list(self.latest),
        }


def _events(
    client: Any, key: str, last_id: str, block_ms: int
) -> Iterator[tuple[str, dict[str, str]]]:
    reply = client.xread({key: last_id}, block=block_ms, count=100)
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            yield eid, decode_hash(fields)


def _result(state: RedisNePSState, trial_id: str, worker_id: str) -> dict[str, Any]:
    """A reported trial as it is now (its state, if it was removed since)."""
    try:
        trial = state.lock_and_get_trial_by_id(trial_id)
    except NePSError:
        return {"trial_id": trial_id, "state": "removed", "worker_id": worker_id}
    return {
        "trial_id": trial_id,
        "state": trial.metadata.state.value,
        "objective_to_minimize": _objective(trial),
        "worker_id": worker_id or None,
    }


def _result_line(result: dict[str, Any]) -> str:
    if result["state"] == "removed":
        return f"trial {result['trial_id']}: removed"
    return (
        f"trial {result['trial_id']} {result['state']}"
        f" objective {_short(result['objective_to_minimize'])}"
        f" (worker {result['worker_id'] or '-'})"
    )


@click.command("watch")
@click.argument("run")
@_redis_option
@click.option(
    "--for",
    "for_seconds",
    type=click.FloatRange(min=0),
    help="Stop after this many seconds [default: until Ctrl-C].",
)
@click.option("--once", is_flag=True, help="Print the view once and stop.")
@click.option(
    "--json", "as_json", is_flag=True, help="With --once: print JSON for scripts."
)
@click.option(
    "--block",
    "block_ms",
    type=click.IntRange(min=10),
    default=1000,
    show_default=True,
    help="How long one XREAD BLOCK waits for events (ms).",
)
def watch_command(
    run: str,
    redis_url: str | None,
    for_seconds: float | None,
    once: bool,
    as_json: bool,
    block_ms: int,
) -> None:
    """Follow RUN live from its event stream: progress toward the budget,
    throughput and the latest results."""
    if as_json and not once:
        raise click.UsageError("--json needs --once: a live view is not one document.")
    url = _url(redis_url)
    state = _load(run, url)
    view = _View(
        run=run,
        server=redact_url(url),
        budget=evaluation_budget(state.client, state.keys),
        counts={k: int(v) for k, v in state.counts().items()},
    )
    # The latest results come first from the stream's recent past.
    recent = state.client.xrevrange(state.keys.events, count=_RECENT_EVENTS)
    for _, raw in reversed(recent):
        event = decode_hash(raw)
        if event.get("event") == "reported":
            view.latest.append(
                _result(state, event.get("trial_id", ""), event.get("worker_id", ""))
            )
    console = _console()
    if as_json:
        echo_json(view.as_json())
        return
    if once:
        console.print(view.render(rate=False))
        return

    # A blocked XREAD holds its connection for the whole block time; the
    # shared client's socket timeout would cut it short and retry, so the
    # watch has a client of its own that waits longer than it blocks.
    watcher = client_from_url(url, socket_timeout=block_ms / 1000 + 10)
    key = state.keys.events
    newest = watcher.xrevrange(key, count=1)
    last_id = newest[0][0].decode() if newest else "0-0"
    deadline = None if for_seconds is None else time.monotonic() + for_seconds
    live = console.is_terminal
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = block_ms
            if deadline is not None:
                wait = max(10, min(block_ms, int(1000 * (deadline - time.monotonic()))))
            changed = False
            for entry_id, event in _events(watcher, key, last_id, wait):
                last_id = entry_id
                changed = True
                name = event.get("event", "")
                if name == "reported":
                    view.reported += 1
                    view.latest.append(
                        _result(
                            state, event.get("trial_id", ""), event.get("worker_id", "")
                        )
                    )
                if not live:
                    # Piped output gets one line an event instead of redraws.
                    console.print(
                        f"{entry_id} {name} {event.get('trial_id', '')}"
                        f" {event.get('worker_id', '')}".rstrip()
                    )
            if changed:
                view.counts = {k: int(v) for k, v in state.counts().items()}
                if live:
                    console.clear()
                    console.print(view.render())
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()
    console.print(view.render())


# --- reset, remove, delete -------------------------------------------------


@contextlib.contextmanager
def _trial_of(run: str, trial_id: str) -> Iterator[None]:
    """A missing trial named with its run, as `show` names it."""
    try:
        yield
    except TrialNotFoundError:
        raise TrialNotFoundError(
            f"Trial '{trial_id}' not found in run '{run}'."
        ) from None


@click.command("reset")
@click.argument("run")
@click.argument("trial_id", metavar="TRIAL")
@_redis_option
def reset_command(run: str, trial_id: str, redis_url: str | None) -> None:
    """Put one trial of RUN back to pending, dropping its report and its
    shared errors; a worker evaluating it will have its report refused."""
    state = _load(run, _url(redis_url))
    with _trial_of(run, trial_id):
        state.lock_and_reset_trial_by_id(trial_id)
    click.echo(f"Run '{run}': trial {trial_id} is pending again.")


@click.command("remove")
@click.argument("run")
@click.argument("trial_id", metavar="TRIAL")
@_redis_option
def remove_command(run: str, trial_id: str, redis_url: str | None) -> None:
    """Delete one trial of RUN and its shared errors."""
    state = _load(run, _url(redis_url))
    with _trial_of(run, trial_id):
        state.lock_and_remove_trial_by_id(trial_id)
    click.echo(f"Run '{run}': trial {trial_id} removed.")


# How often `delete --force` resets the evaluating trials and tries again
# when a live worker claims a trial in between.
_FORCE_ROUNDS = 5


def _live_workers(client: Any, run: str, error: RunInUseError) -> list[str]:
    """One line for each live lease `error` names, with the worker's host
    and pid as it registered them."""
    records = decode_hash(client.hgetall(RunKeys(run).worker_info))
    lines = []
    for trial_id, worker_id, deadline in error.live:
        info = loads_json(records[worker_id]) if worker_id in records else {}
        where = f" on {info.get('host')} (pid {info.get('pid')})" if info else ""
        until = _when(deadline / 1000)
        lines.append(
            f"  worker '{worker_id or '?'}'{where} is evaluating trial"
            f" '{trial_id}', lease until {until} UTC"
        )
    if error.sampling:
        lines.append(
            "  a worker holds the optimizer lease (it is sampling); the lease"
            f" ends within {defaults.optimizer_lease_seconds():.0f} s"
        )
    return lines


def _in_use(client: Any, run: str, error: RunInUseError, *, forced: bool) -> str:
    lines = _live_workers(client, run, error)
    if error.live and not forced:
        advice = (
            "Stop them first, or wait until the lease of a worker that died"
            f" has expired; or delete now with `neps-redis delete {run} --force`"
            " (a worker still running then fails on its next write, and its"
            " result is lost)."
        )
    elif error.live:
        advice = (
            "Its workers claimed trials again as fast as they were taken from"
            " them: stop them first."
        )
    else:
        # No command takes the optimizer lease from a sampler: its new
        # trials would be stored into a run being deleted.
        advice = (
            "Try again in a few seconds, once the sampler is done; a sampler"
            " that died holds the lease until it ends."
        )
    return (
        f"Run '{run}' has live workers, so it was not deleted:\n"
        + "\n".join(lines)
        + f"\n{advice}"
    )


def _reset_evaluating(state: RedisNePSState) -> list[str]:
    """Put every trial being evaluated back to pending; their workers' leases
    end with it, and so would a report of theirs."""
    reset = []
    for trial in state.lock_and_get_current_evaluating_trials():
        try:
            state.lock_and_reset_trial_by_id(trial.id)
        except TrialNotFoundError:
            continue
        reset.append(trial.id)
    return reset


def _delete(client: Any, run: str, *, force: bool) -> int:
    """Delete the run; with `force`, take its trials from live workers
    first. Returns how many trials it held."""
    rounds = _FORCE_ROUNDS if force else 1
    for attempt in range(1, rounds + 1):
        if force:
            state = RedisNePSState.create_or_load(
                run, redis=client, load_only=True, heartbeat=False
            )
            taken = _reset_evaluating(state)
            if taken:
                click.echo(
                    f"Run '{run}': took {counted(len(taken), 'trial')} from"
                    f" live workers ({', '.join(taken)}).",
                    err=True,
                )
        try:
            return RedisNePSState.delete_run(
                run, redis=client, worker_id="neps-redis delete"
            )
        except RunInUseError as error:
            refused = error
        # A live worker may have claimed a trial again in between.
        if attempt == rounds or not refused.live:
            break
    raise RunInUseError(
        _in_use(client, run, refused, forced=force), refused.live, refused.sampling
    )


@click.command("delete")
@click.argument("run")
@_redis_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete even while workers hold leases in RUN: their trials are taken"
    " from them first, and their results are lost.",
)
def delete_command(run: str, redis_url: str | None, yes: bool, force: bool) -> None:
    """Delete RUN and every key of it, unless a worker is alive in it.

    A worker is alive while it evaluates a trial under a lease that has not
    expired (30 minutes after its last heartbeat, by default), or holds the
    optimizer lease. With --force, the trials being evaluated are put back
    to pending first, so that their leases end; a worker still running then
    fails on its next write, and its result is lost. A worker holding the
    optimizer lease still stops the deletion, for at most that lease's
    length (two minutes by default). Exit code 1 when the run does not
    exist, a worker is alive in it, or the question was answered no.
    """
    url = _url(redis_url)
    client = connect(url)
    keys = RunKeys(run)
    if not client.exists(keys.meta):
        raise click.ClickException(f"Run '{run}' not found at {redact_url(url)}.")
    trials = int(client.zcard(keys.trials))
    if not yes:
        click.confirm(
            f"Delete run '{run}' ({counted(trials, 'trial')}) at {redact_url(url)}?",
            abort=True,
        )

    # The library logs a deletion as the start of a fresh run, a warning
    # that would mislead here: this command reports the deletion itself.
    state_logger = logging.getLogger("neps_redis.state")
    level = state_logger.level
    state_logger.setLevel(logging.ERROR)
    try:
        deleted = _delete(client, run, force=force)
    finally:
        state_logger.setLevel(level)
    # The transition keeps the event stream as a record for a run that
    # starts afresh; deleting the run means that record goes too. Replies
    # kept for replays (request:<id>) expire on their own within seconds.
    client.delete(keys.events)
    click.echo(f"Run '{run}' deleted: {counted(deleted, 'trial')}.")


COMMANDS = (
    runs_command,
    trials_command,
    show_command,
    errors_command,
    workers_command,
    watch_command,
    reset_command,
    remove_command,
    delete_command,
)
