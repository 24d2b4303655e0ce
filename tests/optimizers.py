"""Small optimizers that follow NePS's protocol, for the tests."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from neps_redis import BudgetInfo, SampledConfig, Trial


def next_integer_id(trials: Mapping[str, Trial]) -> int:
    """Max integer id + 1, the way most NePS optimizers choose ids."""
    ids = [int(i) for i in trials if i.isdigit()]
    return max(ids, default=0) + 1


class CountingRandomSearch:
    """Random configs, ids max+1; records what it was shown."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], BudgetInfo | None, int | None]] = []

    def __call__(
        self,
        trials: Mapping[str, Trial],
        budget_info: BudgetInfo | None,
        n: int | None = None,
    ) -> SampledConfig | list[SampledConfig]:
        self.seen.append((list(trials), budget_info, n))
        first = next_integer_id(trials)
        configs = [
            SampledConfig(
                id=str(first + i),
                config={"lr": float(np.random.uniform()), "depth": int(i)},
            )
            for i in range(1 if n is None else n)
        ]
        return configs[0] if n is None else configs


class FixedIds:
    """Returns configs with the ids it was given, whatever exists."""

    def __init__(self, *ids: str, previous: str | None = None) -> None:
        self.ids = ids
        self.previous = previous

    def __call__(self, trials, budget_info, n=None):
        configs = [
            SampledConfig(id=i, config={"x": 1}, previous_config_id=self.previous)
            for i in self.ids
        ]
        return configs[0] if n is None else configs


class Failing:
    """An optimizer that raises."""

    def __call__(self, trials, budget_info, n=None):
        raise RuntimeError("optimizer failed")
