"""The package behind Sentinel: a primary, a replica and three Sentinels on
loopback, and failovers.

Marked ``sentinel``; CI runs these tests in the same stage as the Redis
Cluster tests (``-m 'cluster or sentinel'``): both start several servers
and take a while.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from neps_redis import RedisNePSState, acl
from neps_redis.check import inspect_run
from neps_redis.connection import client_from_url, retry_policy
from neps_redis.errors import NePSError
from neps_redis.server import RunningServer, free_port, start_test_server
from neps_redis.topology import SENTINEL_CHECK_SECONDS
from tests.conftest import _require_binaries
from tests.helpers import newest
from tests.test_status_and_cli import Configs, evaluate, new_run

pytestmark = pytest.mark.sentinel

SERVICE = "neps"
TRIALS = 40
# Long enough that the failover falls in the middle of the run: two workers
# take six seconds, the Sentinels switch about two seconds in.
EVALUATION_SECONDS = 0.3


def _wait(what: str, ready, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")


def _start_sentinel(binary, data_dir: Path, primary_port: int) -> RunningServer:
    # A Sentinel rewrites its config file as it learns the topology, so each
    # has a file of its own in its own directory.
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "sentinel.conf"
    config.write_text(
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 10000\n"
    )
    port = free_port()
    command = [
        str(binary.path),
        str(config),
        "--sentinel",
        *("--port", str(port), "--bind", "127.0.0.1"),
        *("--dir", str(data_dir), "--daemonize", "no", "--logfile", ""),
    ]
    sentinel = RunningServer(binary, command, data_dir, port, None)
    sentinel._wait_until_ready(10.0)
    return sentinel


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[tuple[str, list[RunningServer]]]:
    """The Sentinel URL of a primary with one replica, and the Sentinels."""
    binary = newest(_require_binaries())
    started: list[RunningServer] = []
    try:
        primary = start_test_server(binary, data_dir=tmp_path / "primary")
        started.append(primary)
        replica = start_test_server(
            binary,
            data_dir=tmp_path / "replica",
            args=["--replicaof", "127.0.0.1", str(primary.port)],
        )
        started.append(replica)
        with replica.client() as client:
            _wait(
                "the replica's link to its primary",
                lambda: client.info("replication").get("master_link_status") == "up",
            )

        watchers = [
            _start_sentinel(binary, tmp_path / f"sentinel-{i}", primary.port)
            for i in range(3)
        ]
        started += watchers
        for watcher in watchers:
            with watcher.client() as client:
                _wait(
                    "every Sentinel to know the replica and the other Sentinels",
                    lambda c=client: (
                        c.sentinel_master(SERVICE)["num-slaves"] == 1
                        and c.sentinel_master(SERVICE)["num-other-sentinels"] == 2
                    ),
                )

        hosts = ",".join(f"127.0.0.1:{w.port}" for w in watchers)
        yield f"redis+sentinel://{hosts}/{SERVICE}", watchers
    finally:
        for server in reversed(started):
            server.stop()


def _primary_port(sentinel: RunningServer) -> int:
    with sentinel.client() as client:
        return int(client.sentinel_get_master_addr_by_name(SERVICE)[1])


def _replica_port(sentinel: RunningServer) -> int:
    with sentinel.client() as client:
        [replica] = client.sentinel_slaves(SERVICE)
        return int(replica["port"])


def _fail_over(sentinel: RunningServer) -> int:
    """Fail over by hand and wait until `sentinel` names the new primary;
    returns the old primary's port."""
    before = _primary_port(sentinel)
    with sentinel.client() as client:
        client.execute_command("SENTINEL", "FAILOVER", SERVICE)
    _wait("the failover", lambda: _primary_port(sentinel) != before)
    return before


def _role(port: int) -> bytes:
    with redis.Redis(port=port) as client:
        return client.execute_command("ROLE")[0]


def _worker_commands_served(port: int) -> dict[str, int]:
    """How often the server at `port` was sent each command of a worker's
    own (those of connecting excepted, which the Sentinels send too)."""
    own = set(acl.commands("worker")) - {"hello", "info", "ping", "select"}
    with redis.Redis(port=port) as client:
        stats = client.info("commandstats")
    return {
        name: sum(stat.get(k, 0) for k in ("calls", "rejected_calls", "failed_calls"))
        for key, stat in stats.items()
        if (name := key.removeprefix("cmdstat_")) in own
    }


def test_a_sentinel_url_reaches_the_primary_and_runs_the_lifecycle(sentinels):
    # Given
    url, watchers = sentinels

    # When
    state = new_run(url, "through sentinel")
    worker = state.lock_and_set_new_worker_id("w")
    state.lock_and_sample_trial(Configs({"x": 1}, {"x": 2}), worker_id=worker)
    state.lock_and_sample_trial(Configs({"x": 1}, {"x": 2}), worker_id=worker)
    evaluate(state, worker, 0.5)
    state.close()

    # Then: the data is on the primary the Sentinels name, and replicated
    assert state.server == f"sentinel:{SERVICE}/0"
    with redis.Redis(port=_primary_port(watchers[0])) as primary:
        assert primary.execute_command("ROLE")[0] == b"master"
        assert primary.hget(state.keys.counts, "success") == b"1"
        primary.wait(1, 5000)
    client = client_from_url(url)
    assert inspect_run(client, "through sentinel").ok


