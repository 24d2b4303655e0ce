"""Many processes on one run: no trial given twice, no id sampled twice."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter

import numpy as np

from neps_redis import OptimizationState, RedisNePSState, SeedSnapshot
from neps_redis.keys import RunKeys
from tests.optimizers import CountingRandomSearch

INFO = {"name": "random_search", "info": {}}
SPAWN = multiprocessing.get_context("spawn")


def _optimizer_state() -> OptimizationState:
    return OptimizationState(
        budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
    )


def _claim_all(url: str, run: str, worker_id: str, start_at: float) -> list[str]:
    state = RedisNePSState.create_or_load(run, redis=url, load_only=True)
    time.sleep(max(0.0, start_at - time.time()))
    claimed = []
    while (trial := state.claim_next_pending_trial(worker_id=worker_id)) is not None:
        claimed.append(trial.id)
    return claimed


def _sample_many(url: str, run: str, worker_id: str, count: int) -> list[str]:
    state = RedisNePSState.create_or_load(
        run, redis=url, optimizer_info=INFO, optimizer_state=_optimizer_state()
    )
    optimizer = CountingRandomSearch()
    return [
        state.lock_and_sample_trial(optimizer, worker_id=worker_id).id
        for _ in range(count)
    ]


def _create(url: str, run: str, start_at: float) -> tuple[bool, dict]:
    time.sleep(max(0.0, start_at - time.time()))
    state = RedisNePSState.create_or_load(
        run, redis=url, optimizer_info=INFO, optimizer_state=_optimizer_state()
    )
    opt = state.lock_and_get_optimizer_state()
    return state.lock_and_get_optimizer_info() == INFO, {
        "np_rng": opt.seed_snapshot.np_rng[1].tolist()[:4],
        "worker_ids": opt.worker_ids,
    }


def test_eight_processes_claim_each_of_500_pending_trials_exactly_once(redis_url, r):
    # Given 500 pending trials
    state = RedisNePSState.create_or_load(
        "claims",
        redis=redis_url,
        optimizer_info=INFO,
        optimizer_state=_optimizer_state(),
    )
    optimizer = CountingRandomSearch()
    for _ in range(5):
        state.lock_and_sample_trial(optimizer, worker_id="sampler", n=100)

    # When 8 processes claim until the queue is empty, starting together
    start_at = time.time() + 2.0
    with SPAWN.Pool(8) as pool:
        results = pool.starmap(
            _claim_all,
            [(redis_url, "claims", f"w{i}", start_at) for i in range(8)],
        )

    # Then every trial was claimed once, by one worker, and indexes agree
    claimed = [trial_id for ids in results for trial_id in ids]
    assert len(claimed) == 500
    assert set(claimed) == {str(i) for i in range(1, 501)}
    assert sum(1 for ids in results if ids) > 1
    keys = RunKeys("claims")
    assert r.zcard(keys.pending) == 0
    assert r.zcard(keys.evaluating) == 500
    assert state.counts() == {"evaluating": 500}
    events = Counter(fields[b"event"] for _, fields in r.xrange(keys.events, "-", "+"))
    assert events[b"claimed"] == 500
    owners = {
        t.id: t.metadata.evaluating_worker_id
        for t in state.lock_and_read_trials().values()
    }
    for worker, ids in enumerate(results):
        assert all(owners[i] == f"w{worker}" for i in ids)


def test_eight_processes_sampling_at_once_get_unique_ids_and_one_rng_sequence(
    redis_url, r
):
    # Given a run whose stored RNG starts from a known seed
    np.random.seed(42)
    RedisNePSState.create_or_load(
        "samples",
        redis=redis_url,
        optimizer_info=INFO,
        optimizer_state=_optimizer_state(),
    )
    np.random.seed(42)
    expected = [float(np.random.uniform()) for _ in range(80)]

    # When 8 processes each sample 10 trials
    with SPAWN.Pool(8) as pool:
        results = pool.starmap(
            _sample_many, [(redis_url, "samples", f"w{i}", 10) for i in range(8)]
        )

    # Then the 80 ids are unique and dense, as if one process had sampled
    ids = [i for ids in results for i in ids]
    assert sorted(ids, key=int) == [str(i) for i in range(1, 81)]
    state = RedisNePSState.create_or_load("samples", redis=redis_url, load_only=True)
    trials = state.lock_and_read_trials()
    assert list(trials) == [str(i) for i in range(1, 81)]
    assert state.counts() == {"pending": 80}

    # And the optimizer state is one consistent chain: each sample started
    # from the RNG state the previous one stored, as in a single process.
    assert [t.config["lr"] for t in trials.values()] == expected


def test_sixteen_processes_creating_one_new_run_create_it_once(redis_url, r):
    start_at = time.time() + 2.0
    with SPAWN.Pool(16) as pool:
        results = pool.starmap(_create, [(redis_url, "new", start_at)] * 16)

    assert all(info_ok for info_ok, _ in results)
    assert all(view == results[0][1] for _, view in results)
    created = [
        f for _, f in r.xrange(RunKeys("new").events) if f[b"event"] == b"created"
    ]
    assert len(created) == 1
