"""Runs with every kind of trial, and a reader of exported pickles, for the
export and import tests.

`build_mixed_run` fills a run with a trial in each state NePS knows
(pending, evaluating, success, failed, crashed, corrupted, external), NaN
and inf objectives, learning curves, numpy values, a continuation with a
``_rung_`` id and an error whose class cannot be rebuilt. `load_pickle`
reads a pickle written for NePS's classes into this package's classes, so
that tests check the pickles' contents without NePS installed.
"""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from neps_redis import (
    BudgetInfo,
    ImportedConfig,
    OptimizationState,
    RedisNePSState,
    SampledConfig,
    SeedSnapshot,
    Trial,
)
from neps_redis.model import MetaData, Report, State

INFO = {
    "name": "successive_halving",
    "info": {"eta": 3},
    "derived": {"fidelity": {"name": "epochs"}},
}


class ShapeMismatch(Exception):  # noqa: N818 - the name case 001 gives
    """Case 001: an error whose class cannot be rebuilt from its message."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"expected {expected}, got {got}")


TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "train.py", line 3, in evaluate\n'
    "ShapeMismatch: expected 3, got 4\n"
)


def new_run(url: Any, run: str = "mixed", **kwargs: Any) -> RedisNePSState:
    return RedisNePSState.create_or_load(
        run,
        redis=url,
        optimizer_info=INFO,
        optimizer_state=OptimizationState(
            budget=BudgetInfo(total_evaluations_to_spend=20),
            seed_snapshot=SeedSnapshot.new_capture(),
            shared_state={"rung": 0},
        ),
        **kwargs,
    )


def sample(state: RedisNePSState, *configs: SampledConfig, worker: str = "w0") -> None:
    """Store `configs` as newly sampled trials."""
    state.lock_and_sample_trial(
        lambda trials, budget_info, n=None: list(configs),
        worker_id=worker,
        n=len(configs),
    )


def finish(
    state: RedisNePSState,
    *,
    worker: str = "w0",
    report_as: str = "success",
    objective: Any = 0.5,
    cost: Any = 1.0,
    curve: Any = None,
    err: Exception | None = None,
    extra: Any = None,
) -> Trial:
    """Claim the next pending trial and report it."""
    trial = state.claim_next_pending_trial(worker_id=worker)
    assert trial is not None
    report = trial.set_complete(
        report_as=report_as,
        time_end=time.time(),
        objective_to_minimize=objective,
        cost=cost,
        learning_curve=curve,
        err=err,
        tb=TRACEBACK if err is not None else None,
        extra=extra,
        evaluation_duration=0.25,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id=worker)
    return trial


def config(i: int, **more: Any) -> dict[str, Any]:
    # Keys in sorted order, so that an import (which reads config.yaml,
    # sorted) gives back the same order.
    return {"epochs": 1, "lr": 0.1 * i, "optimizer": "adam", **more}


def build_mixed_run(state: RedisNePSState, *, numpy: bool = True) -> None:
    """Trials in every state, with the values that broke other exporters;
    without `numpy`, trial 9 holds plain values instead of numpy ones."""
    np_ = np if numpy else _Plain
    sample(
        state,
        *(SampledConfig(f"{i}_rung_0", config(i)) for i in range(1, 9)),
        SampledConfig(
            "9_rung_0",
            {"epochs": np_.int64(1), "layers": np_.int64(3), "lr": np_.float32(0.01)},
        ),
    )
    finish(state, objective=0.5, curve=[0.9, 0.7, 0.5])  # 1: success
    finish(state, report_as="failed", objective=float("nan"), cost=None)  # 2
    finish(
        state,
        report_as="crashed",
        objective=None,
        cost=None,
        err=ShapeMismatch(3, 4),
        worker="w1",
    )  # 3: crashed, case 001
    finish(state, objective=float("inf"), extra={"note": "diverged"})  # 4
    finish(state, objective=-0.25, extra={"nested": {"a": 1, "b": [1, 2]}})  # 5
    corrupted = finish(state, objective=0.75)  # 6: corrupted afterwards
    corrupted.set_corrupted()
    corrupted.token = None  # its claim ended with the report
    state.put_updated_trial(corrupted)
    state.claim_next_pending_trial(worker_id="w1")  # 7: evaluating
    state.claim_next_pending_trial(worker_id="w1")  # 8: evaluating, reset below
    finish(
        state,
        objective=np_.float64(0.125),
        cost=np_.float32(2.5),
        curve=[np_.float32(0.5), np_.float32(0.25)],
        extra={"acc": np_.float32(0.91), "confusion": np_.array([[5, 1], [0, 4]])},
    )  # 9: numpy values, case 002

    sample(state, SampledConfig("1_rung_1", config(1, epochs=3), "1_rung_0"))
    finish(state, objective=0.0625, curve=[0.5, 0.25, 0.0625])  # continuation
    sample(state, SampledConfig("5_rung_1", config(5, epochs=3), "5_rung_0"))
    state.lock_and_reset_trial_by_id("8_rung_0")  # pending again

    state.lock_and_import_trials(
        [
            ImportedConfig("ext_1", config(11), {"objective_to_minimize": 0.3}),
            ImportedConfig(
                "ext_2",
                config(12),
                {"objective_to_minimize": 0.2, "cost": 2.0, "learning_curve": [0.2]},
            ),
        ],
        worker_id="external",
    )


class _Plain:
    """Stands in for numpy in `build_mixed_run(numpy=False)`: plain values."""

    int64 = int
    float32 = float
    float64 = float

    @staticmethod
    def array(value: Any) -> Any:
        return value


def build_multi_objective_run(state: RedisNePSState) -> None:
    sample(state, *(SampledConfig(str(i), config(i)) for i in range(1, 5)))
    finish(state, objective=[0.5, 1.0])
    finish(state, objective=[0.25, 2.0])
    finish(state, objective=[float("nan"), 1.0])
    finish(state, report_as="crashed", objective=None, err=RuntimeError("boom"))


# --- reading our pickles without NePS -----------------------------------------

_OURS = {
    ("neps.state.trial", "Trial"): Trial,
    ("neps.state.trial", "MetaData"): MetaData,
    ("neps.state.trial", "Report"): Report,
    ("neps.state.trial", "State"): State,
    ("neps.state.optimizer", "OptimizationState"): OptimizationState,
    ("neps.state.optimizer", "BudgetInfo"): BudgetInfo,
    ("neps.state.seed_snapshot", "SeedSnapshot"): SeedSnapshot,
}


class _OurClasses(pickle.Unpickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.globals: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.globals.add((module, name))
        return _OURS.get((module, name)) or super().find_class(module, name)


def load_pickle(path: Path) -> tuple[Any, set[tuple[str, str]]]:
    """The pickle at `path` with NePS's classes read as ours, and every
    global it names."""
    unpickler = _OurClasses(io.BytesIO(path.read_bytes()))
    value = unpickler.load()
    return value, unpickler.globals


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (symlinks followed) by relative path."""
    root = root.resolve()
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
