"""A small but real distributed hyperparameter search, run on one machine.

`run_demo` creates a run, starts worker processes that share nothing but
the Redis URL, and shows progress until the evaluation budget is spent.
Each worker registers a worker id, then claims pending trials, trains a
small neural network (scikit-learn's `MLPClassifier` on the digits data
that ships with scikit-learn) and reports the result; when nothing is
pending it asks `RandomSearch` for a new config.

The workers are started with the "spawn" method and make their own Redis
clients: a client must never cross a fork, and a worker must never touch
another worker's directory. This module never changes a run's stored
state except through `RedisNePSState`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import multiprocessing
import random
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from neps_redis.connection import redact_url, resolve_url
from neps_redis.errors import NePSError
from neps_redis.model import (
    BudgetInfo,
    OptimizationState,
    Report,
    SampledConfig,
    SeedSnapshot,
    State,
    Trial,
)
from neps_redis.state import RedisNePSState
from neps_redis.status import RunSummary, summarize

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
# 24 evaluations of 0.1-1.5 s each keep the whole demo well under a minute
# on two cores, process start-up included.
DEFAULT_BUDGET = 24
DEFAULT_SEED = 0

OPTIMIZER_NAME = "random_search"

# What the optimizer samples from; stored with the run as the optimizer's
# info, and read back from the run by every worker, so that a worker on
# another machine samples exactly this space. Lists, not tuples: the info
# is compared with the stored JSON when a run is continued.
SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate_init": {"type": "float", "lower": 1e-4, "upper": 1e-1, "log": True},
    "alpha": {"type": "float", "lower": 1e-6, "upper": 1e-1, "log": True},
    "hidden_units": {"type": "int", "lower": 8, "upper": 128},
    "activation": {"type": "categorical", "choices": ["relu", "tanh", "logistic"]},
}

# The split and the network's initial weights are fixed, so that the
# objective depends on the hyperparameters alone.
_SPLIT_SEED = 0
_MODEL_SEED = 0
_VALIDATION_SHARE = 0.25
# Caps one evaluation at about 1.5 s on one core.
_MAX_ITER = 120
_BATCH_SIZE = 64

# How often the parent reads the counts and checks its workers.
_POLL_SECONDS = 0.25
# How long a worker process may take to exit after being asked to stop.
_STOP_SECONDS = 5.0


class BudgetSpentError(Exception):
    """The optimizer was asked for a config after the budget's last one.

    Raised inside `lock_and_sample_trial`, which then releases the optimizer
    lease and stores nothing.
    """


class WorkerFailedError(NePSError):
    """A worker process of the demo exited with an error or was killed.

    `summary` holds the run's state after every worker process had ended.
    """

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


class DemoTimeoutError(NePSError):
    """The demo's worker processes were still running at its deadline."""


# --- the optimizer ---------------------------------------------------------


