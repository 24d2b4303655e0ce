"""RedisNePSState keeps NePS 0.17's NePSState contract, method by method.

One suite, several backends (see `tests/backends.py`): every test that
states NePS's contract runs against this package's Redis state and, when
NePS is installed (marker ``neps``), against NePS's own file-based state,
which shows the contract is NePS's. Tests of what only the Redis state does
(its keys, leases, fencing, and the places where NePS is deliberately not
followed, listed in the README) carry `redis_only`. Where a test's
expectation differs by backend, the difference is spelled out beside it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from neps_redis import (
    BudgetInfo,
    ImportedConfig,
    LeaseLostError,
    NePSError,
    RedisNePSState,
    Trial,
    TrialNotFoundError,
)
from neps_redis.keys import RunKeys
from tests.backends import (
    INFO,
    NEPS_MISSING,
    NepsFilesBackend,
    NepsOnRedisBackend,
    RedisBackend,
)
from tests.optimizers import CountingRandomSearch, Failing, FixedIds

BACKENDS = [
    "redis",
    pytest.param("neps-files", marks=pytest.mark.neps),
    pytest.param("neps-on-redis", marks=pytest.mark.neps),
]

# For a test of what only the Redis state does.
redis_only = pytest.mark.parametrize("backend", ["redis"], indirect=True)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    if request.param == "redis":
        return RedisBackend(request.getfixturevalue("redis_url"))
    pytest.importorskip("neps", reason=NEPS_MISSING)
    if request.param == "neps-files":
        return NepsFilesBackend(tmp_path)
    return NepsOnRedisBackend(request.getfixturevalue("redis_url"), tmp_path)


def new_state(backend, run="run", *, budget=None, **kw):
    return backend.create(run, budget=budget, **kw)


@pytest.fixture
def state(backend):
    return new_state(backend)


def finish(state, trial, *, worker_id="w", objective=0.5, err=None, as_="success"):
    report = trial.set_complete(
        report_as=as_,
        time_end=time.time(),
        objective_to_minimize=objective,
        cost=1.0,
        learning_curve=None,
        err=err,
        tb="Traceback (most recent call last): ..." if err else None,
        extra={"k": 1},
        evaluation_duration=0.1,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id=worker_id)
    return report


# --- create_or_load ------------------------------------------------------


def test_load_only_on_a_missing_run_raises_file_not_found(backend):
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        backend.load("no-such-run")


def test_a_loaded_run_equals_the_created_one(state, backend):
    loaded = backend.load("run")
    assert loaded == state
    assert loaded.lock_and_get_optimizer_info() == INFO


def test_reopening_with_other_optimizer_info_raises_nepserror(state, backend):
    with pytest.raises(backend.NePSError, match="optimizer info"):
        new_state(backend, optimizer_info={"name": "bo", "info": {}})
    with pytest.raises(backend.NePSError, match="optimizer info"):
        new_state(backend, optimizer_info={"name": "random_search", "info": {}})


def test_reopening_with_extra_settings_or_other_derived_values_is_accepted(
    state, backend
):
    info = {"name": "random_search", "info": {"seed": 1, "new": 2}, "derived": {"a": 1}}
    assert new_state(backend, optimizer_info=info) == state


def test_reopening_with_another_pipeline_space_raises_nepserror(backend):
    new_state(backend, pipeline_space={"lr": (0.0, 1.0)})
    assert new_state(backend, pipeline_space={"lr": (0.0, 1.0)}) is not None
    assert new_state(backend) is not None
    with pytest.raises(backend.NePSError, match="pipeline space"):
        new_state(backend, pipeline_space={"lr": (0.0, 2.0)})


@redis_only
def test_a_pipeline_space_is_pickled_only_when_the_caller_opts_in(
    backend, redis_url, r
):
    keys = RunKeys("run")
    new_state(backend, pipeline_space={"lr": [0, 1]})
    assert not r.exists(keys.pipeline_space)
    loaded = RedisNePSState.create_or_load("run", redis=redis_url, load_only=True)
    assert loaded.lock_and_get_search_space() is None

    new_state(backend, "run2", pipeline_space={"lr": [0, 1]}, allow_pickle=True)
    assert r.exists(RunKeys("run2").pipeline_space)
    guarded = RedisNePSState.create_or_load("run2", redis=redis_url, load_only=True)
    with pytest.raises(NePSError, match="allow_pickle"):
        guarded.lock_and_get_search_space()
    trusted = RedisNePSState.create_or_load(
        "run2", redis=redis_url, load_only=True, allow_pickle=True
    )
    assert trusted.lock_and_get_search_space() == {"lr": [0, 1]}


@redis_only
def test_a_run_name_with_spaces_colons_and_unicode_works(backend, r):
    state = new_state(backend, "my run: lr sweep ü 東京")
    trial = state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")
    assert state.lock_and_get_trial_by_id(trial.id) == trial
    keys = [k.decode() for k in r.keys("*")]
    assert keys and all(k.startswith("neps:{my run: lr sweep ü 東京}:") for k in keys)


# --- workers ---------------------------------------------------------------


def test_worker_ids_default_to_worker_n_and_duplicates_are_refused(state, backend):
    assert state.lock_and_set_new_worker_id() == "worker_0"
    assert state.lock_and_set_new_worker_id("gpu-node-3") == "gpu-node-3"
    assert state.lock_and_set_new_worker_id() == "worker_2"
    with pytest.raises(backend.NePSError, match="already exists"):
        state.lock_and_set_new_worker_id("gpu-node-3")
    assert state.lock_and_get_optimizer_state().worker_ids == [
        "worker_0",
        "gpu-node-3",
        "worker_2",
    ]


@redis_only
def test_a_default_worker_id_skips_ids_already_taken_by_name(state):
    state.lock_and_set_new_worker_id("worker_1")
    assert state.lock_and_set_new_worker_id() == "worker_2"


# --- sampling ----------------------------------------------------------------


def test_sampling_one_returns_a_pending_trial_and_n_returns_a_list(state, backend):
    optimizer = CountingRandomSearch()
    one = state.lock_and_sample_trial(optimizer, worker_id="w")
    many = state.lock_and_sample_trial(optimizer, worker_id="w", n=3)

    assert isinstance(one, backend.Trial)
    assert one.metadata.state == Trial.State.PENDING
    assert one.metadata.sampling_worker_id == "w"
    # Relative in Redis, resolved by each machine; absolute in NePS.
    assert one.metadata.location == backend.location(state, "1")
    assert [t.id for t in many] == ["2", "3", "4"]
    assert list(state.lock_and_read_trials()) == ["1", "2", "3", "4"]
    assert state.lock_and_read_trials()["3"] == many[1]


def test_the_optimizer_sees_every_trial_and_the_budget_as_neps_passes_it(
    state, backend
):
    # Given a run with a budget, one trial reported with a cost
    state.lock_and_update_global_budgets(
        total_evaluations_to_spend=10,
        total_cost_to_spend=None,
        total_fidelities_to_spend=None,
    )
    optimizer = CountingRandomSearch()
    state.lock_and_sample_trial(optimizer, worker_id="w", n=2)
    finish(state, backend.claim(state, "w"))

    # When
    state.lock_and_sample_trial(optimizer, worker_id="w")

    # Then
    ids, budget, n = optimizer.seen[-1]
    assert ids == ["1", "2"]
    assert n is None
    assert budget.used_evaluations == 2
    assert budget.used_cost_budget == 1.0
    assert budget.total_evaluations_to_spend == 10
    assert state.lock_and_get_optimizer_state().budget.used_evaluations == 2


def test_sampling_restores_and_advances_the_stored_rng(backend):
    np.random.seed(0)
    state = new_state(backend)
    optimizer = CountingRandomSearch()
    first = state.lock_and_sample_trial(optimizer, worker_id="w")
    np.random.seed(12345)  # whatever this process does to its RNG meanwhile
    second = state.lock_and_sample_trial(optimizer, worker_id="w")

    np.random.seed(0)
    expected = np.random.uniform(), np.random.uniform()
    assert (first.config["lr"], second.config["lr"]) == expected


def test_an_id_that_exists_raises_with_its_id_and_stores_nothing(
    state, backend, request
):
    from tests.helpers import dump_keys

    state.lock_and_sample_trial(FixedIds("a"), worker_id="w")
    if backend.redis:
        r = request.getfixturevalue("r")
        before = dump_keys(r)

    with pytest.raises(backend.TrialAlreadyExistsError) as error:
        state.lock_and_sample_trial(FixedIds("b", "a"), worker_id="w", n=2)

    assert error.value.trial_id == "a"
    # NePS has made trial b's directory by then (without its files).
    if backend.redis:
        assert dump_keys(r) == before
    assert state.lock_and_sample_trial(FixedIds("c"), worker_id="w").id == "c"


def test_an_optimizer_that_raises_releases_the_lease(state):
    with pytest.raises(RuntimeError, match="optimizer failed"):
        state.lock_and_sample_trial(Failing(), worker_id="w")
    assert state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w").id == "1"


def test_a_continuation_records_the_previous_trial_and_its_location(state, backend):
    state.lock_and_sample_trial(FixedIds("1_rung_0"), worker_id="w")
    trial = state.lock_and_sample_trial(
        FixedIds("1_rung_1", previous="1_rung_0"), worker_id="w"
    )
    assert trial.metadata.previous_trial_id == "1_rung_0"
    assert trial.metadata.previous_trial_location == backend.location(state, "1_rung_0")
    with pytest.raises(ValueError, match="Previous trial 'nope' not found"):
        state.lock_and_sample_trial(FixedIds("2", previous="nope"), worker_id="w")


@redis_only
def test_a_sample_that_outlives_the_optimizer_lease_stores_nothing(backend, r):
    state = new_state(backend)
    state.optimizer_lease_seconds = 0.2

    def slow(trials, budget_info, n=None):
        time.sleep(0.4)
        return FixedIds("1")(trials, budget_info, n)

    with pytest.raises(LeaseLostError):
        state.lock_and_sample_trial(slow, worker_id="w")
    assert state.all_trial_ids() == []


# --- pending, claim, evaluating ---------------------------------------------


def test_next_pending_is_the_oldest_by_time_sampled_and_does_not_claim(state, backend):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    assert state.lock_and_get_next_pending_trial().id == "1"
    assert [t.id for t in state.lock_and_get_next_pending_trial(2)] == ["1", "2"]
    assert state.lock_and_get_next_pending_trial(0) == []
    assert backend.counts(state) == {"pending": 3}


def test_next_pending_on_an_empty_run_is_none_or_empty(state):
    assert state.lock_and_get_next_pending_trial() is None
    assert state.lock_and_get_next_pending_trial(5) == []


def test_claim_takes_the_oldest_pending_trial_for_the_worker(state, backend):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=3)

    trial = backend.claim(state, "unregistered-worker")

    assert trial.id == "1"
    assert trial.metadata.state == Trial.State.EVALUATING
    assert trial.metadata.evaluating_worker_id == "unregistered-worker"
    assert trial.metadata.time_started is not None
    if backend.claims_carry_tokens:
        assert trial.token
    assert state.lock_and_get_trial_by_id("1").metadata.state == "evaluating"
    assert [t.id for t in state.lock_and_get_current_evaluating_trials()] == ["1"]
    assert backend.counts(state) == {"pending": 2, "evaluating": 1}


def test_claim_on_an_empty_queue_returns_none(state, backend):
    assert backend.claim(state, "w") is None


def test_claims_drain_the_queue_in_order_even_when_the_hint_is_stale(state, backend):
    other = backend.load("run")
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=12)
    claimed = [backend.claim(state, "a").id for _ in range(3)]
    claimed += [backend.claim(other, "b").id for _ in range(4)]
    claimed += [backend.claim(state, "a").id for _ in range(5)]
    assert claimed == [str(i) for i in range(1, 13)]
    assert backend.claim(state, "a") is None


def test_evaluating_trials_come_in_creation_order(state, backend):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=3)
    for _ in range(3):
        backend.claim(state, "w")
    assert [t.id for t in state.lock_and_get_current_evaluating_trials()] == [
        "1",
        "2",
        "3",
    ]


# --- reports and errors -----------------------------------------------------


def test_a_report_finishes_the_trial_and_is_read_back_equal(state, backend):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    trial = backend.claim(state, "w")

    report = finish(state, trial, objective=math.nan)

    stored = state.lock_and_get_trial_by_id(trial.id)
    assert stored.metadata.state == Trial.State.SUCCESS
    assert stored.report == report
    assert stored == trial
    assert backend.counts(state) == {"success": 1}
    assert state.lock_and_get_errors() == backend.ErrDump([])


def test_a_report_with_an_error_is_shared_and_the_latest_is_raisable(state, backend):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=2)
    finish(
        state,
        backend.claim(state, "w1"),
        worker_id="w1",
        err=ValueError("first"),
        as_="crashed",
        objective=None,
    )
    finish(
        state,
        backend.claim(state, "w2"),
        worker_id="w2",
        err=KeyError("second"),
        as_="crashed",
        objective=None,
    )

    errors = state.lock_and_get_errors()
    assert [(e.trial_id, e.worker_id, e.err_type) for e in errors.errs] == [
        ("1", "w1", "ValueError"),
        ("2", "w2", "KeyError"),
    ]
    assert errors.errs[1].err == "'second'"
    assert "KeyError: 'second'" in str(errors.latest_err_as_raisable())


@redis_only
def test_a_report_for_an_unknown_trial_raises_and_writes_nothing(state, r):
    from tests.helpers import dump_keys

    trial = Trial.new(
        trial_id="ghost",
        config={},
        location="",
        previous_trial=None,
        previous_trial_location=None,
        time_sampled=0.0,
        worker_id="w",
    )
    before = dump_keys(r)
    with pytest.raises(TrialNotFoundError):
        finish(state, trial)
    assert dump_keys(r) == before


@redis_only
def test_a_report_with_a_stale_token_is_refused_and_kept_as_an_event(state, r):
    # Given a trial claimed, then reset and claimed again by another worker
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    late = state.claim_next_pending_trial(worker_id="slow")
    state.lock_and_reset_trial_by_id(late.id)
    current = state.claim_next_pending_trial(worker_id="fast")

    # When the first worker reports
    with pytest.raises(LeaseLostError):
        finish(state, late, worker_id="slow", objective=9.0)

    # Then the trial is untouched and the late result is an event
    assert state.lock_and_get_trial_by_id(late.id).metadata.state == "evaluating"
    events = [f[b"event"] for _, f in r.xrange(RunKeys("run").events)]
    assert events[-1] == b"late_report"
    finish(state, current, worker_id="fast", objective=1.0)
    assert state.lock_and_get_trial_by_id(late.id).report.objective_to_minimize == 1.0


@redis_only
def test_put_updated_trial_moves_the_trial_between_state_indexes(state, r):
    keys = RunKeys("run")
    trial = state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")

    trial.set_evaluating(time_started=time.time(), worker_id="w")
    state.put_updated_trial(trial)
    assert r.zrange(keys.evaluating, 0, -1) == [b"1"]
    assert state.lock_and_get_trial_by_id("1") == trial

    trial.set_corrupted()
    state.put_updated_trial(trial, hints=["metadata"])
    assert r.zrange(keys.evaluating, 0, -1) == []
    assert r.zrange(keys.finished, 0, -1) == [b"1"]
    assert state.counts() == {"corrupted": 1}


@redis_only
def test_put_updated_trial_for_an_unknown_trial_raises(state):
    trial = state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    state.lock_and_remove_trial_by_id(trial.id)
    with pytest.raises(TrialNotFoundError):
        state.put_updated_trial(trial)


# --- reset and remove -------------------------------------------------------


def test_reset_makes_a_finished_trial_pending_without_its_report_or_errors(
    state, backend
):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=2)
    first = backend.claim(state, "w")
    second = backend.claim(state, "w")
    finish(state, first, err=ValueError("a"), as_="crashed", objective=None)
    finish(state, second, err=ValueError("b"), as_="crashed", objective=None)

    state.lock_and_reset_trial_by_id("1")

    trial = state.lock_and_get_trial_by_id("1")
    assert trial.report is None
    assert trial.metadata.state == Trial.State.PENDING
    assert trial.metadata.evaluating_worker_id is None
    assert trial.metadata.time_end is None
    assert trial.metadata.time_sampled == first.metadata.time_sampled
    # Only the reset trial's own errors go; NePS drops every trial's.
    kept = ["2"] if backend.own_errors_only else []
    assert [e.trial_id for e in state.lock_and_get_errors().errs] == kept
    backend.after_removing_its_cache(state)
    assert backend.claim(state, "w").id == "1"


def test_remove_deletes_the_trial_its_errors_and_its_index_entries(
    state, backend, request
):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=2)
    finish(
        state,
        backend.claim(state, "w"),
        err=ValueError("a"),
        as_="crashed",
        objective=None,
    )

    state.lock_and_remove_trial_by_id("1")

    assert state.all_trial_ids() == ["2"]
    assert state.lock_and_get_errors().empty()
    backend.after_removing_its_cache(state)
    assert backend.counts(state) == {"pending": 1}
    with pytest.raises(backend.TrialNotFoundError):
        state.lock_and_get_trial_by_id("1")
    if backend.redis:
        r = request.getfixturevalue("r")
        assert not r.exists(RunKeys("run").trial("1"))


@pytest.mark.parametrize(
    "method", ["lock_and_reset_trial_by_id", "lock_and_remove_trial_by_id"]
)
def test_reset_or_remove_of_an_unknown_trial_raises_nepserror(
    state, backend, request, method
):
    from tests.helpers import dump_keys

    if backend.redis:
        r = request.getfixturevalue("r")
        before = dump_keys(r)
    with pytest.raises(backend.NePSError, match="'nope' not found"):
        getattr(state, method)("nope")
    if backend.redis:
        assert dump_keys(r) == before


def test_get_trial_by_id_of_an_unknown_trial_raises_trial_not_found(state, backend):
    with pytest.raises(backend.TrialNotFoundError):
        state.lock_and_get_trial_by_id("nope")
    with pytest.raises(backend.TrialNotFoundError):
        state.unsafe_retry_get_trial_by_id("nope")


# --- imports and budgets ----------------------------------------------------


def test_imported_trials_are_external_chained_and_reported(state, backend):
    imported = [
        ImportedConfig(id="10", config={"x": 1}, result={"objective_to_minimize": 0.3}),
        ImportedConfig(
            id="11",
            config={"x": 2},
            result={"objective_to_minimize": 0.2, "cost": 2.0},
        ),
    ]

    trials = state.lock_and_import_trials(imported, worker_id="importer")

    assert [t.id for t in trials] == ["10", "11"]
    stored = state.lock_and_read_trials()
    # NePS's MetaData compares the NaN time_sampled of a copy read back as
    # unequal; this package's holds NaN equal to NaN.
    if backend.nan_equal:
        assert stored["11"] == trials[1]
    assert stored["11"].config == trials[1].config
    assert stored["11"].report == trials[1].report
    assert stored["11"].metadata.state == Trial.State.EXTERNAL
    assert stored["11"].metadata.previous_trial_id == "10"
    assert math.isnan(stored["10"].metadata.time_sampled)
    assert stored["11"].source == "imported"
    assert stored["11"].report.cost == 2.0
    assert backend.counts(state) == {"external": 2}


def test_import_of_an_existing_id_imports_nothing(state, backend):
    state.lock_and_sample_trial(FixedIds("10"), worker_id="w")
    imported = [
        ImportedConfig(id="9", config={}, result={"objective_to_minimize": 1.0}),
        ImportedConfig(id="10", config={}, result={"objective_to_minimize": 1.0}),
    ]
    with pytest.raises(backend.TrialAlreadyExistsError):
        state.lock_and_import_trials(imported, worker_id="i")
    # NePS has made trial 9's directory by then, so lists it.
    if backend.redis:
        assert state.all_trial_ids() == ["10"]


def test_global_budgets_are_set_only_where_given(backend):
    state = new_state(backend, budget=BudgetInfo(worker_evaluations_to_spend=3))
    assert state.lock_and_get_global_budgets() == (None, None, None)

    state.lock_and_update_global_budgets(
        total_evaluations_to_spend=20,
        total_cost_to_spend=None,
        total_fidelities_to_spend=None,
    )
    state.lock_and_update_global_budgets(
        total_evaluations_to_spend=None,
        total_cost_to_spend=5.5,
        total_fidelities_to_spend=None,
    )

    assert state.lock_and_get_global_budgets() == (20, 5.5, None)
    budget = state.lock_and_get_optimizer_state().budget
    assert budget.worker_evaluations_to_spend == 3


def test_global_budgets_without_a_budget_create_one(state):
    state.lock_and_update_global_budgets(
        total_evaluations_to_spend=None,
        total_cost_to_spend=None,
        total_fidelities_to_spend=7,
    )
    assert state.lock_and_get_global_budgets() == (None, None, 7)


def test_an_error_dump_entry_round_trips_with_every_field(state, backend):
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    finish(
        state,
        backend.claim(state, "w"),
        worker_id="w",
        err=RuntimeError("boom"),
        as_="failed",
        objective=None,
    )
    assert state.lock_and_get_errors().errs == [
        backend.SerializableTrialError(
            trial_id="1",
            worker_id="w",
            err_type="RuntimeError",
            err="boom",
            tb="Traceback (most recent call last): ...",
        )
    ]


@redis_only
def test_a_sampler_claims_its_own_new_trial_in_one_script_call(state, r):
    # Given a worker that has just sampled into an empty queue
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")
    r.config_resetstat()

    # When it claims
    trial = state.claim_next_pending_trial(worker_id="w")

    # Then one script call did it
    stats = r.info("commandstats")
    calls = sum(
        v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
    )
    assert trial.id == "1"
    assert calls == 1


@redis_only
def test_an_optimizer_that_returns_nothing_stores_nothing(state, r):
    from tests.helpers import dump_keys

    before = dump_keys(r)
    with pytest.raises(TypeError, match="non-empty list"):
        state.lock_and_sample_trial(
            lambda trials, budget_info, n=None: [], worker_id="w"
        )
    after = dump_keys(r)
    # Giving the optimizer lease up wakes a waiting sampler: a signal, no data.
    assert after.pop(state.keys.optimizer_free.encode()) == ("list", [b"1"])
    assert after == before


@redis_only
def test_rung_ids_that_differ_only_in_leading_zeros_get_their_own_locations(state):
    first = state.lock_and_sample_trial(FixedIds("1_rung_1"), worker_id="w")
    second = state.lock_and_sample_trial(FixedIds("1_rung_01"), worker_id="w")
    assert first.metadata.location != second.metadata.location
