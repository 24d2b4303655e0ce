"""Exporting a run writes the directory NePS 0.17 writes, as atomic
snapshots; the NePS-marked tests read exports with NePS itself."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from neps_redis import NePSError, RedisNePSState, SampledConfig
from neps_redis.cli_export import export_command
from neps_redis.export import (
    Exporter,
    export_periodically,
    export_run,
    snapshots_dir,
)
from neps_redis.model import State
from tests.runs import (
    INFO,
    build_mixed_run,
    build_multi_objective_run,
    finish,
    load_pickle,
    new_run,
    sample,
    tree,
)

REPORTED = {"success", "failed", "crashed"}


@pytest.fixture
def mixed(redis_url) -> RedisNePSState:
    state = new_run(redis_url)
    build_mixed_run(state)
    return state


@pytest.fixture
def exported(mixed, tmp_path) -> Path:
    export_run(mixed, tmp_path / "export")
    return tmp_path / "export"


def trial_dir(root: Path, trial_id: str) -> Path:
    return root / "configs" / f"config_{trial_id}"


# --- the layout --------------------------------------------------------------


def test_every_trial_gets_a_config_folder_with_neps_s_files(mixed, exported):
    # Given a run with a trial in every state, exported
    trials = mixed.lock_and_read_trials()
    states = {t.metadata.state.value for t in trials.values()}
    assert states == {s.value for s in State} - {"unknown"}

    # Then each trial has its folder; a report exactly when it was reported
    for trial_id, trial in trials.items():
        folder = trial_dir(exported, trial_id)
        names = sorted(p.name for p in folder.iterdir())
        expected = ["config.yaml", "metadata.json"]
        if trial.report is not None:
            expected.append("report.yaml")
        if trial.metadata.previous_trial_id is not None:
            expected.append("previous_trial_id.txt")
        assert names == sorted(expected), trial_id
    root_files = sorted(p.name for p in exported.iterdir())
    assert root_files == [
        "configs",
        "optimizer_info.yaml",
        "optimizer_state.pkl",
        "shared_errors.jsonl",
        "summary",
    ]
    assert sorted(p.name for p in (exported / "summary").iterdir()) == [
        "best_config.txt",
        "best_config_trajectory.txt",
        "full.csv",
        "short.csv",
    ]
    assert (exported / "configs" / ".trial_cache.pkl").is_file()


def test_metadata_json_has_the_twelve_keys_in_field_order_and_nan_as_json_does(
    mixed, exported
):
    # Given an imported trial: its time_sampled is NaN
    text = (trial_dir(exported, "ext_2") / "metadata.json").read_text()

    # Then the file is one line of NePS's keys in MetaData's order
    location = trial_dir(exported, "ext_2")
    assert text == (
        f'{{"id": "ext_2", "location": "{location}", "state": "external",'
        ' "previous_trial_id": "ext_1", "previous_trial_location": null,'
        ' "sampling_worker_id": "external", "time_sampled": NaN,'
        ' "evaluating_worker_id": "external", "evaluation_duration": null,'
        ' "time_submitted": null, "time_started": null, "time_end": null}'
    )


def test_report_yaml_has_the_eight_keys_sorted_err_as_text_and_nan_as_dot_nan(
    exported,
):
    crashed = (trial_dir(exported, "3_rung_0") / "report.yaml").read_text()
    assert crashed.startswith(
        "cost: null\nerr: expected 3, got 4\nevaluation_duration: 0.25\nextra: {}\n"
        "learning_curve: null\nobjective_to_minimize: null\nreported_as: crashed\n"
        'tb: "Traceback (most recent call last):'
    )
    failed = yaml.safe_load(
        (trial_dir(exported, "2_rung_0") / "report.yaml").read_text()
    )
    assert list(failed) == sorted(failed)
    assert math.isnan(failed["objective_to_minimize"])
    assert (
        "objective_to_minimize: .nan\n"
        in (trial_dir(exported, "2_rung_0") / "report.yaml").read_text()
    )
    assert (
        "objective_to_minimize: .inf\n"
        in (trial_dir(exported, "4_rung_0") / "report.yaml").read_text()
    )


def test_config_yaml_has_sorted_keys(exported):
    text = (trial_dir(exported, "1_rung_1") / "config.yaml").read_text()
    assert text == "epochs: 3\nlr: 0.1\noptimizer: adam\n"


def test_numpy_values_are_written_as_plain_numbers_a_safe_loader_reads(exported):
    # Given trial 9: numpy config and report values (case 002)
    folder = trial_dir(exported, "9_rung_0")

    # Then NePS's safe loader reads plain numbers and lists back
    config = yaml.safe_load((folder / "config.yaml").read_text())
    report = yaml.safe_load((folder / "report.yaml").read_text())
    assert config == {"epochs": 1, "layers": 3, "lr": pytest.approx(0.01)}
    assert type(config["layers"]) is int
    assert report["objective_to_minimize"] == 0.125
    assert report["cost"] == 2.5
    assert report["learning_curve"] == [0.5, 0.25]
    assert report["extra"]["confusion"] == [[5, 1], [0, 4]]
    assert type(report["extra"]["acc"]) is float
    assert "!!python" not in (folder / "report.yaml").read_text()


def test_shared_errors_are_one_json_object_a_line_without_a_trailing_newline(
    redis_url, tmp_path
):
    # Given two crashed trials
    state = new_run(redis_url)
    sample(state, SampledConfig("1", {"x": 1}), SampledConfig("2", {"x": 2}))
    finish(state, report_as="crashed", objective=None, err=ValueError("one"))
    finish(state, report_as="crashed", objective=None, err=KeyError("two"))

    # When exported
    export_run(state, tmp_path / "export")

    # Then the file is NePS's format byte for byte
    data = (tmp_path / "export" / "shared_errors.jsonl").read_bytes()
    assert not data.endswith(b"\n")
    lines = data.decode().split("\n")
    assert [json.loads(line)["err_type"] for line in lines] == [
        "ValueError",
        "KeyError",
    ]
    assert lines[0] == json.dumps(
        {
            "trial_id": "1",
            "worker_id": "w0",
            "err_type": "ValueError",
            "err": "one",
            "tb": json.loads(lines[0])["tb"],
        }
    )


def test_a_run_without_errors_has_no_errors_file_as_in_neps(redis_url, tmp_path):
    state = new_run(redis_url)
    sample(state, SampledConfig("1", {"x": 1}))
    export_run(state, tmp_path / "export")
    assert not (tmp_path / "export" / "shared_errors.jsonl").exists()


def test_locations_are_absolute_paths_inside_the_export_directory(mixed, exported):
    metadata = json.loads(
        (trial_dir(exported, "1_rung_1") / "metadata.json").read_text()
    )
    assert metadata["location"] == str(trial_dir(exported, "1_rung_1"))
    assert metadata["previous_trial_location"] == str(trial_dir(exported, "1_rung_0"))
    assert (trial_dir(exported, "1_rung_1") / "previous_trial_id.txt").read_text() == (
        "1_rung_0"
    )
    # Redis keeps them relative to each machine's run directory
    stored = mixed.lock_and_get_trial_by_id("1_rung_1").metadata
    assert stored.location == "configs/config_1_rung_1"


def test_optimizer_info_yaml_has_sorted_keys(exported):
    assert (exported / "optimizer_info.yaml").read_text() == (
        "derived:\n  fidelity:\n    name: epochs\ninfo:\n  eta: 3\n"
        "name: successive_halving\n"
    )


# --- the pickles ---------------------------------------------------------------


def test_the_trial_cache_names_only_neps_classes_and_builtin_exceptions(exported):
    # Given the export's trial cache, read without NePS
    path = exported / "configs" / ".trial_cache.pkl"
    cache, names = load_pickle(path)

    # Then it names NePS's classes, numpy's and a plain Exception, nothing else
    modules = {module for module, _ in names}
    assert {m for m in modules if not m.startswith("numpy")} == {
        "neps.state.trial",
        "builtins",
    }
    assert ("builtins", "Exception") in names
    assert not any("neps_redis" in m or "tests" in m for m in modules)

    # And the crashed trial's error is its text in a builtin Exception (case 001)
    crashed = cache["3_rung_0"]
    assert type(crashed.report.err) is Exception
    assert str(crashed.report.err) == "expected 3, got 4"
    assert crashed.metadata.state is State.CRASHED


def test_the_trial_cache_holds_exactly_the_exported_trials(mixed, exported):
    cache, _ = load_pickle(exported / "configs" / ".trial_cache.pkl")
    trials = mixed.lock_and_read_trials()
    assert list(cache) == list(trials)
    for trial_id, trial in trials.items():
        cached = cache[trial_id]
        assert cached.config == trial.config
        assert cached.report == trial.report
        assert cached.metadata.state == trial.metadata.state
        assert cached.metadata.location == str(trial_dir(exported, trial_id))
        assert cached.source == trial.source


def test_the_optimizer_state_pickle_holds_the_run_s_optimizer_state(mixed, exported):
    stored, names = load_pickle(exported / "optimizer_state.pkl")
    assert ("neps.state.optimizer", "OptimizationState") in names
    assert ("neps.state.seed_snapshot", "SeedSnapshot") in names
    assert stored == mixed.lock_and_get_optimizer_state()
    assert stored.budget.total_evaluations_to_spend == 20
    assert stored.worker_ids is None or isinstance(stored.worker_ids, list)


def test_the_pipeline_space_is_exported_only_when_pickles_are_allowed(
    redis_url, tmp_path
):
    new_run(redis_url, "guarded", pipeline_space={"lr": [0, 1]}, allow_pickle=True)
    guarded = RedisNePSState.create_or_load("guarded", redis=redis_url, load_only=True)
    export_run(guarded, tmp_path / "a")
    assert not (tmp_path / "a" / "pipeline_space.pkl").exists()

    trusted = RedisNePSState.create_or_load(
        "guarded", redis=redis_url, load_only=True, allow_pickle=True
    )
    export_run(trusted, tmp_path / "b")
    stored = trusted.client.get(trusted.keys.pipeline_space)
    assert (tmp_path / "b" / "pipeline_space.pkl").read_bytes() == stored


# --- the summary folder ----------------------------------------------------------


def test_the_summary_lists_every_trial_and_the_best(mixed, exported):
    full = (exported / "summary" / "full.csv").read_text().splitlines()
    assert full[0].startswith("id,config.epochs,config.lr,config.optimizer,")
    short = (exported / "summary" / "short.csv").read_text().splitlines()
    assert short[:2] == [",0", "num_corrupted,1.0"]
    assert "best_objective_to_minimize,-0.25" in short
    assert "best_config_id,5_rung_0" in short
    best = (exported / "summary" / "best_config.txt").read_text()
    assert "Config ID: 5_rung_0\nObjective to minimize: -0.25\n" in best


def test_a_multi_objective_run_has_counts_only_in_short_csv(redis_url, tmp_path):
    state = new_run(redis_url, "mo")
    build_multi_objective_run(state)
    export_run(state, tmp_path / "export")
    assert (tmp_path / "export" / "summary" / "short.csv").read_text() == (
        "summary,value\nnum_crashed,1\nnum_success,3\n"
    )


# --- snapshots -------------------------------------------------------------------


def test_the_export_directory_is_a_symlink_to_the_newest_snapshot(mixed, tmp_path):
    target = tmp_path / "export"
    results = [export_run(mixed, target) for _ in range(3)]

    assert target.is_symlink()
    assert target.resolve() == results[-1].snapshot.resolve()
    kept = sorted(p.name for p in snapshots_dir(target).iterdir())
    assert kept == sorted(r.snapshot.name for r in results[1:])
    assert results[-1].removed == (results[0].snapshot,)
    assert not list(tmp_path.glob(".export.*.swap"))


def test_a_real_directory_is_refused_unless_forced(mixed, tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")

    with pytest.raises(NePSError, match="is a real directory"):
        export_run(mixed, target)
    assert (target / "mine.txt").read_text() == "keep me"
    assert not snapshots_dir(target).exists() or not any(
        snapshots_dir(target).iterdir()
    )

    export_run(mixed, target, force=True)
    assert target.is_symlink()
    assert (target / "optimizer_info.yaml").exists()


def test_unchanged_files_are_hard_links_to_the_previous_snapshot(mixed, tmp_path):
    # Given an exporter that exported once
    exporter = Exporter(tmp_path / "export")
    first = exporter.export(mixed)

    # When one trial is reported and it exports again
    finish(mixed, worker="w2", objective=0.01)
    second = exporter.export(mixed)

    # Then only that trial was encoded again, and the rest are links
    assert first.encoded == first.trials
    assert second.encoded == 1
    assert not second.full_read
    old, new = first.snapshot, second.snapshot
    same = trial_dir(old, "1_rung_0") / "metadata.json"
    assert (
        same.stat().st_ino
        == (trial_dir(new, "1_rung_0") / "metadata.json").stat().st_ino
    )
    changed = trial_dir(new, "8_rung_0") / "metadata.json"
    assert changed.stat().st_nlink == 1
    assert '"state": "success"' in changed.read_text()
    config = trial_dir(new, "8_rung_0") / "config.yaml"
    assert (
        config.stat().st_ino
        == (trial_dir(old, "8_rung_0") / "config.yaml").stat().st_ino
    )
    assert (new / "optimizer_info.yaml").stat().st_nlink == 2
    assert second.files_written < 10


def test_a_restarted_exporter_reads_everything_and_still_links_equal_files(
    mixed, tmp_path
):
    first = Exporter(tmp_path / "export").export(mixed)
    second = Exporter(tmp_path / "export").export(mixed)

    assert second.full_read
    assert second.encoded == second.trials
    # The summary's files are the same too: nothing changed in between.
    assert second.files_written == 0
    assert tree(first.snapshot) == tree(second.snapshot)


def test_the_periodic_exporter_picks_up_each_change(mixed, tmp_path):
    # Given a periodic exporter in a thread
    stop = threading.Event()
    results = []
    thread = threading.Thread(
        target=export_periodically,
        args=(mixed, tmp_path / "export"),
        kwargs={"every": 0.05, "stop_event": stop, "on_round": results.append},
    )
    thread.start()
    try:
        # When a trial is reported meanwhile
        while not results:
            time.sleep(0.01)
        finish(mixed, worker="w2", objective=0.01)
        deadline = time.monotonic() + 10
        metadata = tmp_path / "export" / "configs" / "config_8_rung_0" / "metadata.json"
        while "success" not in metadata.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()

    # Then later rounds read only what changed
    assert results[0].full_read
    assert all(not r.full_read for r in results[1:])
    assert any(r.encoded == 1 for r in results[1:])
    assert sum(r.encoded for r in results[1:]) <= 2


def test_export_periodically_stops_after_max_rounds(mixed, tmp_path):
    result = export_periodically(mixed, tmp_path / "export", every=0.01, max_rounds=3)
    assert result is not None
    assert len(list(snapshots_dir(tmp_path / "export").iterdir())) == 2


def _consistent_snapshot(root: Path) -> bool | None:
    """Check one snapshot; None when it vanished while being read."""
    try:
        folder = Path(os.path.realpath(root))
        cache, _ = load_pickle(folder / "configs" / ".trial_cache.pkl")
        errors_file = folder / "shared_errors.jsonl"
        errors = errors_file.read_text().split("\n") if errors_file.exists() else []
        crashed = set()
        for trial_id, cached in cache.items():
            trial = folder / "configs" / f"config_{trial_id}"
            state = json.loads((trial / "metadata.json").read_text())["state"]
            reported = (trial / "report.yaml").exists()
            assert state == cached.metadata.state.value, trial_id
            assert reported == (cached.report is not None), trial_id
            assert reported == (state in REPORTED), (trial_id, state)
            if state == "crashed":
                crashed.add(trial_id)
        listed = {json.loads(line)["trial_id"] for line in errors if line}
        assert listed == crashed
    except FileNotFoundError:
        return None
    return True


def test_a_reader_never_sees_a_mix_of_two_moments(redis_url, tmp_path):
    # Given a run whose trials are reported while a periodic exporter runs
    state = new_run(redis_url, "busy")
    sample(state, *(SampledConfig(str(i), {"x": i}) for i in range(1, 81)))
    stop = threading.Event()
    exporter = threading.Thread(
        target=export_periodically,
        args=(state, tmp_path / "export"),
        kwargs={"every": 0.005, "stop_event": stop, "keep": 4},
    )

    def report_all() -> None:
        writer = RedisNePSState.create_or_load("busy", redis=redis_url, load_only=True)
        for i in range(80):
            crashed = i % 3 == 0
            finish(
                writer,
                worker="w",
                report_as="crashed" if crashed else "success",
                objective=None if crashed else float(i),
                err=RuntimeError(f"trial {i}") if crashed else None,
            )

    reporter = threading.Thread(target=report_all)
    exporter.start()
    while not (tmp_path / "export").exists():
        time.sleep(0.005)
    reporter.start()

    # When a reader loads every snapshot it can see meanwhile
    checked = 0
    cache_file = tmp_path / "export" / "configs" / ".trial_cache.pkl"
    try:
        while reporter.is_alive():
            if _consistent_snapshot(tmp_path / "export"):
                checked += 1
        reporter.join()
        deadline = time.monotonic() + 10
        while not all(t.report for t in load_pickle(cache_file)[0].values()):
            assert time.monotonic() < deadline, "the last report was never exported"
            time.sleep(0.01)
    finally:
        reporter.join()
        stop.set()
        exporter.join()

    # Then each one was whole: state, report, cache and errors agree
    assert checked >= 3
    assert _consistent_snapshot(tmp_path / "export")


def test_an_exporter_resumes_after_the_server_restarts(start_server, tmp_path):
    # Given a server that keeps its data, a run, and an exporter
    server = start_server(args=("--appendonly", "yes", "--appendfsync", "always"))
    state = new_run(server.url, "durable")
    sample(state, *(SampledConfig(str(i), {"x": i}) for i in range(1, 4)))
    exporter = Exporter(tmp_path / "export")
    exporter.export(state)

    # When the server restarts and a trial is reported
    server.restart()
    finish(state, objective=0.5)
    result = exporter.export(state)

    # Then the exporter caught up from the event stream
    assert not result.full_read
    assert result.encoded == 1
    assert (tmp_path / "export" / "configs" / "config_1" / "report.yaml").exists()


def test_an_exporter_reads_everything_when_the_run_was_created_anew(
    redis_url, tmp_path
):
    # Given an export of a run that is then deleted and created again
    state = new_run(redis_url, "again")
    sample(state, SampledConfig("1", {"x": 1}), SampledConfig("2", {"x": 2}))
    exporter = Exporter(tmp_path / "export")
    exporter.export(state)
    state.client.flushall()
    time.sleep(0.01)
    state = new_run(redis_url, "again")
    sample(state, SampledConfig("1", {"x": 10}))

    # When it exports again
    result = exporter.export(state)

    # Then it read the new run whole
    assert result.full_read
    assert result.trials == 1
    config = tmp_path / "export" / "configs" / "config_1" / "config.yaml"
    assert config.read_text() == "x: 10\n"


def test_an_unknown_run_raises_run_not_found(redis_url, tmp_path):
    state = new_run(redis_url, "gone")
    state.client.flushall()
    with pytest.raises(FileNotFoundError, match="gone"):
        export_run(state, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# --- progress --------------------------------------------------------------------


def test_an_export_reports_its_progress_until_every_trial_is_written(mixed, tmp_path):
    # When an export is given a progress callback
    calls: list[tuple[str, int, int]] = []
    export_run(mixed, tmp_path / "out", progress=lambda *call: calls.append(call))

    # Then each step counts up to the run's 13 trials, in order, never past it
    steps = [step for step, _, _ in calls]
    assert steps == sorted(steps, key=["read", "encode", "write"].index)
    for step in ("read", "encode", "write"):
        done = [d for s, d, _ in calls if s == step]
        assert done == sorted(done) and done[-1] == 13
        assert {total for s, _, total in calls if s == step} == {13}


def test_the_export_command_off_a_terminal_prints_its_line_and_no_progress(
    mixed, redis_url, tmp_path
):
    # When the command runs with stdout and stderr not terminals (a script)
    result = CliRunner().invoke(
        export_command, ["mixed", str(tmp_path / "out"), "--redis", redis_url]
    )

    # Then stdout holds its one line and stderr nothing
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Exported run 'mixed'")
    assert len(result.stdout.strip().splitlines()) == 1
    assert result.stderr == ""


def test_the_export_command_with_quiet_prints_nothing(mixed, redis_url, tmp_path):
    result = CliRunner().invoke(
        export_command,
        ["mixed", str(tmp_path / "out"), "--redis", redis_url, "--quiet"],
    )

    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert (tmp_path / "out" / "optimizer_info.yaml").exists()


# --- the command -----------------------------------------------------------------


def test_the_export_command_writes_the_directory_and_says_what_it_did(
    mixed, redis_url, tmp_path
):
    result = CliRunner().invoke(
        export_command, ["mixed", str(tmp_path / "out"), "--redis", redis_url]
    )
    assert result.exit_code == 0, result.output
    assert "Exported run 'mixed'" in result.output
    assert "13 trials" in result.output
    assert (tmp_path / "out" / "configs" / "config_ext_1" / "metadata.json").exists()


def test_the_export_command_refuses_a_real_directory_in_one_line(
    mixed, redis_url, tmp_path
):
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(
        export_command, ["mixed", str(tmp_path / "out"), "--redis", redis_url]
    )
    assert result.exit_code == 1
    assert "--force" in result.output
    assert "Traceback" not in result.output


def test_the_command_takes_the_server_from_the_group_it_is_attached_to(
    mixed, redis_url, tmp_path, monkeypatch
):
    # Given a group with its own --redis, and another server in the environment
    monkeypatch.setenv("NEPS_REDIS_URL", "redis://127.0.0.1:1/0")

    @click.group()
    @click.option("--redis", "redis_url", envvar="NEPS_REDIS_URL")
    def group(redis_url):
        del redis_url

    group.add_command(export_command)

    # When the group is given the server
    result = CliRunner().invoke(
        group, ["--redis", redis_url, "export", "mixed", str(tmp_path / "out")]
    )

    # Then the command uses it
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "optimizer_info.yaml").exists()


# --- with NePS itself ------------------------------------------------------------


def _same(a, b) -> bool:
    """Equality that holds NaN equal to NaN and compares arrays by value."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _neps():
    try:
        import neps  # noqa: F401
    except ImportError as error:
        pytest.skip(f"neural-pipeline-search is not installed ({error})")
    from neps.state.neps_state import NePSState

    return NePSState


