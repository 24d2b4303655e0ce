"""NePS-shaped value types: trials, reports, optimizer state and errors.

These mirror the names, fields and field order of NePS 0.17 exactly, so that
an optimizer written for NePS accepts them and a NePS directory written from
them loads in NePS. They hold values only: nothing here talks to Redis, and
nothing imports `neps`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, NotRequired, TypedDict

import numpy as np

from neps_redis.errors import NePSError


class NotReportedYetError(NePSError):
    """The trial has no report yet."""


class State(StrEnum):
    """Where a trial is in its life."""

    EXTERNAL = "external"
    PENDING = "pending"
    EVALUATING = "evaluating"
    SUCCESS = "success"
    FAILED = "failed"
    CRASHED = "crashed"
    CORRUPTED = "corrupted"
    UNKNOWN = "unknown"


@dataclass
class MetaData:
    """Bookkeeping of a trial; the field order is the key order of metadata.json."""

    id: str
    location: str
    state: State
    previous_trial_id: str | None
    previous_trial_location: str | None

    sampling_worker_id: str
    time_sampled: float

    evaluating_worker_id: str | None = None
    evaluation_duration: float | None = None

    time_submitted: float | None = None
    time_started: float | None = None
    time_end: float | None = None

    def __eq__(self, other: object) -> bool:
        # Imported trials have a NaN time_sampled; two copies of one trial
        # must still compare equal.
        if not isinstance(other, MetaData):
            return False
        return all(
            _same_number(getattr(self, name), getattr(other, name))
            for name in self.__dataclass_fields__
        )


def _same_number(a: Any, b: Any) -> bool:
    """Equality that holds NaN equal to NaN, also inside lists (multi-objective)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(
            _same_number(x, y) for x, y in zip(a, b, strict=True)
        )
    a_nan = isinstance(a, float | np.floating) and math.isnan(a)
    b_nan = isinstance(b, float | np.floating) and math.isnan(b)
    if a_nan or b_nan:
        return a_nan and b_nan
    return bool(a == b)


@dataclass
class Report:
    """The outcome of evaluating a trial's config."""

    objective_to_minimize: float | list[float] | None
    cost: float | None
    learning_curve: list[float] | list[list[float]] | None
    extra: Mapping[str, Any]
    err: Exception | None
    tb: str | None
    reported_as: Literal["success", "failed", "crashed"]
    evaluation_duration: float | None

    def __post_init__(self) -> None:
        # An error read back from storage is only its text; NePS rebuilds it so.
        if isinstance(self.err, str):
            self.err = Exception(self.err)

    def __eq__(self, other: object) -> bool:
        # Errors compare by text (a stored error cannot be its original class),
        # and a NaN objective or cost equals NaN.
        if not isinstance(other, Report):
            return False
        for name, mine in self.__dict__.items():
            theirs = other.__dict__.get(name)
            if name == "err":
                if str(mine) != str(theirs):
                    return False
            elif name in ("objective_to_minimize", "cost"):
                if not _same_number(mine, theirs):
                    return False
            elif _contains_array(mine) or _contains_array(theirs):
                if not _deep_equal(mine, theirs):
                    return False
            elif mine != theirs:
                return False
        return True


