"""The Lua transitions: documented, sharing one error table, shipped, and
working on every server version this machine has."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis

from neps_redis import OptimizationState, RedisNePSState, SeedSnapshot
from neps_redis.errors import ERROR_CODES
from neps_redis.scripts import INCLUDES, TRANSITIONS, lua_dir, source
from tests.optimizers import CountingRandomSearch

ROOT = Path(__file__).resolve().parents[1]
LUA = sorted((ROOT / "lua").glob("*.lua"))


def test_every_lua_file_is_a_registered_transition():
    assert sorted(p.stem for p in LUA) == sorted(TRANSITIONS)
    assert sorted(p.stem for p in (ROOT / "lua" / "includes").glob("*.lua")) == sorted(
        INCLUDES
    )


@pytest.mark.parametrize("path", LUA, ids=lambda p: p.name)
def test_every_transition_has_a_header_naming_its_keys_args_and_results(path):
    text = path.read_text()
    header = text.split("]]", 1)[0]
    assert header.startswith(f"--[[\n{path.stem}:")
    used_keys = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", text.split("]]", 1)[1])}
    for i in used_keys:
        assert f"KEYS[{i}]" in header, f"KEYS[{i}] is used but not documented"
    assert "ARGV[1]" in header
    assert "Returns" in header
    assert "Errors:" in header
    assert "Events:" in header


def test_every_error_code_a_script_uses_is_in_the_shared_table():
    used = set()
    for path in [*LUA, *(ROOT / "lua" / "includes").glob("*.lua")]:
        used |= set(re.findall(r"E\.(\w+)", path.read_text()))
    assert used <= set(ERROR_CODES)
    for code in used:
        for path in LUA:
            header = path.read_text().split("]]", 1)[0]
            if f"E.{code}" in path.read_text():
                assert code in header, f"{path.name} raises {code} undocumented"


def test_no_script_builds_a_key_from_a_string():
    for path in LUA:
        body = path.read_text().split("]]", 1)[1]
        for call in re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", body):
            command, first = call
            if command in ("TIME",):
                continue
            assert ".." not in first, f"{path.name}: {command} on a built key"


def test_the_lua_files_are_found_in_an_installed_wheel(tmp_path):
    # Given a wheel built from this checkout
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("neps_redis-*.whl"))

    # Then it carries every script beside the package
    names = zipfile.ZipFile(wheel).namelist()
    for path in LUA:
        assert f"neps_redis/lua/{path.name}" in names
    for include in INCLUDES:
        assert f"neps_redis/lua/includes/{include}.lua" in names

    # And the package finds them when installed from it
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from neps_redis.scripts import lua_dir; print(lua_dir())",
        ],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert found == str(target / "neps_redis" / "lua")


def test_the_scripts_compile_and_a_lifecycle_runs_on_every_server(any_redis_url):
    # Given each server version in turn
    client = redis.Redis.from_url(any_redis_url)
    for name in TRANSITIONS:
        client.script_load(source(name))

    # When a run goes through every transition
    state = RedisNePSState.create_or_load(
        "versions",
        redis=any_redis_url,
        optimizer_info={"name": "rs", "info": {}},
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    state.lock_and_set_new_worker_id()
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w", n=3)
    trial = state.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="crashed",
        time_end=1.0,
        objective_to_minimize=None,
        cost=None,
        learning_curve=None,
        err=ValueError("x"),
        tb=None,
        extra=None,
        evaluation_duration=None,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id="w")
    state.lock_and_reset_trial_by_id("1")
    state.lock_and_remove_trial_by_id("2")

    # Then the result is the same everywhere
    assert state.counts() == {"pending": 2}
    assert state.all_trial_ids() == ["1", "3"]
    assert state.lock_and_get_errors().empty()


def test_the_script_cache_may_vanish_between_calls(redis_url, r):
    state = RedisNePSState.create_or_load(
        "flush",
        redis=redis_url,
        optimizer_info={"name": "rs", "info": {}},
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    state.lock_and_sample_trial(CountingRandomSearch(), worker_id="w")
    r.script_flush()
    assert state.claim_next_pending_trial(worker_id="w").id == "1"
    assert lua_dir().is_dir()
