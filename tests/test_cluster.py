"""The package on a real Redis Cluster of three primaries on loopback.

The cluster is built by hand, as `redis-cli --cluster create` would: three
servers started with cluster mode on, each given a third of the 16384
slots, then introduced to each other with CLUSTER MEET. It is started once a
session and flushed before each test.

The chaos tests at the end run the fault tests' worker processes against it
(workers killed at random, with runs on two primaries); the one that kills
a primary gets a private cluster with an fsync-always AOF.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from neps_redis import RedisNePSState
from neps_redis.cli import main
from neps_redis.connection import client_from_url
from neps_redis.keys import RunKeys
from neps_redis.server import RunningServer, start_test_server
from tests import test_faults as faults
from tests.conftest import AOF_ARGS, _require_binaries
from tests.helpers import newest
from tests.test_status_and_cli import Configs, evaluate, new_run

pytestmark = pytest.mark.cluster

SLOTS = 16384
PRIMARIES = 3
# Trials in each run of the chaos tests, two runs each.
CHAOS_LIFECYCLES = 250


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_ok(servers: list[RunningServer], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for server in servers:
            with server.client() as client:
                states.append(client.cluster("info")["cluster_state"])
        if all(s == "ok" for s in states):
            return
        time.sleep(0.1)
    raise AssertionError(f"The cluster did not become ok in {timeout} s: {states}")


def _start_cluster(
    data_dirs: list[Path], args: tuple[str, ...] = ()
) -> list[RunningServer]:
    """One primary a directory, each owning a contiguous share of the slots,
    joined into a cluster that answers ``ok``; `args` go to every server."""
    binary = newest(_require_binaries())
    servers: list[RunningServer] = []
    bus_ports: list[int] = []
    try:
        for data_dir in data_dirs:
            bus_ports.append(_free_port())
            servers.append(
                start_test_server(
                    binary,
                    data_dir=data_dir,
                    args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(data_dir / "nodes.conf"),
                        # The bus port defaults to the port + 10000, which
                        # a free port above 55535 cannot have.
                        "--cluster-port",
                        str(bus_ports[-1]),
                        *args,
                    ],
                )
            )

        # One contiguous share of the slots a primary; the last takes the rest.
        share = SLOTS // len(servers)
        for i, server in enumerate(servers):
            first = i * share
            last = SLOTS - 1 if i == len(servers) - 1 else first + share - 1
            with server.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        with servers[0].client() as client:
            for other, bus_port in zip(servers[1:], bus_ports[1:], strict=True):
                client.execute_command(
                    "CLUSTER", "MEET", "127.0.0.1", other.port, bus_port
                )
        _wait_until_ok(servers)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _url(servers: list[RunningServer]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a 3-primary cluster: ``redis+cluster://`` and every node."""
    servers = _start_cluster(
        [tmp_path_factory.mktemp(f"cluster-{i}") for i in range(PRIMARIES)]
    )
    try:
        yield _url(servers)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def cluster_url(cluster: str) -> Iterator[str]:
    client = client_from_url(cluster)
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    client.close()
    return cluster


def test_a_cluster_url_gives_a_cluster_client_that_sees_every_primary(cluster_url):
    client = client_from_url(cluster_url)

    assert isinstance(client, redis.RedisCluster)
    assert len(client.get_primaries()) == PRIMARIES


def test_the_core_lifecycle_works_on_a_cluster(cluster_url):
    # Given
    state = new_run(cluster_url, "on a cluster")
    worker = state.lock_and_set_new_worker_id("w")
    optimizer = Configs(*({"x": k} for k in range(3)))

    # When: sample, claim, report, reset, remove
    for _ in range(3):
        state.lock_and_sample_trial(optimizer, worker_id=worker)
    evaluate(state, worker, 0.5)
    evaluate(state, worker, 0.1)
    state.lock_and_reset_trial_by_id("1")
    state.lock_and_remove_trial_by_id("3")

    # Then: a fresh reader of the same cluster agrees
    again = RedisNePSState.create_or_load(
        "on a cluster", redis=client_from_url(cluster_url), load_only=True
    )
    assert again.counts() == {"pending": 1, "success": 1}
    assert again.lock_and_get_trial_by_id("2").report.objective_to_minimize == 0.1
    assert again.all_trial_ids() == ["1", "2"]
    state.close()


def test_a_redis_cluster_object_works_as_the_redis_argument(cluster_url):
    client = redis.RedisCluster.from_url(
        cluster_url.replace("+cluster", "", 1).split(",")[0]
    )

    state = new_run(client, "given a client")

    assert state.counts() == {}
    assert state.server.startswith("cluster:")


