"""What both backends run: a typical trial, a trivial optimizer, one lifecycle.

A lifecycle is sample, claim, report, the three state steps every
evaluation in a NePS run goes through. `RedisLifecycle` does them with
`RedisNePSState`'s public methods. `NePSLifecycle` does them as NePS's own
runtime does (``DefaultWorker._get_next_trial``): NePS has no claim, so it
samples under its optimizer and trial locks, then stores the new trial
already evaluating, and the optimizer lock is released only after that
store. Both report with ``lock_and_report_trial_evaluation``.

Both backends get the same configs, ids and reports, so that they store
the same data. This module imports `neps` only inside `NePSLifecycle`, so
that a process running the neps-redis side never pays for it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_CATEGORIES = {
    "optimizer": ("adam", "adamw", "sgd", "rmsprop"),
    "activation": ("relu", "gelu", "tanh"),
}
LEARNING_CURVE_LENGTH = 5


def typical_config(trial_id: int) -> dict[str, Any]:
    """Ten hyperparameters of a small network: four floats, four ints, two
    categoricals, the same for a given id on every backend."""
    rng = random.Random(trial_id)
    return {
        "learning_rate": 10 ** rng.uniform(-5, -1),
        "weight_decay": 10 ** rng.uniform(-6, -2),
        "dropout": rng.uniform(0.0, 0.5),
        "momentum": rng.uniform(0.8, 0.99),
        "num_layers": rng.randint(1, 8),
        "hidden_size": rng.choice((64, 128, 256, 512, 1024)),
        "batch_size": rng.choice((32, 64, 128, 256)),
        "epochs": rng.randint(5, 50),
        "optimizer": rng.choice(_CATEGORIES["optimizer"]),
        "activation": rng.choice(_CATEGORIES["activation"]),
    }


def typical_result(trial_id: int) -> dict[str, Any]:
    """An objective, a cost and a short learning curve for a given id."""
    rng = random.Random(-trial_id)
    curve = sorted(rng.uniform(0.05, 1.0) for _ in range(LEARNING_CURVE_LENGTH))
    curve.reverse()
    return {
        "objective_to_minimize": curve[-1],
        "cost": rng.uniform(1.0, 100.0),
        "learning_curve": curve,
    }


def complete(trial: Any) -> Any:
    """Mark `trial` a success with its typical result; returns the report."""
    result = typical_result(int(trial.id))
    return trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=result["objective_to_minimize"],
        cost=result["cost"],
        learning_curve=result["learning_curve"],
        err=None,
        tb=None,
        extra={},
        evaluation_duration=result["cost"],
    )


class MaxPlusOne:
    """An optimizer that costs almost nothing: the next ids are the largest
    integer id plus one, the configs are `typical_config` of those ids.

    It keeps how long its last call took (`last_ns`), so that a sample's
    own cost can be told apart from the optimizer's.
    """

    def __init__(self, sampled_config: type) -> None:
        self._sampled_config = sampled_config
        self.last_ns = 0

    def __call__(
        self, trials: Mapping[str, Any], budget_info: Any, n: int | None = None
    ) -> Any:
        started = time.perf_counter_ns()
        first = max((int(i) for i in trials if i.isdigit()), default=0) + 1
        configs = [
            self._sampled_config(id=str(i), config=typical_config(i))
            for i in range(first, first + (1 if n is None else n))
        ]
        self.last_ns = time.perf_counter_ns() - started
        return configs[0] if n is None else configs


class NextIds:
    """An optimizer whose cost does not grow with the run: the ids count up
    from `start`, the configs are `typical_config` of those ids. For one
    sampling process that knows the next free id; it keeps `last_ns` as
    `MaxPlusOne` does.

    `MaxPlusOne` looks at every id, as real optimizers do, and on a run of
    100k trials that scan leaves the CPU's caches cold for the sample's own
    work that follows it: the growth probe uses this one, so that what grows
    with the run is neps-redis's own work and not that after-effect.
    """

    def __init__(self, sampled_config: type, start: int) -> None:
        self._sampled_config = sampled_config
        self.next = start
        self.last_ns = 0

    def __call__(
        self, trials: Mapping[str, Any], budget_info: Any, n: int | None = None
    ) -> Any:
        started = time.perf_counter_ns()
        count = 1 if n is None else n
        configs = [
            self._sampled_config(id=str(i), config=typical_config(i))
            for i in range(self.next, self.next + count)
        ]
        self.next += count
        self.last_ns = time.perf_counter_ns() - started
        return configs[0] if n is None else configs


def summarize(samples_ns: Iterable[int]) -> dict[str, float | int]:
    """Count, p50, p99, mean and max of durations, in microseconds."""
    values = np.asarray(list(samples_ns), dtype=np.float64) / 1000.0
    if values.size == 0:
        return {"n": 0}
    p50, p99 = np.percentile(values, [50, 99])
    return {
        "n": int(values.size),
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "mean_us": round(float(values.mean()), 1),
        "max_us": round(float(values.max()), 1),
    }


# One lifecycle's durations, in nanoseconds: the order of `STEPS`.
STEPS = ("sample", "optimizer", "claim", "report", "lifecycle")


def summarize_steps(records: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per-step statistics of lifecycle records, with the sample's own cost
    (the optimizer's time taken out) as ``sample_excl_optimizer``."""
    columns = (
        dict(zip(STEPS, zip(*records, strict=True), strict=True)) if records else {}
    )
    steps = {name: summarize(columns.get(name, ())) for name in STEPS}
    steps["sample_excl_optimizer"] = summarize(
        s - o
        for s, o in zip(
            columns.get("sample", ()), columns.get("optimizer", ()), strict=True
        )
    )
    return steps


