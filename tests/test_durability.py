"""Durability: the server is recognised by its own name and version, and a
report can wait until it is in the server's AOF on disk (WAITAOF)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from neps_redis import RedisNePSState, SampledConfig
from neps_redis.connection import describe_server, supports_waitaof
from neps_redis.errors import NePSError
from neps_redis.server import RunningServer, ServerBinary
from tests.helpers import dump_keys
from tests.runs import config, finish, new_run, sample

APPENDONLY = ("--appendonly", "yes", "--appendfsync", "everysec")


def _waitaof_calls(server: RunningServer) -> int:
    with server.client() as admin:
        stats = admin.info("commandstats")
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


def _has_waitaof(binary: ServerBinary) -> bool:
    return binary.name == "valkey" or binary.version >= (7, 2)


def test_each_server_is_reported_by_its_own_name_and_version(
    any_server: RunningServer, any_binary: ServerBinary
) -> None:
    # When the server describes itself
    with any_server.client() as client:
        described = describe_server(client)
        redis_version = client.info("server")["redis_version"]

    # Then Valkey is Valkey with its own version, not the Redis one it reports
    assert described.name == any_binary.name
    assert described.version[:2] == any_binary.version[:2]
    if any_binary.name == "valkey":
        assert described.label.startswith(f"valkey {any_binary.version[0]}.")
        assert redis_version.split(".")[:2] != [str(v) for v in described.version[:2]]
    else:
        assert described.label.startswith("redis ")


def test_a_report_waits_for_the_aof_where_the_server_has_waitaof(
    any_binary: ServerBinary, start_server: Callable[..., RunningServer]
) -> None:
    if not _has_waitaof(any_binary):
        pytest.skip(f"{any_binary.id} has no WAITAOF")
    # Given a server with an AOF and a run whose reports wait for it
    server = start_server(any_binary, args=APPENDONLY)
    state = new_run(server.url, "durable", heartbeat=False, wait_aof=True)
    sample(state, *(SampledConfig(str(i), config(i)) for i in (1, 2)))

    # When two trials are reported, the second after the script cache emptied
    finish(state, objective=0.5)
    with server.client() as admin:
        admin.script_flush()
    finish(state, objective=0.25)

    # Then each report was followed by a WAITAOF (sent again with the script
    # when the cache lacked it), and both are stored, in the AOF too
    assert _waitaof_calls(server) >= 2
    aof = b"".join(p.read_bytes() for p in server.data_dir.rglob("*.aof*"))
    assert b"0.25" in aof and b"0.5" in aof
    trials = state.lock_and_read_trials()
    assert [t.report.objective_to_minimize for t in trials.values()] == [0.5, 0.25]
    state.close()


def test_waiting_for_the_aof_is_refused_on_a_server_without_waitaof_or_aof(
    any_binary: ServerBinary, start_server: Callable[..., RunningServer]
) -> None:
    # Given a server that cannot wait for an AOF: too old, or without one
    server = start_server(any_binary)
    with server.client() as admin:
        before = dump_keys(admin)
        assert supports_waitaof(describe_server(admin)) == _has_waitaof(any_binary)
    expected = "does not have" if not _has_waitaof(any_binary) else "appendonly yes"

    # When a run is opened asking for the wait
    with pytest.raises(NePSError, match=expected) as refused:
        new_run(server.url, "durable", heartbeat=False, wait_aof=True)

    # Then it is refused, naming what is missing, and nothing is written
    assert "WAITAOF" in str(refused.value) or "appendonly" in str(refused.value)
    with server.client() as admin:
        assert dump_keys(admin) == before


def test_the_environment_variable_turns_the_wait_on(
    any_binary: ServerBinary,
    start_server: Callable[..., RunningServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not _has_waitaof(any_binary):
        pytest.skip(f"{any_binary.id} has no WAITAOF")
    server = start_server(any_binary, args=APPENDONLY)
    monkeypatch.setenv("NEPS_REDIS_WAIT_AOF", "1")

    new_run(server.url, "durable", heartbeat=False).close()
    state = RedisNePSState.create_or_load("durable", redis=server.url, load_only=True)

    assert state.wait_aof_ms is not None
    state.close()
