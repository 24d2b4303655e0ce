"""The package on a real Redis Cluster of three primaries on loopback.

The cluster is built by hand, as `redis-cli --cluster create` would: three
servers started with cluster mode on, each given a third of the 16384
slots, then introduced to each other with CLUSTER MEET. It is started once a
session and flushed before each test.
"""

from __future__ import annotations

import json
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
from tests.conftest import _require_binaries
from tests.helpers import newest
from tests.test_status_and_cli import Configs, evaluate, new_run

pytestmark = pytest.mark.cluster

SLOTS = 16384
PRIMARIES = 3


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


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a 3-primary cluster: ``redis+cluster://`` and every node."""
    binary = newest(_require_binaries())
    servers: list[RunningServer] = []
    bus_ports: list[int] = []
    try:
        for i in range(PRIMARIES):
            data_dir: Path = tmp_path_factory.mktemp(f"cluster-{i}")
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
                    ],
                )
            )

        # One contiguous third of the slots a primary; the last takes the rest.
        share = SLOTS // PRIMARIES
        for i, server in enumerate(servers):
            first = i * share
            last = SLOTS - 1 if i == PRIMARIES - 1 else first + share - 1
            with server.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        with servers[0].client() as client:
            for other, bus_port in zip(servers[1:], bus_ports[1:], strict=True):
                client.execute_command(
                    "CLUSTER", "MEET", "127.0.0.1", other.port, bus_port
                )
        _wait_until_ok(servers)

        yield "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
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