def _contains_array(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, Mapping):
        return any(_contains_array(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains_array(v) for v in value)
    return False


def _deep_equal(a: Any, b: Any) -> bool:
    """Equality that compares numpy arrays by value instead of raising."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_deep_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


@dataclass
class Trial:
    """A config, its bookkeeping, and its report once it has one."""

    State: ClassVar = State
    Report: ClassVar = Report
    MetaData: ClassVar = MetaData
    NotReportedYetError: ClassVar = NotReportedYetError

    config: Mapping[str, Any]
    metadata: MetaData
    report: Report | None
    source: Literal["run", "ask_and_tell", "imported"] = "run"

    # The claim token of the lease this process holds on the trial. It lives
    # outside NePS's fields: it is not compared, not exported, and a trial
    # without one is reported unfenced.
    token: str | None = field(default=None, compare=False, repr=False, kw_only=True)

    @classmethod
    def new(
        cls,
        *,
        trial_id: str,
        config: Mapping[str, Any],
        location: str,
        previous_trial: str | None,
        previous_trial_location: str | None,
        time_sampled: float,
        worker_id: int | str,
    ) -> Trial:
        """A trial that was just sampled, pending evaluation."""
        return cls(
            config=config,
            metadata=MetaData(
                id=trial_id,
                location=location,
                state=State.PENDING,
                previous_trial_id=previous_trial,
                previous_trial_location=previous_trial_location,
                sampling_worker_id=str(worker_id),
                time_sampled=time_sampled,
            ),
            report=None,
        )

    @classmethod
    def load_from_dict(
        cls,
        data: list[ImportedConfig],
        *,
        worker_id: str,
        trial_directory: Path,
    ) -> list[Trial]:
        """Trials for results evaluated elsewhere, in state EXTERNAL.

        Each imported trial names the one imported before it as its previous
        trial, as NePS does.
        """
        trials: list[Trial] = []
        for imported in data:
            info = imported.result.get("info_dict") or {}
            duration = info.get("evaluation_duration")
            metadata = MetaData(
                id=imported.id,
                location=str(trial_directory / f"config_{imported.id}"),
                state=State.EXTERNAL,
                previous_trial_id=trials[-1].metadata.id if trials else None,
                previous_trial_location=None,
                sampling_worker_id=worker_id,
                time_sampled=float("nan"),
                evaluating_worker_id=worker_id,
                evaluation_duration=duration,
                time_started=info.get("time_started"),
                time_end=info.get("time_end"),
            )
            report = Report(
                objective_to_minimize=imported.result["objective_to_minimize"],
                cost=imported.result.get("cost"),
                learning_curve=imported.result.get("learning_curve"),
                extra={},
                err=None,
                tb=None,
                reported_as="success",
                evaluation_duration=duration,
            )
            trials.append(
                cls(
                    config=imported.config,
                    metadata=metadata,
                    report=report,
                    source="imported",
                )
            )
        return trials

    @property
    def id(self) -> str:
        """The trial's id."""
        return self.metadata.id

    def set_evaluating(self, *, time_started: float, worker_id: int | str) -> None:
        """Mark the trial as being evaluated by `worker_id`."""
        self.metadata.time_started = time_started
        self.metadata.evaluating_worker_id = str(worker_id)
        self.metadata.state = State.EVALUATING

    def set_complete(
        self,
        *,
        report_as: Literal["success", "failed", "crashed"],
        time_end: float,
        objective_to_minimize: float | list[float] | None,
        cost: float | None,
        learning_curve: list[float] | list[list[float]] | None,
        err: Exception | None,
        tb: str | None,
        extra: dict[str, Any] | None,
        evaluation_duration: float | None,
    ) -> Report:
        """Mark the trial finished and return its report (the caller attaches it)."""
        states = {
            "success": State.SUCCESS,
            "failed": State.FAILED,
            "crashed": State.CRASHED,
        }
        if report_as not in states:
            raise ValueError(f"Invalid report_as: '{report_as}'")

        self.metadata.state = states[report_as]
        self.metadata.time_end = time_end
        self.metadata.evaluation_duration = evaluation_duration
        return Report(
            objective_to_minimize=objective_to_minimize,
            cost=cost,
            learning_curve=learning_curve,
            extra=extra if extra is not None else {},
            err=err,
            tb=tb,
            reported_as=report_as,
            evaluation_duration=evaluation_duration,
        )

    def set_corrupted(self) -> None:
        """Mark the trial as corrupted."""
        self.metadata.state = State.CORRUPTED

    def reset(self) -> None:
        """Back to pending, forgetting everything about its evaluation."""
        old = self.metadata
        self.metadata = MetaData(
            id=old.id,
            location=old.location,
            state=State.PENDING,
            previous_trial_id=old.previous_trial_id,
            previous_trial_location=old.previous_trial_location,
            sampling_worker_id=old.sampling_worker_id,
            time_sampled=old.time_sampled,
        )


@dataclass
class BudgetInfo:
    """The budget of a run as the optimizer sees it (NePS 0.17 fields)."""

    worker_cost_to_spend: float | None = None
    used_cost_budget: float = 0.0
    worker_evaluations_to_spend: int | None = None
    used_evaluations: int = 0
    worker_fidelities_to_spend: int | float | None = None
    total_evaluations_to_spend: int | None = None
    total_cost_to_spend: float | None = None
    total_fidelities_to_spend: int | float | None = None

    def clone(self) -> BudgetInfo:
        """A copy the optimizer may change freely."""
        return replace(self)


@functools.cache
def _torch() -> Any:
    """The torch module, or None where it cannot be imported; asked once,
    since a failed import searches every path again each time."""
    try:
        import torch
    except Exception:
        return None
    return torch


@dataclass
class SeedSnapshot:
    """The global random number generators' states (random, numpy, torch)."""

    np_rng: tuple[str, np.ndarray, int, int, float]
    py_rng: tuple[int, tuple[int, ...], int | float | None]
    torch_rng: Any | None
    torch_cuda_rng: list[Any] | None

    @classmethod
    def new_capture(cls) -> SeedSnapshot:
        """The current global RNG states, copied."""
        snapshot = cls(None, None, None, None)  # type: ignore[arg-type]
        snapshot.recapture()
        return snapshot

    def recapture(self) -> None:
        """Read the global RNG states again into this snapshot."""
        self.py_rng = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        self.np_rng = (kind, keys.copy(), pos, has_gauss, cached)

        # torch is optional; without it (or with a broken install) there is
        # simply no torch state to keep.
        torch = _torch()
        if torch is None:
            return
        with contextlib.suppress(Exception):
            self.torch_rng = torch.random.get_rng_state().clone()
            self.torch_cuda_rng = (
                [s.clone() for s in torch.cuda.get_rng_state_all()]
                if torch.cuda.is_available()
                else None
            )

    def set_as_global_seed_state(self) -> None:
        """Make this snapshot the global RNG state."""
        np.random.set_state(self.np_rng)
        random.setstate(self.py_rng)
        if self.torch_rng is None and self.torch_cuda_rng is None:
            return

        import torch

        if self.torch_rng is not None:
            torch.random.set_rng_state(self.torch_rng)
        if self.torch_cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.torch_cuda_rng)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SeedSnapshot):
            return False
        if self.py_rng != other.py_rng:
            return False
        mine, theirs = self.np_rng, other.np_rng
        if (mine[0], *mine[2:]) != (theirs[0], *theirs[2:]):
            return False
        if not np.array_equal(mine[1], theirs[1]):
            return False
        if type(self.torch_rng) is not type(other.torch_rng):
            return False
        if type(self.torch_cuda_rng) is not type(other.torch_cuda_rng):
            return False
        if self.torch_rng is not None:
            import torch

            if not torch.equal(self.torch_rng, other.torch_rng):
                return False
        if self.torch_cuda_rng is not None:
            import torch

            pairs = zip(self.torch_cuda_rng, other.torch_cuda_rng, strict=False)
            if not all(torch.equal(a, b) for a, b in pairs):
                return False
        return True


