"""A run's summary, and the ``neps-redis`` command against real servers."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping

import pytest
import redis
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry

from neps_redis import (
    BudgetInfo,
    OptimizationState,
    RedisNePSState,
    SampledConfig,
    SeedSnapshot,
    Trial,
    __version__,
    defaults,
)
from neps_redis.cli import main
from neps_redis.server import HOME_ENV, EmbeddedServer
from neps_redis.status import summarize

SECRET_URL = "redis://user:secret@127.0.0.1:1/0"


class Configs:
    """Hands out the configs it was given, one per call, ids 1, 2, ..."""

    def __init__(self, *configs: Mapping) -> None:
        self.configs = list(configs)

    def __call__(self, trials, budget_info, n=None):
        config = self.configs[len(trials)]
        return SampledConfig(id=str(len(trials) + 1), config=config)


def fallback_answers() -> bool:
    client = redis.Redis.from_url(
        defaults.FALLBACK_URL, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def new_run(url: str, run: str) -> RedisNePSState:
    return RedisNePSState.create_or_load(
        run,
        redis=url,
        optimizer_info={"name": "fixed", "info": {}},
        optimizer_state=OptimizationState(
            budget=BudgetInfo(total_evaluations_to_spend=10),
            seed_snapshot=SeedSnapshot.new_capture(),
            shared_state=None,
        ),
    )


def evaluate(
    state: RedisNePSState,
    worker_id: str,
    objective,
    *,
    as_: str = "success",
    err: Exception | None = None,
) -> Trial:
    trial = state.claim_next_pending_trial(worker_id=worker_id)
    assert trial is not None
    report = trial.set_complete(
        report_as=as_,
        time_end=time.time(),
        objective_to_minimize=objective,
        cost=None,
        learning_curve=None,
        err=err,
        tb="Traceback (most recent call last): ..." if err else None,
        extra=None,
        evaluation_duration=0.1,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id=worker_id)
    return trial


@pytest.fixture
def mixed_run(redis_url) -> RedisNePSState:
    return build_mixed_run(redis_url)


def build_mixed_run(redis_url: str) -> RedisNePSState:
    """Run "mixed", budget 10, workers a, b and idle; six trials: 0.5 (a),
    0.2 (best, b), NaN (a), crashed with "diverged" (b), evaluating (b),
    pending."""
    state = new_run(redis_url, "mixed")
    a = state.lock_and_set_new_worker_id("a")
    b = state.lock_and_set_new_worker_id("b")
    state.lock_and_set_new_worker_id("idle")
    optimizer = Configs(*({"lr": 0.1 * k, "units": k} for k in range(1, 7)))
    for worker_id in (a, a, a, b, b, b):
        state.lock_and_sample_trial(optimizer, worker_id=worker_id)

    evaluate(state, a, 0.5)
    evaluate(state, b, 0.2)
    evaluate(state, a, math.nan)
    evaluate(state, b, None, as_="crashed", err=ValueError("diverged"))
    state.claim_next_pending_trial(worker_id=b)
    return state


# --- summarize ---------------------------------------------------------------


def test_the_summary_counts_every_state_and_finds_the_lowest_objective(mixed_run):
    summary = summarize(mixed_run)

    assert summary.run == "mixed"
    assert summary.counts == {
        "external": 0,
        "pending": 1,
        "evaluating": 1,
        "success": 3,
        "failed": 0,
        "crashed": 1,
        "corrupted": 0,
        "unknown": 0,
    }
    assert summary.total == 6
    assert summary.finished == 4
    assert summary.evaluation_budget == 10
    assert summary.best_trial_id == "2"
    assert summary.best_objective == pytest.approx(0.2)
    assert summary.best_config == {"lr": 0.2, "units": 2}
    assert not summary.multi_objective
    assert summary.shared_errors == 1
    assert summary.registered_workers == 3


def test_the_summary_counts_each_worker_s_samples_and_evaluations(mixed_run):
    workers = {w.worker_id: w for w in summarize(mixed_run).workers}

    assert list(workers) == ["a", "b", "idle"]
    assert workers["a"].sampled == 3
    assert workers["a"].evaluated == {"success": 2}
    assert workers["b"].sampled == 3
    assert workers["b"].evaluated == {"success": 1, "crashed": 1, "evaluating": 1}
    assert workers["b"].evaluated_total == 3
    assert workers["idle"].sampled == 0
    assert workers["idle"].evaluated == {}


def test_a_run_with_only_nan_objectives_has_no_best_trial(redis_url):
    # Given
    state = new_run(redis_url, "nan")
    state.lock_and_sample_trial(Configs({"x": 1}), worker_id="w")

    # When
    evaluate(state, "w", math.nan)

    # Then
    summary = summarize(state)
    assert summary.best_trial_id is None
    assert summary.best_config is None
    assert summary.counts["success"] == 1


def test_a_multi_objective_run_says_it_has_no_single_best(redis_url):
    # Given
    state = new_run(redis_url, "multi")
    optimizer = Configs({"x": 1}, {"x": 2})
    for _ in range(2):
        state.lock_and_sample_trial(optimizer, worker_id="w")

    # When
    evaluate(state, "w", [0.1, 0.9])
    evaluate(state, "w", [0.5, 0.2])

    # Then
    summary = summarize(state)
    assert summary.multi_objective
    assert summary.best_trial_id is None


# --- the command -------------------------------------------------------------


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_status_prints_the_counts_the_best_config_and_the_workers(
    runner, redis_url, mixed_run
):
    result = runner.invoke(main, ["--redis", redis_url, "status", "mixed"])

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Run 'mixed'" in out
    assert "crashed" in out
    assert "Finished 4 of 10 trials." in out
    assert "Best trial 2: objective_to_minimize 0.2" in out
    assert "units" in out
    assert "idle" in out
    assert "1 shared error" in out and "1 shared errors" not in out


def test_status_json_is_one_document_a_script_can_read(runner, redis_url, mixed_run):
    result = runner.invoke(main, ["--redis", redis_url, "status", "mixed", "--json"])

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["run"] == "mixed"
    assert record["counts"]["success"] == 3 and record["counts"]["crashed"] == 1
    assert record["total"] == 6 and record["finished"] == 4
    assert record["evaluation_budget"] == 10
    assert record["best_trial_id"] == "2" and record["best_objective"] == 0.2
    workers = {w["worker_id"]: w for w in record["workers"]}
    assert workers["b"]["evaluated_total"] == 3
    assert record["shared_errors"] == 1


def test_status_json_of_an_unknown_run_exits_1_with_nothing_on_stdout(
    runner, redis_url
):
    result = runner.invoke(main, ["--redis", redis_url, "status", "nope", "--json"])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert "nope" in result.stderr


def test_status_reads_the_url_from_the_environment(
    runner, redis_url, mixed_run, monkeypatch
):
    monkeypatch.setenv("NEPS_REDIS_URL", redis_url)

    result = runner.invoke(main, ["status", "mixed"])

    assert result.exit_code == 0, result.output
    assert "Best trial 2" in result.stdout


def test_status_of_an_unknown_run_exits_1_naming_the_run(runner, redis_url):
    result = runner.invoke(main, ["--redis", redis_url, "status", "no-such-run"])

    assert result.exit_code == 1
    assert "no-such-run" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["status", "x"], ["demo", "--budget", "1"]])
def test_an_unreachable_server_is_one_line_without_the_password(runner, command):
    # From the option and from the environment alike.
    for args, env in (
        (["--redis", SECRET_URL], {}),
        ([], {"NEPS_REDIS_URL": SECRET_URL}),
    ):
        result = runner.invoke(main, [*args, *command], env=env)

        assert result.exit_code == 1
        assert "secret" not in result.output
        assert "redis://user:***@127.0.0.1:1/0" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "url",
    [
        "foo://bar",
        "redis://127.0.0.1:notaport/0",
        "redis+cluster://no-port/",
        "redis+sentinel://127.0.0.1:26379",
    ],
)
def test_a_malformed_url_is_a_usage_error_in_one_line(runner, url):
    result = runner.invoke(main, ["--redis", url, "status", "x"])

    assert result.exit_code == 2
    assert result.stderr.startswith("Error: Invalid ")
    assert len(result.stderr.splitlines()) == 1


def test_an_unknown_url_scheme_is_refused_naming_every_scheme(runner):
    result = runner.invoke(main, ["--redis", "foo://bar", "status", "x"])

    assert result.exit_code == 2
    schemes = ["redis", "rediss", "unix", "redis+cluster", "rediss+cluster"]
    schemes += ["redis+sentinel", "rediss+sentinel"]
    listed = re.findall(r"([a-z+]+)://", result.stderr.split(": it must", 1)[1])
    assert listed == schemes


@pytest.mark.parametrize(
    "run", ["x{y}", "a\tb", "x" * 201], ids=["braces", "tab", "201 characters"]
)
@pytest.mark.parametrize("command", ["status", "trials", "delete"])
def test_an_invalid_run_name_is_a_usage_error(runner, redis_url, run, command):
    args = ["--redis", redis_url, command, run]
    result = runner.invoke(main, [*args, "--yes"] if command == "delete" else args)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: Run name ")
    assert len(result.stderr.splitlines()) == 1


def test_debug_shows_the_traceback_instead(runner):
    package_logger = logging.getLogger("neps_redis")
    level = package_logger.level
    try:
        result = runner.invoke(main, ["--debug", "--redis", SECRET_URL, "status", "x"])
    finally:
        package_logger.setLevel(level)

    assert result.exit_code == 1
    assert result.exception is not None
    assert "secret" not in result.output


def test_the_version_is_the_package_s(runner):
    result = runner.invoke(main, ["--version"])

    assert result.exit_code == 0
    assert __version__ in result.output


def test_the_demo_runs_end_to_end_and_prints_the_table(runner, redis_url, tmp_path):
    result = runner.invoke(
        main,
        [
            "--redis",
            redis_url,
            "demo",
            "--workers",
            "2",
            "--budget",
            "4",
            "--run",
            "cli-demo",
            "--workdir",
            str(tmp_path),
        ],
    )

    assert result.exit_code == 0, result.output
    assert "Finished 4 of 4 trials." in result.stdout
    assert "Best trial" in result.stdout
    assert "learning_rate_init" in result.stdout
    state = RedisNePSState.create_or_load("cli-demo", redis=redis_url, load_only=True)
    assert state.counts() == {"success": 4}


def test_the_embedded_server_commands_start_report_and_stop_it(
    runner, tmp_path, monkeypatch
):
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    try:
        # Not running yet: `url` and `status` both say so with exit code 1
        assert runner.invoke(main, ["server", "url"]).exit_code == 1
        not_running = runner.invoke(main, ["server", "status"])
        assert not_running.exit_code == 1
        assert "no" in not_running.stdout

        # Started
        started = runner.invoke(main, ["server", "start"])
        assert started.exit_code == 0, started.output
        url = EmbeddedServer().url
        assert url in started.stdout
        assert runner.invoke(main, ["server", "url"]).stdout.strip() == url
        status = runner.invoke(main, ["server", "status"])
        assert status.exit_code == 0, status.output
        assert "yes" in status.stdout

        # Stopped
        stopped = runner.invoke(main, ["server", "stop"])
        assert stopped.exit_code == 0
        assert not EmbeddedServer().is_running()
    finally:
        EmbeddedServer().stop()


def test_the_demo_with_no_server_configured_starts_the_embedded_one(
    runner, tmp_path, monkeypatch
):
    # Given: nothing configured, and (checked) nothing at the fallback URL
    monkeypatch.delenv("NEPS_REDIS_URL", raising=False)
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    if fallback_answers():
        pytest.skip(f"a server answers at {defaults.FALLBACK_URL} on this machine")

    try:
        # When
        result = runner.invoke(
            main,
            ["demo", "--workers", "1", "--budget", "2", "--workdir", str(tmp_path)],
        )

        # Then
        assert result.exit_code == 0, result.output
        embedded = EmbeddedServer()
        assert embedded.is_running()
        announcements = [
            line for line in result.stderr.splitlines() if "embedded server" in line
        ]
        assert len(announcements) == 1
        assert str(embedded.data_dir) in result.stderr
        assert "Finished 2 of 2 trials." in result.stdout
    finally:
        EmbeddedServer().stop()
