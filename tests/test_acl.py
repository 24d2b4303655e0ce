"""Least-privilege users: each role does its whole job on its own run through
the lines `neps-redis acl` prints, and nothing else."""

from __future__ import annotations

import hashlib
import shlex
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from redis.exceptions import NoPermissionError

from neps_redis import ImportedConfig, RedisNePSState, SampledConfig
from neps_redis.acl import (
    PASSWORD_PLACEHOLDER,
    acl_line,
    acl_rules,
    commands,
    default_user,
)
from neps_redis.check import inspect_run
from neps_redis.cli import main
from neps_redis.connection import describe_server
from neps_redis.export import export_run
from neps_redis.server import RunningServer
from neps_redis.status import summarize
from tests.runs import build_mixed_run, config, new_run

PASSWORD = "s3cret-acl-pw"


@pytest.fixture
def make_user(any_server: RunningServer) -> Iterator[Callable[..., str]]:
    """Create ACL users on `any_server` from `acl_rules`; returns their URL."""
    admin = any_server.client()
    admin.flushall()
    made: list[str] = []

    def make(run: str, role: str, name: str | None = None) -> str:
        name = name or f"test-{role}"
        rules = acl_rules(run, role, server=describe_server(admin))
        admin.execute_command("ACL", "SETUSER", name, "reset", f">{PASSWORD}", *rules)
        made.append(name)
        return f"redis://{name}:{PASSWORD}@127.0.0.1:{any_server.port}/0"

    yield make
    for name in made:
        admin.execute_command("ACL", "DELUSER", name)
    admin.close()


def _open(url: str, run: str = "demo", **kwargs: Any) -> RedisNePSState:
    # A restricted user may not run CONFIG GET, so the eviction check warns.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not verify the eviction")
        if kwargs.pop("create", False):
            return new_run(url, run, heartbeat=False)
        return RedisNePSState.create_or_load(
            run, redis=url, load_only=True, heartbeat=False, **kwargs
        )


def _fill_as_admin(any_server: RunningServer, run: str = "demo") -> None:
    state = new_run(any_server.url, run, heartbeat=False)
    build_mixed_run(state)
    state.close()


def test_a_worker_user_runs_every_transition_of_its_run(
    make_user: Callable[..., str], any_server: RunningServer
) -> None:
    # Given a worker user of run "demo"
    url = make_user("demo", "worker")

    # When it creates the run and goes through every transition
    state = _open(url, create=True)
    state.lock_and_set_new_worker_id()
    build_mixed_run(state)  # sample, claim, report, put, reset, import
    with any_server.client() as admin:
        admin.script_flush()  # a restart empties the script cache
    trial = state.claim_next_pending_trial(worker_id="w9", lease_seconds=0.05)
    assert trial is not None
    assert state.renew_lease(trial, lease_seconds=0.05)
    time.sleep(0.2)
    swept = state.requeue_expired()
    state.lock_and_remove_trial_by_id("ext_1")
    state.lock_and_import_trials(
        [ImportedConfig("ext_3", config(13), {"objective_to_minimize": 0.1})],
        worker_id="external",
    )
    # (a sampler that waits for another's optimizer lease blocks on BLPOP)
    holder = _open(url)
    token = holder.take_optimizer_lease()
    threading.Timer(0.3, holder.release_optimizer_lease, [token]).start()
    state.lock_and_sample_trial(
        lambda trials, budget_info, n=None: SampledConfig("late", config(14)),
        worker_id="w9",
    )
    holder.close()
    trials = state.lock_and_read_trials()
    state.close()

    # Then every step was allowed, and the run can be deleted by it too
    assert swept == [(trial.metadata.id, "requeued")]
    assert "ext_1" not in trials and {"ext_3", "late"} <= set(trials)
    assert inspect_run(any_server.client(), "demo").ok
    state.lock_and_reset_trial_by_id("7_rung_0")  # the last live lease
    assert RedisNePSState.delete_run("demo", redis=url) > 0