@pytest.mark.neps
def test_neps_loads_an_export_and_its_trials_equal_the_run_s(mixed, exported):
    neps_state = _neps()

    # When NePS opens the export, the first read already has every trial
    loaded = neps_state.create_or_load(exported, load_only=True)
    theirs = loaded.lock_and_read_trials()
    ours = mixed.lock_and_read_trials()

    # Then field by field they are the run's trials
    assert list(theirs) == list(ours)
    for trial_id, trial in ours.items():
        other = theirs[trial_id]
        assert type(other).__module__ == "neps.state.trial"
        assert dict(other.config) == dict(trial.config)
        for name in trial.metadata.__dataclass_fields__:
            mine, their = getattr(trial.metadata, name), getattr(other.metadata, name)
            if name in ("location", "previous_trial_location") and mine is not None:
                mine = str(exported / mine)
            assert _same(their, mine), (trial_id, name)
        if trial.report is None:
            assert other.report is None
            continue
        for name in trial.report.__dataclass_fields__:
            mine, their = getattr(trial.report, name), getattr(other.report, name)
            if name == "err":
                assert str(their) == str(mine)
                assert mine is None or type(their) is Exception
            else:
                assert _same(their, mine), (trial_id, name)
    errors = loaded.lock_and_get_errors()
    assert [e.err_type for e in errors.errs] == ["ShapeMismatch"]


