"""Inputs that broke other systems doing this job, with their right results."""

from __future__ import annotations

import time

import numpy as np
import pytest

from neps_redis import OptimizationState, RedisNePSState, SampledConfig, SeedSnapshot
from neps_redis.status import summarize

INFO = {"name": "random_search", "info": {}}


@pytest.fixture
def state(redis_url) -> RedisNePSState:
    return RedisNePSState.create_or_load(
        "cases",
        redis=redis_url,
        optimizer_info=INFO,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )


class ShapeMismatch(Exception):  # noqa: N818 - the name the case gives
    def __init__(self, expected, got):
        super().__init__(f"expected {expected}, got {got}")


def test_an_error_whose_class_cannot_be_rebuilt_keeps_every_read_working(state):
    # Given a trial crashed with an exception that needs two constructor args
    state.lock_and_sample_trial(
        lambda trials, budget_info, n=None: SampledConfig("1", {"x": 1}),
        worker_id="w",
    )
    trial = state.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="crashed",
        time_end=time.time(),
        objective_to_minimize=None,
        cost=None,
        learning_curve=None,
        err=ShapeMismatch(3, 4),
        tb="Traceback (most recent call last):\nShapeMismatch: expected 3, got 4",
        extra=None,
        evaluation_duration=0.5,
    )

    # When it is reported
    state.lock_and_report_trial_evaluation(trial, report, worker_id="w")

    # Then the report, the shared errors and every later read work
    assert str(state.lock_and_get_trial_by_id("1").report.err) == "expected 3, got 4"
    errors = state.lock_and_get_errors()
    assert errors.errs[0].err_type == "ShapeMismatch"
    assert errors.errs[0].err == "expected 3, got 4"
    assert state.lock_and_read_trials()["1"].report == report
    loaded = RedisNePSState.create_or_load("cases", redis=state.client, load_only=True)
    assert loaded.lock_and_read_trials()["1"].metadata.state == "crashed"
    assert summarize(loaded).counts["crashed"] == 1


def test_numpy_values_in_configs_and_results_are_read_back_equal(state):
    # Given a config and a report made of numpy values
    config = {"layers": np.int64(3), "lr": np.float32(0.01)}
    state.lock_and_sample_trial(
        lambda trials, budget_info, n=None: SampledConfig("1", config),
        worker_id="w",
    )
    trial = state.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=np.float64(0.25),
        cost=None,
        learning_curve=[np.float32(0.5), np.float32(0.25)],
        err=None,
        tb=None,
        extra={"acc": np.float32(0.91), "confusion": np.array([[5, 1], [0, 4]])},
        evaluation_duration=1.0,
    )

    # When it is reported and read back
    state.lock_and_report_trial_evaluation(trial, report, worker_id="w")
    stored = state.lock_and_get_trial_by_id("1")

    # Then every value is equal and keeps its numpy type
    assert stored.config == config
    assert type(stored.config["layers"]) is np.int64
    assert type(stored.config["lr"]) is np.float32
    assert stored.report == report
    assert type(stored.report.objective_to_minimize) is np.float64
    assert stored.report.learning_curve == [np.float32(0.5), np.float32(0.25)]
    assert type(stored.report.extra["acc"]) is np.float32
    assert np.array_equal(stored.report.extra["confusion"], [[5, 1], [0, 4]])
    assert stored.report.extra["confusion"].dtype == np.int64