def test_a_worker_user_cannot_touch_another_run_or_the_server(
    make_user: Callable[..., str], any_server: RunningServer
) -> None:
    # Given run "other" and a worker user of run "demo"
    _fill_as_admin(any_server, "other")
    url = make_user("demo", "worker")
    client = redis.Redis.from_url(url)

    # When / Then it can neither open the other run nor read or write its keys
    with pytest.raises(NoPermissionError):
        _open(url, "other", create=True)
    with pytest.raises(NoPermissionError):
        client.hgetall("neps:{other}:meta")
    with pytest.raises(NoPermissionError):
        client.hset("neps:{other}:meta", "x", "1")

    # Nor act on the whole server
    for command in (("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "1"), ("KEYS", "*")):
        with pytest.raises(NoPermissionError):
            client.execute_command(*command)
    with pytest.raises(NoPermissionError):
        client.execute_command("CONFIG", "GET", "requirepass")
    client.close()


def test_a_monitor_user_reads_status_and_check_but_writes_nothing(
    make_user: Callable[..., str], any_server: RunningServer
) -> None:
    # Given a filled run and a monitor user of it
    _fill_as_admin(any_server)
    url = make_user("demo", "monitor")

    # When it reads the status and checks the run
    state = _open(url)
    summary = summarize(state)
    client = redis.Redis.from_url(url)
    result = inspect_run(client, "demo")
    newest = client.xrevrange("neps:{demo}:events", count=1)

    # Then both work, and no write of any kind is allowed
    assert summary.total == 13 and result.ok and newest
    with pytest.raises(NoPermissionError):
        state.lock_and_set_new_worker_id()
    with pytest.raises(NoPermissionError):
        client.hset("neps:{demo}:meta", "x", "1")
    with pytest.raises(NoPermissionError):
        client.hgetall("neps:{other}:meta")
    client.close()


def test_an_exporter_user_exports_the_run_and_writes_nothing(
    make_user: Callable[..., str], any_server: RunningServer, tmp_path: Path
) -> None:
    # Given a filled run and an exporter user of it
    _fill_as_admin(any_server)
    url = make_user("demo", "exporter")

    # When it exports the run
    state = _open(url)
    result = export_run(state, tmp_path / "export")

    # Then the export is complete, and writes and other runs are refused
    assert result.trials == 13
    assert (tmp_path / "export" / "configs").is_dir()
    with pytest.raises(NoPermissionError):
        state.lock_and_reset_trial_by_id("1_rung_0")
    client = redis.Redis.from_url(url)
    with pytest.raises(NoPermissionError):
        client.zrange("neps:{other}:trials", 0, -1)
    client.close()


def test_a_run_name_with_glob_characters_limits_the_user_to_that_run(
    make_user: Callable[..., str], any_server: RunningServer
) -> None:
    # Given runs "a*" and "ab", and a worker user of "a*"
    _fill_as_admin(any_server, "ab")
    url = make_user("a*", "worker")

    # When it works on "a*" / Then it may, but "ab" is not matched by its pattern
    _open(url, "a*", create=True).close()
    with pytest.raises(NoPermissionError):
        redis.Redis.from_url(url).hgetall("neps:{ab}:meta")


def test_the_acl_command_prints_lines_redis_cli_reads_back_with_a_placeholder() -> None:
    # When the CLI prints the three roles' lines of a run whose name has a space
    result = CliRunner().invoke(main, ["acl", "my run"])

    # Then each line is one ACL SETUSER with the placeholder and the run's pattern
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    digest = hashlib.sha256(b"my run").hexdigest()[:12]
    assert [shlex.split(line)[2] for line in lines] == [
        f"neps-worker-my_run-{digest}",
        f"neps-monitor-my_run-{digest}",
        f"neps-exporter-my_run-{digest}",
    ]
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["ACL", "SETUSER"]
        assert f">{PASSWORD_PLACEHOLDER}" in words
        assert "~neps:{my run}:*" in words
    assert lines[0] == acl_line("my run", "worker")


def test_runs_whose_names_are_not_plain_get_users_of_their_own() -> None:
    # Given run names that are the same once made plain, or not plain at all
    names = ["a b:c", "a b c", "a_b_c ", "ünï-☃", "☃", "✓"]

    # When
    users = [default_user(name, "worker") for name in names]

    # Then no two runs share a user, and a plain name is the user's as it is
    assert len(set(users)) == len(names)
    assert all(u.startswith("neps-worker-") for u in users)
    assert default_user("demo", "worker") == "neps-worker-demo"
    assert default_user("a_b_c", "worker") == "neps-worker-a_b_c"


def test_an_invalid_run_name_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["acl", "x{y}"])

    assert result.exit_code == 2
    assert "Run name 'x{y}' contains '{' or '}'" in result.stderr


def test_the_acl_command_names_the_user_and_role_asked_for() -> None:
    result = CliRunner().invoke(
        main, ["acl", "demo", "--role", "monitor", "--user", "grafana"]
    )

    assert result.exit_code == 0, result.output
    assert result.output.startswith("ACL SETUSER grafana reset on >CHANGE-ME ")
    assert "+evalsha" not in result.output and "+xread" in result.output


def test_the_portable_lines_name_no_command_an_older_server_lacks() -> None:
    for role in ("worker", "monitor", "exporter"):
        assert not {"client|setinfo", "waitaof", "config|get"} & set(commands(role))


def test_a_worker_user_of_a_server_with_waitaof_can_wait_for_the_aof(
    start_server: Callable[..., RunningServer],
) -> None:
    # Given a server with an AOF and WAITAOF, and a worker user made for it
    server = start_server(args=("--appendonly", "yes"))
    admin = server.client()
    if "+waitaof" not in acl_line("demo", "worker", server=describe_server(admin)):
        pytest.skip(f"{server.binary.id} has no WAITAOF")
    rules = acl_rules("demo", "worker", server=describe_server(admin))
    admin.execute_command("ACL", "SETUSER", "w", "reset", f">{PASSWORD}", *rules)
    url = f"redis://w:{PASSWORD}@127.0.0.1:{server.port}/0"

    # When it reports with reports waiting for the AOF
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not verify the eviction")
        state = new_run(url, "demo", heartbeat=False, wait_aof=True)
    build_mixed_run(state)

    # Then every report went through WAITAOF as that user
    assert int(admin.info("commandstats")["cmdstat_waitaof"]["calls"]) >= 5
    state.close()
    admin.close()
