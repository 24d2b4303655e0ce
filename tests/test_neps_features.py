"""NePS features on a run in Redis: async results, batches, imports into a
live run, resuming, starting afresh, crashes, and the path-based entry
points other processes use.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

neps = pytest.importorskip(
    "neps", reason="neural-pipeline-search is not installed (pip install '.[neps]')"
)


import neps_redis  # noqa: E402
from neps_redis import RedisNePSState, State  # noqa: E402
from neps_redis.errors import RunInUseError, RunNotFoundError  # noqa: E402
from tests.neps_support import (  # noqa: E402
    RunView,
    assert_all_succeeded,
    kill_leftover_workers,
    spawn_worker,
    wait_all,
    wait_until,
)
from tests.neps_worker import OtherSpace, PlainSpace, objective  # noqa: E402

pytestmark = [pytest.mark.neps, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test():
    yield
    kill_leftover_workers()


def evaluate(x, y):
    return objective({"x": x, "y": y})


def run_here(redis_url, root, run, **kwargs):
    """`neps_redis.run` in the test process (a machine of its own: `root`)."""
    kwargs.setdefault("optimizer", "random_search")
    neps_redis.run(
        kwargs.pop("evaluate", evaluate),
        kwargs.pop("space", PlainSpace()),
        run=run,
        redis=redis_url,
        root_directory=root,
        **kwargs,
    )


def python(code: str, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process (another machine's process)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def trial_states(redis_url, run):
    """Each trial's state ({} while the run does not exist yet)."""
    try:
        state = RedisNePSState.create_or_load(run, redis=redis_url, load_only=True)
    except RunNotFoundError:
        return {}
    return {i: t.metadata.state for i, t in state.lock_and_read_trials().items()}


# --- async evaluation -----------------------------------------------------


def test_results_returned_later_are_saved_from_another_process(tmp_path, redis_url):
    # Given two workers whose evaluations return None (results come later)
    workers = [
        spawn_worker(
            tmp_path,
            f"w{i}",
            run="async",
            redis_url=redis_url,
            neps={"optimizer": "random_search", "total_evaluations_to_spend": 4},
            evaluate={"async": True},
        )
        for i in range(2)
    ]
    assert_all_succeeded(workers)
    ids = sorted(r["id"] for w in workers for r in w.records())
    assert ids == ["1", "2", "3", "4"]
    assert set(trial_states(redis_url, "async").values()) == {State.EVALUATING}

    # When another process, in its own empty directory, saves the results
    saver = tmp_path / "saver"
    python(
        f"""
        import neps
        from neps_redis.neps_bridge import attach
        root = attach({str(saver)!r}, run="async", redis={redis_url!r})
        for trial_id in {ids!r}:
            neps.save_pipeline_results(
                user_result={{"objective_to_minimize": float(trial_id), "cost": 1.0}},
                pipeline_id=trial_id,
                root_directory=root,
            )
        """,
        cwd=tmp_path,
    )

    # Then every trial is finished with its result, and NePS's summary of
    # the run was written in the saver's directory
    state = RedisNePSState.create_or_load("async", redis=redis_url, load_only=True)
    trials = state.lock_and_read_trials()
    assert {i: t.metadata.state for i, t in trials.items()} == dict.fromkeys(
        ids, State.SUCCESS
    )
    assert {i: t.report.objective_to_minimize for i, t in trials.items()} == {
        i: float(i) for i in ids
    }
    assert (saver / "summary" / "full.csv").read_text().count("\n") == 5


# --- batches -----------------------------------------------------------------


def test_a_sampled_batch_is_shared_the_sampler_keeping_the_first(tmp_path, redis_url):
    # Given two workers sampling three trials at a time
    workers = [
        spawn_worker(
            tmp_path,
            f"w{i}",
            run="batch",
            redis_url=redis_url,
            neps={
                "optimizer": "random_search",
                "sample_batch_size": 3,
                "total_evaluations_to_spend": 9,
            },
            evaluate={"sleep": 0.2},
        )
        for i in range(2)
    ]

    # When they run
    assert_all_succeeded(workers)

    # Then three batches were sampled, each stored with its first trial
    # already claimed by the sampler, and the others claimed one by one
    view = RunView.read(redis_url, "batch", workers)
    view.assert_each_trial_evaluated_once()
    assert len(view.trials) == 9
    sampled = [e for e in view.events if e["event"] == "sampled"]
    claimed = [e for e in view.events if e["event"] == "claimed"]
    assert [e["trial_id"] for e in sampled if e["state"] == "evaluating"] == [
        "1",
        "4",
        "7",
    ]
    assert len(claimed) == 6
    for first in ("1", "4", "7"):
        trial = view.trials[first]
        assert trial.metadata.evaluating_worker_id == trial.metadata.sampling_worker_id