@pytest.mark.neps
def test_neps_status_counts_match_on_the_first_call(mixed, exported):
    _neps()
    import neps

    _, short = neps.status(exported)
    counts = {k: int(v) for k, v in short.items() if str(k).startswith("num_")}
    expected = {f"num_{k}": v for k, v in mixed.counts().items()}
    assert counts == expected


@pytest.mark.neps
def test_the_pickles_load_as_neps_classes(mixed, exported):
    _neps()
    import pickle

    from neps.state.optimizer import BudgetInfo, OptimizationState
    from neps.state.seed_snapshot import SeedSnapshot
    from neps.state.trial import MetaData, Report, Trial
    from neps.state.trial import State as NePSStateEnum

    with (exported / "optimizer_state.pkl").open("rb") as f:
        state = pickle.load(f)
    assert type(state) is OptimizationState
    assert type(state.budget) is BudgetInfo
    assert type(state.seed_snapshot) is SeedSnapshot
    # The RNG snapshot works in NePS, torch's included where torch is installed
    state.seed_snapshot.set_as_global_seed_state()
    stored = mixed.lock_and_get_optimizer_state().seed_snapshot
    assert SeedSnapshot.new_capture() == state.seed_snapshot
    if stored.torch_rng is not None:
        assert bytes(state.seed_snapshot.torch_rng.numpy()) == bytes(
            stored.torch_rng.numpy()
        )
    with (exported / "configs" / ".trial_cache.pkl").open("rb") as f:
        cache = pickle.load(f)
    trial = cache["3_rung_0"]
    assert type(trial) is Trial
    assert type(trial.metadata) is MetaData
    assert type(trial.report) is Report
    assert trial.metadata.state is NePSStateEnum.CRASHED
    assert type(trial.report.err) is Exception
    assert not hasattr(trial, "token")


