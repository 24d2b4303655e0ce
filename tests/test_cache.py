"""Reads of every trial cost what changed, and never miss a change."""

from __future__ import annotations

import time

from neps_redis import OptimizationState, RedisNePSState, SeedSnapshot
from tests.optimizers import CountingRandomSearch, FixedIds

INFO = {"name": "random_search", "info": {}}


def new_state(url, run="cache") -> RedisNePSState:
    return RedisNePSState.create_or_load(
        run,
        redis=url,
        optimizer_info=INFO,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )


def commands_sent(r, action) -> int:
    r.config_resetstat()
    action()
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_config")


def test_a_read_after_one_change_sends_the_same_commands_whatever_the_run_size(
    redis_url, r
):
    # Given two runs, of 10 and of 300 trials, each read once by a reader
    small, large = new_state(redis_url, "small"), new_state(redis_url, "large")
    small.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=10)
    large.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=300)
    readers = [
        RedisNePSState.create_or_load(run, redis=redis_url, load_only=True)
        for run in ("small", "large")
    ]
    for reader in readers:
        reader.lock_and_read_trials()

    # When one trial of each changes and the readers read again
    counts = []
    for writer, reader in zip((small, large), readers, strict=True):
        writer.claim_next_pending_trial(worker_id="w")
        counts.append(commands_sent(r, reader.lock_and_read_trials))

    # Then both reads sent the same, small number of commands
    assert counts[0] == counts[1]
    assert counts[0] <= 5


def test_every_kind_of_change_by_another_process_is_seen(redis_url):
    # Given a reader that has read the run once
    writer = new_state(redis_url)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=4)
    reader = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    reader.lock_and_read_trials()

    # When another process claims, reports, resets, removes and samples
    trial = writer.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=0.5,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=1.0,
    )
    writer.lock_and_report_trial_evaluation(trial, report, worker_id="w")
    writer.claim_next_pending_trial(worker_id="w")
    writer.lock_and_reset_trial_by_id("2")
    writer.lock_and_remove_trial_by_id("3")
    writer.lock_and_sample_trial(FixedIds("3"), worker_id="w")

    # Then the reader's view equals a fresh full read, order included
    fresh = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    seen = reader.lock_and_read_trials()
    assert seen == fresh.lock_and_read_trials()
    assert list(seen) == ["1", "2", "4", "3"]
    assert seen["1"].report.objective_to_minimize == 0.5
    assert seen["2"].metadata.state == "pending"


def test_a_trimmed_event_stream_falls_back_to_a_full_read(redis_url, r):
    writer = new_state(redis_url)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    reader = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    reader.lock_and_read_trials()

    writer.claim_next_pending_trial(worker_id="w")
    r.xtrim(writer.keys.events, maxlen=0)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")

    fresh = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    assert reader.lock_and_read_trials() == fresh.lock_and_read_trials()
    assert reader.lock_and_read_trials()["1"].metadata.state == "evaluating"


def test_a_run_deleted_and_created_again_is_read_afresh(redis_url):
    writer = new_state(redis_url)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    reader = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    assert len(reader.lock_and_read_trials()) == 3

    RedisNePSState.delete_run("cache", redis=redis_url)
    again = new_state(redis_url)
    again.lock_and_sample_trial(FixedIds("x"), worker_id="w")

    assert list(reader.lock_and_read_trials()) == ["x"]