# --- imports -----------------------------------------------------------------


def test_trials_imported_into_a_live_run_take_fresh_ids(tmp_path, redis_url):
    # Given two workers in the middle of evaluating (held at a gate)
    gate = tmp_path / "gate"
    workers = [
        spawn_worker(
            tmp_path,
            f"w{i}",
            run="live",
            redis_url=redis_url,
            neps={"optimizer": "random_search", "total_evaluations_to_spend": 8},
            evaluate={"gate": str(gate)},
        )
        for i in range(2)
    ]
    wait_until(
        lambda: (
            list(trial_states(redis_url, "live").values()).count(State.EVALUATING) == 2
        ),
        what="two trials evaluating",
    )

    # When results obtained elsewhere are imported from another directory
    from neps_redis.neps_bridge import attach

    root = attach(tmp_path / "importer", run="live", redis=redis_url)
    neps.import_trials(
        [
            ({"x": 0.1, "y": 2}, {"objective_to_minimize": 0.5}),
            ({"x": 0.2, "y": 3}, {"objective_to_minimize": 0.4, "cost": 2.0}),
            ({"x": 0.3, "y": 4}, {"objective_to_minimize": 0.3}),
        ],
        root_directory=root,
        pipeline_space=PlainSpace(),
        optimizer="random_search",
    )
    gate.touch()
    assert_all_succeeded(workers)

    # Then they are external trials with ids after those sampled so far, the
    # optimizer's budget counts them, and no trial was duplicated
    view = RunView.read(redis_url, "live", workers)
    external = {i for i, t in view.trials.items() if t.metadata.state == "external"}
    assert external == {"3", "4", "5"}
    assert view.trials["4"].report.cost == 2.0
    assert view.trials["4"].metadata.previous_trial_id == "3"
    assert len(view.trials) == 8
    assert sum(view.evaluated_by().values()) == 5
    view.assert_each_trial_evaluated_once()


# --- resuming ----------------------------------------------------------------


def test_a_resumed_run_continues_the_same_state_with_new_workers(tmp_path, redis_url):
    # Given a run that spent its budget of three evaluations on one machine
    run_here(redis_url, tmp_path / "a", "resume", total_evaluations_to_spend=3)

    # When it is resumed on another machine with a larger budget, twice
    run_here(redis_url, tmp_path / "b", "resume", total_evaluations_to_spend=5)
    run_here(redis_url, tmp_path / "c", "resume", total_evaluations_to_spend=6)

    # Then the same run went on: new worker ids, trial ids continued, the
    # stored budget raised
    state = RedisNePSState.create_or_load("resume", redis=redis_url, load_only=True)
    trials = state.lock_and_read_trials()
    assert list(trials) == ["1", "2", "3", "4", "5", "6"]
    by = [t.metadata.evaluating_worker_id for t in trials.values()]
    assert by == ["worker_0"] * 3 + ["worker_1"] * 2 + ["worker_2"]
    assert state.worker_ids() == ["worker_0", "worker_1", "worker_2"]
    assert state.lock_and_get_global_budgets() == (6, None, None)
    assert sorted(p.name for p in (tmp_path / "b" / "configs").iterdir()) == [
        "config_4",
        "config_5",
    ]


