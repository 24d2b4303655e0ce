"""The ``neps-redis`` command: the demo and its worker, a run's status, the
embedded server.

Errors a person can fix (no server, no such run) end the command with one
readable line and exit code 1, a refused argument (a bad URL, run name or
budget) with exit code 2; ``--debug`` shows the traceback instead. No
output of this module ever holds a password: every URL shown goes through
`redact_url`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from neps_redis import __version__, defaults
from neps_redis.check import inspect_run
from neps_redis.cli_acl import acl_command
from neps_redis.cli_export import _redis_option, export_command, import_command
from neps_redis.cli_output import (
    URL_META,
    Column,
    authentication_failed,
    click_error,
    counted,
    echo_json,
    fitted_table,
    plain_warnings,
)
from neps_redis.cli_runs import COMMANDS as RUN_COMMANDS
from neps_redis.cli_runs import _short
from neps_redis.connection import (
    URL_ENV,
    client_from_url,
    redact_url,
    resolve_url,
    tls_failure,
)
from neps_redis.demo import (
    DEFAULT_BUDGET,
    DEFAULT_SEED,
    DEFAULT_WORKERS,
    BudgetLoweredError,
    NoBudgetError,
    StopSignals,
    WorkerFailedError,
    WorkerStopped,
    create_or_join,
    default_run_name,
    evaluate_until_spent,
    limit_blas_threads,
    register_worker,
    run_demo,
    run_directory,
)
from neps_redis.errors import InvalidArgumentError, NePSError
from neps_redis.model import Report, State, Trial
from neps_redis.server import EmbeddedServer
from neps_redis.state import RedisNePSState
from neps_redis.status import RunSummary, summarize

logger = logging.getLogger(__name__)

# A mistyped URL should fail at once, not after the client's retries.
_PROBE_TIMEOUT = 2.0

# How long `worker` waits for a server that does not answer yet, by
# default: a job's tasks may start before its server is up. The pause
# between tries is short because a refused connection fails at once.
DEFAULT_SERVER_WAIT = 60.0
_SERVER_WAIT_PAUSE = 0.5


@dataclass
class _Settings:
    """The global options, and the URL a command settled on."""

    redis_url: str | None
    debug: bool
    url: str | None = None


class _Cli(click.Group):
    """Turns the errors a person can act on into one line and exit code 1
    (2 for a refused argument: a bad URL, run name or budget), and warnings
    into one ``warning:`` line each."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with plain_warnings():
                return super().invoke(ctx)
        except (NePSError, RedisError) as error:
            settings = ctx.find_object(_Settings)
            if settings is None or settings.debug:
                raise
            # The URL the command settled on: its own --redis, else the
            # group's, else the default order.
            url = settings.url or ctx.meta.get(URL_META)
            url = url or resolve_url(settings.redis_url)
            raise click_error(error, url) from None


def _probe(url: str) -> None:
    """Raise the client's ConnectionError at once if nothing answers at `url`."""
    client = client_from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=_PROBE_TIMEOUT,
        socket_timeout=_PROBE_TIMEOUT,
    )
    try:
        client.ping()
    finally:
        client.close()


def _answers(url: str) -> bool:
    try:
        _probe(url)
    except RedisError:
        return False
    return True


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    envvar=URL_ENV,
    show_envvar=True,
    help=(
        "The Redis server of the runs. Default: the embedded server if it runs,"
        f" else {defaults.FALLBACK_URL}."
    ),
)
@click.option("--debug", is_flag=True, help="Show debug logs and full tracebacks.")
@click.version_option(__version__, "--version", prog_name="neps-redis")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, debug: bool) -> None:
    """NePS's shared optimization state in Redis."""
    ctx.obj = _Settings(redis_url=redis_url or None, debug=debug)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if debug:
        logging.getLogger("neps_redis").setLevel(logging.DEBUG)


def _redis_here(command: Any) -> Any:
    """Let a command take ``--redis`` after its name as well as before it;
    the one given after wins."""

    @functools.wraps(command)
    def wrapper(*args: Any, redis_url: str | None = None, **kwargs: Any) -> Any:
        context = click.get_current_context()
        if context.get_parameter_source("redis_url") == ParameterSource.COMMANDLINE:
            context.find_object(_Settings).redis_url = redis_url
        return command(*args, **kwargs)

    return _redis_option(wrapper)