def test_runs_land_on_at_least_two_primaries(cluster_url):
    # Given
    client = client_from_url(cluster_url)
    names = [f"run-{i}" for i in range(8)]
    for name in names:
        new_run(cluster_url, name)

    # When: each run's slot, and the primary that owns it
    owners = {name: client.get_node_from_key(RunKeys(name).meta).name for name in names}
    slots = {name: client.keyslot(RunKeys(name).meta) for name in names}

    # Then: every key of a run is in its run's slot, and runs spread
    for name in names:
        assert client.keyslot(RunKeys(name).trial("1")) == slots[name]
        assert client.keyslot(RunKeys(name).events) == slots[name]
    assert len(set(owners.values())) >= 2, owners


def test_runs_lists_the_runs_of_every_primary(cluster_url):
    # Given: runs on more than one primary
    names = [f"listed-{i}" for i in range(8)]
    for name in names:
        new_run(cluster_url, name)

    # When
    result = CliRunner().invoke(main, ["runs", "--json", "--redis", cluster_url])

    # Then
    assert result.exit_code == 0, result.output
    assert sorted(r["run"] for r in json.loads(result.stdout)) == sorted(names)


def test_the_demo_runs_on_a_cluster(cluster_url, tmp_path):
    runner = CliRunner()

    result = runner.invoke(
        main,
        [
            "demo",
            "--redis",
            cluster_url,
            "--workers",
            "2",
            "--budget",
            "4",
            "--run",
            "cluster-demo",
            "--workdir",
            str(tmp_path),
        ],
    )

    assert result.exit_code == 0, result.output
    assert "Finished 4 of 4 trials." in result.stdout
    trials = runner.invoke(
        main, ["--redis", cluster_url, "trials", "cluster-demo", "--json"]
    )
    assert [t["state"] for t in json.loads(trials.stdout)] == ["success"] * 4


# --- chaos on a cluster ------------------------------------------------------
#
# The fault tests' worker processes and checks (tests/test_faults.py), with
# the workers connected through the redis+cluster:// URL.


@pytest.fixture
def short_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    # For the states this process opens; the workers get them by FAULT_ENV.
    for name, value in faults.FAULT_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def aof_cluster(tmp_path: Path) -> Iterator[list[RunningServer]]:
    """A private 3-primary cluster with an fsync-always AOF, which a test may
    kill and restart node by node."""
    servers = _start_cluster(
        [tmp_path / f"node-{i}" for i in range(PRIMARIES)], args=AOF_ARGS
    )
    yield servers
    for server in servers:
        server.stop()


def _runs_on_different_primaries(client, count: int) -> dict[str, str]:
    """`count` run names whose slots belong to different primaries, each
    with the address of its primary."""
    chosen: dict[str, str] = {}
    for i in range(100):
        name = f"chaos-{i}"
        owner = client.get_node_from_key(RunKeys(name).meta).name
        if owner not in chosen.values():
            chosen[name] = owner
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"No {count} runs on different primaries: {chosen}")


@pytest.mark.timeout(120)
def test_a_worker_killed_on_a_cluster_leaves_its_trial_to_another_after_the_lease(
    cluster_url, tmp_path, short_leases
):
    # Given three workers on a cluster, each evaluating one of three trials
    # for longer than the lease
    client = client_from_url(cluster_url)
    faults.new_run(cluster_url, "kill", pending=3).close()
    workers = [
        faults.Worker(
            cluster_url, "kill", tmp_path, n, target=3, eval_min=2.5, eval_max=2.5
        )
        for n in range(3)
    ]
    faults.wait_for(
        lambda: all(w.last_event() == "claimed" for w in workers), 30, "three claims"
    )

    # When one of them is killed mid-evaluation
    victim, *survivors = workers
    orphan = victim.lines()[-1]["trial"]
    killed_at = faults.server_ms(client)
    victim.kill()

    # Then another worker finishes the orphan once its lease has expired
    for worker in survivors:
        assert worker.wait(60) == 0, worker.stderr.read_text()[-2000:]
    history = faults.events_by_trial(client, "kill")[orphan]
    expired = [
        int(e["ms"]) - killed_at for e in history if e["event"] == "lease_expired"
    ]
    assert len(expired) == 1, history
    assert expired[0] <= (faults.LEASE + faults.SWEEP + 1.0) * 1000, expired
    state = RedisNePSState.create_or_load("kill", redis=client, load_only=True)
    finisher = state.lock_and_get_trial_by_id(orphan).metadata.evaluating_worker_id
    assert finisher in {line["worker"] for w in survivors for line in w.lines()}
    faults.assert_run_is_sound(client, "kill", workers, total=3)