def test_a_run_resumed_without_its_pipeline_space_loads_it_when_pickles_are_allowed(
    tmp_path, redis_url
):
    # Given a run whose pipeline space was stored (allow_pickle)
    run_here(
        redis_url,
        tmp_path / "a",
        "pickled",
        total_evaluations_to_spend=2,
        allow_pickle=True,
    )

    # When another machine continues it naming neither space nor optimizer
    neps_redis.run(
        evaluate,
        None,
        run="pickled",
        redis=redis_url,
        root_directory=tmp_path / "b",
        allow_pickle=True,
        total_evaluations_to_spend=3,
    )

    # Then NePS loaded both from the run
    state = RedisNePSState.create_or_load("pickled", redis=redis_url, load_only=True)
    assert len(state.lock_and_read_trials()) == 3
    assert neps.load_optimizer_info(tmp_path / "b")["name"] == "random_search"
    assert neps.load_pipeline_space(tmp_path / "b") is not None


def test_resuming_with_another_pipeline_space_raises_neps_error(tmp_path, redis_url):
    # Given a run of one pipeline space
    run_here(redis_url, tmp_path / "a", "space", total_evaluations_to_spend=1)

    # When it is resumed with another
    with pytest.raises(neps.exceptions.NePSError, match="pipeline space") as error:
        run_here(
            redis_url,
            tmp_path / "b",
            "space",
            space=OtherSpace(),
            total_evaluations_to_spend=2,
        )

    # Then NePS's error is raised and the run is unchanged
    assert isinstance(error.value, neps_redis.NePSError)
    assert list(trial_states(redis_url, "space")) == ["1"]


# --- starting afresh (case 003) ----------------------------------------------


def test_starting_afresh_refuses_while_a_worker_is_evaluating(tmp_path, redis_url):
    # Given a worker that started the run afresh and is evaluating trial 1
    gate = tmp_path / "gate"
    first = spawn_worker(
        tmp_path,
        "first",
        run="afresh",
        redis_url=redis_url,
        neps={
            "optimizer": "random_search",
            "total_evaluations_to_spend": 2,
            "overwrite_root_directory": True,
        },
        evaluate={"gate": str(gate)},
    )
    wait_until(
        lambda: trial_states(redis_url, "afresh").get("1") == State.EVALUATING,
        what="trial 1 evaluating",
    )

    # When a second worker asks to start the same run afresh
    with pytest.raises(RunInUseError) as refused:
        run_here(
            redis_url,
            tmp_path / "second",
            "afresh",
            total_evaluations_to_spend=2,
            overwrite_root_directory=True,
        )

    # Then it is refused, naming the live worker and its trial, and the
    # first worker finishes its run undisturbed
    assert isinstance(refused.value, neps.exceptions.NePSError)
    message = str(refused.value)
    assert "worker 'worker_0'" in message
    assert "trial '1'" in message
    assert refused.value.live[0][:2] == ("1", "worker_0")
    assert not (tmp_path / "second").exists()
    gate.touch()
    assert_all_succeeded([first])
    assert trial_states(redis_url, "afresh") == {"1": "success", "2": "success"}


def test_starting_afresh_without_live_workers_deletes_the_run_and_records_it(
    tmp_path, redis_url, r
):
    # Given a finished run, its root directory holding a trial's files
    run_here(redis_url, tmp_path / "a", "fresh", total_evaluations_to_spend=3)
    (tmp_path / "a" / "configs" / "config_1" / "checkpoint.txt").write_text("old")

    # When it is started afresh
    run_here(
        redis_url,
        tmp_path / "a",
        "fresh",
        total_evaluations_to_spend=1,
        overwrite_root_directory=True,
    )

    # Then only the new run's trial is there, the local files are gone, and
    # the event stream records what was deleted
    assert trial_states(redis_url, "fresh") == {"1": "success"}
    assert not (tmp_path / "a" / "configs" / "config_1" / "checkpoint.txt").exists()
    events = [
        {k.decode(): v.decode() for k, v in f.items()}
        for _, f in r.xrange("neps:{fresh}:events")
    ]
    deleted = [e for e in events if e["event"] == "deleted"]
    assert deleted and deleted[0]["trials"] == "3"


