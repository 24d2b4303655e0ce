"""Passwords never appear in log lines, errors, warnings or CLI output, on a
server that asks for one and on a server that cannot be reached."""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from redis.exceptions import AuthenticationError

from neps_redis import RedisNePSState
from neps_redis.check import inspect_run
from neps_redis.cli import main
from neps_redis.connection import client_from_url
from neps_redis.export import export_run
from neps_redis.server import RunningServer
from neps_redis.status import summarize
from tests.runs import build_mixed_run, new_run

PASSWORD = "Pw-9d1e-S3cret"
WRONG = "Wr0ng-77aa-Guess"
UNREACHABLE = f"redis://someone:{PASSWORD}@127.0.0.1:1/0"


@pytest.fixture
def guarded(start_server) -> RunningServer:
    """A private server that requires PASSWORD."""
    # Set after the start: the fixture's readiness check has no password.
    server = start_server()
    with server.client() as admin:
        admin.config_set("requirepass", PASSWORD)
    return server


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Every log record (DEBUG and up, every logger) and warning, as text."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    seen += [str(w.message) for w in caught]
    seen += [record.getMessage() for record in caplog.records]
    seen.append(caplog.text)


def _url(server: RunningServer, password: str = PASSWORD) -> str:
    return f"redis://default:{password}@127.0.0.1:{server.port}/0"


def _cli_commands(directory: Path) -> list[list[str]]:
    return [
        ["status", "run"],
        ["status", "no-such-run"],
        ["check", "run"],
        ["reap", "run"],
        ["runs"],
        ["trials", "run"],
        ["show", "run", "1_rung_0"],
        ["errors", "run"],
        ["workers", "run"],
        ["watch", "run", "--once"],
        ["export", "run", str(directory / "export")],
        ["acl", "run", "--for-server"],
        ["reset", "run", "2_rung_0"],
        ["remove", "run", "3_rung_0"],
        ["delete", "run", "--yes"],
    ]


def _all_text(result: object) -> str:
    parts = [getattr(result, "output", "")]
    if (error := getattr(result, "exception", None)) is not None:
        parts += traceback.format_exception(error)
    return "\n".join(parts)


def test_library_calls_on_a_password_server_log_and_raise_without_it(
    guarded: RunningServer, everything_logged: list[str], tmp_path: Path
) -> None:
    # Given a run on a server that requires a password
    url = _url(guarded)

    # When the library works on it, and fails on it, at DEBUG
    state = new_run(url, "run")
    build_mixed_run(state)
    summarize(state)
    inspect_run(state.client, "run")
    export_run(state, tmp_path / "export")
    state.close()
    failures = []
    for attempt in (
        lambda: RedisNePSState.create_or_load("nope", redis=url, load_only=True),
        lambda: RedisNePSState.create_or_load(
            "run", redis=_url(guarded, WRONG), load_only=True
        ),
    ):
        with pytest.raises(Exception) as error:
            attempt()
        failures.append("".join(traceback.format_exception(error.value)))

    # Then neither the password nor the wrong one appears anywhere
    shown = "\n".join([*everything_logged, *failures, repr(state), state.server])
    assert PASSWORD not in shown and WRONG not in shown


def test_an_unreachable_server_s_errors_and_logs_do_not_hold_the_password(
    everything_logged: list[str],
) -> None:
    # When the library fails to reach a server whose URL holds a password
    with pytest.raises(Exception) as error:
        RedisNePSState.create_or_load(
            "run", redis=client_from_url(UNREACHABLE, retry=None), load_only=True
        )

    # Then the error, its chain and the logs do not hold it
    shown = "".join(traceback.format_exception(error.value))
    assert PASSWORD not in shown + "\n".join(everything_logged)


def test_every_cli_command_on_a_password_server_prints_no_password(
    guarded: RunningServer, everything_logged: list[str], tmp_path: Path
) -> None:
    # Given a filled run on a server that requires a password
    state = new_run(_url(guarded), "run", heartbeat=False)
    build_mixed_run(state)
    state.close()
    runner = CliRunner()

    # When every command runs against it, with the URL as option and from
    # the environment, and with a wrong password
    outputs = []
    for command in _cli_commands(tmp_path):
        for args, env in (
            (["--redis", _url(guarded)], {}),
            ([], {"NEPS_REDIS_URL": _url(guarded)}),
            (["--redis", _url(guarded, WRONG)], {}),
        ):
            result = runner.invoke(main, [*args, *command], env=env)
            outputs.append(_all_text(result))

    # Then no output, traceback or log line holds either password
    shown = "\n".join([*outputs, *everything_logged])
    assert PASSWORD not in shown and WRONG not in shown
    assert "***" in shown  # the URL was shown, redacted


@pytest.mark.parametrize("command", [["status", "run"], ["check", "run"]])
def test_cli_commands_on_an_unreachable_server_print_no_password(
    command: list[str], everything_logged: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, ["--redis", UNREACHABLE, *command])

    assert result.exit_code == 1
    assert PASSWORD not in _all_text(result) + "\n".join(everything_logged)


def test_a_wrong_password_fails_at_once_instead_of_being_retried(
    guarded: RunningServer,
) -> None:
    # When a client made from a URL presents a wrong password
    started = time.monotonic()
    with pytest.raises(AuthenticationError):
        client_from_url(_url(guarded, WRONG)).ping()

    # Then it is refused without the backoff meant for a restarting server
    assert time.monotonic() - started < 1.0