def _kill_at_random(
    url: str,
    runs: dict[str, list[faults.Worker]],
    tmp_path: Path,
    options: dict,
    *,
    kills: int,
    limit: float,
    client,
) -> int:
    """Until every worker is done: every half second, once the runs are
    under way, kill a worker in the middle of an evaluation and start
    another on its run. Returns the number killed."""
    current = {run: list(workers) for run, workers in runs.items()}
    rng = random.Random(0)
    killed = 0
    started = time.monotonic()
    while any(w.process.poll() is None for ws in current.values() for w in ws):
        time.sleep(0.5)
        assert time.monotonic() - started < limit, f"the runs took over {limit} s"
        under_way = all(
            int(client.hget(RunKeys(run).counts, "success") or 0) >= 10
            for run in current
        )
        evaluating = [
            (run, w)
            for run, ws in current.items()
            for w in ws
            if w.process.poll() is None and w.last_event() == "claimed"
        ]
        if killed < kills and under_way and evaluating:
            run, victim = rng.choice(evaluating)
            victim.kill()
            killed += 1
            current[run].remove(victim)
            replacement = faults.Worker(
                url, run, tmp_path / run, len(runs[run]), **options
            )
            runs[run].append(replacement)
            current[run].append(replacement)
    return killed


@pytest.mark.timeout(150)
def test_workers_on_two_primaries_with_random_kills_claim_nothing_twice_lose_nothing(
    cluster_url, tmp_path, short_leases, monkeypatch
):
    # Given two runs whose slots are on different primaries, and three
    # workers on each, allowed enough attempts that kills never exhaust one
    monkeypatch.setitem(faults.FAULT_ENV, "NEPS_REDIS_MAX_ATTEMPTS", "20")
    client = client_from_url(cluster_url)
    primaries = _runs_on_different_primaries(client, 2)
    options = {
        "target": CHAOS_LIFECYCLES,
        "batch": 10,
        "eval_min": 0.02,
        "eval_max": 0.1,
    }
    runs: dict[str, list[faults.Worker]] = {}
    for run in primaries:
        faults.new_run(cluster_url, run).close()
        (tmp_path / run).mkdir()
        runs[run] = [
            faults.Worker(cluster_url, run, tmp_path / run, n, **options)
            for n in range(3)
        ]

    # When workers in the middle of an evaluation are killed at random, and
    # replaced
    started = time.monotonic()
    killed = _kill_at_random(
        cluster_url, runs, tmp_path, options, kills=15, limit=100, client=client
    )
    elapsed = time.monotonic() - started

    # Then on each primary every trial finished once, nothing acknowledged
    # was lost, and `check` finds nothing
    assert len(set(primaries.values())) == 2, primaries
    for run, workers in runs.items():
        for worker in workers:
            assert worker.process.wait(10) in (0, -signal.SIGKILL)
        faults.assert_run_is_sound(client, run, workers, total=CHAOS_LIFECYCLES)
    expired = sum(
        e["event"] == "lease_expired"
        for run in runs
        for history in faults.events_by_trial(client, run).values()
        for e in history
    )
    assert killed >= 5 and expired >= killed // 2, (killed, expired)
    print(
        f"{len(runs) * CHAOS_LIFECYCLES} lifecycles on {len(runs)} primaries,"
        f" {sum(map(len, runs.values()))} processes, {killed} kills,"
        f" {expired} requeues in {elapsed:.1f} s"
    )


def _reported(workers: list[faults.Worker]) -> list[dict]:
    return [line for w in workers for line in w.lines() if line["event"] == "reported"]


@pytest.mark.timeout(150)
def test_workers_outlive_a_killed_and_restarted_primary_and_lose_nothing(
    aof_cluster, tmp_path, short_leases
):
    # Given two runs on different primaries of a cluster with an
    # fsync-always AOF, and two workers on each
    url = _url(aof_cluster)
    client = client_from_url(url)
    primaries = _runs_on_different_primaries(client, 2)
    options = {"target": CHAOS_LIFECYCLES, "eval_min": 0.01, "eval_max": 0.03}
    runs: dict[str, list[faults.Worker]] = {}
    for run in primaries:
        faults.new_run(url, run).close()
        (tmp_path / run).mkdir()
        runs[run] = [
            faults.Worker(url, run, tmp_path / run, n, **options) for n in range(2)
        ]
    hit = next(iter(primaries))
    [node] = [s for s in aof_cluster if f"127.0.0.1:{s.port}" == primaries[hit]]
    faults.wait_for(
        lambda: sum(len(w.lines()) for w in runs[hit]) > 60, 60, "some progress"
    )

    # When the primary of one run is killed mid-run and started again on its
    # data a second later
    [spared] = [run for run in runs if run != hit]
    working_at_the_kill = sum(w.process.poll() is None for w in runs[hit])
    spared_at_the_kill = len(_reported(runs[spared]))
    node.kill()
    time.sleep(1.0)
    spared_before_the_restart = len(_reported(runs[spared]))
    node.restart()

    # Then the other run went on meanwhile, every worker finishes, and
    # neither run lost anything acknowledged
    assert working_at_the_kill == 2
    assert spared_before_the_restart > spared_at_the_kill
    for run, workers in runs.items():
        for worker in workers:
            assert worker.wait(90) == 0, worker.stderr.read_text()[-2000:]
        faults.assert_run_is_sound(client, run, workers, total=CHAOS_LIFECYCLES)
