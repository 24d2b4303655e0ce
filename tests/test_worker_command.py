"""``neps-redis worker``: one worker of the demo's search, in the foreground.

Every worker here is a process of its own, as on a cluster: the command
installs signal handlers, which must not land in the test process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from neps_redis import BudgetInfo, OptimizationState, RedisNePSState, SeedSnapshot
from neps_redis.cli import main
from neps_redis.demo import OPTIMIZER_NAME, SEARCH_SPACE
from neps_redis.keys import RunKeys
from neps_redis.server import free_port

# Generous: a worker evaluates its share in a few seconds; a hang must
# fail, not block.
TIMEOUT = 120

# "trial 3 success objective 0.0266667 (worker worker_1, 0.8 s)"
_TRIAL_LINE = re.compile(
    r"^trial (\S+) (?:success|failed|crashed) objective .*\(worker (\S+),"
)


def start_worker(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from neps_redis.cli import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"The worker did not exit:\n{out}\n{err}") from None
    return process.returncode, out, err


def reported(out: str) -> dict[str, str]:
    """Each trial a worker printed, with the worker id it printed."""
    found = map(_TRIAL_LINE.match, out.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def trial_fields(r, run: str, field: str) -> dict[str, str]:
    keys = RunKeys(run)
    ids = [i.decode() for i in r.zrange(keys.trials, 0, -1)]
    return {i: (r.hget(keys.trial(i), field) or b"").decode() for i in ids}


def assert_check_passes(redis_url: str, run: str) -> None:
    result = CliRunner().invoke(main, ["check", run, "--redis", redis_url])
    assert result.exit_code == 0, result.output
    assert "no violations" in result.stdout


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(0.02)


def test_two_workers_started_at_once_share_one_run_and_spend_its_budget_exactly(
    redis_url, r, tmp_path
):
    # Given: two workers on one run that neither finds; one names the server
    # before the command, one after it.
    budget = 8

    # When
    workers = [
        start_worker(
            "worker", "shared", "--redis", redis_url, "--budget", str(budget),
            "--workdir", str(tmp_path / "a"),
        ),
        start_worker(
            "--redis", redis_url, "worker", "shared", "--budget", str(budget),
            "--workdir", str(tmp_path / "b"),
        ),
    ]  # fmt: skip
    results = [finish(w) for w in workers]

    # Then: both are done, and the run holds the budget, each trial reported
    # once, by the worker that printed it.
    for code, _, err in results:
        assert code == 0, err
    states = trial_fields(r, "shared", "state")
    assert sorted(states, key=int) == [str(i) for i in range(1, budget + 1)]
    assert set(states.values()) == {"success"}

    printed = [reported(out) for _, out, _ in results]
    assert sorted([*printed[0], *printed[1]], key=int) == sorted(states, key=int)
    evaluator = trial_fields(r, "shared", "evaluating_worker_id")
    assert {**printed[0], **printed[1]} == evaluator
    assert r.zcard(RunKeys("shared").workers) == 2
    # Eight trials of about half a second each leave both time to start.
    assert all(printed), "each worker should have evaluated a trial"

    assert_check_passes(redis_url, "shared")


def test_a_worker_stopped_by_sigterm_exits_at_once_and_gives_its_trial_back(
    redis_url, r, tmp_path
):
    # Given: a worker in the middle of a trial, with more to come
    keys = RunKeys("stopped")
    worker = start_worker(
        "worker", "stopped", "--redis", redis_url, "--budget", "50",
        "--workdir", str(tmp_path),
    )  # fmt: skip

    def evaluating_after_a_report() -> bool:
        assert worker.poll() is None, worker.communicate()
        counts = {k.decode(): int(v) for k, v in r.hgetall(keys.counts).items()}
        return counts.get("success", 0) >= 1 and r.zcard(keys.evaluating) == 1

    wait_for(evaluating_after_a_report, TIMEOUT, "the worker's second trial")

    # When
    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, out, err = finish(worker)

    # Then: it stopped promptly, said so, and left no trial evaluating.
    assert time.monotonic() - sent < 10
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert r.zcard(keys.evaluating) == 0
    states = trial_fields(r, "stopped", "state")
    assert set(reported(out)) == {i for i, s in states.items() if s == "success"}
    given_back = re.search(r"trial (\S+) went back to pending", err)
    if given_back:
        assert states[given_back.group(1)] == "pending"
    assert_check_passes(redis_url, "stopped")


def test_a_worker_joining_a_spent_run_exits_0_without_evaluating(redis_url, tmp_path):
    # Given: a run of the demo whose budget has been spent
    first = start_worker(
        "worker", "spent", "--redis", redis_url, "--budget", "1",
        "--workdir", str(tmp_path / "first"),
    )  # fmt: skip
    assert finish(first)[0] == 0

    # When
    code, out, err = finish(
        start_worker(
            "worker", "spent", "--redis", redis_url,
            "--workdir", str(tmp_path / "second"),
        )
    )  # fmt: skip

    # Then
    assert code == 0, err
    assert reported(out) == {}
    assert "evaluated 0 trials" in out
    assert "finished 1 of 1" in out


def test_a_worker_refuses_a_run_of_another_search_with_exit_code_1(redis_url, tmp_path):
    # Given
    RedisNePSState.create_or_load(
        "other",
        redis=redis_url,
        optimizer_info={"name": "bayesian_optimization", "info": {}},
        optimizer_state=OptimizationState(
            budget=BudgetInfo(total_evaluations_to_spend=5),
            seed_snapshot=SeedSnapshot.new_capture(),
            shared_state=None,
        ),
    ).close()

    # When
    code, _, err = finish(
        start_worker(
            "worker", "other", "--redis", redis_url, "--workdir", str(tmp_path)
        )
    )

    # Then
    assert code == 1
    assert "Run 'other' exists and is not a run of the demo's random search" in err
    assert "Traceback" not in err


def test_a_worker_without_a_workdir_leaves_no_directory_behind(redis_url, tmp_path):
    # When a worker runs without --workdir
    code, out, err = finish(
        start_worker(
            "worker", "tidy", "--redis", redis_url, "--budget", "1",
            env={"TMPDIR": str(tmp_path)},
        )
    )  # fmt: skip

    # Then it worked in a temporary directory, removed when it was done
    assert code == 0, err
    assert "finished 1 of 1" in out
    assert str(tmp_path) in err
    assert not list(tmp_path.glob("neps-redis-worker-*"))


def test_a_worker_refuses_a_random_search_run_without_the_demo_s_space(
    redis_url, tmp_path
):
    # Given a random-search run made by the library, without the demo's space
    RedisNePSState.create_or_load(
        "bare",
        redis=redis_url,
        optimizer_info={"name": OPTIMIZER_NAME, "info": {}},
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    ).close()

    # When a worker is given it, with a budget
    code, _, err = finish(
        start_worker(
            "worker", "bare", "--redis", redis_url, "--budget", "2",
            "--workdir", str(tmp_path),
        )
    )  # fmt: skip

    # Then it refuses in one line, before touching the run's budget
    assert code == 1
    assert "Run 'bare' exists and is not a run of the demo's random search" in err
    assert "Traceback" not in err
    assert _budget(redis_url, "bare") is None


@pytest.mark.parametrize(
    "args",
    [["worker"], ["worker", "run", "--budget", "0"], ["worker", "run", "--nope"]],
    ids=["no run", "budget 0", "unknown option"],
)
def test_a_worker_given_bad_arguments_exits_2(args):
    result = CliRunner().invoke(main, args)

    assert result.exit_code == 2
    assert "Usage:" in result.stderr


# --- the run's budget and seed -----------------------------------------------


def _run_without_budget(redis_url: str, run: str) -> None:
    """A run of the demo's search as the library or `import` makes it: no
    evaluation budget."""
    RedisNePSState.create_or_load(
        run,
        redis=redis_url,
        optimizer_info={"name": OPTIMIZER_NAME, "info": {"space": SEARCH_SPACE}},
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    ).close()


def _budget(redis_url: str, run: str) -> int | None:
    state = RedisNePSState.create_or_load(run, redis=redis_url, load_only=True)
    with state:
        return state.lock_and_get_global_budgets()[0]


def test_a_worker_refuses_a_run_without_a_budget_unless_given_one(redis_url, tmp_path):
    # Given
    _run_without_budget(redis_url, "unbounded")

    # When: a worker joins it without --budget, then one with it
    refused = finish(
        start_worker(
            "worker", "unbounded", "--redis", redis_url,
            "--workdir", str(tmp_path / "a"),
        )
    )  # fmt: skip
    given = finish(
        start_worker(
            "worker", "unbounded", "--redis", redis_url, "--budget", "2",
            "--workdir", str(tmp_path / "b"),
        )
    )  # fmt: skip

    # Then: the first exits 1 in one line, the second sets the budget
    code, out, err = refused
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        "Error: Run 'unbounded' has no evaluation budget (it was imported, or made"
        " by the library), so its workers would never stop: give one with"
        " --budget N."
    ]
    code, out, err = given
    assert code == 0, err
    assert "Run 'unbounded': evaluation budget set to 2." in err
    assert "finished 2 of 2" in out
    assert "None" not in out + err
    assert _budget(redis_url, "unbounded") == 2


def test_a_worker_raises_the_run_s_budget_with_a_notice_and_never_lowers_it(
    redis_url, tmp_path
):
    # Given: a run of budget 1, spent
    first = start_worker(
        "worker", "growing", "--redis", redis_url, "--budget", "1",
        "--workdir", str(tmp_path / "a"),
    )  # fmt: skip
    assert finish(first)[0] == 0

    # When: a worker raises the budget to 2, then one asks for 1
    raised = finish(
        start_worker(
            "worker", "growing", "--redis", redis_url, "--budget", "2",
            "--workdir", str(tmp_path / "b"),
        )
    )  # fmt: skip
    lowered = finish(
        start_worker(
            "worker", "growing", "--redis", redis_url, "--budget", "1",
            "--workdir", str(tmp_path / "c"),
        )
    )  # fmt: skip

    # Then
    code, out, err = raised
    assert code == 0, err
    assert "Run 'growing': evaluation budget raised from 1 to 2.\n" in err
    assert "finished 2 of 2" in out
    code, out, err = lowered
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "Error: Run 'growing' has an evaluation budget of 2 and holds 2 trials;"
        " --budget 1 would lower it, and a run's budget is only ever raised:"
        " give --budget 2 or more, or leave --budget out."
    ]
    assert _budget(redis_url, "growing") == 2


def test_a_worker_given_another_seed_than_the_run_s_says_the_run_keeps_its_own(
    redis_url, tmp_path
):
    # Given
    first = start_worker(
        "worker", "seeded", "--redis", redis_url, "--budget", "1", "--seed", "5",
        "--workdir", str(tmp_path / "a"),
    )  # fmt: skip
    assert finish(first)[0] == 0

    # When
    code, _, err = finish(
        start_worker(
            "worker", "seeded", "--redis", redis_url, "--seed", "7",
            "--workdir", str(tmp_path / "b"),
        )
    )  # fmt: skip
    _, _, quiet = finish(
        start_worker(
            "worker", "seeded", "--redis", redis_url,
            "--workdir", str(tmp_path / "c"),
        )
    )  # fmt: skip

    # Then
    assert code == 0, err
    assert (
        "Run 'seeded' keeps the seed it was created with (5); seed 7 was not used."
    ) in err
    assert "keeps the seed" not in quiet


# --- a server that is not up yet ---------------------------------------------


def test_a_worker_started_before_its_server_waits_for_it(start_server, tmp_path):
    # Given: a worker that found no server, and said it waits for one
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    worker = start_worker(
        "worker", "late", "--redis", url, "--budget", "1",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    said = worker.stderr.readline()

    # When its server starts a second later
    time.sleep(1)
    start_server(port=port)
    code, out, err = finish(worker)

    # Then it said so once, and then did its work
    assert said == (
        f"The Redis server at {url} does not answer yet; waiting up to 60 s for it.\n"
    )
    assert code == 0, err
    assert "does not answer yet" not in err
    assert "finished 1 of 1" in out


def test_a_worker_whose_server_never_answers_exits_1_after_its_wait(tmp_path):
    # Given
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()

    # When
    code, _, err = finish(
        start_worker(
            "worker", "alone", "--redis", url, "--wait-for-server", "1",
            "--workdir", str(tmp_path),
        )
    )  # fmt: skip

    # Then
    assert code == 1
    assert "waiting up to 1 s" in err
    assert f"Error: Cannot reach the Redis server at {url}" in err
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("run", "url", "message"),
    [
        ("fine", "foo://bar", "Invalid Redis URL 'foo://bar'"),
        ("x{y}", None, "Run name 'x{y}' contains '{' or '}'"),
    ],
    ids=["bad url", "bad run name"],
)
def test_a_worker_given_a_malformed_url_or_run_name_exits_2(
    redis_url, tmp_path, run, url, message
):
    code, out, err = finish(
        start_worker(
            "worker", run, "--redis", url or redis_url, "--budget", "1",
            "--workdir", str(tmp_path),
        )
    )  # fmt: skip

    assert code == 2
    assert out == ""
    assert err.startswith(f"Error: {message}")
    assert len(err.splitlines()) == 1