# --- demo ------------------------------------------------------------------


_seed_option = click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    help=(
        "Seed of a new run's random number generators; a run that exists"
        f" keeps its own. [default: {DEFAULT_SEED}]"
    ),
)


def _notice(message: str) -> None:
    click.echo(message, err=True)


@contextlib.contextmanager
def _budget_refusals(run: str, budget: int | None) -> Iterator[None]:
    """The demo's budget errors, said in the command line's words."""
    try:
        yield
    except NoBudgetError:
        raise NePSError(
            f"Run '{run}' has no evaluation budget (it was imported, or made by"
            " the library), so its workers would never stop: give one with"
            " --budget N."
        ) from None
    except BudgetLoweredError as error:
        raise InvalidArgumentError(
            f"Run '{run}' has an evaluation budget of {error.budget} and holds"
            f" {counted(error.evaluated, 'trial')}; --budget {budget} would lower"
            f" it, and a run's budget is only ever raised: give --budget"
            f" {error.budget} or more, or leave --budget out."
        ) from None


def _server_for_demo(settings: _Settings) -> str:
    """The URL the demo uses; starts the embedded server if nothing else is
    configured or answering."""
    if settings.redis_url:
        return settings.redis_url

    url = resolve_url()
    embedded = EmbeddedServer()
    if url != defaults.FALLBACK_URL:
        click.echo(
            f"Using the embedded server at {url} (data in {embedded.data_dir}).",
            err=True,
        )
        return url
    if _answers(url):
        click.echo(
            f"Using the server at {url}; the run's data lives in that server.",
            err=True,
        )
        return url

    url = embedded.start()
    click.echo(
        f"Started the embedded server at {url} (data in {embedded.data_dir});"
        " stop it with `neps-redis server stop`.",
        err=True,
    )
    return url


@main.command()
@_redis_here
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Worker processes.",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    help=(
        "Trials to evaluate in all; more than an existing run's budget raises"
        " it, less is refused."
        f" [default: {DEFAULT_BUDGET} for a new run, else the run's]"
    ),
)
@click.option("--run", "run", metavar="NAME", help="Run name [default: demo-<time>].")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the workers' directories go [default: a new temporary directory].",
)
@_seed_option
@click.pass_obj
def demo(
    settings: _Settings,
    workers: int,
    budget: int | None,
    run: str | None,
    workdir: Path | None,
    seed: int | None,
) -> None:
    """Tune a small neural network with WORKERS processes sharing one run.

    Each worker is a separate process with its own directory; they share
    nothing but the Redis server. An existing run of the same name is
    continued.
    """
    settings.url = _server_for_demo(settings)
    _probe(settings.url)
    run = run or default_run_name()
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="neps-redis-demo-"))
    click.echo(
        f"Run '{run}': {counted(workers, 'worker')}; worker directories in {workdir}.",
        err=True,
    )

    try:
        with _budget_refusals(run, budget):
            summary = run_demo(
                redis_url=settings.url,
                run=run,
                workers=workers,
                budget=budget,
                seed=seed,
                workdir=workdir,
                console=Console(stderr=True),
                notify=_notice,
            )
    except WorkerFailedError as error:
        _print_summary(error.summary)
        raise
    _print_summary(summary)


# --- worker ----------------------------------------------------------------


@main.command()
@_redis_here
@click.argument("run")
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    help=(
        "The run's evaluation budget, for all its workers together; more than"
        " the budget of a run that exists raises it, less is refused."
        f" [default: {DEFAULT_BUDGET} for a new run, else the run's]"
    ),
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the worker's directory goes [default: a new temporary directory].",
)
@_seed_option
@click.option(
    "--wait-for-server",
    "wait_seconds",
    type=click.FloatRange(min=0),
    default=DEFAULT_SERVER_WAIT,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the server to answer before giving up.",
)
@click.pass_obj
def worker(
    settings: _Settings,
    run: str,
    budget: int | None,
    workdir: Path | None,
    seed: int | None,
    wait_seconds: float,
) -> None:
    """Be one worker of the demo's search in RUN, until its budget is spent.

    RUN is created if it does not exist and joined if it does, so any number
    of workers may start at once, on any machine that reaches the server.
    A worker started before its server waits for it (--wait-for-server).
    Prints a line per trial it evaluated, then what it did. Ctrl-C
    or SIGTERM stops it; the trial it was evaluating goes back to pending.
    Exit code 0 when the budget is spent, 1 when the run has no budget and
    none is given, 2 when --budget is below the run's, 130 or 143 when
    stopped by Ctrl-C or SIGTERM.
    """
    stop = StopSignals()
    stop.install()
    try:
        with contextlib.ExitStack() as scratch:
            if workdir is None:
                # Its trials' files are of no use once the worker is done.
                workdir = Path(
                    scratch.enter_context(
                        tempfile.TemporaryDirectory(prefix="neps-redis-worker-")
                    )
                )
            _work_in_foreground(
                settings, run, budget, workdir, seed, stop, wait_seconds=wait_seconds
            )
    except WorkerStopped as stopped:
        click.get_current_context().exit(stopped.exit_code)


