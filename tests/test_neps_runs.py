"""NePS's own optimizers and worker loop, four worker processes, one Redis.

Each worker runs `neps_redis.run` in its own empty directory; the workers
share nothing but the server. Every run must keep NePS's rules for the same
settings: budgets bound the evaluated trials as NePS counts them, every
trial is evaluated exactly once, promotions continue finished trials, and
errors are shared and acted on as `ignore_errors` says.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "neps", reason="neural-pipeline-search is not installed (pip install '.[neps]')"
)

from neps_redis import State
from tests.neps_support import (
    RunView,
    assert_all_succeeded,
    kill_leftover_workers,
    spawn_worker,
    wait_all,
)

pytestmark = [pytest.mark.neps, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test():
    yield
    kill_leftover_workers()


def start(tmp_path, redis_url, run, n=4, **kwargs):
    return [
        spawn_worker(tmp_path, f"w{i}", run=run, redis_url=redis_url, **kwargs)
        for i in range(n)
    ]


def test_random_search_keeps_each_worker_s_budget_and_ignores_shared_errors(
    tmp_path, redis_url
):
    # Given four workers that may each evaluate three trials, and two trials
    # whose evaluation raises, with errors ignored
    workers = start(
        tmp_path,
        redis_url,
        "rs",
        neps={
            "optimizer": "random_search",
            "worker_evaluations_to_spend": 3,
            "ignore_errors": True,
        },
        evaluate={"fail_ids": ["2", "5"], "sleep": 0.05},
    )

    # When they run
    assert_all_succeeded(workers)

    # Then each evaluated exactly three trials (crashed ones count, as in
    # NePS), the errors are shared, and nothing is lost or duplicated
    view = RunView.read(redis_url, "rs", workers)
    view.assert_each_trial_evaluated_once()
    assert sorted(view.evaluated_by().values()) == [3, 3, 3, 3]
    assert len(view.trials) == 12
    crashed = {i for i, t in view.trials.items() if t.metadata.state == State.CRASHED}
    assert crashed == {"2", "5"}
    errors = view.state.lock_and_get_errors().errs
    assert sorted(e.trial_id for e in errors) == ["2", "5"]
    assert all(e.err_type == "ValueError" for e in errors)
    assert sorted(view.state.worker_ids()) == [f"worker_{i}" for i in range(4)]


def test_an_error_stops_every_worker_when_errors_are_not_ignored(tmp_path, redis_url):
    # Given three workers with errors not ignored, and trial 3 failing
    workers = start(
        tmp_path,
        redis_url,
        "raise",
        n=3,
        neps={"optimizer": "random_search", "total_evaluations_to_spend": 40},
        evaluate={"fail_ids": ["3"], "sleep": 0.2},
    )

    # When they run
    codes = wait_all(workers)

    # Then every worker raised NePS's WorkerRaiseError, because of that one
    # shared error, and no trial was left evaluating
    assert all(code != 0 for code in codes)
    for worker in workers:
        assert "WorkerRaiseError" in worker.log, worker.log[-2000:]
    view = RunView.read(redis_url, "raise", workers)
    assert [e.trial_id for e in view.state.lock_and_get_errors().errs] == ["3"]
    assert view.trials["3"].metadata.state == State.CRASHED
    assert len(view.trials) < 40
    view.assert_each_trial_evaluated_once()


def test_bayesian_optimization_spends_exactly_the_total_budget(tmp_path, redis_url):
    # Given four workers sharing a total budget of ten evaluations
    workers = start(
        tmp_path,
        redis_url,
        "bo",
        neps={
            "optimizer": ("bayesian_optimization", {"initial_design_size": 4}),
            "total_evaluations_to_spend": 10,
        },
    )

    # When they run
    assert_all_succeeded(workers)

    # Then exactly ten trials were evaluated, each once
    view = RunView.read(redis_url, "bo", workers)
    view.assert_each_trial_evaluated_once()
    assert len(view.trials) == 10
    assert sum(view.evaluated_by().values()) == 10
    assert view.state.lock_and_get_optimizer_info()["name"] == "bayesian_optimization"
    budget = view.state.lock_and_get_optimizer_state().budget
    assert budget.total_evaluations_to_spend == 10


@pytest.mark.parametrize(
    ("optimizer", "space"),
    [("hyperband", "fidelity"), ("priorband", "priors")],
)
def test_a_bracket_optimizer_promotes_finished_trials_across_machines(
    tmp_path, redis_url, optimizer, space
):
    # Given four workers of a bracket optimizer with a total budget
    workers = start(
        tmp_path,
        redis_url,
        optimizer,
        space=space,
        neps={"optimizer": optimizer, "total_evaluations_to_spend": 24},
        evaluate={"sleep": 0.05},
    )

    # When they run
    assert_all_succeeded(workers)

    # Then the budget is spent exactly, promotions continue finished trials
    # of the rung below, and a continuation gets its previous trial's
    # directory only where that trial ran
    view = RunView.read(redis_url, optimizer, workers)
    view.assert_each_trial_evaluated_once()
    assert len(view.trials) == 24
    assert view.assert_promotions_valid() > 0
    view.assert_previous_directories_are_local()
    assert view.state.fidelity_name == "epochs"