@dataclass
class OptimizationState:
    """What the optimizer keeps between samples."""

    budget: BudgetInfo | None
    seed_snapshot: SeedSnapshot
    shared_state: dict[str, Any] | None
    worker_ids: list[str] | None = None


class OptimizerInfo(TypedDict):
    """The optimizer's name and settings, as NePS stores them."""

    name: str
    info: Mapping[str, Any]
    derived: NotRequired[Mapping[str, Any]]


@dataclass
class SampledConfig:
    """What an optimizer returns: a new config to evaluate."""

    id: str
    config: Mapping[str, Any]
    previous_config_id: str | None = None


@dataclass
class ImportedConfig:
    """A config with a result obtained outside the run."""

    id: str
    config: Mapping[str, Any]
    result: Mapping[str, Any]


class SerializedError(NePSError):
    """An error from another worker, known only by its type name and text."""


@dataclass
class SerializableTrialError:
    """One entry of the run's shared errors."""

    trial_id: str
    worker_id: str
    err_type: str
    err: str
    tb: str | None

    def as_raisable(self) -> SerializedError:
        """An exception that tells where the original error came from."""
        return SerializedError(
            f"An error occurred during the evaluation of a trial '{self.trial_id}'"
            f" which was evaluted by worker '{self.worker_id}'. The original error"
            " could not be deserialized but had the following information:"
            f"\n{self.err_type}: {self.err}\n\n{self.tb}"
        )


@dataclass
class ErrDump:
    """The run's shared errors, oldest first."""

    SerializableTrialError: ClassVar = SerializableTrialError

    errs: list[SerializableTrialError] = field(default_factory=list)

    def append(self, err: SerializableTrialError) -> None:
        """Add an error at the end."""
        self.errs.append(err)

    def __len__(self) -> int:
        return len(self.errs)

    def __bool__(self) -> bool:
        return bool(self.errs)

    def empty(self) -> bool:
        """True when there are no errors."""
        return not self.errs

    def latest_err_as_raisable(self) -> SerializedError | None:
        """The newest error as an exception, or None (NePS's error policy)."""
        return self.errs[-1].as_raisable() if self.errs else None