def _work_in_foreground(
    settings: _Settings,
    run: str,
    budget: int | None,
    workdir: Path,
    seed: int | None,
    stop: StopSignals,
    *,
    wait_seconds: float,
) -> None:
    if importlib.util.find_spec("sklearn") is None:
        raise NePSError(
            "The demo's worker trains scikit-learn models: pip install"
            " 'neps-redis[demo]'."
        )
    # Never the embedded server by default, as the demo would start: a
    # worker with no URL set on a cluster node would search alone.
    settings.url = resolve_url(settings.redis_url)
    _wait_for_server(settings.url, wait_seconds)
    limit_blas_threads()

    with _budget_refusals(run, budget):
        state = create_or_join(
            run, redis_url=settings.url, budget=budget, seed=seed, notify=_notice
        )
    with state:
        worker_id, directory = register_worker(state, run_directory(workdir, run))
        click.echo(
            f"Run '{run}' at {redact_url(settings.url)}: worker {worker_id},"
            f" budget {state.lock_and_get_global_budgets()[0]}; directory"
            f" {directory}.",
            err=True,
        )
        evaluated: Counter[str] = Counter()

        def echo_report(trial: Trial, report: Report) -> None:
            evaluated[report.reported_as] += 1
            seconds = report.evaluation_duration or 0.0
            click.echo(
                f"trial {trial.id} {report.reported_as} objective"
                f" {_short(report.objective_to_minimize)}"
                f" (worker {worker_id}, {seconds:.1f} s)"
            )

        try:
            evaluate_until_spent(
                state,
                worker_id=worker_id,
                directory=directory,
                stop=stop,
                on_report=echo_report,
            )
        except WorkerStopped as stopped:
            given_back = ""
            if stopped.trial_id is not None:
                given_back = f"; trial {stopped.trial_id} went back to pending"
            click.echo(f"Worker {worker_id}: {stopped}{given_back}.", err=True)
            _echo_worker_summary(state, worker_id, evaluated)
            raise
        _echo_worker_summary(state, worker_id, evaluated)


def _wait_for_server(url: str, seconds: float) -> None:
    """Return once the server at `url` answers, trying for `seconds`: the
    tasks of a job often start before its server. A refused password or
    certificate, or a server still silent at the end, raises the error."""
    deadline = time.monotonic() + seconds
    waiting = False
    while True:
        try:
            _probe(url)
            return
        except (RedisConnectionError, RedisTimeoutError) as error:
            refused = authentication_failed(error) or tls_failure(error, "") is not None
            if refused or time.monotonic() >= deadline:
                raise
            if not waiting:
                waiting = True
                click.echo(
                    f"The Redis server at {redact_url(url)} does not answer yet;"
                    f" waiting up to {seconds:g} s for it.",
                    err=True,
                )
        time.sleep(max(0.0, min(_SERVER_WAIT_PAUSE, deadline - time.monotonic())))


def _echo_worker_summary(
    state: RedisNePSState, worker_id: str, evaluated: Counter[str]
) -> None:
    done = ", ".join(f"{count} {name}" for name, count in evaluated.items())
    summary = summarize(state)
    # Other workers may still be evaluating the last trials of the budget.
    others = summary.counts[State.EVALUATING.value]
    budget = summary.evaluation_budget
    of_budget = f" of {budget}" if budget is not None else ""
    click.echo(
        f"Worker {worker_id} evaluated {counted(evaluated.total(), 'trial')}"
        f"{f' ({done})' if done else ''}. Run '{state.run}': finished"
        f" {summary.finished}{of_budget}"
        f"{f', {others} evaluating' if others else ''}."
    )


