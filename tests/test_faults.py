"""Chaos: workers and servers killed, stopped and cut off while a run goes on.

Real worker processes (``tests/fault_worker.py``) run against real servers
with two-second leases, half-second heartbeats and half-second sweeps. Each
test kills or freezes something mid-run and then proves from the worker
logs (every acknowledged step), the event stream and `check` that no trial
was claimed twice at once, no acknowledged report was lost and every trial
finished exactly once.

Marked ``fault``: deselected by default, run with ``pytest -m fault``.
NEPS_REDIS_CHAOS_LIFECYCLES sets the size of the sixteen-process run
(default 2,000; 10,000 by hand).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from neps_redis import (
    LeaseLostError,
    OptimizationState,
    RedisNePSState,
    SeedSnapshot,
    Trial,
)
from neps_redis.check import inspect_run
from neps_redis.connection import client_from_url
from neps_redis.keys import RunKeys
from tests.fault_worker import Batches
from tests.proxy import ReplyDroppingProxy

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]
INFO = {"name": "random_search", "info": {}}
LEASE = 2.0
HEARTBEAT = 0.5
SWEEP = 0.5
LIFECYCLES = int(os.environ.get("NEPS_REDIS_CHAOS_LIFECYCLES", "2000"))
# Seconds the sixteen-process run may take: 150 for the default size.
LIMIT = max(150, LIFECYCLES // 13)
# Workers killed in it: 20 for the default size.
KILLS = max(20, LIFECYCLES // 100)

FAULT_ENV = {
    "NEPS_REDIS_LEASE_SECONDS": str(LEASE),
    "NEPS_REDIS_HEARTBEAT_SECONDS": str(HEARTBEAT),
    "NEPS_REDIS_SWEEP_SECONDS": str(SWEEP),
    "NEPS_REDIS_OPTIMIZER_LEASE_SECONDS": str(LEASE),
}


@pytest.fixture(autouse=True)
def _short_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    # For the states this process opens; the workers get them by FAULT_ENV.
    for name, value in FAULT_ENV.items():
        monkeypatch.setenv(name, value)


def new_run(url: str, run: str, *, pending: int = 0) -> RedisNePSState:
    state = RedisNePSState.create_or_load(
        run,
        redis=url,
        optimizer_info=INFO,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    if pending:
        state.lock_and_sample_trial(Batches(pending), worker_id="setup", n=pending)
    return state


class Worker:
    """One ``tests.fault_worker`` process and its log."""

    def __init__(self, url: str, run: str, tmp: Path, n: int, **options: Any) -> None:
        self.log = tmp / f"worker-{n}.jsonl"
        self.stderr = tmp / f"worker-{n}.err"
        command = [sys.executable, "-m", "tests.fault_worker", url, run, str(self.log)]
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        env = {**os.environ, **FAULT_ENV, "PYTHONPATH": str(ROOT)}
        with self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err
            )

    def lines(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        text = self.log.read_text()
        # A line cut short by SIGKILL was never acknowledged to anyone.
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def last_event(self) -> str | None:
        lines = self.lines()
        return lines[-1]["event"] if lines else None

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(0.02)


def server_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def events_by_trial(client, run: str) -> dict[str, list[dict[str, str]]]:
    by_trial: dict[str, list[dict[str, str]]] = defaultdict(list)
    for entry_id, fields in client.xrange(RunKeys(run).events):
        event = {k.decode(): v.decode() for k, v in fields.items()}
        event["ms"] = entry_id.decode().split("-")[0]
        if "trial_id" in event:
            by_trial[event["trial_id"]].append(event)
    return by_trial


def assert_run_is_sound(client, run: str, workers: list[Worker], total: int) -> None:
    """Every trial finished once, no claim overlapped another, no
    acknowledged report lost, and `check` finds nothing."""
    result = inspect_run(client, run)
    assert result.violations == [], result.violations
    assert result.trials == total

    state = RedisNePSState.create_or_load(run, redis=client, load_only=True)
    trials = state.lock_and_read_trials()
    assert len(trials) == total
    assert {t.metadata.state for t in trials.values()} == {Trial.State.SUCCESS}

    # No claim while another was live: between two claims of a trial its
    # lease expired; one report closes the last claim; claims = attempts.
    attempts = {i: int(client.hget(RunKeys(run).trial(i), "attempts")) for i in trials}
    for trial_id, history in events_by_trial(client, run).items():
        steps = [
            e["event"]
            for e in history
            if e["event"] in ("claimed", "lease_expired", "reported")
        ]
        for before, after in pairwise(steps):
            assert (before, after) in {
                ("claimed", "lease_expired"),
                ("lease_expired", "claimed"),
                ("claimed", "reported"),
            }, (trial_id, steps)
        assert steps[-1] == "reported", (trial_id, steps)
        assert steps.count("claimed") == attempts[trial_id], (trial_id, steps)

    # Every acknowledged report is the stored result, and only one per trial.
    acknowledged: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for worker in workers:
        for line in worker.lines():
            if line["event"] == "reported":
                acknowledged[line["trial"]].append((line["worker"], line["objective"]))
    for trial_id, reports in acknowledged.items():
        assert len(reports) == 1, (trial_id, reports)
        [(worker_id, objective)] = reports
        stored = trials[trial_id]
        assert stored.metadata.evaluating_worker_id == worker_id
        assert stored.report.objective_to_minimize == objective
    state.close()


# --- workers killed ----------------------------------------------------------


def test_a_killed_worker_s_trials_are_requeued_after_the_lease_and_finished_once(
    server, tmp_path
):
    # Given four workers each evaluating a trial for longer than the lease
    url = server.url
    client = client_from_url(url)
    client.flushall()
    new_run(url, "kill", pending=6)
    workers = [
        Worker(url, "kill", tmp_path, n, target=6, eval_min=2.5, eval_max=2.5)
        for n in range(4)
    ]
    wait_for(lambda: sum(len(w.lines()) for w in workers) == 4, 30, "four claims")

    # When two of them are killed mid-evaluation
    killed = workers[:2]
    orphans = {w.lines()[0]["trial"] for w in killed}
    killed_at = server_ms(client)
    for worker in killed:
        worker.kill()

    # Then the survivors finish every trial, the orphans after a requeue
    for worker in workers[2:]:
        assert worker.wait(60) == 0
    requeued = {
        trial_id: [
            int(e["ms"]) - killed_at for e in history if e["event"] == "lease_expired"
        ]
        for trial_id, history in events_by_trial(client, "kill").items()
    }
    assert {t for t, delays in requeued.items() if delays} == orphans
    delays = [d for t in orphans for d in requeued[t]]
    print(f"requeued {sorted(delays)} ms after the kill")
    assert all(d <= (LEASE + SWEEP + 1.0) * 1000 for d in delays), delays
    assert all(len(requeued[t]) == 1 for t in orphans)
    assert_run_is_sound(client, "kill", workers, total=6)


def test_a_frozen_worker_s_late_report_is_refused_and_the_other_s_result_kept(
    server, tmp_path
):
    # Given a worker evaluating the run's only trial
    url = server.url
    client = client_from_url(url)
    client.flushall()
    new_run(url, "freeze", pending=1)
    # (it sleeps long enough to wake with its heartbeat before its report)
    frozen = Worker(url, "freeze", tmp_path, 0, target=1, eval_min=6, eval_max=6)
    wait_for(lambda: frozen.lines(), 30, "the claim")

    # When it is stopped past its lease, another worker takes the trial over
    frozen.signal(signal.SIGSTOP)
    other = RedisNePSState.create_or_load("freeze", redis=url, load_only=True)
    deadline = time.monotonic() + 3 * LEASE
    while (trial := other.claim_next_pending_trial(worker_id="other")) is None:
        assert time.monotonic() < deadline, "the frozen worker's trial never returned"
        time.sleep(0.05)
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=0.125,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=0.0,
    )
    other.lock_and_report_trial_evaluation(trial, report, worker_id="other")

    # And the frozen worker goes on
    frozen.signal(signal.SIGCONT)
    assert frozen.wait(30) == 0

    # Then its report was refused and kept as an event; the result is the other's
    [late] = [line for line in frozen.lines() if line["event"] == "late"]
    assert late["trial"] == trial.id
    [event] = [
        e
        for e in events_by_trial(client, "freeze")[trial.id]
        if e["event"] == "late_report"
    ]
    assert float(event["objective_to_minimize"]) == late["objective"]
    stored = other.lock_and_get_trial_by_id(trial.id)
    assert stored.report.objective_to_minimize == 0.125
    assert stored.metadata.evaluating_worker_id == "other"
    assert "lost its lease on trial '1'" in frozen.stderr.read_text()
    assert inspect_run(client, "freeze").violations == []
    other.close()


# --- the server killed -------------------------------------------------------


def test_workers_outlive_a_killed_and_restarted_server_and_lose_nothing(
    fresh_server, tmp_path
):
    # Given four workers running through 300 lifecycles on an fsync-always AOF
    url = fresh_server.url
    client = client_from_url(url)
    new_run(url, "restart")
    workers = [Worker(url, "restart", tmp_path, n, target=300) for n in range(4)]
    wait_for(lambda: sum(len(w.lines()) for w in workers) > 60, 60, "some progress")

    # When the server is killed mid-run and started again on its data
    fresh_server.kill()
    time.sleep(1.0)
    fresh_server.restart()

    # Then every worker finishes, and nothing acknowledged was lost
    for worker in workers:
        assert worker.wait(90) == 0, worker.stderr.read_text()[-2000:]
    assert_run_is_sound(client, "restart", workers, total=300)


# --- many workers, random kills -----------------------------------------------


@pytest.mark.timeout(LIMIT + 60)
def test_sixteen_workers_with_random_kills_claim_nothing_twice_and_lose_nothing(
    server, tmp_path, monkeypatch
):
    # Given sixteen workers on a run of LIFECYCLES trials, allowed enough
    # attempts that random kills never exhaust a trial
    monkeypatch.setitem(FAULT_ENV, "NEPS_REDIS_MAX_ATTEMPTS", "20")
    # A sample reads every trial; on a big run and a busy machine that can
    # take longer than two seconds.
    monkeypatch.setitem(FAULT_ENV, "NEPS_REDIS_OPTIMIZER_LEASE_SECONDS", "5")
    url = server.url
    client = client_from_url(url)
    client.flushall()
    new_run(url, "chaos")
    # Large batches: each sample reads every trial of the run, and the test
    # is about claims and reports.
    batch = max(8, LIFECYCLES // 25)
    # Evaluations long enough that a kill often lands in one.
    options = {"target": LIFECYCLES, "batch": batch, "eval_min": 0.05, "eval_max": 0.15}
    started = time.monotonic()
    workers = [Worker(url, "chaos", tmp_path, n, **options) for n in range(16)]
    current = list(workers)

    # When, once the run is under way, a worker in the middle of an
    # evaluation is killed every half second, and replaced
    rng = random.Random(0)
    kills = 0
    while alive := [w for w in current if w.process.poll() is None]:
        time.sleep(0.5)
        if time.monotonic() - started > LIMIT:
            raise AssertionError(f"the chaos run did not finish in {LIMIT} s")
        under_way = int(client.hget(RunKeys("chaos").counts, "success") or 0)
        evaluating = [w for w in alive if w.last_event() == "claimed"]
        if kills < KILLS and under_way >= LIFECYCLES // 20 and evaluating:
            victim = rng.choice(evaluating)
            victim.kill()
            kills += 1
            current.remove(victim)
            workers.append(Worker(url, "chaos", tmp_path, len(workers), **options))
            current.append(workers[-1])
    elapsed = time.monotonic() - started

    # Then every trial finished once, nothing was lost, check passes
    for worker in workers:
        assert worker.process.wait(10) in (0, -signal.SIGKILL)
    assert_run_is_sound(client, "chaos", workers, total=LIFECYCLES)
    expired = sum(
        e["event"] == "lease_expired"
        for history in events_by_trial(client, "chaos").values()
        for e in history
    )
    # Kills mid-evaluation left trials to requeue (a kill can still land
    # just after a report, before its line).
    assert kills >= KILLS // 2 and expired >= kills // 2, (kills, expired)
    retried = sum(line["event"] == "sample_lost" for w in workers for line in w.lines())
    print(
        f"{LIFECYCLES} lifecycles, {len(workers)} processes, {kills} kills,"
        f" {expired} requeues, {retried} samples retried in {elapsed:.1f} s:"
        f" {LIFECYCLES / elapsed:.0f} lifecycles/s"
    )


# --- many creators -------------------------------------------------------------


def _create_in_threads(url: str, run: str, threads: int, start_at: float) -> list:
    results: list[Any] = [None] * threads

    def create(i: int) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        state = RedisNePSState.create_or_load(
            run,
            redis=url,
            optimizer_info=INFO,
            optimizer_state=OptimizationState(
                budget=None,
                seed_snapshot=SeedSnapshot.new_capture(),
                shared_state={"creator": i},
            ),
        )
        opt = state.lock_and_get_optimizer_state()
        results[i] = (opt.shared_state, opt.seed_snapshot.np_rng[1][:4].tolist())

    pool = [threading.Thread(target=create, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return results


def test_a_hundred_creators_at_once_create_one_run_and_all_load_it(server):
    # Given one new run name and 100 creators: 10 processes of 10 threads
    # (100 processes would not start within a minute on two cores)
    url = server.url
    client = client_from_url(url)
    client.flushall()
    start_at = time.time() + 3.0

    # When they all call create_or_load at the same moment
    with multiprocessing.get_context("spawn").Pool(10) as pool:
        results = pool.starmap(_create_in_threads, [(url, "many", 10, start_at)] * 10)

    # Then one of them created it, and all hold the same stored state
    outcomes = [r for process in results for r in process]
    assert len(outcomes) == 100
    assert len({json.dumps(o) for o in outcomes}) == 1
    created = Counter(
        fields[b"event"] for _, fields in client.xrange(RunKeys("many").events)
    )
    assert created[b"created"] == 1


# --- a partition -----------------------------------------------------------------


def test_a_worker_cut_off_past_its_lease_is_fenced_off_after_the_partition_heals(
    server,
):
    # Given a worker that reaches the server through a proxy, holding a trial
    client = client_from_url(server.url)
    client.flushall()
    new_run(server.url, "cut", pending=1).close()
    proxy = ReplyDroppingProxy("127.0.0.1", server.port)
    try:
        cut = RedisNePSState.create_or_load(
            "cut", redis=client_from_url(proxy.url), load_only=True
        )
        trial = cut.claim_next_pending_trial(worker_id="cut-off")

        # When the network between them is cut past the lease
        proxy.blackhole()
        other = RedisNePSState.create_or_load("cut", redis=server.url, load_only=True)
        deadline = time.monotonic() + 3 * LEASE
        while (taken := other.claim_next_pending_trial(worker_id="other")) is None:
            assert time.monotonic() < deadline, "the cut-off trial never returned"
            time.sleep(0.05)
        finish_now(other, taken, "other", 0.25)

        # And healed before the cut-off worker reports
        proxy.heal()
        wait_for(lambda: cut.lease_lost(trial.id), 20, "the heartbeat to notice")
        with pytest.raises(LeaseLostError):
            finish_now(cut, trial, "cut-off", 0.75)
    finally:
        proxy.close()

    # Then the trial is the other worker's, the late result an event
    stored = other.lock_and_get_trial_by_id(trial.id)
    assert stored.report.objective_to_minimize == 0.25
    late = [
        e
        for e in events_by_trial(client, "cut")[trial.id]
        if e["event"] == "late_report"
    ]
    assert [e["objective_to_minimize"] for e in late] == ["0.75"]
    assert inspect_run(client, "cut").violations == []
    cut.close()
    other.close()


def finish_now(state, trial, worker_id: str, objective: float) -> None:
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=objective,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=0.0,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id=worker_id)
