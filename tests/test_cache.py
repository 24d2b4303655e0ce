"""Reads of every trial cost what changed, and never miss a change."""

from __future__ import annotations

import pickle
import time
from fractions import Fraction

import pytest

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


def snapshot(r, run: str) -> dict[bytes, bytes]:
    """Every key of a run, dumped: what a replica or an older save holds."""
    return {key: r.dump(key) for key in r.scan_iter(match=f"neps:{{{run}}}:*")}


def roll_back(r, run: str, saved: dict[bytes, bytes]) -> None:
    """Put the run back as it was when `saved` was taken, as a failover to a
    replica that missed the last writes, or a restart from an older save."""
    for key in r.scan_iter(match=f"neps:{{{run}}}:*"):
        r.delete(key)
    for key, value in saved.items():
        r.restore(key, 0, value)


def test_a_server_gone_back_in_time_is_read_afresh(redis_url, r):
    # Given a reader that has seen a claim the server later loses
    writer = new_state(redis_url)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    reader = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    reader.lock_and_read_trials()
    saved = snapshot(r, "cache")
    writer.claim_next_pending_trial(worker_id="w")
    assert reader.lock_and_read_trials()["1"].metadata.state == "evaluating"

    # When the server goes back to before the claim
    roll_back(r, "cache", saved)

    # Then the reader shows what the server has, not what it lost
    assert reader.lock_and_read_trials()["1"].metadata.state == "pending"


def test_changes_after_going_back_in_time_do_not_hide_the_loss(redis_url, r):
    # Given a reader that has seen a report and a removal the server loses
    writer = new_state(redis_url)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    reader = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    reader.lock_and_read_trials()
    saved = snapshot(r, "cache")
    trial = writer.claim_next_pending_trial(worker_id="w")
    writer.lock_and_report_trial_evaluation(trial, _done(trial), worker_id="w")
    writer.lock_and_remove_trial_by_id("3")
    reader.lock_and_read_trials()
    roll_back(r, "cache", saved)

    # When new changes follow on the server that went back (its event ids
    # are newer than any the reader saw)
    time.sleep(0.002)
    other = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    other.claim_next_pending_trial(worker_id="v")

    # Then the reader's view equals a fresh full read
    fresh = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    seen = reader.lock_and_read_trials()
    assert seen == fresh.lock_and_read_trials()
    assert seen["1"].report is None
    assert list(seen) == ["1", "2", "3"]


def test_a_server_gone_back_in_time_after_the_stream_was_emptied_is_read_afresh(
    redis_url, r
):
    # Given a reader whose last read found the event stream empty (trimmed)
    writer = new_state(redis_url)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    saved = snapshot(r, "cache")
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=2)
    r.xtrim(writer.keys.events, maxlen=0)
    reader = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    assert len(reader.lock_and_read_trials()) == 5

    # When the server goes back to before the last two trials
    roll_back(r, "cache", saved)

    # Then the reader shows the three the server has
    assert list(reader.lock_and_read_trials()) == ["1", "2", "3"]


def test_a_change_read_before_its_event_is_not_kept_once_the_server_loses_it(
    redis_url, r, monkeypatch
):
    import neps_redis.cache as cache

    # Given a reader that read the run once, and the server's state then
    writer = new_state(redis_url)
    writer.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=2)
    reader = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    reader.lock_and_read_trials()
    trial = writer.claim_next_pending_trial(worker_id="w")
    saved = snapshot(r, "cache")

    # When a report lands between the reader's look at the events and its
    # read of the trials they name (so it reads the report before its event)
    read_hashes = cache.read_trial_hashes

    def report_first(*args, **kwargs):
        monkeypatch.setattr(cache, "read_trial_hashes", read_hashes)
        writer.lock_and_report_trial_evaluation(trial, _done(trial), worker_id="w")
        return read_hashes(*args, **kwargs)

    monkeypatch.setattr(cache, "read_trial_hashes", report_first)
    assert reader.lock_and_read_trials()["1"].report is not None
    # and the server then loses that report (a failover, a restore)
    roll_back(r, "cache", saved)

    # Then the reader no longer shows it
    seen = reader.lock_and_read_trials()
    assert seen["1"].report is None
    assert seen["1"].metadata.state == "evaluating"


def test_own_changes_to_a_read_trial_are_replaced_by_the_stored_one(redis_url):
    # Given a caller that changes a trial it read, then stores it
    state = new_state(redis_url)
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=2)
    trial = state.lock_and_read_trials()["1"]
    trial.config = {"changed": True}
    state.put_updated_trial(trial)

    # Then the next read shows what the server stored
    fresh = RedisNePSState.create_or_load("cache", redis=redis_url, load_only=True)
    assert state.lock_and_read_trials() == fresh.lock_and_read_trials()


def test_the_used_cost_follows_reports_resets_and_removals(redis_url):
    from neps_redis import BudgetInfo

    # Given a run with a cost budget whose trials report costs
    state = RedisNePSState.create_or_load(
        "cost",
        redis=redis_url,
        optimizer_info=INFO,
        optimizer_state=OptimizationState(
            budget=BudgetInfo(total_cost_to_spend=100.0),
            seed_snapshot=SeedSnapshot.new_capture(),
            shared_state=None,
        ),
    )
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    for cost in (0.1, 0.2, 0.7):
        trial = state.claim_next_pending_trial(worker_id="w")
        state.lock_and_report_trial_evaluation(
            trial, _done(trial, cost=cost), worker_id="w"
        )
    seen = []

    def spy(trials, budget_info, n=None):
        seen.append(budget_info.used_cost_budget)
        return CountingRandomSearch()(trials=trials, budget_info=budget_info, n=n)

    # When it samples, and again after a reset and a removal
    state.lock_and_sample_trial(spy, worker_id="w")
    state.lock_and_reset_trial_by_id("2")
    state.lock_and_remove_trial_by_id("3")
    state.lock_and_sample_trial(spy, worker_id="w")

    # Then the optimizer saw the exact sums of the costs still reported
    assert seen == [float(sum(map(Fraction, (0.1, 0.2, 0.7)))), 0.1]


def _done(trial, *, cost=None):
    return trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=0.5,
        cost=cost,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=1.0,
    )


def test_a_read_is_not_changed_by_later_reads_and_cannot_be_changed(redis_url):
    # Given a read kept by its caller
    state = new_state(redis_url)
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=2)
    kept = state.lock_and_read_trials()
    values = kept.values()
    state.claim_next_pending_trial(worker_id="w")
    state.lock_and_remove_trial_by_id("2")

    # When the run is read again
    later = state.lock_and_read_trials()

    # Then the kept read, and its values view, still show the run as it was
    assert later["1"].metadata.state == "evaluating" and "2" not in later
    assert kept["1"].metadata.state == "pending" and list(kept) == ["1", "2"]
    assert [t.id for t in values] == ["1", "2"]
    # and no read can be changed in place
    with pytest.raises(TypeError):
        later["3"] = later["1"]  # type: ignore[index]
    assert later.copy() == later and isinstance(later.copy(), dict)
    assert pickle.loads(pickle.dumps(later)) == later