# --- status ----------------------------------------------------------------


_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts."
)


@main.command()
@_redis_here
@click.argument("run")
@_json_option
@click.pass_obj
def status(settings: _Settings, run: str, as_json: bool) -> None:
    """Show RUN's trials by state, its best trial, and what each worker did."""
    settings.url = resolve_url(settings.redis_url)
    _probe(settings.url)
    state = RedisNePSState.create_or_load(run, redis=settings.url, load_only=True)
    summary = summarize(state)
    if as_json:
        echo_json(_summary_record(summary))
        return
    _print_summary(summary)


def _summary_record(summary: RunSummary) -> dict[str, Any]:
    record = dataclasses.asdict(summary)
    record["server"] = redact_url(summary.server)
    record["finished"] = summary.finished
    for worker, shown in zip(summary.workers, record["workers"], strict=True):
        shown["evaluated_total"] = worker.evaluated_total
    return record


def _heading(text: str) -> Text:
    # Headings are lines of their own: a table's title would wrap at the
    # table's width, and a server path is wider than a small table.
    return Text(text, style="bold")


def _counts_table(summary: RunSummary) -> Table:
    table = Table(show_footer=True)
    table.add_column("state", footer="total")
    table.add_column("trials", justify="right", footer=str(summary.total))
    for name, count in summary.counts.items():
        table.add_row(name, str(count), style=None if count else "dim")
    return table


def _best(summary: RunSummary) -> list[Any]:
    if summary.multi_objective:
        return [Text("Multi-objective run: there is no single best trial.")]
    if summary.best_trial_id is None or summary.best_config is None:
        return [Text("No successful trial with an objective yet.")]

    heading = _heading(
        f"Best trial {summary.best_trial_id}:"
        f" objective_to_minimize {summary.best_objective!r}"
    )
    table = Table()
    table.add_column("parameter")
    table.add_column("value", justify="right", overflow="fold")
    for name, value in summary.best_config.items():
        table.add_row(name, repr(value) if isinstance(value, float) else str(value))
    return [heading, table]


def _workers_table(summary: RunSummary, console: Console) -> Table:
    states = [State.EVALUATING.value, State.SUCCESS.value]
    states += [
        s.value
        for s in State
        if s.value not in states
        and any(w.evaluated.get(s.value) for w in summary.workers)
    ]
    columns = [
        Column("worker id"),
        Column("sampled", justify="right"),
        Column("evaluated", justify="right"),
        *(Column(name, justify="right") for name in states),
    ]
    rows = [
        [
            worker.worker_id,
            str(worker.sampled),
            str(worker.evaluated_total),
            *(str(worker.evaluated.get(name, 0)) for name in states),
        ]
        for worker in summary.workers
    ]
    # Too narrow for a column a state: what each worker left, as text.
    narrow = [
        Column("worker id"),
        Column("sampled", justify="right"),
        Column("evaluated", justify="right"),
        Column("evaluated trials by state"),
    ]
    narrow_rows = [
        [
            *row[:3],
            ", ".join(
                f"{name} {worker.evaluated[name]}"
                for name in states
                if worker.evaluated.get(name)
            )
            or "-",
        ]
        for row, worker in zip(rows, summary.workers, strict=True)
    ]
    table, _ = fitted_table(console, (columns, rows), (narrow, narrow_rows))
    return table


def _print_summary(summary: RunSummary) -> None:
    budget = summary.evaluation_budget
    progress = f"{summary.finished} of {budget}" if budget else str(summary.finished)
    # "1 of 10 trials", but "1 trial".
    noun = "trials" if budget or summary.finished != 1 else "trial"
    used = f"Finished {progress} {noun}."
    if budget:
        used += f" Evaluation budget used: {100 * summary.finished / budget:.0f} %."
    if summary.cost_budget:
        used += (
            f" Cost used: {summary.cost_used:.6g} of {summary.cost_budget:.6g}"
            f" ({100 * summary.cost_used / summary.cost_budget:.0f} %)."
        )
    console = Console(highlight=False)
    lines: list[Any] = [
        _heading(f"Run '{summary.run}' at {redact_url(summary.server)}"),
        _counts_table(summary),
        Text(used),
        Text(""),
        *_best(summary),
        Text(""),
        _heading(
            f"Workers: {summary.registered_workers} registered,"
            f" {counted(summary.shared_errors, 'shared error')}"
        ),
        _workers_table(summary, console),
    ]
    if summary.recent_errors:
        latest = counted(len(summary.recent_errors), "shared error")
        lines.append(_heading(f"Latest {latest}"))
        lines += [Text(f"  {line}") for line in summary.recent_errors]
    console.print(Group(*lines))