@pytest.mark.neps
@pytest.mark.parametrize("build", [build_mixed_run, build_multi_objective_run])
def test_the_summary_files_are_what_neps_writes_for_the_same_trials(
    redis_url, tmp_path, build
):
    _neps()
    state = new_run(redis_url)
    build(state)
    exported = tmp_path / "export"
    export_run(state, exported)
    import io

    from neps.state.neps_state import NePSState
    from neps.status.status import status
    from neps.status.summary import SummaryWriter

    # When NePS computes its summary of the export
    full, short = status(exported)
    loaded = NePSState.create_or_load(exported, load_only=True)
    writer = SummaryWriter(root_directory=exported, fidelity_name="epochs")
    # The export adds NePS's end-of-run totals once nothing is left to do.
    busy = {"pending", "evaluating"}
    final = not any(
        t.metadata.state.value in busy for t in loaded.lock_and_read_trials().values()
    )
    valid = loaded._trial_repo.get_valid_evaluated_trials()
    texts = {
        a.name: a.content
        for a in writer.collect(valid, final=final)
        if a.name.startswith("best")
    }

    # Then the export's files hold the same bytes
    summary = exported / "summary"
    buffer = io.StringIO()
    full.to_csv(buffer, index=True)
    assert (summary / "full.csv").read_text() == buffer.getvalue()
    buffer = io.StringIO()
    short.to_frame().to_csv(buffer, index=True)
    assert (summary / "short.csv").read_text() == buffer.getvalue()
    # NePS leaves a file empty when it has nothing to put in it
    for name in ("best_config", "best_config_trajectory"):
        assert (summary / f"{name}.txt").read_text() == texts.get(name, ""), name
    assert INFO["derived"]["fidelity"]["name"] == "epochs"