def sample_config(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One config drawn from `space` with numpy's global RNG.

    The global RNG is what the state restores from the run's snapshot before
    calling the optimizer, so the same run seed gives the same configs.
    Values are plain Python numbers and strings, as the trial hash stores
    them.
    """
    config: dict[str, Any] = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "float":
            lower, upper = float(spec["lower"]), float(spec["upper"])
            if spec.get("log"):
                value = math.exp(np.random.uniform(math.log(lower), math.log(upper)))
            else:
                value = np.random.uniform(lower, upper)
            config[name] = float(value)
        elif kind == "int":
            config[name] = int(np.random.randint(spec["lower"], spec["upper"] + 1))
        elif kind == "categorical":
            choices = spec["choices"]
            config[name] = choices[int(np.random.randint(len(choices)))]
        else:
            raise ValueError(f"Parameter {name!r} has unknown type {kind!r}.")
    return config


def _integer_ids(trials: Mapping[str, Trial]) -> list[int]:
    return [int(i) for i in trials if i.isascii() and i.isdigit()]


class RandomSearch:
    """Uniform random sampling, with NePS's optimizer call signature.

    It stops at the evaluation budget (`total_evaluations_to_spend`):
    asked for a config when the run already holds that many trials, it
    raises `BudgetSpentError`. The state calls it under the optimizer
    lease, so the trials it sees are all there are and the run never holds
    more trials than the budget.
    """

    def __init__(self, space: Mapping[str, Mapping[str, Any]] = SEARCH_SPACE) -> None:
        self.space = space

    def __call__(
        self,
        trials: Mapping[str, Trial],
        budget_info: BudgetInfo | None,
        n: int | None = None,
    ) -> SampledConfig | list[SampledConfig]:
        wanted = 1 if n is None else n
        limit = None if budget_info is None else budget_info.total_evaluations_to_spend
        if limit is not None:
            left = limit - len(trials)
            if left <= 0:
                raise BudgetSpentError(
                    f"All {limit} evaluations of the budget have been sampled."
                )
            wanted = min(wanted, left)

        first = max(_integer_ids(trials), default=0) + 1
        sampled = [
            SampledConfig(id=str(first + k), config=sample_config(self.space))
            for k in range(wanted)
        ]
        return sampled[0] if n is None else sampled


# --- the objective ---------------------------------------------------------


@functools.cache
def _digits_split() -> tuple[Any, Any, Any, Any]:
    """The digits data, split and scaled once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_valid, y_train, y_valid = train_test_split(
        x, y, test_size=_VALIDATION_SHARE, random_state=_SPLIT_SEED, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_valid), y_train, y_valid


def evaluate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train the network `config` describes; 1 - validation accuracy.

    Returns NePS's result mapping: ``objective_to_minimize`` and ``extra``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_train, x_valid, y_train, y_valid = _digits_split()
    model = MLPClassifier(
        hidden_layer_sizes=(int(config["hidden_units"]),),
        activation=config["activation"],
        alpha=float(config["alpha"]),
        learning_rate_init=float(config["learning_rate_init"]),
        batch_size=_BATCH_SIZE,
        max_iter=_MAX_ITER,
        random_state=_MODEL_SEED,
    )
    # The iteration cap is deliberate; a warning per trial would be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)

    accuracy = float(model.score(x_valid, y_valid))
    return {
        "objective_to_minimize": 1.0 - accuracy,
        "extra": {
            "validation_accuracy": accuracy,
            "train_accuracy": float(model.score(x_train, y_train)),
            "iterations": int(model.n_iter_),
        },
    }


# --- a worker --------------------------------------------------------------


@dataclass(frozen=True)
class _WorkerArgs:
    """What a worker process receives; plain values only, no client."""

    redis_url: str
    run: str
    directory: str
    objective: Callable[[Mapping[str, Any]], Any]
    log_level: int


def _as_result(value: Any) -> dict[str, Any]:
    """An objective's return value as NePS's result mapping."""
    if isinstance(value, Mapping):
        return dict(value)
    return {"objective_to_minimize": float(value)}


def _evaluate(
    trial: Trial,
    *,
    worker_id: str,
    directory: Path,
    objective: Callable[[Mapping[str, Any]], Any],
) -> Report:
    """Evaluate one claimed trial and return its report; never raises for an
    error of the objective, which becomes a crashed report."""
    started = time.monotonic()
    try:
        result = _as_result(objective(trial.config))
        record = {
            "trial_id": trial.id,
            "worker_id": worker_id,
            "config": dict(trial.config),
            "result": result,
        }
        path = directory / f"trial_{trial.id}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
    except Exception as error:
        logger.warning("Trial %r crashed on worker %r: %s", trial.id, worker_id, error)
        return trial.set_complete(
            report_as="crashed",
            time_end=time.time(),
            objective_to_minimize=None,
            cost=None,
            learning_curve=None,
            err=error,
            tb=traceback.format_exc(),
            extra=None,
            evaluation_duration=time.monotonic() - started,
        )

    return trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=result["objective_to_minimize"],
        cost=result.get("cost"),
        learning_curve=result.get("learning_curve"),
        err=None,
        tb=None,
        extra=result.get("extra"),
        evaluation_duration=time.monotonic() - started,
    )