# --- check and reap --------------------------------------------------------


@main.command()
@_redis_here
@click.argument("run")
@_json_option
@click.pass_obj
def check(settings: _Settings, run: str, as_json: bool) -> None:
    """Check that RUN's keys agree with each other (indexes, counts, leases,
    sequence numbers, events); exit 1 naming every violation."""
    settings.url = resolve_url(settings.redis_url)
    _probe(settings.url)
    client = client_from_url(settings.url)
    try:
        result = inspect_run(client, run)
    finally:
        client.close()
    if as_json:
        echo_json(
            {
                "run": run,
                "server": redact_url(settings.url),
                "ok": result.ok,
                "trials": result.trials,
                "violations": [dataclasses.asdict(v) for v in result.violations],
                "notes": [dataclasses.asdict(n) for n in result.notes],
            }
        )
    else:
        for note in result.notes:
            click.echo(f"note: {note}")
        for violation in result.violations:
            click.echo(f"violation: {violation}")
    if not result.ok:
        raise click.ClickException(
            f"Run '{run}': {counted(len(result.violations), 'violation')} of its"
            " invariants."
        )
    if not as_json:
        click.echo(f"Run '{run}': {counted(result.trials, 'trial')}, no violations.")


@main.command()
@_redis_here
@click.argument("run")
@click.pass_obj
def reap(settings: _Settings, run: str) -> None:
    """Requeue RUN's trials whose lease expired (their worker died), now; a
    trial out of attempts is marked crashed. Prints what became of each."""
    settings.url = resolve_url(settings.redis_url)
    _probe(settings.url)
    state = RedisNePSState.create_or_load(
        run, redis=settings.url, load_only=True, heartbeat=False
    )
    swept = state.requeue_expired()
    if not swept:
        click.echo(f"Run '{run}': no trial's lease has expired.")
    for trial_id, outcome in swept:
        history = state.attempt_history(trial_id)
        lost = history[-1] if history else {}
        click.echo(
            f"trial {trial_id}: {outcome} (worker {lost.get('worker_id')!r} lost"
            f" it on attempt {lost.get('attempt')})"
        )


# --- the embedded server ---------------------------------------------------


@main.group()
def server() -> None:
    """Start, stop and inspect this user's embedded server (unix socket only)."""


@server.command("start")
def server_start() -> None:
    """Start the embedded server unless it runs already; print its URL."""
    embedded = EmbeddedServer()
    was_running = embedded.is_running()
    url = embedded.start()
    verb = "Already running" if was_running else "Started"
    click.echo(f"{verb}: {url} (data in {embedded.data_dir})")


@server.command("stop")
def server_stop() -> None:
    """Stop the embedded server; its data is saved and kept."""
    embedded = EmbeddedServer()
    if not embedded.is_running():
        click.echo(f"The embedded server in {embedded.home} is not running.")
        return
    embedded.stop()
    click.echo(f"Stopped the embedded server in {embedded.home}.")


@server.command("status")
def server_status() -> None:
    """Show whether the embedded server runs, where, and how big its data
    is; exit code 1 when it is not running, as for `server url`."""
    info = EmbeddedServer().status()
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in info.items():
        shown = ("yes" if value else "no") if isinstance(value, bool) else value
        table.add_row(name, "-" if shown is None else str(shown))
    Console(highlight=False).print(table)
    if not info["running"]:
        click.get_current_context().exit(1)


@server.command("url")
def server_url() -> None:
    """Print the embedded server's URL (for NEPS_REDIS_URL on this machine)."""
    embedded = EmbeddedServer()
    if not embedded.is_running():
        raise click.ClickException(
            f"The embedded server in {embedded.home} is not running; start it"
            " with `neps-redis server start`."
        )
    click.echo(embedded.url)


# Commands that live beside the concept they serve.
main.add_command(export_command)
main.add_command(import_command)
main.add_command(acl_command)
for _command in RUN_COMMANDS:
    main.add_command(_command)
