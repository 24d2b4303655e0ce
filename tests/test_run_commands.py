"""The ``neps-redis`` commands that look into runs and tend them: their
output for people and for scripts, and their exit codes."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import time

import pytest
from click.testing import CliRunner

from neps_redis import RedisNePSState
from neps_redis.cli import main
from neps_redis.errors import NePSError
from tests.test_status_and_cli import Configs, build_mixed_run, evaluate, new_run


@pytest.fixture
def mixed_run(redis_url) -> RedisNePSState:
    return build_mixed_run(redis_url)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, url: str, *args: str, **kwargs):
    # --redis after the subcommand, as a person types it after the fact.
    return runner.invoke(main, [*args, "--redis", url], **kwargs)


# --- runs --------------------------------------------------------------------


def test_runs_lists_every_run_with_its_counts(runner, redis_url, mixed_run):
    # Given: a second run
    new_run(redis_url, "other run")

    # When
    result = invoke(runner, redis_url, "runs")
    as_json = invoke(runner, redis_url, "runs", "--json")

    # Then
    assert result.exit_code == 0, result.output
    assert "mixed" in result.stdout and "other run" in result.stdout
    rows = {row["run"]: row for row in json.loads(as_json.stdout)}
    assert set(rows) == {"mixed", "other run"}
    assert rows["mixed"]["counts"]["success"] == 3
    assert rows["mixed"]["total"] == 6
    assert rows["mixed"]["evaluation_budget"] == 10
    assert rows["other run"]["total"] == 0


def test_runs_on_an_empty_server_says_so_and_exits_0(runner, redis_url):
    result = invoke(runner, redis_url, "runs")

    assert result.exit_code == 0
    assert "No runs" in result.stdout
    assert json.loads(invoke(runner, redis_url, "runs", "--json").stdout) == []


# --- trials ------------------------------------------------------------------


def test_trials_sorted_by_objective_put_the_best_first_and_unranked_last(
    runner, redis_url, mixed_run
):
    result = invoke(runner, redis_url, "trials", "mixed", "--sort", "objective")
    rows = json.loads(
        invoke(
            runner, redis_url, "trials", "mixed", "--sort", "objective", "--json"
        ).stdout
    )

    assert result.exit_code == 0, result.output
    assert "Run 'mixed': 6 trials" in result.stdout
    assert [r["id"] for r in rows][:2] == ["2", "1"]
    assert rows[0]["objective_to_minimize"] == 0.2
    assert rows[0]["config"] == {"lr": pytest.approx(0.2), "units": 2}
    # NaN is not valid JSON: it is spelled as text
    assert any(r["objective_to_minimize"] == "nan" for r in rows)


def test_trials_filter_by_state_and_worker_and_limit(runner, redis_url, mixed_run):
    by_state = json.loads(
        invoke(
            runner, redis_url, "trials", "mixed", "--state", "success", "--json"
        ).stdout
    )
    by_worker = json.loads(
        invoke(runner, redis_url, "trials", "mixed", "--worker", "b", "--json").stdout
    )
    limited = invoke(runner, redis_url, "trials", "mixed", "--limit", "2")

    # NaN was reported as a success too
    assert [r["id"] for r in by_state] == ["1", "2", "3"]
    assert {r["id"] for r in by_worker} == {"2", "4", "5", "6"}, by_worker
    assert "first 2 of 6" in limited.stdout


def test_trials_as_csv_has_one_row_a_trial_and_a_column_a_parameter(
    runner, redis_url, mixed_run
):
    result = invoke(runner, redis_url, "trials", "mixed", "--csv")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 6
    assert rows[1]["id"] == "2"
    assert rows[1]["config.units"] == "2"
    assert rows[1]["state"] == "success"


def test_trials_with_a_bad_option_exit_2(runner, redis_url, mixed_run):
    bad_sort = invoke(runner, redis_url, "trials", "mixed", "--sort", "cost")
    both = invoke(runner, redis_url, "trials", "mixed", "--json", "--csv")

    assert bad_sort.exit_code == 2
    assert both.exit_code == 2


def test_trials_of_an_unknown_run_exit_1(runner, redis_url):
    result = invoke(runner, redis_url, "trials", "no-such-run")

    assert result.exit_code == 1
    assert "no-such-run" in result.stderr


# --- show and errors ---------------------------------------------------------


def test_show_prints_the_report_the_error_and_the_traceback(
    runner, redis_url, mixed_run
):
    result = invoke(runner, redis_url, "show", "mixed", "4")
    record = json.loads(
        invoke(runner, redis_url, "show", "mixed", "4", "--json").stdout
    )

    assert result.exit_code == 0, result.output
    assert "Trial 4 of run 'mixed'" in result.stdout
    assert "crashed" in result.stdout
    assert "diverged" in result.stdout
    assert "Traceback (most recent call last)" in result.stdout
    assert record["metadata"]["state"] == "crashed"
    assert record["report"]["err"] == "diverged"
    assert record["attempts"] == []


def test_show_of_an_unknown_trial_exits_1_naming_it(runner, redis_url, mixed_run):
    result = invoke(runner, redis_url, "show", "mixed", "99")

    assert result.exit_code == 1
    assert "Trial '99' not found in run 'mixed'." in result.stderr


def test_show_prints_a_report_s_extra_as_json(runner, redis_url):
    # Given: a trial reported with extra values
    state = new_run(redis_url, "extras")
    state.lock_and_sample_trial(Configs({"x": 1}), worker_id="w")
    trial = state.claim_next_pending_trial(worker_id="w")
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=0.1,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra={"validation_accuracy": 0.9, "note": "ok", "sizes": [1, 2]},
        evaluation_duration=0.1,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id="w")

    # When
    result = invoke(runner, redis_url, "show", "extras", "1")

    # Then
    assert result.exit_code == 0, result.output
    # The cell may fold onto more lines of the table.
    shown = re.sub(r"[\s│]", "", result.stdout)
    assert 'extra{"validation_accuracy":0.9,"note":"ok","sizes":[1,2]}' in shown
    assert "'validation_accuracy'" not in result.stdout


def test_errors_lists_the_shared_errors_newest_last(runner, redis_url, mixed_run):
    # Given: a second error after the one of trial 4
    evaluate(mixed_run, "a", None, as_="failed", err=RuntimeError("second"))

    # When
    result = invoke(runner, redis_url, "errors", "mixed")
    errors = json.loads(invoke(runner, redis_url, "errors", "mixed", "--json").stdout)

    # Then
    assert result.exit_code == 0, result.output
    assert result.stdout.index("diverged") < result.stdout.index("second")
    assert [e["err"] for e in errors] == ["diverged", "second"]
    assert errors[0]["err_type"] == "ValueError"


def test_status_shows_the_budget_used_and_the_recent_errors(
    runner, redis_url, mixed_run
):
    result = invoke(runner, redis_url, "status", "mixed")

    assert result.exit_code == 0, result.output
    assert "Evaluation budget used: 40 %." in result.stdout
    assert "trial 4: ValueError: diverged" in result.stdout


# --- workers -----------------------------------------------------------------


def test_workers_shows_each_worker_s_host_and_current_trial(
    runner, redis_url, mixed_run
):
    result = invoke(runner, redis_url, "workers", "mixed")
    rows = {
        r["worker_id"]: r
        for r in json.loads(
            invoke(runner, redis_url, "workers", "mixed", "--json").stdout
        )
    }

    assert result.exit_code == 0, result.output
    assert "3 workers" in result.stdout
    assert set(rows) == {"a", "b", "idle"}
    assert rows["b"]["evaluating"] == ["5"]
    assert rows["a"]["evaluating"] == []
    assert rows["b"]["host"] and rows["b"]["pid"]


# --- watch -------------------------------------------------------------------


def test_watch_once_prints_the_progress_toward_the_budget(runner, redis_url, mixed_run):
    result = invoke(runner, redis_url, "watch", "mixed", "--once")

    assert result.exit_code == 0, result.output
    assert "finished 4 of 10 (40 %)" in result.stdout


def test_watch_once_json_is_one_document_with_the_latest_results(
    runner, redis_url, mixed_run
):
    result = invoke(runner, redis_url, "watch", "mixed", "--once", "--json")

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["run"] == "mixed" and record["server"] == redis_url
    assert record["finished"] == 4 and record["evaluation_budget"] == 10
    assert record["counts"]["success"] == 3
    latest = {r["trial_id"]: r for r in record["latest_results"]}
    assert latest["2"]["objective_to_minimize"] == 0.2
    assert latest["2"]["worker_id"] == "b"
    assert latest["3"]["objective_to_minimize"] == "nan"


def test_watch_json_without_once_is_a_usage_error(runner, redis_url, mixed_run):
    result = invoke(runner, redis_url, "watch", "mixed", "--json")

    assert result.exit_code == 2
    assert "--once" in result.stderr


def test_watch_follows_the_results_reported_while_it_runs(runner, redis_url):
    # Given: a run whose trials are reported while the watch runs
    state = new_run(redis_url, "live")
    worker = state.lock_and_set_new_worker_id("w")
    optimizer = Configs(*({"x": k} for k in range(3)))
    for _ in range(3):
        state.lock_and_sample_trial(optimizer, worker_id=worker)

    def report_later() -> None:
        time.sleep(0.5)
        for objective in (0.3, 0.1):
            evaluate(state, worker, objective)

    reporter = threading.Thread(target=report_later)
    reporter.start()

    # When
    result = invoke(runner, redis_url, "watch", "live", "--for", "2", "--block", "200")
    reporter.join()

    # Then
    assert result.exit_code == 0, result.output
    assert "reported 1 w" in result.stdout
    assert "trial 2 success objective 0.1 (worker w)" in result.stdout
    assert "finished 2 of 10" in result.stdout


# --- reset, remove, delete ---------------------------------------------------


def test_reset_and_remove_of_an_unknown_trial_name_the_run(
    runner, redis_url, mixed_run
):
    for command in ("reset", "remove"):
        result = invoke(runner, redis_url, command, "mixed", "99")

        assert result.exit_code == 1
        assert result.stderr == "Error: Trial '99' not found in run 'mixed'.\n"


def test_reset_puts_a_trial_back_to_pending(runner, redis_url, mixed_run):
    result = invoke(runner, redis_url, "reset", "mixed", "4")

    assert result.exit_code == 0, result.output
    assert "trial 4 is pending again" in result.stdout
    assert mixed_run.lock_and_get_trial_by_id("4").metadata.state.value == "pending"


def test_remove_deletes_a_trial_and_an_unknown_one_exits_1(
    runner, redis_url, mixed_run
):
    removed = invoke(runner, redis_url, "remove", "mixed", "1")
    again = invoke(runner, redis_url, "remove", "mixed", "1")

    assert removed.exit_code == 0, removed.output
    assert "1" not in mixed_run.all_trial_ids()
    assert again.exit_code == 1
    assert "Trial '1' not found in run 'mixed'" in again.stderr


def test_delete_asks_first_and_deletes_every_key_of_the_run(runner, redis_url, r):
    # Given: a finished run, and another run that must stay
    state = new_run(redis_url, "doomed")
    worker = state.lock_and_set_new_worker_id("w")
    state.lock_and_sample_trial(Configs({"x": 1}), worker_id=worker)
    evaluate(state, worker, 0.5)
    new_run(redis_url, "kept")

    # When: the question is answered no, then yes
    declined = invoke(runner, redis_url, "delete", "doomed", input="n\n")
    assert declined.exit_code == 1
    assert "Aborted!" in declined.stderr
    assert "(1 trial)" in declined.stdout
    assert r.exists(state.keys.meta)
    accepted = invoke(runner, redis_url, "delete", "doomed", input="y\n")

    # Then
    assert accepted.exit_code == 0, accepted.output
    assert "Run 'doomed' deleted: 1 trial." in accepted.stdout
    left = [k for k in r.scan_iter(match=state.keys.pattern) if b":request:" not in k]
    assert left == []
    assert r.exists(
        RedisNePSState.create_or_load("kept", redis=r, load_only=True).keys.meta
    )


def test_delete_of_a_run_with_a_live_worker_refuses_and_exits_1(
    runner, redis_url, mixed_run
):
    result = invoke(runner, redis_url, "delete", "mixed", "--yes")

    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "Error: Run 'mixed' has live workers, so it was not deleted:"
    assert "worker 'b'" in lines[1] and "evaluating trial '5'" in lines[1]
    assert "afresh" not in result.stderr
    assert "neps-redis delete mixed --force" in result.stderr
    assert mixed_run.counts()


def test_delete_with_force_takes_the_trials_from_live_workers_and_deletes(
    runner, redis_url, r, mixed_run
):
    # Given: worker b evaluates trial 5 under a live lease
    trial = mixed_run.lock_and_get_trial_by_id("5")
    assert trial.metadata.state.value == "evaluating"

    # When
    result = invoke(runner, redis_url, "delete", "mixed", "--yes", "--force")

    # Then: the run is gone, and the worker's report is refused
    assert result.exit_code == 0, result.output
    assert "took 1 trial from live workers (5)" in result.stderr
    assert "Run 'mixed' deleted: 6 trials." in result.stdout
    assert not r.exists(mixed_run.keys.meta)
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=0.3,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=0.1,
    )
    with pytest.raises(NePSError):
        mixed_run.lock_and_report_trial_evaluation(trial, report, worker_id="b")
    assert not r.exists(mixed_run.keys.meta)


def test_delete_with_force_still_waits_for_a_worker_that_is_sampling(
    runner, redis_url, r, mixed_run
):
    # Given: a worker holds the optimizer lease
    token = mixed_run.take_optimizer_lease()
    try:
        # When
        result = invoke(runner, redis_url, "delete", "mixed", "--yes", "--force")
    finally:
        mixed_run.release_optimizer_lease(token)

    # Then
    assert result.exit_code == 1
    assert "a worker holds the optimizer lease (it is sampling)" in result.stderr
    assert "Try again in a few seconds" in result.stderr
    assert r.exists(mixed_run.keys.meta)


def test_delete_of_an_unknown_run_exits_1(runner, redis_url):
    result = invoke(runner, redis_url, "delete", "no-such-run", "--yes")

    assert result.exit_code == 1
    assert "not found" in result.stderr