def _work(args: _WorkerArgs) -> None:
    """A worker process: claim, evaluate, report; sample when idle."""
    # Ctrl-C reaches the whole process group. scikit-learn catches the
    # KeyboardInterrupt inside `fit` and returns a half-trained model, which
    # would be reported as a real result; so workers ignore it and the parent
    # stops them instead, leaving an interrupted trial evaluating, never
    # wrongly finished.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s",
    )
    # One BLAS thread per worker: the workers are the parallelism, and four
    # workers on two cores each starting two threads would fight. The
    # limiter comes with scikit-learn; a custom objective may do without.
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)

    try:
        state = RedisNePSState.create_or_load(
            args.run, redis=args.redis_url, load_only=True
        )
        worker_id = state.lock_and_set_new_worker_id()

        # The worker's own directory, new and empty: nothing in it was
        # written by anyone else.
        directory = Path(args.directory) / worker_id
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise NePSError(f"Worker directory {directory} is not empty.")

        space = state.lock_and_get_optimizer_info()["info"]["space"]
        optimizer = RandomSearch(space)
        while True:
            trial = state.claim_next_pending_trial(worker_id=worker_id)
            if trial is not None:
                report = _evaluate(
                    trial,
                    worker_id=worker_id,
                    directory=directory,
                    objective=args.objective,
                )
                state.lock_and_report_trial_evaluation(
                    trial, report, worker_id=worker_id
                )
                continue

            try:
                state.lock_and_sample_trial(optimizer, worker_id=worker_id)
            except BudgetSpentError:
                # Another worker's sample may still be waiting to be claimed;
                # trials other workers are evaluating are theirs until their
                # lease runs out, so there is nothing else to wait for.
                if not state.counts().get(State.PENDING.value):
                    break
        logger.info("Worker %r finished in run %r.", worker_id, args.run)
    except KeyboardInterrupt:
        # Only when SIGINT is sent to this process alone: stop quietly.
        sys.exit(130)


# --- the parent ------------------------------------------------------------


def default_run_name() -> str:
    """``demo-<local date>-<time>``."""
    return time.strftime("demo-%Y%m%d-%H%M%S")


def _directory_name(run: str) -> str:
    """A run name made safe as one directory name."""
    name = re.sub(r"[^\w.-]", "_", run).lstrip(".")
    return name or "run"


def _seed_snapshot(seed: int) -> SeedSnapshot:
    """The RNG states after seeding with `seed`; the caller's own RNG states
    are left as they were."""
    saved = SeedSnapshot.new_capture()
    random.seed(seed)
    np.random.seed(seed)
    snapshot = SeedSnapshot.new_capture()
    saved.set_as_global_seed_state()
    return snapshot


def _describe_counts(counts: Mapping[str, int]) -> str:
    shown = [State.PENDING.value, State.EVALUATING.value]
    shown += [s.value for s in State if s.value not in shown and counts.get(s.value)]
    return "  ".join(f"{name} {counts.get(name, 0)}" for name in shown)


def _finished(counts: Mapping[str, int]) -> int:
    busy = counts.get(State.PENDING.value, 0) + counts.get(State.EVALUATING.value, 0)
    return sum(counts.values()) - busy


