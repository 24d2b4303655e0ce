"""A write whose reply is lost is sent again by redis-py; it acts once."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from neps_redis import LeaseLostError, OptimizationState, RedisNePSState, SeedSnapshot
from neps_redis.connection import client_from_url
from neps_redis.keys import RunKeys
from tests.optimizers import CountingRandomSearch
from tests.proxy import ReplyDroppingProxy

INFO = {"name": "random_search", "info": {}}


@pytest.fixture
def proxy(server):
    proxy = ReplyDroppingProxy("127.0.0.1", server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def direct(redis_url) -> RedisNePSState:
    state = RedisNePSState.create_or_load(
        "replay",
        redis=redis_url,
        optimizer_info=INFO,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    # Load every script into the server's cache through the direct client,
    # so the proxied EVALSHA acts on the first try.
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="s", n=3)
    finish(state, state.claim_next_pending_trial(worker_id="s"), "s")
    state.lock_and_set_new_worker_id("warm-up")
    return state


@pytest.fixture
def proxied(proxy, direct) -> RedisNePSState:
    client = client_from_url(proxy.url)
    return RedisNePSState.create_or_load("replay", redis=client, load_only=True)


def finish(state, trial, worker_id):
    report = trial.set_complete(
        report_as="crashed",
        time_end=time.time(),
        objective_to_minimize=None,
        cost=None,
        learning_curve=None,
        err=ValueError("boom"),
        tb="tb",
        extra=None,
        evaluation_duration=0.1,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id=worker_id)


def events(r) -> Counter:
    return Counter(f[b"event"] for _, f in r.xrange(RunKeys("replay").events))


def test_the_proxy_really_makes_redis_py_send_a_write_twice(proxy, r):
    # A plain INCRBY has no replay guard: losing its reply counts it twice.
    # This is the fault every transition below must survive.
    client = client_from_url(proxy.url)
    proxy.drop_next_reply("INCRBY")

    client.incr("counter")

    assert proxy.dropped == 1
    assert r.get("counter") == b"2"


def test_a_claim_whose_reply_was_lost_claims_one_trial_once(proxied, proxy, r):
    before = events(r)
    proxy.drop_next_reply("EVALSHA")

    trial = proxied.claim_next_pending_trial(worker_id="w")

    assert proxy.dropped == 1
    assert trial.id == "2"
    assert events(r)[b"claimed"] - before[b"claimed"] == 1
    assert proxied.counts() == {"pending": 1, "evaluating": 1, "crashed": 1}
    assert r.hget(RunKeys("replay").trial("2"), "attempts") == b"1"
    assert proxied.claim_next_pending_trial(worker_id="w").id == "3"


def test_a_report_whose_reply_was_lost_is_recorded_once(proxied, proxy, r):
    trial = proxied.claim_next_pending_trial(worker_id="w")
    proxy.drop_next_reply("EVALSHA")

    finish(proxied, trial, "w")

    assert proxy.dropped == 1
    assert [e.trial_id for e in proxied.lock_and_get_errors().errs] == ["1", "2"]
    assert events(r)[b"reported"] == 2
    assert proxied.counts() == {"pending": 1, "crashed": 2}


def test_a_sample_whose_reply_was_lost_stores_its_trials_once(proxied, proxy, r):
    proxy.drop_next_reply("EVALSHA")

    trials = proxied.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=2)

    assert proxy.dropped == 1
    assert [t.id for t in trials] == ["4", "5"]
    assert proxied.all_trial_ids() == ["1", "2", "3", "4", "5"]
    assert events(r)[b"sampled"] == 5


def test_a_worker_registration_whose_reply_was_lost_registers_once(proxied, proxy):
    proxy.drop_next_reply("EVALSHA")

    worker_id = proxied.lock_and_set_new_worker_id()

    assert proxy.dropped == 1
    assert worker_id == "worker_1"
    assert proxied.lock_and_get_optimizer_state().worker_ids == ["warm-up", "worker_1"]


@pytest.mark.parametrize(
    "method", ["lock_and_reset_trial_by_id", "lock_and_remove_trial_by_id"]
)
def test_a_reset_or_remove_whose_reply_was_lost_acts_once(proxied, proxy, r, method):
    proxy.drop_next_reply("EVALSHA")

    getattr(proxied, method)("1")

    assert proxy.dropped == 1
    assert events(r)[b"reset" if "reset" in method else b"removed"] == 1


def test_a_replayed_claim_whose_trial_was_taken_meanwhile_is_refused(direct, r):
    # Given a claim that took effect, then its trial was reset and claimed
    # by another worker before the first claim's copy was sent again
    keys = RunKeys("replay")
    request = keys.request("fixed-request-id")
    claim_keys = [
        keys.pending,
        keys.evaluating,
        keys.finished,
        keys.counts,
        keys.events,
        request,
        keys.trial("2"),
    ]

    def claim(token):
        args = ["A", "1.0", 60_000, token, 1000, 60_000, "2"]
        return direct._scripts.run("claim", claim_keys, args)

    assert claim("token-a")[1] == b"2"
    direct.lock_and_reset_trial_by_id("2")
    taken = direct.claim_next_pending_trial(worker_id="B")
    assert taken.id == "2"

    # When the first claim is replayed, Then it does not hand over B's trial
    with pytest.raises(LeaseLostError):
        claim("token-a")
    assert r.hget(keys.trial("2"), "evaluating_worker_id") == b"B"
