"""The demo: a real distributed search with worker processes, budget-exact."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from neps_redis import BudgetInfo, OptimizationState, RedisNePSState, SeedSnapshot
from neps_redis.demo import (
    SEARCH_SPACE,
    BudgetSpentError,
    DemoTimeoutError,
    RandomSearch,
    WorkerFailedError,
    evaluate_config,
    run_demo,
)
from neps_redis.keys import RunKeys
from neps_redis.model import Trial
from tests.helpers import dump_keys

# Generous: the demos here take a few seconds; a hang must fail, not block.
TIMEOUT = 120


# Objectives for the worker processes; module level, so that a spawned
# worker can import them.


def quick_objective(config: Mapping[str, Any]) -> float:
    return abs(math.log10(config["learning_rate_init"]) + 2.0) + config["alpha"]


def crash_on_small_networks(config: Mapping[str, Any]) -> float:
    if config["hidden_units"] < 68:
        raise ValueError(f"too few hidden units: {config['hidden_units']}")
    return quick_objective(config)


def die(config: Mapping[str, Any]) -> float:
    os._exit(7)


def hang(config: Mapping[str, Any]) -> float:
    time.sleep(600)
    return 0.0


def _text(value: bytes) -> str:
    return value.decode()


def read_trials(r, run: str) -> dict[str, dict[str, str]]:
    keys = RunKeys(run)
    ids = [_text(i) for i in r.zrange(keys.trials, 0, -1)]
    return {
        i: {_text(k): _text(v) for k, v in r.hgetall(keys.trial(i)).items()}
        for i in ids
    }


def worker_files(directory: Path) -> dict[str, set[str]]:
    return {
        d.name: {f.name for f in d.iterdir()} for d in directory.iterdir() if d.is_dir()
    }


# --- the optimizer -----------------------------------------------------------


def trials_with_ids(*ids: str) -> dict[str, Trial]:
    return {
        i: Trial.new(
            trial_id=i,
            config={},
            location=f"configs/config_{i}",
            previous_trial=None,
            previous_trial_location=None,
            time_sampled=0.0,
            worker_id="w",
        )
        for i in ids
    }


def test_random_search_numbers_a_new_trial_after_the_largest_integer_id():
    # Given
    trials = trials_with_ids("1", "7", "3", "imported-a")

    # When
    sampled = RandomSearch()(trials, BudgetInfo(total_evaluations_to_spend=10))

    # Then
    assert sampled.id == "8"
    assert set(sampled.config) == set(SEARCH_SPACE)


def test_random_search_samples_inside_the_space_with_plain_python_values():
    configs = [RandomSearch()({}, None).config for _ in range(50)]

    for config in configs:
        assert 1e-4 <= config["learning_rate_init"] <= 1e-1
        assert 1e-6 <= config["alpha"] <= 1e-1
        assert 8 <= config["hidden_units"] <= 128
        assert config["activation"] in SEARCH_SPACE["activation"]["choices"]
        assert type(config["learning_rate_init"]) is float
        assert type(config["hidden_units"]) is int
    assert len({c["learning_rate_init"] for c in configs}) == 50


def test_random_search_raises_once_the_run_holds_the_budget():
    budget = BudgetInfo(total_evaluations_to_spend=3)

    with pytest.raises(BudgetSpentError):
        RandomSearch()(trials_with_ids("1", "2", "3"), budget)


def test_random_search_asked_for_a_batch_returns_only_what_the_budget_leaves():
    budget = BudgetInfo(total_evaluations_to_spend=3)

    sampled = RandomSearch()(trials_with_ids("1"), budget, n=5)

    assert [s.id for s in sampled] == ["2", "3"]


def test_a_spent_budget_leaves_the_run_untouched_and_the_optimizer_lease_free(
    redis_url, r
):
    # Given
    state = RedisNePSState.create_or_load(
        "spent",
        redis=redis_url,
        optimizer_info={"name": "random_search", "info": {"space": SEARCH_SPACE}},
        optimizer_state=OptimizationState(
            budget=BudgetInfo(total_evaluations_to_spend=1),
            seed_snapshot=SeedSnapshot.new_capture(),
            shared_state=None,
        ),
    )
    state.lock_and_sample_trial(RandomSearch(), worker_id="w")
    before = dump_keys(r)

    # When
    with pytest.raises(BudgetSpentError):
        state.lock_and_sample_trial(RandomSearch(), worker_id="w")

    # Then
    assert dump_keys(r) == before
    assert not r.exists(state.keys.optimizer_lease)


def test_the_objective_depends_on_the_hyperparameters():
    good = {
        "learning_rate_init": 3e-2,
        "alpha": 1e-4,
        "hidden_units": 64,
        "activation": "tanh",
    }
    poor = {**good, "learning_rate_init": 1e-4, "hidden_units": 8}

    results = [evaluate_config(good), evaluate_config(poor)]

    values = [r["objective_to_minimize"] for r in results]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[0] < values[1]
    assert evaluate_config(good) == results[0]


# --- the demo ----------------------------------------------------------------


def test_a_small_demo_evaluates_exactly_the_budget_each_trial_once(
    redis_url, r, tmp_path
):
    # When
    summary = run_demo(
        redis_url=redis_url,
        run="demo-test",
        workers=2,
        budget=6,
        workdir=tmp_path,
        show_progress=False,
        timeout=TIMEOUT,
    )

    # Then: exactly the budget, all successful
    trials = read_trials(r, "demo-test")
    assert sorted(trials, key=int) == ["1", "2", "3", "4", "5", "6"]
    assert summary.total == 6
    assert summary.counts["success"] == 6
    assert summary.registered_workers == 2

    # Every trial is in exactly the index its state names.
    keys = RunKeys("demo-test")
    index = {
        "pending": {_text(i) for i in r.zrange(keys.pending, 0, -1)},
        "evaluating": {_text(i) for i in r.zrange(keys.evaluating, 0, -1)},
        "finished": {_text(i) for i in r.zrange(keys.finished, 0, -1)},
    }
    for trial_id, fields in trials.items():
        holding = [name for name, ids in index.items() if trial_id in ids]
        expected = fields["state"] if fields["state"] in index else "finished"
        assert holding == [expected], trial_id
    assert len(list(r.scan_iter(match=keys.pattern[:-1] + "trial:*"))) == 6

    # Each trial was evaluated by one worker, in that worker's own directory,
    # and nothing else is in any worker's directory.
    workers = [_text(w) for w in r.zrange(keys.workers, 0, -1)]
    files = worker_files(tmp_path / "demo-test")
    assert set(files) == set(workers)
    for worker_id in workers:
        own = {i for i, f in trials.items() if f["evaluating_worker_id"] == worker_id}
        assert files[worker_id] == {f"trial_{i}.json" for i in own}
        for trial_id in own:
            path = tmp_path / "demo-test" / worker_id / f"trial_{trial_id}.json"
            record = json.loads(path.read_text())
            assert record["worker_id"] == worker_id
            assert record["config"] == json.loads(trials[trial_id]["config"])

    # The objective differs across configs.
    objectives = [float(f["objective_to_minimize"]) for f in trials.values()]
    assert len(set(objectives)) > 1
    assert summary.best_objective == min(objectives)


def test_equal_seeds_sample_equal_configs_under_equal_ids(redis_url, r, tmp_path):
    # When
    for run in ("first", "second"):
        run_demo(
            redis_url=redis_url,
            run=run,
            workers=2,
            budget=5,
            seed=7,
            workdir=tmp_path,
            objective=quick_objective,
            show_progress=False,
            timeout=TIMEOUT,
        )

    # Then
    first, second = read_trials(r, "first"), read_trials(r, "second")
    assert {i: f["config"] for i, f in first.items()} == {
        i: f["config"] for i, f in second.items()
    }


def test_an_evaluation_error_is_reported_as_crashed_and_the_worker_goes_on(
    redis_url, r, tmp_path
):
    # When
    summary = run_demo(
        redis_url=redis_url,
        run="crashing",
        workers=1,
        budget=8,
        seed=3,
        workdir=tmp_path,
        objective=crash_on_small_networks,
        show_progress=False,
        timeout=TIMEOUT,
    )

    # Then
    trials = read_trials(r, "crashing")
    crashed = {i for i, f in trials.items() if f["state"] == "crashed"}
    assert summary.total == 8
    assert 0 < len(crashed) < 8, "seed 3 should give both outcomes"
    assert summary.counts["crashed"] == len(crashed)
    assert summary.counts["success"] == 8 - len(crashed)
    assert summary.shared_errors == len(crashed)
    for trial_id in crashed:
        assert "too few hidden units" in trials[trial_id]["err"]
        assert "Traceback" in trials[trial_id]["tb"]


def test_a_worker_process_that_dies_fails_the_demo_instead_of_hanging(
    redis_url, tmp_path
):
    with pytest.raises(WorkerFailedError, match="exit code 7") as raised:
        run_demo(
            redis_url=redis_url,
            run="dying",
            workers=2,
            budget=4,
            workdir=tmp_path,
            objective=die,
            show_progress=False,
            timeout=TIMEOUT,
        )

    # Each worker died holding the trial it had claimed.
    summary = raised.value.summary
    assert summary.counts["evaluating"] == 2
    assert summary.finished == 0


def test_workers_still_running_at_the_deadline_are_stopped(redis_url, tmp_path):
    # Given
    started = time.monotonic()

    # When
    with pytest.raises(DemoTimeoutError, match="deadline"):
        run_demo(
            redis_url=redis_url,
            run="hanging",
            workers=2,
            budget=2,
            workdir=tmp_path,
            objective=hang,
            show_progress=False,
            timeout=3,
        )

    # Then
    assert time.monotonic() - started < 30
