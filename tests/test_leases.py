"""Liveness: heartbeats renew leases, sweeps requeue dead workers' trials,
claim tokens fence late writes, and every new write survives a lost reply.

Leases here are a fraction of a second, set on each state before its first
claim, so that expiry is seen without waiting.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import time
from collections import Counter

import pytest

from neps_redis import (
    LeaseLostError,
    OptimizationState,
    RedisNePSState,
    SeedSnapshot,
    Trial,
)
from neps_redis.connection import client_from_url
from neps_redis.errors import InvalidStateError, WorkerLostError
from neps_redis.keys import RunKeys
from neps_redis.leases import server_time_ms, sweep_expired
from neps_redis.scripts import Scripts
from tests.helpers import dump_keys
from tests.optimizers import CountingRandomSearch
from tests.proxy import ReplyDroppingProxy

INFO = {"name": "random_search", "info": {}}
KEYS = RunKeys("run")
SPAWN = multiprocessing.get_context("spawn")


def open_state(
    url,
    *,
    lease: float = 0.3,
    heartbeat: bool = False,
    beat: float = 0.05,
    sweep: float = 0.05,
    attempts: int = 3,
) -> RedisNePSState:
    state = RedisNePSState.create_or_load(
        "run",
        redis=url,
        optimizer_info=INFO,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
        heartbeat=heartbeat,
    )
    state.lease_seconds = lease
    state.heartbeat_seconds = beat
    state.sweep_seconds = sweep
    state.max_attempts = attempts
    return state


def finish(state, trial, *, worker_id, objective=0.5) -> None:
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
    state.lock_and_report_trial_evaluation(trial, report, worker_id=worker_id)


def events(r, name=None) -> list[dict]:
    entries = [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(KEYS.events)
    ]
    return [e for e in entries if name is None or e["event"] == name]


def wait_until_expired(r, trial_id) -> None:
    deadline = int(r.hget(KEYS.trial(trial_id), "lease_deadline_ms"))
    while server_time_ms(r) <= deadline:
        time.sleep(0.02)


@pytest.fixture
def state(redis_url):
    state = open_state(redis_url)
    yield state
    state.close()


# --- heartbeats --------------------------------------------------------------


def test_a_heartbeat_keeps_a_trial_evaluated_longer_than_its_lease(redis_url, r):
    # Given a worker whose heartbeat renews a 0.6 s lease every 0.05 s
    worker = open_state(redis_url, heartbeat=True, lease=0.6)
    worker.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")
    trial = worker.claim_next_pending_trial(worker_id="w")

    # When it evaluates for two leases while others sweep
    other = open_state(redis_url)
    for _ in range(6):
        time.sleep(0.2)
        assert other.requeue_expired() == []

    # Then the trial is still its own and its report is stored
    finish(worker, trial, worker_id="w", objective=0.25)
    stored = worker.lock_and_get_trial_by_id(trial.id)
    assert stored.report.objective_to_minimize == 0.25
    assert events(r, "lease_expired") == []
    worker.close()


def test_a_heartbeat_stamps_the_worker_record_with_the_server_clock(redis_url, r):
    # Given a registered worker holding a trial
    worker = open_state(redis_url, heartbeat=True, beat=60)
    worker_id = worker.lock_and_set_new_worker_id()
    before = json.loads(r.hget(KEYS.worker_info, worker_id))
    worker.lock_and_sample_trial(CountingRandomSearch(), worker_id=worker_id)
    worker.claim_next_pending_trial(worker_id=worker_id)

    # When its heartbeat beats
    worker._heartbeat.beat()

    # Then the record keeps host, pid and start, and has the server's time
    record = json.loads(r.hget(KEYS.worker_info, worker_id))
    assert {k: record[k] for k in ("host", "pid")} == {
        k: before[k] for k in ("host", "pid")
    }
    assert record["started"] == pytest.approx(before["started"], abs=1e-3)
    assert record["last_heartbeat"] == pytest.approx(server_time_ms(r) / 1000, abs=2)
    worker.close()


def test_a_heartbeat_learns_that_its_trial_was_taken_over(redis_url, r, caplog):
    # Given a worker holding a trial, which is then reset and claimed by another
    worker = open_state(redis_url, heartbeat=True, beat=60)
    worker.lock_and_sample_trial(CountingRandomSearch(), worker_id="slow")
    trial = worker.claim_next_pending_trial(worker_id="slow")
    other = open_state(redis_url)
    other.lock_and_reset_trial_by_id(trial.id)
    other.claim_next_pending_trial(worker_id="fast")

    # When the first worker's heartbeat beats
    with caplog.at_level(logging.WARNING, logger="neps_redis.leases"):
        lost = worker._heartbeat.beat()

    # Then it learns the trial is lost, says so with the ids, and stops renewing
    assert lost == [trial.id]
    assert worker.lease_lost(trial.id)
    assert worker._heartbeat.held() == []
    assert f"trial '{trial.id}'" in caplog.text and "'slow'" in caplog.text
    assert r.hget(KEYS.trial(trial.id), "evaluating_worker_id") == b"fast"
    worker.close()


def test_a_renewal_never_shortens_a_longer_lease(state, r):
    # Given a trial claimed with a lease of a minute
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")
    trial = state.claim_next_pending_trial(worker_id="w", lease_seconds=60)
    deadline = int(r.hget(KEYS.trial(trial.id), "lease_deadline_ms"))

    # When it is renewed with a lease of a tenth of a second
    held = state.renew_lease(trial, lease_seconds=0.1)

    # Then the minute stands, in the hash and in the index
    assert held
    assert int(r.hget(KEYS.trial(trial.id), "lease_deadline_ms")) == deadline
    assert r.zscore(KEYS.evaluating, trial.id) == deadline


def test_close_stops_the_heartbeat_and_a_context_manager_closes(redis_url):
    # Given a worker whose heartbeat started with its first claim
    with open_state(redis_url, heartbeat=True, beat=0.05) as worker:
        worker.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")
        worker.claim_next_pending_trial(worker_id="w")
        heartbeat = worker._heartbeat
        assert heartbeat.running

    # When the state is closed by the context manager
    # Then the thread is gone
    assert not heartbeat.running
    assert worker._heartbeat is None


def test_heartbeats_can_be_turned_off_by_argument_or_environment(
    redis_url, monkeypatch
):
    # Given one state opened with heartbeat=False, one with NEPS_REDIS_HEARTBEAT=0
    by_argument = open_state(redis_url, heartbeat=False)
    monkeypatch.setenv("NEPS_REDIS_HEARTBEAT", "0")
    by_environment = RedisNePSState.create_or_load(
        "run", redis=redis_url, load_only=True
    )
    by_argument.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=2)

    # When both claim
    by_argument.claim_next_pending_trial(worker_id="a")
    by_environment.claim_next_pending_trial(worker_id="b")

    # Then neither started a heartbeat
    assert by_argument._heartbeat is None
    assert by_environment._heartbeat is None


# --- requeue -----------------------------------------------------------------


def test_an_expired_trial_is_requeued_with_its_lost_attempt_in_its_history(state, r):
    # Given a trial whose worker died (no heartbeat) and whose lease expired
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    trial = state.claim_next_pending_trial(worker_id="dead")
    wait_until_expired(r, trial.id)

    # When a sweep runs
    swept = state.requeue_expired()

    # Then it is pending again without its evaluation fields or claim token
    assert swept == [(trial.id, "requeued")]
    stored = state.lock_and_get_trial_by_id(trial.id)
    assert stored.metadata.state == Trial.State.PENDING
    assert stored.metadata.evaluating_worker_id is None
    assert stored.metadata.time_started is None
    fields = r.hgetall(KEYS.trial(trial.id))
    assert b"token" not in fields and b"lease_deadline_ms" not in fields
    assert fields[b"attempts"] == b"1"
    assert r.zscore(KEYS.pending, trial.id) == trial.metadata.time_sampled
    # And the lost attempt is in its history and the events, not the errors
    [lost] = state.attempt_history(trial.id)
    assert lost["attempt"] == 1 and lost["worker_id"] == "dead"
    assert lost["reason"] == "lease_expired"
    assert lost["time_started"] == trial.metadata.time_started
    assert isinstance(lost["lease_deadline_ms"], int)
    assert state.lock_and_get_errors().empty()
    [event] = events(r, "lease_expired")
    assert event["state"] == "pending" and event["attempt"] == "1"
    assert state.counts() == {"pending": 1}


def test_a_trial_that_lost_its_worker_on_every_attempt_is_crashed(redis_url, r):
    # Given a run that allows two attempts, and a trial whose workers die
    state = open_state(redis_url, attempts=2)
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    outcomes = []
    for worker in ("w1", "w2"):
        trial = state.claim_next_pending_trial(worker_id=worker)
        wait_until_expired(r, trial.id)
        outcomes += state.requeue_expired()

    # Then the second loss crashes it, with a report saying the worker was lost
    assert outcomes == [("1", "requeued"), ("1", "crashed")]
    crashed = state.lock_and_get_trial_by_id("1")
    assert crashed.metadata.state == Trial.State.CRASHED
    assert crashed.report.reported_as == "crashed"
    assert "lost its worker ('w2'" in str(crashed.report.err)
    assert crashed.report.objective_to_minimize is None
    assert b"token" not in r.hgetall(KEYS.trial("1"))
    [error] = state.lock_and_get_errors().errs
    assert (error.trial_id, error.worker_id) == ("1", "w2")
    assert error.err_type == WorkerLostError.__name__
    assert [a["worker_id"] for a in state.attempt_history("1")] == ["w1", "w2"]
    assert state.counts() == {"crashed": 1}


def test_a_reset_trial_gets_every_attempt_again(redis_url, r):
    # Given a trial crashed because its workers died on both its attempts
    state = open_state(redis_url, attempts=2)
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    for worker in ("w1", "w2"):
        trial = state.claim_next_pending_trial(worker_id=worker)
        wait_until_expired(r, trial.id)
        state.requeue_expired()
    assert state.counts() == {"crashed": 1}

    # When it is reset and its next worker dies too
    state.lock_and_reset_trial_by_id("1")
    trial = state.claim_next_pending_trial(worker_id="w3")
    wait_until_expired(r, trial.id)

    # Then it is requeued, as a new trial would be, and its history stays
    assert state.requeue_expired() == [("1", "requeued")]
    assert r.hget(KEYS.trial("1"), "attempts") == b"1"
    assert [a["worker_id"] for a in state.attempt_history("1")] == ["w1", "w2", "w3"]


def test_a_claim_with_nothing_pending_requeues_a_dead_worker_s_trial(state, r):
    # Given a trial whose worker died, and nothing else pending
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    dead = state.claim_next_pending_trial(worker_id="dead")
    wait_until_expired(r, dead.id)

    # When another worker asks for work
    other = open_state(state.client)
    again = other.claim_next_pending_trial(worker_id="alive")

    # Then it gets that trial, as its second attempt
    assert again.id == dead.id
    assert r.hget(KEYS.trial(dead.id), "attempts") == b"2"
    assert again.metadata.evaluating_worker_id == "alive"


def test_a_late_report_after_a_takeover_is_refused_recorded_and_never_stored(state, r):
    # Given a worker whose lease expired, whose trial was requeued and claimed
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    late = state.claim_next_pending_trial(worker_id="slow")
    wait_until_expired(r, late.id)
    other = open_state(state.client)
    current = other.claim_next_pending_trial(worker_id="fast")
    assert current.id == late.id

    # When the first worker reports
    with pytest.raises(LeaseLostError):
        finish(state, late, worker_id="slow", objective=9.0)

    # Then its result is an event with its objective, and the trial is the other's
    [event] = events(r, "late_report")
    assert event["worker_id"] == "slow" and event["objective_to_minimize"] == "9.0"
    stored = state.lock_and_get_trial_by_id(late.id)
    assert stored.metadata.state == Trial.State.EVALUATING
    assert stored.metadata.evaluating_worker_id == "fast"
    finish(other, current, worker_id="fast", objective=1.0)
    assert state.lock_and_get_trial_by_id(late.id).report.objective_to_minimize == 1.0
    assert [e["worker_id"] for e in events(r, "reported")] == ["fast"]


def test_a_second_result_for_a_finished_trial_is_refused_and_recorded(state, r):
    # Given a trial that has its result
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    trial = state.claim_next_pending_trial(worker_id="w")
    finish(state, trial, worker_id="w", objective=1.0)
    before = r.hgetall(KEYS.trial("1"))

    # When a copy without a claim reports it again (a result saved later
    # for the wrong trial, say)
    again = state.lock_and_get_trial_by_id("1")
    with pytest.raises(InvalidStateError, match="already has a result"):
        finish(state, again, worker_id="late", objective=9.0)

    # Then the first result stands, and the second is an event
    assert r.hgetall(KEYS.trial("1")) == before
    [event] = events(r, "late_report")
    assert event["worker_id"] == "late" and event["objective_to_minimize"] == "9.0"
    # and after a reset it may be evaluated and reported anew
    state.lock_and_reset_trial_by_id("1")
    trial = state.claim_next_pending_trial(worker_id="w")
    finish(state, trial, worker_id="w", objective=2.0)
    assert state.lock_and_get_trial_by_id("1").report.objective_to_minimize == 2.0


def test_a_stale_copy_cannot_overwrite_a_trial_held_by_another_worker(state, r):
    # Given a copy read while one worker held the trial, then a takeover
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    state.claim_next_pending_trial(worker_id="slow")
    stale = state.lock_and_get_trial_by_id("1")
    state.lock_and_reset_trial_by_id("1")
    state.claim_next_pending_trial(worker_id="fast")
    before = r.hgetall(KEYS.trial("1"))

    # When the stale copy is put back, marked corrupted
    stale.set_corrupted()
    with pytest.raises(LeaseLostError):
        state.put_updated_trial(stale)

    # Then nothing of the trial changed and the attempt is an event
    assert r.hgetall(KEYS.trial("1")) == before
    assert [e["state"] for e in events(r, "late_update")] == ["corrupted"]


def test_a_tokenless_report_cannot_finish_a_trial_another_worker_holds(state):
    # Given a pending copy of a trial, then claimed by a worker
    pending = state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    state.claim_next_pending_trial(worker_id="holder")

    # When the pending copy is reported
    # Then it is refused: the report does not know the holder's token
    with pytest.raises(LeaseLostError):
        finish(state, pending, worker_id="other")
    assert state.counts() == {"evaluating": 1}


def test_neps_s_claim_by_put_updated_trial_is_held_and_fenced(redis_url, r):
    # Given a pending trial that NePS's runtime makes evaluating with a put
    worker = open_state(redis_url, heartbeat=True, beat=60)
    trial = worker.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    trial.set_evaluating(time_started=time.time(), worker_id="neps-worker")

    # When it is put
    worker.put_updated_trial(trial)

    # Then it has a claim token, counts as an attempt and is renewed
    assert trial.token and r.hget(KEYS.trial("1"), "token") == trial.token.encode()
    assert r.hget(KEYS.trial("1"), "attempts") == b"1"
    assert worker._heartbeat.held() == ["1"]
    # And its report (the copy with the token) is stored; a second copy is not
    stale = Trial(config=trial.config, metadata=trial.metadata, report=None)
    with pytest.raises(LeaseLostError):
        finish(worker, stale, worker_id="neps-worker")
    finish(worker, trial, worker_id="neps-worker")
    assert worker._heartbeat.held() == []
    assert worker.counts() == {"success": 1}
    worker.close()


def test_a_sweep_leaves_alone_a_trial_renewed_after_it_was_read(state, r):
    # Given a trial read as expired by a sweep, then renewed by its worker
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    trial = state.claim_next_pending_trial(worker_id="w")
    wait_until_expired(r, trial.id)
    candidates = [i.decode() for i in r.zrangebyscore(KEYS.evaluating, 0, math.inf)]
    assert state.renew_lease(trial, lease_seconds=60)
    r.set(KEYS.sweep_lock, "mine")

    # When the sweep's script runs with it
    reply = requeue_script(state, "mine", candidates)

    # Then it acts on nothing
    assert reply == [b"done"]
    assert state.counts() == {"evaluating": 1}


def test_only_the_sweep_holding_the_sweep_lock_writes(state, r):
    # Given an expired trial and a sweep lock taken by another sweep
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    trial = state.claim_next_pending_trial(worker_id="w")
    wait_until_expired(r, trial.id)
    r.set(KEYS.sweep_lock, "someone-else")
    before = dump_keys(r)

    # When a sweep with another token runs its script
    reply = requeue_script(state, "mine", [trial.id])

    # Then it is told so and writes nothing
    assert reply == [b"busy"]
    assert dump_keys(r) == before


def test_automatic_sweeps_are_paced_run_wide_by_the_sweep_lock(state, r):
    # Given two expired trials, and a sweep that took the lock for a minute
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=2)
    first = state.claim_next_pending_trial(worker_id="w")
    wait_until_expired(r, first.id)
    kwargs = {
        "scripts": Scripts(r),
        "max_attempts": 3,
        "lock_ms": 60_000,
        "events_maxlen": 1000,
        "request_ttl_ms": 60_000,
    }
    assert len(sweep_expired(r, KEYS, force=False, **kwargs)) == 1
    second = state.claim_next_pending_trial(worker_id="w")
    wait_until_expired(r, second.id)

    # When another automatic sweep comes within that minute
    # Then it does nothing; a sweep on demand takes the lock over
    assert sweep_expired(r, KEYS, force=False, **kwargs) is None
    assert state.counts() == {"pending": 1, "evaluating": 1}
    assert [s.outcome for s in sweep_expired(r, KEYS, force=True, **kwargs)] == [
        "requeued"
    ]


def requeue_script(state, token, ids):
    keys = state.keys
    return Scripts(state.client).run(
        "requeue_expired",
        [
            keys.sweep_lock,
            keys.pending,
            keys.evaluating,
            keys.finished,
            keys.counts,
            keys.errors,
            keys.events,
            keys.request("test"),
            *(keys.trial(i) for i in ids),
        ],
        [token, 3, repr(time.time()), "WorkerLostError", 1000, 60_000, *ids],
    )


# --- lost replies --------------------------------------------------------------


@pytest.fixture
def proxy(server):
    proxy = ReplyDroppingProxy("127.0.0.1", server.port)
    yield proxy
    proxy.close()


def test_a_requeue_whose_reply_was_lost_requeues_once_and_says_so(state, proxy, r):
    # Given an expired trial, and a state whose connection loses a reply
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    trial = state.claim_next_pending_trial(worker_id="dead")
    wait_until_expired(r, trial.id)
    state.requeue_expired()  # loads the scripts, so the proxied EVALSHA acts
    proxied = open_state(client_from_url(proxy.url))
    trial = state.claim_next_pending_trial(worker_id="dead")
    wait_until_expired(r, trial.id)
    proxy.drop_next_reply("EVALSHA")

    # When the proxied state requeues
    swept = proxied.requeue_expired()

    # Then the re-sent script answered with the first run's reply
    assert proxy.dropped == 1
    assert swept == [(trial.id, "requeued")]
    assert len(events(r, "lease_expired")) == 2
    assert [a["attempt"] for a in state.attempt_history(trial.id)] == [1, 2]


def test_a_heartbeat_whose_reply_was_lost_renews_and_reports_the_loss(
    redis_url, proxy, r
):
    # Given a proxied worker holding two trials, one of them taken over
    warm = open_state(redis_url, heartbeat=True, beat=60)
    warm.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=3)
    warm.claim_next_pending_trial(worker_id="warm")
    warm._heartbeat.beat()  # loads the script, so the proxied EVALSHA acts
    worker = open_state(client_from_url(proxy.url), heartbeat=True, beat=60, lease=5)
    kept = worker.claim_next_pending_trial(worker_id="w")
    lost = worker.claim_next_pending_trial(worker_id="w")
    warm.lock_and_reset_trial_by_id(lost.id)
    deadline = int(r.hget(KEYS.trial(kept.id), "lease_deadline_ms"))
    requests = len(r.keys(KEYS.request("*")))
    time.sleep(0.01)  # so that a renewal moves the deadline
    proxy.drop_next_reply("EVALSHA")

    # When its heartbeat beats
    reply = worker._heartbeat.beat()

    # Then the loss is reported once, the other lease renewed
    assert proxy.dropped == 1
    assert reply == [lost.id]
    assert worker._heartbeat.held() == [kept.id]
    assert int(r.hget(KEYS.trial(kept.id), "lease_deadline_ms")) > deadline
    assert len(r.keys(KEYS.request("*"))) == requests + 1
    worker.close()
    warm.close()


def test_an_optimizer_lease_whose_set_reply_was_lost_is_still_taken(state, proxy, r):
    # Given a state whose connection loses the reply of the lease's SET
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s")
    proxied = open_state(client_from_url(proxy.url))
    proxied.optimizer_wait_seconds = 5
    proxy.drop_next_reply("SET")

    # When it samples (the client sends the SET again, which finds it taken)
    started = time.monotonic()
    proxied.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")

    # Then it recognises its own lease instead of waiting for it to expire
    assert proxy.dropped == 1
    assert time.monotonic() - started < 2
    assert proxied.all_trial_ids() == ["1", "2"]


# --- the optimizer lease -------------------------------------------------------


class _DiesWhileSampling:
    def __call__(self, trials, budget_info, n=None):
        os.kill(os.getpid(), signal.SIGKILL)


def _sample_and_die(url: str) -> None:
    state = RedisNePSState.create_or_load("run", redis=url, load_only=True)
    state.lock_and_sample_trial(_DiesWhileSampling(), worker_id="doomed")


def test_a_sampler_that_dies_holding_the_optimizer_lease_blocks_no_longer_than_it(
    state, redis_url, r, monkeypatch
):
    # Given a sampler that dies holding a 1 s optimizer lease
    monkeypatch.setenv("NEPS_REDIS_OPTIMIZER_LEASE_SECONDS", "1")
    process = SPAWN.Process(target=_sample_and_die, args=(redis_url,))
    process.start()
    process.join(30)
    assert process.exitcode == -signal.SIGKILL
    remaining_ms = r.pttl(KEYS.optimizer_lease)
    assert 0 < remaining_ms <= 1000

    # When another worker samples
    started = time.monotonic()
    trial = state.lock_and_sample_trial(CountingRandomSearch(), worker_id="alive")

    # Then it waited for the lease to expire, and no longer
    waited = time.monotonic() - started
    assert remaining_ms / 1000 - 0.05 <= waited <= remaining_ms / 1000 + 0.5
    assert trial.id == "1"
    assert Counter(e["event"] for e in events(r))["sampled"] == 1
