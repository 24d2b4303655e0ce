"""A run's summary: counts by state, the best trial, and who did what.

`summarize` reads a run through `RedisNePSState` and returns plain values;
the CLI turns them into tables. This module never prints and never writes
to Redis.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from neps_redis.model import State, Trial
from neps_redis.state import RedisNePSState

# The states a trial can end in once a worker has evaluated it; evaluating
# is listed too, so that a worker's trial in progress is visible.
EVALUATED_STATES = (
    State.EVALUATING,
    State.SUCCESS,
    State.FAILED,
    State.CRASHED,
    State.CORRUPTED,
    State.UNKNOWN,
)


@dataclass(frozen=True)
class WorkerSummary:
    """What one worker id did in a run."""

    worker_id: str
    registered: bool
    sampled: int
    evaluated: Mapping[str, int]  # state -> trials, for the states it left them in

    @property
    def evaluated_total(self) -> int:
        return sum(self.evaluated.values())


@dataclass(frozen=True)
class RunSummary:
    """A snapshot of one run, for people."""

    run: str
    server: str  # never holds a password
    counts: Mapping[str, int]  # every state, zeros included, in State's order
    total: int
    evaluation_budget: int | None
    best_trial_id: str | None
    best_objective: float | None
    best_config: Mapping[str, Any] | None
    multi_objective: bool
    workers: list[WorkerSummary] = field(default_factory=list)
    shared_errors: int = 0
    registered_workers: int = 0
    cost_budget: float | None = None
    cost_used: float = 0.0
    # The newest shared errors, oldest first, as "trial <id>: <type>: <text>".
    recent_errors: list[str] = field(default_factory=list)

    @property
    def finished(self) -> int:
        """Trials that are neither pending nor evaluating."""
        busy = self.counts[State.PENDING.value] + self.counts[State.EVALUATING.value]
        return self.total - busy


def _single_objective(trial: Trial) -> float | None:
    """The trial's objective if it can compete for best, else None."""
    report = trial.report
    if report is None or report.reported_as != "success":
        return None
    value = report.objective_to_minimize
    if value is None or isinstance(value, list | tuple | str | bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        # An objective that is not a number cannot be ranked; it must not
        # stop the summary of every other trial.
        return None
    return None if math.isnan(value) else value


def _is_multi_objective(trials: Mapping[str, Trial]) -> bool:
    return any(
        t.report is not None and isinstance(t.report.objective_to_minimize, list)
        for t in trials.values()
    )


def _workers(trials: Mapping[str, Trial], registered: list[str]) -> list[WorkerSummary]:
    sampled = Counter(t.metadata.sampling_worker_id for t in trials.values())
    evaluated: dict[str, Counter[str]] = {}
    for trial in trials.values():
        worker_id = trial.metadata.evaluating_worker_id
        if worker_id is None or trial.metadata.state not in EVALUATED_STATES:
            continue
        evaluated.setdefault(worker_id, Counter())[trial.metadata.state.value] += 1

    # Registered workers first, in registration order, so that an idle one
    # shows up too; then ids that appear only in trials (imported ones).
    order = list(registered)
    order += sorted((set(sampled) | set(evaluated)) - set(registered))
    return [
        WorkerSummary(
            worker_id=worker_id,
            registered=worker_id in registered,
            sampled=sampled.get(worker_id, 0),
            evaluated=dict(evaluated.get(worker_id, {})),
        )
        for worker_id in order
    ]


def _cost_used(trials: Mapping[str, Trial]) -> float:
    total = 0.0
    for trial in trials.values():
        cost = None if trial.report is None else trial.report.cost
        if isinstance(cost, int | float) and math.isfinite(cost):
            total += float(cost)
    return total


def _recent_errors(state: RedisNePSState, count: int) -> list[str]:
    # Only the newest few are read: a long run may have thousands.
    entries = state.client.xrevrange(state.keys.errors, count=count)
    lines = []
    for _, raw in reversed(entries):
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        text = fields.get("err", "").strip().splitlines() or [""]
        lines.append(
            f"trial {fields.get('trial_id', '?')}: {fields.get('err_type', '?')}:"
            f" {text[0]}"
        )
    return lines


def summarize(state: RedisNePSState, *, recent_errors: int = 3) -> RunSummary:
    """The summary of the run `state` belongs to.

    Reads every trial once; the counts come from the run's counts hash, so
    on a busy run they may be a moment newer than the trials.
    """
    stored = state.counts()
    counts = {s.value: int(stored.get(s.value, 0)) for s in State}
    trials = state.lock_and_read_trials()
    registered = state.worker_ids()
    budget, cost_budget, _ = state.lock_and_get_global_budgets()

    multi_objective = _is_multi_objective(trials)
    best: Trial | None = None
    best_value: float | None = None
    if not multi_objective:
        for trial in trials.values():
            value = _single_objective(trial)
            if value is not None and (best_value is None or value < best_value):
                best, best_value = trial, value

    return RunSummary(
        run=state.run,
        server=state.server,
        counts=counts,
        total=sum(counts.values()),
        evaluation_budget=budget,
        best_trial_id=None if best is None else best.id,
        best_objective=best_value,
        best_config=None if best is None else dict(best.config),
        multi_objective=multi_objective,
        workers=_workers(trials, registered),
        shared_errors=int(state.client.xlen(state.keys.errors)),
        registered_workers=len(registered),
        cost_budget=cost_budget,
        cost_used=_cost_used(trials),
        recent_errors=_recent_errors(state, recent_errors),
    )
