"""The state backends the contract tests run against, as Optuna tests its
storages: this package's `RedisNePSState`; and, when NePS is installed,
NePS's own file-based `NePSState`, and NePS's interface served by Redis
through `neps_redis.neps_bridge` (what NePS's runtime talks to).

A backend makes and opens runs, and knows the few things that differ by
design rather than by fault: how a trial is claimed (NePS has no claim: its
runtime sets the oldest pending trial evaluating and writes it back), what a
trial's location looks like, and which classes its values and errors have.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import neps_redis
from neps_redis import OptimizationState, RedisNePSState, SeedSnapshot

INFO = {"name": "random_search", "info": {"seed": 1}}

NEPS_MISSING = "neural-pipeline-search is not installed (pip install '.[neps]')"


class RedisBackend:
    """RedisNePSState on the test's server."""

    name = "redis"
    # A Redis server holds the state (its keys can be dumped); reset and
    # remove drop only the trial's own errors; copies of a trial with a NaN
    # time compare equal; a claim returns the claim token.
    redis = True
    own_errors_only = True
    nan_equal = True
    claims_carry_tokens = True
    Trial = neps_redis.Trial
    ErrDump = neps_redis.ErrDump
    NePSError = neps_redis.NePSError
    TrialAlreadyExistsError = neps_redis.TrialAlreadyExistsError
    TrialNotFoundError = neps_redis.TrialNotFoundError
    SerializableTrialError = neps_redis.SerializableTrialError

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url

    def create(self, run: str = "run", *, budget: Any = None, **kw: Any) -> Any:
        return RedisNePSState.create_or_load(
            run,
            redis=self.url,
            optimizer_info=kw.pop("optimizer_info", INFO),
            optimizer_state=OptimizationState(
                budget=budget,
                seed_snapshot=SeedSnapshot.new_capture(),
                shared_state=None,
            ),
            **kw,
        )

    def load(self, run: str = "run") -> Any:
        return RedisNePSState.create_or_load(run, redis=self.url, load_only=True)

    def claim(self, state: Any, worker_id: str) -> Any:
        return state.claim_next_pending_trial(worker_id=worker_id)

    def counts(self, state: Any) -> dict[str, int]:
        return state.counts()

    def location(self, state: Any, name: str) -> str:
        return f"configs/config_{name}"

    def after_removing_its_cache(self, state: Any) -> None:
        """Nothing to do: reads never depend on a cache."""


class NepsFilesBackend:
    """NePS's own file-based NePSState, in a temporary directory."""

    name = "neps-files"
    redis = False
    own_errors_only = False
    nan_equal = False
    claims_carry_tokens = False

    def __init__(self, directory: Path) -> None:
        import neps.exceptions
        import neps.state
        import neps.state.err_dump

        self.directory = directory
        self._state = neps.state
        self.Trial = neps.state.Trial
        self.ErrDump = neps.state.err_dump.ErrDump
        self.NePSError = neps.exceptions.NePSError
        self.TrialAlreadyExistsError = neps.exceptions.TrialAlreadyExistsError
        self.TrialNotFoundError = neps.exceptions.TrialNotFoundError
        self.SerializableTrialError = neps.state.err_dump.SerializableTrialError

    def create(self, run: str = "run", *, budget: Any = None, **kw: Any) -> Any:
        state = self._state
        if budget is not None:
            budget = state.BudgetInfo(**dataclasses.asdict(budget))
        return state.NePSState.create_or_load(
            self.directory / run,
            optimizer_info=kw.pop("optimizer_info", INFO),
            optimizer_state=state.OptimizationState(
                budget=budget,
                seed_snapshot=state.SeedSnapshot.new_capture(),
                shared_state=None,
            ),
            **kw,
        )

    def load(self, run: str = "run") -> Any:
        return self._state.NePSState.create_or_load(
            self.directory / run, load_only=True
        )

    def claim(self, state: Any, worker_id: str) -> Any:
        # What NePS's runtime does under its locks.
        trial = state.lock_and_get_next_pending_trial()
        if trial is None:
            return None
        trial.set_evaluating(time_started=time.time(), worker_id=worker_id)
        state.put_updated_trial(trial, hints="metadata")
        return trial

    def counts(self, state: Any) -> dict[str, int]:
        found = Counter(
            t.metadata.state.value for t in state.lock_and_read_trials().values()
        )
        return dict(found)

    def location(self, state: Any, name: str) -> str:
        return str(state.path / "configs" / f"config_{name}")

    def after_removing_its_cache(self, state: Any) -> None:
        """NePS's reset and remove delete its trial cache, and the first read
        after that rebuilds it and returns no trials (a NePS fault, not part
        of the contract); this is that first read."""
        state.lock_and_read_trials()


class NepsOnRedisBackend(NepsFilesBackend):
    """NePS's NePSState interface, with NePS's types and errors, served by a
    run in Redis: each run's directory is bound to the run by the bridge."""

    name = "neps-on-redis"
    redis = True
    own_errors_only = True
    nan_equal = False
    claims_carry_tokens = False

    def __init__(self, redis_url: str, directory: Path) -> None:
        super().__init__(directory)
        from neps_redis import neps_bridge

        self.url = redis_url
        self._bridge = neps_bridge

    def _bound(self, run: str) -> Path:
        return self._bridge.attach(self.directory / run, run=run, redis=self.url)

    def create(self, run: str = "run", *, budget: Any = None, **kw: Any) -> Any:
        self._bound(run)
        state = super().create(run, budget=budget, **kw)
        assert isinstance(state, self._bridge.RedisBackedNePSState)
        return state

    def load(self, run: str = "run") -> Any:
        self._bound(run)
        return super().load(run)

    def claim(self, state: Any, worker_id: str) -> Any:
        return state.claim(worker_id)

    def after_removing_its_cache(self, state: Any) -> None:
        """Nothing to do: reads never depend on a cache."""
