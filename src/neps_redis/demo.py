"""A small but real distributed hyperparameter search, run on one machine.

`run_demo` creates a run, starts worker processes that share nothing but
the Redis URL, and shows progress until the evaluation budget is spent.
Each worker registers a worker id, then claims pending trials, trains a
small neural network (scikit-learn's `MLPClassifier` on the digits data
that ships with scikit-learn) and reports the result; when nothing is
pending it asks `RandomSearch` for a new config.

The same worker runs on its own, in the foreground of any machine that
reaches the server (``neps-redis worker``): `create_or_join` creates the
run or joins it, `register_worker` and `evaluate_until_spent` are the
worker, and `StopSignals` stops it cleanly on SIGINT or SIGTERM.

The workers are started with the "spawn" method and make their own Redis
clients: a client must never cross a fork, and a worker must never touch
another worker's directory. This module never changes a run's stored
state except through `RedisNePSState`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from neps_redis.connection import redact_url, resolve_url
from neps_redis.errors import (
    InvalidArgumentError,
    LeaseLostError,
    NePSError,
    OptimizerInfoMismatchError,
)
from neps_redis.model import (
    BudgetInfo,
    OptimizationState,
    OptimizerInfo,
    Report,
    SampledConfig,
    SeedSnapshot,
    State,
    Trial,
)
from neps_redis.state import RedisNePSState, optimizer_info_matches
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


# --- the run ---------------------------------------------------------------


def default_run_name() -> str:
    """``demo-<local date>-<time>``."""
    return time.strftime("demo-%Y%m%d-%H%M%S")


def _directory_name(run: str) -> str:
    """A run name made safe as one directory name."""
    name = re.sub(r"[^\w.-]", "_", run).lstrip(".")
    return name or "run"


def run_directory(workdir: str | Path, run: str) -> Path:
    """Where the workers of `run` make their own directories: one directory
    a run under `workdir`, named after it."""
    return Path(workdir) / _directory_name(run)


def _seed_snapshot(seed: int) -> SeedSnapshot:
    """The RNG states after seeding with `seed`; the caller's own RNG states
    are left as they were."""
    saved = SeedSnapshot.new_capture()
    random.seed(seed)
    np.random.seed(seed)
    snapshot = SeedSnapshot.new_capture()
    saved.set_as_global_seed_state()
    return snapshot


class NoBudgetError(NePSError):
    """The run has no evaluation budget and none was given: its workers
    would sample for ever."""


class BudgetLoweredError(InvalidArgumentError):
    """A budget below the run's was given; a run's budget is only raised.

    `budget` is the run's, `evaluated` how many trials it holds.
    """

    def __init__(self, message: str, budget: int, evaluated: int) -> None:
        super().__init__(message)
        self.budget = budget
        self.evaluated = evaluated


def _optimizer_info(seed: int | None) -> OptimizerInfo:
    # The seed is a setting of the search like the space: stored with the
    # run, it tells a joining worker which seed the run was created with.
    settings: dict[str, Any] = {"space": SEARCH_SPACE}
    if seed is not None:
        settings["seed"] = seed
    return {"name": OPTIMIZER_NAME, "info": settings}


def _join_with_its_seed(run: str, redis_url: str) -> tuple[RedisNePSState, Any]:
    """Run `run`, which exists and was created with another seed than the
    one given, or is no run of the demo at all; returns it and its seed."""
    state = RedisNePSState.create_or_load(run, redis=redis_url, load_only=True)
    stored = state.lock_and_get_optimizer_info()
    settings = dict(stored["info"] or {})
    seed = settings.pop("seed", None)
    unseeded = {"name": stored["name"], "info": settings}
    if not optimizer_info_matches(unseeded, _optimizer_info(None)):
        state.close()
        raise OptimizerInfoMismatchError(
            f"Run '{run}' exists and is not a run of the demo's random search"
            " (its optimizer or search space differ): choose another run name."
        )
    return state, seed


def create_or_join(
    run: str,
    *,
    redis_url: str | None = None,
    budget: int | None = None,
    seed: int | None = None,
    notify: Callable[[str], None] | None = None,
) -> RedisNePSState:
    """The demo's run `run`, created if it does not exist, else joined.

    Any number of workers may call this at once: the run is created by
    exactly one of them, in one atomic step, and the others join it.

    Args:
        redis_url: Where the run lives (default: see `resolve_url`).
        budget: The run's evaluation budget. None keeps the budget of a run
            that exists and gives a new one `DEFAULT_BUDGET`. A larger
            number than the run's raises the run's; a smaller one is
            refused, as other workers may count on the larger budget.
        seed: Seeds the RNG snapshot of a new run (None: `DEFAULT_SEED`),
            so equal seeds sample equal configs under equal ids. A run that
            exists keeps its own seed.
        notify: Called with one line for each change a person should hear
            of: a budget raised or set, a seed that was not used (default:
            the log, at INFO).

    Raises:
        OptimizerInfoMismatchError: (a NePSError) The run exists and is not
            a run of the demo's search.
        NoBudgetError: (a NePSError) The run exists without an evaluation
            budget (it was imported, or made by the library), and `budget`
            is None.
        BudgetLoweredError: (an InvalidArgumentError) `budget` is below the
            run's budget. Nothing was changed.
    """
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be at least 1, not {budget}.")
    if notify is None:
        notify = functools.partial(logger.info, "%s")
    redis_url = resolve_url(redis_url)
    chosen_seed = DEFAULT_SEED if seed is None else seed
    try:
        state = RedisNePSState.create_or_load(
            run,
            redis=redis_url,
            optimizer_info=_optimizer_info(chosen_seed),
            optimizer_state=OptimizationState(
                budget=BudgetInfo(total_evaluations_to_spend=budget or DEFAULT_BUDGET),
                seed_snapshot=_seed_snapshot(chosen_seed),
                shared_state=None,
            ),
        )
    except OptimizerInfoMismatchError:
        state, run_seed = _join_with_its_seed(run, redis_url)
        if seed is not None:
            notify(
                f"Run '{run}' keeps the seed it was created with ({run_seed});"
                f" seed {seed} was not used."
            )

    try:
        if "space" not in (state.lock_and_get_optimizer_info()["info"] or {}):
            # NePS's rules accept settings a run did not record; the space
            # must be there all the same: the workers sample from it.
            raise OptimizerInfoMismatchError(
                f"Run '{run}' exists and is not a run of the demo's random"
                " search (it records no search space): choose another run name."
            )
        _settle_budget(state, budget, notify)
    except BaseException:
        state.close()
        raise
    return state


def _settle_budget(
    state: RedisNePSState, budget: int | None, notify: Callable[[str], None]
) -> None:
    """Give the run `budget` if it is more than the run's; see
    `create_or_join`."""
    run = state.run
    current = state.lock_and_get_global_budgets()[0]
    if budget is None:
        if current is None:
            raise NoBudgetError(
                f"Run '{run}' has no evaluation budget, so its workers would"
                " never stop; give it one."
            )
        return
    if current is not None and budget < current:
        evaluated = sum(state.counts().values())
        raise BudgetLoweredError(
            f"Run '{run}' has an evaluation budget of {current}; a budget is"
            f" raised, never lowered, so {budget} was refused.",
            current,
            evaluated,
        )
    if budget == current:
        return

    if current is None:
        notify(f"Run '{run}': evaluation budget set to {budget}.")
    else:
        notify(f"Run '{run}': evaluation budget raised from {current} to {budget}.")
    state.lock_and_update_global_budgets(
        total_evaluations_to_spend=budget,
        total_cost_to_spend=None,
        total_fidelities_to_spend=None,
    )


# --- a worker --------------------------------------------------------------


class WorkerStopped(BaseException):
    """A stop signal (SIGINT, SIGTERM) ended a worker before the budget was
    spent.

    A BaseException, so that no evaluation can swallow it: scikit-learn's
    `fit` catches KeyboardInterrupt and returns a half-trained model, and an
    objective's own ``except Exception`` would turn a stop into a crashed
    report.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        # The trial the worker gave back to pending, if it was evaluating one.
        self.trial_id: str | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process it ended."""
        return 128 + self.signum


class StopSignals:
    """Turns stop signals into a clean stop of `evaluate_until_spent`.

    A signal during an evaluation stops it at once (`WorkerStopped` is raised
    there) and its trial goes back to pending. A signal during a step on the
    server (a claim, a report, a sample) is noted and acted on once the step
    is done, so that no reply is cut off half read. A second signal stops
    the worker wherever it is.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._evaluating = False

    def install(self, signums: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """Handle `signums` in this process (call from the main thread)."""
        for signum in signums:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        again = self.signum is not None
        self.signum = signum
        if self._evaluating or again:
            raise WorkerStopped(signum)

    def check(self) -> None:
        """Raise `WorkerStopped` if a stop signal has arrived."""
        if self.signum is not None:
            raise WorkerStopped(self.signum)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Inside, a stop signal raises `WorkerStopped` at once."""
        self.check()
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False


def limit_blas_threads() -> None:
    """One BLAS thread in this process.

    The workers are the parallelism: four workers on two cores each
    starting two threads would fight. The limiter comes with scikit-learn;
    a custom objective may do without.
    """
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)


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


def _give_back(state: RedisNePSState, trial: Trial, worker_id: str) -> bool:
    """Put a trial this worker stopped evaluating back to pending now, not
    when its lease runs out (30 minutes by default).

    The write is fenced by the trial's claim token: a trial no longer held
    under it (requeued and claimed by another worker meanwhile) is left
    alone, and False returned.
    """
    metadata = dataclasses.replace(
        trial.metadata,
        state=State.PENDING,
        evaluating_worker_id=None,
        evaluation_duration=None,
        time_submitted=None,
        time_started=None,
        time_end=None,
    )
    pending = dataclasses.replace(trial, metadata=metadata, report=None)
    try:
        state.put_updated_trial(pending)
    except LeaseLostError:
        return False
    logger.info(
        "Worker %r gave trial %r of run %r back to pending.",
        worker_id,
        trial.id,
        state.run,
    )
    return True


def register_worker(state: RedisNePSState, directory: str | Path) -> tuple[str, Path]:
    """Register a new worker in `state`'s run; returns its worker id and its
    own directory, ``<directory>/<worker id>``, new and empty.

    Raises:
        NePSError: The worker's directory exists and holds files.
    """
    worker_id = state.lock_and_set_new_worker_id()
    # Nothing in a worker's directory was written by anyone else.
    own = Path(directory) / worker_id
    own.mkdir(parents=True, exist_ok=True)
    if any(own.iterdir()):
        raise NePSError(
            f"Worker directory {own} is not empty; give the worker a workdir of"
            " its own."
        )
    return worker_id, own


def evaluate_until_spent(
    state: RedisNePSState,
    *,
    worker_id: str,
    directory: Path,
    objective: Callable[[Mapping[str, Any]], Any] = evaluate_config,
    stop: StopSignals | None = None,
    on_report: Callable[[Trial, Report], None] | None = None,
) -> None:
    """Claim, evaluate and report the run's trials as `worker_id`, asking
    `RandomSearch` for a new config when none is pending, until the run's
    budget is spent.

    Returns once the optimizer has sampled the whole budget and nothing is
    pending: trials other workers are evaluating are theirs until their
    lease runs out. `on_report` is called after each report is stored.

    Raises:
        NoBudgetError: The run has no evaluation budget.
        WorkerStopped: `stop` caught a signal. A trial this worker was
            evaluating went back to pending.
    """
    if state.lock_and_get_global_budgets()[0] is None:
        raise NoBudgetError(
            f"Run '{state.run}' has no evaluation budget, so its workers would"
            " never stop; give it one."
        )
    stop = stop or StopSignals()
    optimizer = RandomSearch(state.lock_and_get_optimizer_info()["info"]["space"])
    while True:
        stop.check()
        trial = state.claim_next_pending_trial(worker_id=worker_id)
        if trial is not None:
            try:
                with stop.evaluating():
                    report = _evaluate(
                        trial,
                        worker_id=worker_id,
                        directory=directory,
                        objective=objective,
                    )
            except WorkerStopped as stopped:
                if _give_back(state, trial, worker_id):
                    stopped.trial_id = trial.id
                raise
            try:
                state.lock_and_report_trial_evaluation(
                    trial, report, worker_id=worker_id
                )
            except LeaseLostError:
                # The trial was requeued while this worker evaluated it; the
                # state has logged it, and another worker evaluates it again.
                continue
            if on_report is not None:
                on_report(trial, report)
            continue

        try:
            state.lock_and_sample_trial(optimizer, worker_id=worker_id)
        except BudgetSpentError:
            # Another worker's sample may still be waiting to be claimed.
            if not state.counts().get(State.PENDING.value):
                return


# --- the demo's worker processes -------------------------------------------


@dataclass(frozen=True)
class _WorkerArgs:
    """What a worker process receives; plain values only, no client."""

    redis_url: str
    run: str
    directory: str
    objective: Callable[[Mapping[str, Any]], Any]
    log_level: int


def _work(args: _WorkerArgs) -> None:
    """A worker process: claim, evaluate, report; sample when idle."""
    # Ctrl-C reaches the whole process group, and the parent answers it by
    # stopping its workers with SIGTERM. A worker heeding both would take
    # the parent's SIGTERM for a second signal and stop before giving its
    # trial back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = StopSignals()
    stop.install((signal.SIGTERM,))
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s",
    )
    limit_blas_threads()

    state = RedisNePSState.create_or_load(
        args.run, redis=args.redis_url, load_only=True
    )
    try:
        worker_id, directory = register_worker(state, args.directory)
        evaluate_until_spent(
            state,
            worker_id=worker_id,
            directory=directory,
            objective=args.objective,
            stop=stop,
        )
    except WorkerStopped as stopped:
        sys.exit(stopped.exit_code)
    finally:
        state.close()
    logger.info("Worker %r finished in run %r.", worker_id, args.run)


# --- the parent ------------------------------------------------------------


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
    budget: int | None = None,
    seed: int | None = None,
    workdir: str | Path | None = None,
    objective: Callable[[Mapping[str, Any]], Any] = evaluate_config,
    console: Console | None = None,
    show_progress: bool = True,
    timeout: float | None = None,
    notify: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run a random search with `workers` processes until the run's budget
    of trials.

    Args:
        redis_url: Where the run lives (default: see `resolve_url`).
        run: The run's name (default `default_run_name()`). An existing run
            of the demo is continued: its stored RNG state is used.
        workers: Number of worker processes.
        budget: Number of trials to evaluate in all; as for
            `create_or_join` (None: the run's, `DEFAULT_BUDGET` for a new
            run; a run's budget is raised, never lowered).
        seed: Seeds a new run's RNG snapshot (None: `DEFAULT_SEED`), so
            equal seeds sample equal configs under equal ids.
        workdir: Each worker writes into ``<workdir>/<run>/<worker id>/``
            (default: a new temporary directory).
        objective: Takes a config, returns the objective to minimize or
            NePS's result mapping; must be importable by the workers.
        console: Where progress is drawn (default: stderr).
        show_progress: Draw the progress bar.
        timeout: Stop the workers and raise `DemoTimeoutError` after this
            many seconds (default: no limit).
        notify: As for `create_or_join`.

    Raises:
        WorkerFailedError: A worker process exited with an error; the
            summary is attached.
    """
    if workers < 1 or (budget is not None and budget < 1):
        raise ValueError("workers and budget must be at least 1.")
    if objective is evaluate_config and importlib.util.find_spec("sklearn") is None:
        raise NePSError(
            "The demo trains scikit-learn models: pip install 'neps-redis[demo]'."
        )
    redis_url = resolve_url(redis_url)
    run = run or default_run_name()
    state = create_or_join(
        run, redis_url=redis_url, budget=budget, seed=seed, notify=notify
    )
    budget = state.lock_and_get_global_budgets()[0] or DEFAULT_BUDGET
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="neps-redis-demo-")
    directory = run_directory(workdir, run)
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
                were = (
                    "worker process was" if len(alive) == 1 else "worker processes were"
                )
                raise DemoTimeoutError(
                    f"{len(alive)} {were} of run '{state.run}' still running at"
                    " the demo's deadline, and stopped."
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
