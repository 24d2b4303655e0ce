"""Bad input gets a clear error naming what is wrong, and writes nothing.

Each test dumps every key of the server before and after the bad call.
"""

from __future__ import annotations

import time
import warnings

import pytest

from neps_redis import (
    EncodingError,
    InvalidNameError,
    NePSError,
    OptimizationState,
    RedisNePSState,
    SampledConfig,
    SchemaVersionError,
    SeedSnapshot,
    UnsafeServerError,
)
from neps_redis.keys import RunKeys
from tests.helpers import dump_keys
from tests.optimizers import CountingRandomSearch, FixedIds

INFO = {"name": "random_search", "info": {}}


def opt_state(**kw) -> OptimizationState:
    return OptimizationState(
        budget=None,
        seed_snapshot=SeedSnapshot.new_capture(),
        shared_state=kw.get("shared_state"),
    )


def create(url, run="run", **kw):
    return RedisNePSState.create_or_load(
        run,
        redis=url,
        optimizer_info=kw.pop("optimizer_info", INFO),
        optimizer_state=kw.pop("optimizer_state", None) or opt_state(),
        **kw,
    )


@pytest.fixture
def state(redis_url):
    state = create(redis_url)
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=2)
    return state


@pytest.mark.parametrize(
    ("run", "named"),
    [
        ("a{b", "'{'"),
        ("a}b", "'}'"),
        ("", "empty"),
        ("   ", "empty"),
        ("tab\there", "control"),
        ("nul\x00", "control"),
        ("x" * 201, "at most 200"),
        (None, "must be a str"),
    ],
)
def test_a_bad_run_name_is_refused_before_anything_is_written(redis_url, r, run, named):
    before = dump_keys(r)
    with pytest.raises(InvalidNameError, match=named):
        create(redis_url, run)
    assert dump_keys(r) == before


@pytest.mark.parametrize(
    ("trial_id", "named"),
    [
        ("", "cannot name a directory"),
        (".", "cannot name a directory"),
        ("..", "cannot name a directory"),
        ("a/b", "'/'"),
        ("a\\b", "'\\\\\\\\'"),
        ("a\x00b", "'\\\\x00'"),
        ("line\nbreak", "control"),
        ("x" * 300, "too long"),
        (7, "must be a str"),
    ],
)
def test_a_bad_trial_id_from_the_optimizer_is_refused_and_nothing_stored(
    state, r, trial_id, named
):
    before = dump_keys(r)
    with pytest.raises(InvalidNameError, match=named):
        state.lock_and_sample_trial(FixedIds(trial_id), worker_id="w")
    assert dump_keys(r) == before
    # The lease was released: the next sample goes through.
    assert state.lock_and_sample_trial(FixedIds("ok"), worker_id="w").id == "ok"


class Opaque:
    pass


def test_a_config_that_cannot_be_stored_names_the_trial_and_field(state, r):
    def optimizer(trials, budget_info, n=None):
        return SampledConfig(id="9", config={"lr": 0.1, "model": Opaque()})

    before = dump_keys(r)
    with pytest.raises(EncodingError, match=r"trial '9' config\['model'\].*Opaque"):
        state.lock_and_sample_trial(optimizer, worker_id="w")
    assert dump_keys(r) == before


def test_a_report_that_cannot_be_stored_leaves_the_trial_as_it_was(state, r):
    trial = state.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=0.1,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra={"handle": open},
        evaluation_duration=1.0,
    )
    before = dump_keys(r)
    with pytest.raises(EncodingError, match=r"report\.extra\['handle'\]"):
        state.lock_and_report_trial_evaluation(trial, report, worker_id="w")
    assert dump_keys(r) == before


def test_a_report_with_an_invalid_outcome_is_refused(state, r):
    trial = state.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=0.1,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=1.0,
    )
    report.reported_as = "maybe"
    before = dump_keys(r)
    with pytest.raises(EncodingError, match="'maybe'"):
        state.lock_and_report_trial_evaluation(trial, report, worker_id="w")
    assert dump_keys(r) == before


def test_an_optimizer_state_that_cannot_be_stored_creates_no_run(redis_url, r):
    before = dump_keys(r)
    with pytest.raises(EncodingError, match=r"shared_state\['x'\]"):
        create(redis_url, optimizer_state=opt_state(shared_state={"x": {1, 2}}))
    assert dump_keys(r) == before


@pytest.mark.parametrize(
    "info",
    [
        {"name": "rs"},
        {"name": 3, "info": {}},
        {"name": "rs", "info": {"callback": print}},
        "random_search",
    ],
)
def test_optimizer_info_that_cannot_be_stored_creates_no_run(redis_url, r, info):
    before = dump_keys(r)
    with pytest.raises(EncodingError, match="optimizer_info"):
        create(redis_url, optimizer_info=info)
    assert dump_keys(r) == before


