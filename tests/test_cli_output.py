"""What the command line shows besides its results: progress on a terminal
only, warnings as one line each, authentication failures named as such,
and tables that fit an 80-column terminal without cutting values short."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from neps_redis.acl import acl_rules
from neps_redis.cli import main
from neps_redis.cli_output import plain_warnings
from neps_redis.connection import describe_server
from neps_redis.server import RunningServer
from tests.runs import build_mixed_run, new_run

SAMPLE = Path(__file__).parent / "data" / "neps-0.17-run"
PASSWORD = "Pw-5c2f-Secret"


def _run_with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """Run ``neps-redis ARGS`` with stderr on a pseudo-terminal and stdout
    on a pipe; returns the exit code, stdout and what the terminal got."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-c", "from neps_redis.cli import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    terminal: list[bytes] = []

    def drain() -> None:
        # The leader reads until the last writer is gone (EIO on Linux).
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = process.communicate(timeout=60)
    reader.join(timeout=10)
    os.close(leader)
    return process.returncode, stdout.decode(), b"".join(terminal).decode()


# --- progress ----------------------------------------------------------------


def test_import_and_export_show_progress_on_a_terminal_and_only_there(
    redis_url, tmp_path
):
    # When a run is imported and exported with stderr on a terminal
    imported = _run_with_terminal_stderr(
        "--redis", redis_url, "import", str(SAMPLE), "moved"
    )
    exported = _run_with_terminal_stderr(
        "--redis", redis_url, "export", "moved", str(tmp_path / "out")
    )

    # Then the terminal shows each step's trials counted to the total
    code, stdout, terminal = imported
    assert code == 0, stdout + terminal
    assert "Reading trials" in terminal and "Storing trials" in terminal
    assert "4/4" in terminal
    code, stdout, terminal = exported
    assert code == 0, stdout + terminal
    assert "Writing trials" in terminal and "4/4" in terminal

    # And stdout, which a script reads, holds the report alone
    assert stdout.startswith("Exported run 'moved'")
    assert "\x1b" not in stdout and "Writing trials" not in stdout


def test_quiet_shows_no_progress_even_on_a_terminal(redis_url):
    code, stdout, terminal = _run_with_terminal_stderr(
        "--redis", redis_url, "import", str(SAMPLE), "moved", "--quiet"
    )

    assert code == 0, stdout + terminal
    assert stdout == ""
    assert terminal == ""


# --- warnings ----------------------------------------------------------------


def test_a_warning_raised_twice_is_shown_once_as_one_plain_line(capsys):
    # When the same warning comes from two places
    with plain_warnings():
        warnings.warn("The server may evict keys.", stacklevel=1)
        warnings.warn("The server may evict keys.", stacklevel=2)

    # Then stderr has it once, without a source path
    assert capsys.readouterr().err == "warning: The server may evict keys.\n"


@pytest.fixture
def monitor_url(server: RunningServer, redis_url: str) -> Iterator[str]:
    """A user that may read runs but not CONFIG GET, as ACLs often allow."""
    state = new_run(redis_url, "run", heartbeat=False)
    build_mixed_run(state, numpy=False)
    state.close()
    with server.client() as admin:
        rules = acl_rules("run", "monitor", server=describe_server(admin))
        admin.execute_command(
            "ACL", "SETUSER", "reader", "reset", f">{PASSWORD}", *rules
        )
    yield f"redis://reader:{PASSWORD}@127.0.0.1:{server.port}/0"
    with server.client() as admin:
        admin.execute_command("ACL", "DELUSER", "reader")


@pytest.mark.parametrize("command", [["trials", "run"], ["watch", "run", "--once"]])
def test_an_unverifiable_eviction_policy_is_one_warning_line(monitor_url, command):
    result = CliRunner().invoke(main, ["--redis", monitor_url, *command])

    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warned) == 1
    assert warned[0].startswith("warning: Could not verify the eviction policy")
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr
    assert PASSWORD not in result.output


# --- errors ------------------------------------------------------------------


@pytest.fixture
def guarded(start_server) -> RunningServer:
    """A private server that requires PASSWORD."""
    server = start_server()
    with server.client() as admin:
        admin.config_set("requirepass", PASSWORD)
    return server


@pytest.mark.parametrize(
    "command",
    [["status", "run"], ["check", "run"], ["watch", "run", "--once"], ["runs"]],
)
def test_a_wrong_password_is_reported_as_failed_authentication(guarded, command):
    url = f"redis://default:wrong-guess@127.0.0.1:{guarded.port}/0"

    result = CliRunner().invoke(main, ["--redis", url, *command])

    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "Authentication failed" in message
    assert "Cannot reach" not in message
    assert f"redis://default:***@127.0.0.1:{guarded.port}/0" in message
    assert "wrong-guess" not in result.output
    assert len(message.splitlines()) == 1


def test_a_server_error_names_the_url_the_command_chose(guarded):
    # When a command that takes --redis after its name fails on the server
    url = f"redis://default:wrong-guess@127.0.0.1:{guarded.port}/0"
    result = CliRunner().invoke(main, ["watch", "run", "--once", "--redis", url])

    # Then the message names that server, not a placeholder
    assert result.exit_code == 1
    assert f"127.0.0.1:{guarded.port}" in result.stderr
    assert "no server chosen" not in result.stderr


# --- tables ------------------------------------------------------------------


@pytest.fixture
def long_ids_run(redis_url: str) -> str:
    state = new_run(redis_url, "a-run-with-a-rather-long-name", heartbeat=False)
    build_mixed_run(state, numpy=False)
    state.close()
    return redis_url


@pytest.mark.parametrize(
    "command",
    [
        ["trials", "a-run-with-a-rather-long-name"],
        ["runs"],
        ["workers", "a-run-with-a-rather-long-name"],
        ["errors", "a-run-with-a-rather-long-name"],
        ["status", "a-run-with-a-rather-long-name"],
    ],
)
def test_tables_at_80_columns_cut_nothing_short(long_ids_run, command):
    result = CliRunner().invoke(
        main, ["--redis", long_ids_run, *command], env={"COLUMNS": "80"}
    )

    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_a_narrow_trials_table_keeps_whole_ids_and_says_what_it_left_out(
    long_ids_run,
):
    result = CliRunner().invoke(
        main,
        ["--redis", long_ids_run, "trials", "a-run-with-a-rather-long-name"],
        env={"COLUMNS": "80"},
    )

    assert "1_rung_0" in result.stdout and "ext_1" in result.stdout
    assert "success" in result.stdout
    note = result.stdout.strip().splitlines()[-1]
    assert note.startswith("(left out for the terminal's width:")
    assert "sampler" in note and "objective" not in note