def _stop(processes: list[Any]) -> None:
    """Terminate the worker processes that still run, and reap them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(_STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()


def run_demo(
    *,
    redis_url: str | None = None,
    run: str | None = None,
    workers: int = DEFAULT_WORKERS,
    budget: int = DEFAULT_BUDGET,
    seed: int = DEFAULT_SEED,
    workdir: str | Path | None = None,
    objective: Callable[[Mapping[str, Any]], Any] = evaluate_config,
    console: Console | None = None,
    show_progress: bool = True,
    timeout: float | None = None,
) -> RunSummary:
    """Run a random search with `workers` processes until `budget` trials.

    Args:
        redis_url: Where the run lives (default: see `resolve_url`).
        run: The run's name (default `default_run_name()`). An existing run
            of the demo is continued: its stored RNG state is used, and its
            evaluation budget becomes `budget`.
        workers: Number of worker processes.
        budget: Number of trials to evaluate in all.
        seed: Seeds the run's RNG snapshot, so equal seeds sample equal
            configs under equal ids.
        workdir: Each worker writes into ``<workdir>/<run>/<worker id>/``
            (default: a new temporary directory).
        objective: Takes a config, returns the objective to minimize or
            NePS's result mapping; must be importable by the workers.
        console: Where progress is drawn (default: stderr).
        show_progress: Draw the progress bar.
        timeout: Stop the workers and raise `DemoTimeoutError` after this
            many seconds (default: no limit).

    Raises:
        WorkerFailedError: A worker process exited with an error; the
            summary is attached.
    """
    if workers < 1 or budget < 1:
        raise ValueError("workers and budget must be at least 1.")
    if objective is evaluate_config and importlib.util.find_spec("sklearn") is None:
        raise NePSError(
            "The demo trains scikit-learn models: pip install 'neps-redis[demo]'."
        )
    redis_url = resolve_url(redis_url)
    run = run or default_run_name()
    state = RedisNePSState.create_or_load(
        run,
        redis=redis_url,
        optimizer_info={"name": OPTIMIZER_NAME, "info": {"space": SEARCH_SPACE}},
        optimizer_state=OptimizationState(
            budget=BudgetInfo(total_evaluations_to_spend=budget),
            seed_snapshot=_seed_snapshot(seed),
            shared_state=None,
        ),
    )
    if state.lock_and_get_global_budgets()[0] != budget:
        state.lock_and_update_global_budgets(
            total_evaluations_to_spend=budget,
            total_cost_to_spend=None,
            total_fidelities_to_spend=None,
        )
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="neps-redis-demo-")
    directory = Path(workdir) / _directory_name(run)
    directory.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Demo run %r at %s: %d workers, budget %d, directory %r.",
        run,
        redact_url(redis_url),
        workers,
        budget,
        str(directory),
    )

    args = _WorkerArgs(
        redis_url=redis_url,
        run=run,
        directory=str(directory),
        objective=objective,
        log_level=logging.getLogger("neps_redis").getEffectiveLevel(),
    )
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_work, args=(args,), name=f"demo-worker-{i + 1}")
        for i in range(workers)
    ]
    started = time.monotonic()
    try:
        for process in processes:
            process.start()
        _watch(
            state,
            processes,
            budget=budget,
            console=console or Console(stderr=True),
            show_progress=show_progress,
            deadline=None if timeout is None else started + timeout,
        )
    finally:
        _stop(processes)
    logger.info("Demo run %r took %.1f s.", run, time.monotonic() - started)

    summary = summarize(state)
    failed = [p for p in processes if p.exitcode != 0]
    if failed:
        listing = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in failed)
        raise WorkerFailedError(
            f"{len(failed)} of {workers} worker processes of run '{run}' failed:"
            f" {listing}. Their trials in progress stay evaluating.",
            summary,
        )
    return summary


def _watch(
    state: RedisNePSState,
    processes: list[Any],
    *,
    budget: int,
    console: Console,
    show_progress: bool,
    deadline: float | None,
) -> None:
    """Show the counts until every worker process has exited.

    Waiting on the processes' sentinels, not on `join`, wakes the parent as
    soon as a worker ends, and a dead worker can never make it wait forever:
    the loop ends when no process is left alive, however they ended.
    """
    progress = Progress(
        TextColumn("[bold]trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console,
        disable=not show_progress,
    )
    told: set[str] = set()
    with progress:
        task = progress.add_task("", total=budget)
        while True:
            counts = state.counts()
            progress.update(
                task, completed=_finished(counts), description=_describe_counts(counts)
            )
            alive = [p for p in processes if p.is_alive()]
            if not alive:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise DemoTimeoutError(
                    f"{len(alive)} worker processes of run '{state.run}' were"
                    " still running at the demo's deadline; they were stopped."
                )
            for process in processes:
                if process.exitcode not in (None, 0) and process.name not in told:
                    told.add(process.name)
                    logger.error(
                        "Worker process %s exited with code %s.",
                        process.name,
                        process.exitcode,
                    )
            with contextlib.suppress(OSError):
                wait([p.sentinel for p in alive], timeout=_POLL_SECONDS)