def test_wrong_optimizer_info_on_reopen_writes_nothing(state, redis_url, r):
    before = dump_keys(r)
    with pytest.raises(NePSError, match="does not match"):
        create(redis_url, optimizer_info={"name": "bayesian_optimization", "info": {}})
    assert dump_keys(r) == before


def test_a_run_of_a_newer_layout_version_is_refused_on_load_and_create(
    state, redis_url, r
):
    r.hset(RunKeys("run").meta, "schema_version", "99")
    before = dump_keys(r)
    with pytest.raises(SchemaVersionError, match="version 99"):
        RedisNePSState.create_or_load("run", redis=redis_url, load_only=True)
    with pytest.raises(SchemaVersionError, match="version 99"):
        create(redis_url)
    assert dump_keys(r) == before


def test_a_server_that_may_evict_keys_is_refused_before_any_write(start_server):
    server = start_server(args=["--maxmemory-policy", "allkeys-lru"])
    with server.client() as client:
        before = dump_keys(client)
        with pytest.raises(UnsafeServerError, match="allkeys-lru"):
            create(server.url)
        assert dump_keys(client) == before


def test_an_evicting_server_is_accepted_with_a_warning_when_allowed(
    start_server, monkeypatch
):
    server = start_server(args=["--maxmemory-policy", "volatile-lru"])
    monkeypatch.setenv("NEPS_REDIS_ALLOW_EVICTION", "1")
    with pytest.warns(UserWarning, match="volatile-lru"):
        create(server.url)


def test_a_server_that_forbids_config_get_gives_a_warning_not_an_error(redis_url, r):
    # Given a user allowed everything but CONFIG
    r.acl_setuser(
        "worker",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@all", "-config"],
    )
    host_port = redis_url.split("://")[1].split("/")[0]
    url = f"redis://worker:pw@{host_port}/0"

    # When it creates a run, Then it is warned, and the run works
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = create(url, "acl run")
    assert any("Could not verify" in str(w.message) for w in caught)
    assert all("pw@" not in str(w.message) for w in caught)
    assert state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w").id == "1"
    r.acl_deluser("worker")


def test_a_worker_id_that_is_not_a_string_is_refused(state, r):
    before = dump_keys(r)
    with pytest.raises(InvalidNameError):
        state.lock_and_set_new_worker_id(7)
    with pytest.raises(InvalidNameError):
        state.claim_next_pending_trial(worker_id="")
    assert dump_keys(r) == before


def test_an_unreachable_server_error_does_not_show_the_password():
    with pytest.raises(Exception) as error:
        create("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://user:s3cret@127.0.0.1:1/0", "s3cret"),
        ("redis://127.0.0.1:1/0?password=S3cretPW", "S3cretPW"),
        ("unix:///nonexistent/sock?password=S3cretPW", "S3cretPW"),
        ("redis://alice:S3c@retPW@127.0.0.1:1/0", "retPW"),
        ("redis://alice:S3c/retPW@127.0.0.1:1/0", "retPW"),
    ],
)
def test_a_password_in_any_part_of_a_url_is_redacted(url, secret):
    from neps_redis.connection import redact_text, redact_url

    assert secret not in redact_url(url)
    assert secret not in redact_text(f"could not reach {url}", url)


def test_a_string_that_is_not_valid_unicode_is_refused_naming_the_field(state, r):
    before = dump_keys(r)
    with pytest.raises(EncodingError, match=r"trial '9' config.*not valid unicode"):
        state.lock_and_sample_trial(
            lambda trials, budget_info, n=None: SampledConfig("9", {"name": "\ud800"}),
            worker_id="w",
        )
    assert dump_keys(r) == before


def test_an_error_whose_str_fails_is_still_reported_by_its_repr(state):
    class UnprintableError(Exception):
        def __str__(self):
            raise RuntimeError("no")

    trial = state.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="crashed",
        time_end=time.time(),
        objective_to_minimize=None,
        cost=None,
        learning_curve=None,
        err=UnprintableError(),
        tb=None,
        extra=None,
        evaluation_duration=1.0,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id="w")
    assert state.lock_and_get_errors().errs[-1].err_type == "UnprintableError"
    assert state.lock_and_get_trial_by_id(trial.id).metadata.state == "crashed"


def test_numpy_times_are_stored_as_plain_numbers_and_reset_keeps_the_trial(state, r):
    # Given a claimed trial whose times are numpy floats (one of them NaN)
    import numpy as np

    trial = state.claim_next_pending_trial(worker_id="w")
    trial.metadata.time_sampled = np.float64(trial.metadata.time_sampled)
    trial.metadata.time_started = np.float32("nan")
    state.put_updated_trial(trial)
    assert not r.hget(RunKeys("run").trial(trial.id), "time_sampled").startswith(b"{")

    # When it is reset
    state.lock_and_reset_trial_by_id(trial.id)

    # Then it is pending, in the pending index, and the counts agree
    assert r.zscore(RunKeys("run").pending, trial.id) is not None
    assert state.counts() == {"pending": 2}
    assert state.claim_next_pending_trial(worker_id="w").id == trial.id