def test_a_machine_s_files_of_a_run_started_afresh_elsewhere_are_moved_aside(
    tmp_path, redis_url
):
    # Given a run evaluated on machine a, then started afresh on machine b
    run_here(redis_url, tmp_path / "a", "again", total_evaluations_to_spend=2)
    run_here(
        redis_url,
        tmp_path / "b",
        "again",
        total_evaluations_to_spend=1,
        overwrite_root_directory=True,
    )

    # When machine a works on the run again
    run_here(redis_url, tmp_path / "a", "again", total_evaluations_to_spend=2)

    # Then its files of the earlier run were moved aside, and the new trial 2
    # got a directory of its own
    aside = list((tmp_path / "a").glob("replaced-*"))
    assert len(aside) == 1
    assert sorted(p.name for p in (aside[0] / "configs").iterdir()) == [
        "config_1",
        "config_2",
    ]
    assert [p.name for p in (tmp_path / "a" / "configs").iterdir()] == ["config_2"]
    assert trial_states(redis_url, "again") == {"1": "success", "2": "success"}


# --- a worker dying mid-evaluation -------------------------------------------


def test_a_trial_whose_worker_died_is_evaluated_again_by_another(tmp_path, redis_url):
    # Given three workers with short leases, the first evaluation of trial 1
    # killing its process
    crashed_once = tmp_path / "crashed-once"
    env = {
        "NEPS_REDIS_LEASE_SECONDS": "1",
        "NEPS_REDIS_SWEEP_SECONDS": "0.2",
    }
    workers = [
        spawn_worker(
            tmp_path,
            f"w{i}",
            run="crash",
            redis_url=redis_url,
            neps={
                "optimizer": "random_search",
                "total_evaluations_to_spend": 16,
                "continue_until_max_evaluation_completed": True,
            },
            evaluate={
                "sleep": 0.3,
                "crash_once_ids": ["1"],
                "crash_once_file": str(crashed_once),
            },
            env=env,
        )
        for i in range(3)
    ]

    # When they run
    codes = wait_all(workers)

    # Then the dead worker's trial went back to the queue when its lease
    # expired and another worker evaluated it; nothing else was repeated
    assert sorted(codes) == [0, 0, 3]
    view = RunView.read(redis_url, "crash", workers)
    first = view.trials["1"]
    assert first.metadata.state == State.SUCCESS
    dead = next(w for w, c in zip(workers, codes, strict=True) if c == 3)
    assert [r["id"] for r in dead.records()][-1] == "1"
    assert view.state.client.hget("neps:{crash}:trial:1", "attempts") == b"2"
    again = [r for r in view.records if r["id"] == "1"]
    assert len(again) == 2
    assert {r["pid"] for r in again} != {dead.process.pid}
    view.records = [r for r in view.records if r["pid"] != dead.process.pid]
    view.assert_each_trial_evaluated_once()


# --- what other processes see ------------------------------------------------


def test_neps_redis_status_agrees_with_neps_status_on_an_export(tmp_path, redis_url):
    # Given a run with a crashed trial among its successes
    def evaluate_but_the_fourth(pipeline_id, x, y):
        if pipeline_id == "4":
            raise ValueError("the fourth fails")
        return objective({"x": x, "y": y})

    run_here(
        redis_url,
        tmp_path / "here",
        "agree",
        evaluate=evaluate_but_the_fourth,
        total_evaluations_to_spend=6,
        ignore_errors=True,
    )

    # When it is exported, and NePS alone (no neps_redis) reads the export
    from neps_redis.export import export_run

    state = RedisNePSState.create_or_load("agree", redis=redis_url, load_only=True)
    export = tmp_path / "export"
    export_run(state, export)
    done = python(
        f"""
        import json, neps
        _, short = neps.status({str(export)!r})
        print(json.dumps({{k: str(v) for k, v in short.items()}}))
        """,
        cwd=tmp_path,
    )
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    neps_redis_cli = Path(sys.executable).with_name("neps-redis")
    cli = subprocess.run(
        [str(neps_redis_cli), "--redis", redis_url, "status", "agree"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr

    # Then both count the same trials per state and name the same best trial
    ours = dict(re.findall(r"│ (\w+)\s+│\s+(\d+) │", cli.stdout))
    for name, value in theirs.items():
        if name.startswith("num_"):
            assert int(float(value)) == int(ours[name.removeprefix("num_")]), name
    best = re.search(r"Best trial (\S+): objective_to_minimize (\S+)", cli.stdout)
    assert best is not None, cli.stdout
    assert best.group(1) == theirs["best_config_id"]
    assert float(best.group(2)) == pytest.approx(
        float(theirs["best_objective_to_minimize"])
    )