class RedisLifecycle:
    """One worker's lifecycle on neps-redis."""

    backend = "neps-redis"

    def __init__(self, url: str, run: str, worker_id: str) -> None:
        from neps_redis import RedisNePSState, SampledConfig

        self.worker_id = worker_id
        self.optimizer = MaxPlusOne(SampledConfig)
        self.state = RedisNePSState.create_or_load(run, redis=url, load_only=True)

    @staticmethod
    def create(url: str, run: str) -> None:
        """Create the run, empty."""
        from neps_redis import OptimizationState, RedisNePSState, SeedSnapshot

        RedisNePSState.create_or_load(
            run,
            redis=url,
            optimizer_info={"name": "max_plus_one", "info": {}},
            optimizer_state=OptimizationState(
                budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
            ),
        ).close()

    def run_one(self) -> tuple[int, int, int, int, int]:
        """Sample, claim, report; returns the durations in `STEPS` order."""
        started = time.perf_counter_ns()
        self.state.lock_and_sample_trial(self.optimizer, worker_id=self.worker_id)
        sampled = time.perf_counter_ns()
        trial = self.state.claim_next_pending_trial(worker_id=self.worker_id)
        claimed = time.perf_counter_ns()
        if trial is None:
            # Every worker samples before it claims, so one is always pending.
            raise RuntimeError("No pending trial to claim right after sampling.")
        report = complete(trial)
        reporting = time.perf_counter_ns()
        self.state.lock_and_report_trial_evaluation(
            trial, report, worker_id=self.worker_id
        )
        done = time.perf_counter_ns()
        return (
            sampled - started,
            self.optimizer.last_ns,
            claimed - sampled,
            done - reporting,
            done - started,
        )

    def census(self) -> dict[str, int]:
        """Trials per state."""
        return self.state.counts()

    def close(self) -> None:
        self.state.close()


class NePSLifecycle:
    """One worker's lifecycle on NePS's file-based state, done the way
    NePS's runtime does it (see the module docstring)."""

    backend = "neps"

    def __init__(self, path: str, run: str, worker_id: str) -> None:
        from neps.optimizers.optimizer import SampledConfig
        from neps.state import NePSState, State
        from neps.utils.common import gc_disabled

        self.worker_id = worker_id
        self.optimizer = MaxPlusOne(SampledConfig)
        self.state = NePSState.create_or_load(Path(path) / run, load_only=True)
        self._pending = State.PENDING
        self._gc_disabled = gc_disabled

    @staticmethod
    def create(path: str, run: str) -> None:
        """Create the run, empty."""
        from neps.state import NePSState, OptimizationState, SeedSnapshot

        NePSState.create_or_load(
            Path(path) / run,
            optimizer_info={"name": "max_plus_one", "info": {}},
            optimizer_state=OptimizationState(
                budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
            ),
        )

    def run_one(self) -> tuple[int, int, int, int, int]:
        """Sample, claim, report; returns the durations in `STEPS` order."""
        state, worker = self.state, self.worker_id
        started = time.perf_counter_ns()
        with state._optimizer_lock.lock(worker_id=worker):
            with state._trial_lock.lock(worker_id=worker), self._gc_disabled():
                trials = state._trial_repo.latest()
                pending = [
                    t for t in trials.values() if t.metadata.state == self._pending
                ]
            if pending:
                # The runtime would claim it; here every trial is stored
                # evaluating, so a pending one means the workload is broken.
                raise RuntimeError(f"Unexpected pending trials: {len(pending)}.")
            trial = state._sample_trial(
                self.optimizer, worker_id=worker, trials=trials, n=None
            )
            sampled = time.perf_counter_ns()
            with state._trial_lock.lock(worker_id=worker), self._gc_disabled():
                trial.set_evaluating(time_started=time.time(), worker_id=worker)
                state._trial_repo.store_new_trial(trial)
        claimed = time.perf_counter_ns()
        report = complete(trial)
        reporting = time.perf_counter_ns()
        state.lock_and_report_trial_evaluation(trial, report, worker_id=worker)
        done = time.perf_counter_ns()
        return (
            sampled - started,
            self.optimizer.last_ns,
            claimed - sampled,
            done - reporting,
            done - started,
        )

    def census(self) -> dict[str, int]:
        """Trials per state."""
        counts: dict[str, int] = {}
        for trial in self.state.lock_and_read_trials().values():
            name = trial.metadata.state.value
            counts[name] = counts.get(name, 0) + 1
        return counts

    def close(self) -> None:
        """NePS's state holds no connection or thread."""


LIFECYCLES = {"neps-redis": RedisLifecycle, "neps": NePSLifecycle}
