"""`check` names every broken invariant of a run; `reap` requeues on demand.

Each test breaks one invariant by hand, with raw Redis commands, and
expects exactly that violation.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from neps_redis import OptimizationState, RedisNePSState, SeedSnapshot
from neps_redis.check import check_run, inspect_run
from neps_redis.cli import main
from neps_redis.errors import RunNotFoundError
from neps_redis.keys import RunKeys
from tests.optimizers import CountingRandomSearch

KEYS = RunKeys("run")


def finish(state, trial, objective=0.5) -> None:
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=objective,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=0.01,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id="w")


@pytest.fixture
def state(redis_url) -> RedisNePSState:
    """Trials 1-2 success, 3 evaluating, 4-5 pending."""
    state = RedisNePSState.create_or_load(
        "run",
        redis=redis_url,
        optimizer_info={"name": "random_search", "info": {}},
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
        heartbeat=False,
    )
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=5)
    for _ in range(2):
        finish(state, state.claim_next_pending_trial(worker_id="w"))
    state.claim_next_pending_trial(worker_id="w")
    return state


def kinds(r) -> list[tuple[str, str | None]]:
    return [(v.kind, v.trial_id) for v in check_run(r, "run")]


def test_a_run_built_by_the_transitions_has_no_violations(state, r):
    assert check_run(r, "run") == []
    assert inspect_run(r, "run").notes == []


def test_checking_a_run_that_does_not_exist_raises(r):
    with pytest.raises(RunNotFoundError):
        check_run(r, "nothing-here")


def test_a_trial_in_no_state_index_is_named(state, r):
    r.zrem(KEYS.pending, "4")
    assert kinds(r) == [("no_state_index", "4")]


def test_a_trial_in_two_state_indexes_is_named(state, r):
    r.zadd(KEYS.finished, {"4": 4})
    assert kinds(r) == [("several_state_indexes", "4")]


def test_a_trial_in_the_wrong_state_index_is_named(state, r):
    r.zrem(KEYS.pending, "4")
    r.zadd(KEYS.finished, {"4": 4})
    assert kinds(r) == [("wrong_state_index", "4")]


def test_an_index_entry_without_a_trial_hash_is_named(state, r):
    r.delete(KEYS.trial("5"))
    r.hincrby(KEYS.counts, "pending", -1)
    assert kinds(r) == [("missing_hash", "5")]


def test_a_state_index_entry_missing_from_trials_is_named(state, r):
    r.zrem(KEYS.trials, "5")
    assert kinds(r) == [("not_in_trials", "5")]


def test_a_hash_whose_id_field_differs_is_named(state, r):
    r.hset(KEYS.trial("5"), "id", "6")
    assert kinds(r) == [("id_mismatch", "5")]


def test_an_evaluating_trial_without_its_claim_token_is_named(state, r):
    r.hdel(KEYS.trial("3"), "token")
    assert kinds(r) == [("evaluating_without_lease", "3")]


def test_a_lease_left_on_a_finished_trial_is_named(state, r):
    r.hset(KEYS.trial("1"), "token", "abc")
    assert kinds(r) == [("lease_without_evaluating", "1")]


def test_an_evaluating_score_that_is_not_the_lease_deadline_is_named(state, r):
    r.zadd(KEYS.evaluating, {"3": 1})
    assert kinds(r) == [("lease_score_mismatch", "3")]


def test_counts_that_disagree_with_the_trial_hashes_are_named(state, r):
    r.hincrby(KEYS.counts, "success", 1)
    [violation] = check_run(r, "run")
    assert violation.kind == "counts_mismatch"
    assert "counts says 3 success, the trial hashes 2" in violation.detail


def test_a_trial_without_seq_and_two_trials_sharing_one_are_named(state, r):
    r.hdel(KEYS.trial("5"), "seq")
    r.hset(KEYS.trial("4"), "seq", "1")
    assert kinds(r) == [("missing_seq", "5"), ("duplicate_seq", None)]


def test_a_next_seq_below_the_number_of_trials_is_named(state, r):
    r.hset(KEYS.meta, "next_seq", 2)
    assert kinds(r) == [("next_seq_too_small", None)]


def test_a_trial_whose_latest_event_names_another_state_is_named(state, r):
    # Move trial 5 to failed everywhere but in the event stream.
    r.hset(KEYS.trial("5"), "state", "failed")
    r.zrem(KEYS.pending, "5")
    r.zadd(KEYS.finished, {"5": 5})
    r.hincrby(KEYS.counts, "pending", -1)
    r.hincrby(KEYS.counts, "failed", 1)
    [violation] = check_run(r, "run")
    assert (violation.kind, violation.trial_id) == ("event_state_mismatch", "5")
    assert "(sampled) says state pending" in violation.detail


def test_an_expired_lease_and_an_error_of_a_removed_trial_are_notes_only(state, r):
    r.hset(KEYS.trial("3"), "lease_deadline_ms", 1)
    r.zadd(KEYS.evaluating, {"3": 1})
    r.xadd(KEYS.errors, {"trial_id": "gone", "worker_id": "w", "err_type": "E"})
    result = inspect_run(r, "run")
    assert result.violations == []
    assert [(n.kind, n.trial_id) for n in result.notes] == [
        ("lease_expired", "3"),
        ("error_of_unknown_trial", "gone"),
    ]


# --- the command line ------------------------------------------------------------


def test_check_exits_0_on_a_sound_run(state, redis_url):
    result = CliRunner().invoke(main, ["--redis", redis_url, "check", "run"])
    assert result.exit_code == 0, result.output
    assert "Run 'run': 5 trials, no violations." in result.output


def test_check_exits_1_naming_every_violation(state, r, redis_url):
    r.zrem(KEYS.pending, "4")
    r.hdel(KEYS.trial("3"), "token")
    result = CliRunner().invoke(main, ["--redis", redis_url, "check", "run"])
    assert result.exit_code == 1
    assert "violation: no_state_index: trial '4'" in result.output
    assert "violation: evaluating_without_lease: trial '3'" in result.output
    assert "2 violations of" in result.output


def test_check_json_is_one_document_and_keeps_the_exit_codes(state, r, redis_url):
    # When a sound run is checked for a script
    sound = CliRunner().invoke(main, ["--redis", redis_url, "check", "run", "--json"])

    # Then stdout is one JSON object saying so, and the exit code is 0
    assert sound.exit_code == 0, sound.output
    record = json.loads(sound.stdout)
    assert record["ok"] is True and record["trials"] == 5
    assert record["violations"] == [] and record["run"] == "run"

    # And a broken one is exit code 1, with every violation in the document
    r.zrem(KEYS.pending, "4")
    broken = CliRunner().invoke(main, ["--redis", redis_url, "check", "run", "--json"])
    assert broken.exit_code == 1
    record = json.loads(broken.stdout)
    assert record["ok"] is False
    assert [(v["kind"], v["trial_id"]) for v in record["violations"]] == [
        ("no_state_index", "4")
    ]
    assert "1 violation of" in broken.stderr


def test_reap_requeues_expired_trials_and_says_what_became_of_each(state, r, redis_url):
    r.hset(KEYS.trial("3"), "lease_deadline_ms", 1)
    r.zadd(KEYS.evaluating, {"3": 1})
    result = CliRunner().invoke(main, ["--redis", redis_url, "reap", "run"])
    assert result.exit_code == 0, result.output
    assert "trial 3: requeued (worker 'w' lost it on attempt 1)" in result.output
    assert state.counts() == {"success": 2, "pending": 3}
    again = CliRunner().invoke(main, ["--redis", redis_url, "reap", "run"])
    assert "no trial's lease has expired" in again.output
    assert check_run(r, "run") == []