def test_a_client_refuses_a_server_that_the_sentinels_name_but_is_a_replica(
    sentinels,
):
    # Given: Sentinels told to watch the replica as the service's primary
    url, watchers = sentinels
    replica = _replica_port(watchers[0])
    for watcher in watchers:
        with watcher.client() as client:
            client.execute_command("SENTINEL", "REMOVE", SERVICE)
            client.execute_command(
                "SENTINEL", "MONITOR", SERVICE, "127.0.0.1", replica, 2
            )
    client = client_from_url(url, retry=retry_policy(retries=0))

    # When / Then: a command is not sent there, and the error says why
    with pytest.raises(redis.ConnectionError, match="is a slave, not the primary"):
        client.hgetall("neps:{refused}:counts")
    client.close()


def test_after_a_failover_the_client_follows_the_new_primary(sentinels):
    # Given: a run on the first primary
    url, watchers = sentinels
    state = new_run(url, "failover")
    with redis.Redis(port=_primary_port(watchers[0])) as old:
        old.wait(1, 5000)

    # When: the primary fails over, and the old one is demoted
    before = _fail_over(watchers[0])
    _wait("the old primary's demotion", lambda: _role(before) == b"slave")

    # Then: the same state object writes to the new primary
    worker = state.lock_and_set_new_worker_id("after")
    state.lock_and_sample_trial(Configs({"x": 1}), worker_id=worker)
    evaluate(state, worker, 0.1)
    state.close()
    with redis.Redis(port=_primary_port(watchers[0])) as primary:
        assert primary.hget(state.keys.counts, "success") == b"1"


def test_a_client_idle_across_a_failover_writes_to_the_new_primary_at_once(
    sentinels,
):
    # Given: a run opened through the Sentinels, on the first primary
    url, watchers = sentinels
    state = new_run(url, "idle")
    with redis.Redis(port=_primary_port(watchers[0])) as old:
        old.wait(1, 5000)

    # When: the Sentinels name the new primary, and the state's connection,
    # still open to the old one, is used again before the old one is demoted
    # (the Sentinels demote it some eight seconds later)
    before = _fail_over(watchers[0])
    time.sleep(SENTINEL_CHECK_SECONDS)
    served = _worker_commands_served(before)
    worker = state.lock_and_set_new_worker_id("w")
    state.lock_and_sample_trial(Configs({"x": 1}), worker_id=worker)
    evaluate(state, worker, 0.1)
    state.close()

    # Then: not one command reached the old primary, which still answered
    # as a primary and would have served them; the trial is on the new one
    assert _role(before) == b"master"
    assert _worker_commands_served(before) == served
    with redis.Redis(port=_primary_port(watchers[0])) as primary:
        assert primary.hget(state.keys.counts, "success") == b"1"


def _work(url: str, worker_id: str, failures: list[BaseException]) -> None:
    state = RedisNePSState.create_or_load("busy", redis=url, load_only=True)
    # A short lease: a claim or report lost with the old primary is found
    # and requeued within seconds, not half an hour.
    state.lease_seconds = 2.0
    state.heartbeat_seconds = 0.3
    state.sweep_seconds = 0.5
    try:
        state.lock_and_set_new_worker_id(worker_id)
        while sum(state.counts().get(s, 0) for s in ("pending", "evaluating")):
            trial = state.claim_next_pending_trial(worker_id=worker_id)
            if trial is None:
                time.sleep(0.1)
                continue
            time.sleep(EVALUATION_SECONDS)
            report = trial.set_complete(
                report_as="success",
                time_end=time.time(),
                objective_to_minimize=float(trial.config["x"]),
                cost=None,
                learning_curve=None,
                err=None,
                tb=None,
                extra=None,
                evaluation_duration=EVALUATION_SECONDS,
            )
            try:
                state.lock_and_report_trial_evaluation(
                    trial, report, worker_id=worker_id
                )
            except NePSError:
                # The claim was lost with the old primary; the trial is
                # pending again there and is evaluated again.
                continue
    except BaseException as error:
        failures.append(error)
    finally:
        state.close()


def test_workers_survive_a_failover_in_the_middle_of_a_run(sentinels):
    # Given: a run with its trials sampled
    url, watchers = sentinels
    state = new_run(url, "busy")
    sampler = state.lock_and_set_new_worker_id("sampler")
    optimizer = Configs(*({"x": k} for k in range(TRIALS)))
    for _ in range(TRIALS):
        state.lock_and_sample_trial(optimizer, worker_id=sampler)
    state.close()

    # When: two workers evaluate them, and the primary fails over meanwhile
    failures: list[BaseException] = []
    workers = [
        threading.Thread(target=_work, args=(url, f"w{i}", failures)) for i in range(2)
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    _fail_over(watchers[0])
    working_at_the_switch = sum(w.is_alive() for w in workers)
    for worker in workers:
        worker.join(timeout=120)

    # Then: the failover fell in the middle of the run, and every trial was
    # evaluated, on the new primary, and the keys agree
    assert working_at_the_switch == 2
    assert not any(w.is_alive() for w in workers)
    assert failures == []
    client = client_from_url(url)
    after = RedisNePSState.create_or_load("busy", redis=client, load_only=True)
    assert after.counts() == {"success": TRIALS}
    assert inspect_run(client, "busy").ok
