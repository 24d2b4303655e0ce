"""Importing a NePS run directory: the whole run or nothing, corrupt input
named by file and line, and a round trip that gives the same files back."""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from neps_redis import (
    NePSError,
    OptimizationState,
    RedisNePSState,
    SampledConfig,
    SeedSnapshot,
    TrialAlreadyExistsError,
)
from neps_redis.cli_export import import_command
from neps_redis.errors import CorruptRunError, RunExistsError
from neps_redis.export import Skipped, export_run, import_run
from neps_redis.neps_files import read_optimizer_info
from neps_redis.neps_pickle import loads_optimizer_state
from tests.helpers import dump_keys
from tests.runs import (
    build_mixed_run,
    build_multi_objective_run,
    load_pickle,
    new_run,
    sample,
    tree,
)

SAMPLE = Path(__file__).parent / "data" / "neps-0.17-run"
# Where NePS ran when it wrote the sample; its locations start with this.
SAMPLE_ROOT = "/tmp/tmpmnx4s2rg/neps-0.17-run"
ERRORS = "shared_errors.jsonl"


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of the committed NePS run, for a test to damage."""
    return Path(shutil.copytree(SAMPLE, tmp_path / "run"))


def load(url, run) -> RedisNePSState:
    return RedisNePSState.create_or_load(run, redis=url, load_only=True)


# --- the NePS sample -----------------------------------------------------------


def test_the_committed_neps_run_imports_without_neps(redis_url):
    # When the directory NePS 0.17 wrote is imported
    result = import_run(SAMPLE, "moved", redis=redis_url)

    # Then every trial is there in creation order, with its exact values
    assert result.trials == 4
    assert result.counts == {"success": 3, "crashed": 1}
    assert result.errors == 1
    assert result.optimizer_state == "fresh"
    assert result.skipped == []
    assert any("optimizer_state.pkl was not read" in n for n in result.notes)
    state = load(redis_url, "moved")
    trials = state.lock_and_read_trials()
    assert list(trials) == ["1_rung_0", "2_rung_0", "3_rung_0", "1_rung_1"]
    continued = trials["1_rung_1"]
    assert continued.config == {"epochs": 3, "x": 0.21570205688476562}
    assert continued.metadata.previous_trial_id == "1_rung_0"
    assert continued.metadata.location == "configs/config_1_rung_1"
    assert continued.metadata.previous_trial_location == "configs/config_1_rung_0"
    assert continued.metadata.time_sampled == 1796304899.8278158
    assert continued.report.learning_curve == [
        0.007106143213459289,
        0.004737428808972859,
        0.0023687144044864297,
    ]
    crashed = trials["2_rung_0"]
    assert str(crashed.report.err) == "loss diverged at x=0.308"
    assert crashed.report.tb.startswith("Traceback (most recent call last):")
    errors = state.lock_and_get_errors().errs
    assert [(e.trial_id, e.err_type) for e in errors] == [("2_rung_0", "DivergedError")]
    info, _ = read_optimizer_info(SAMPLE / "optimizer_info.yaml")
    assert state.lock_and_get_optimizer_info() == info
    assert state.counts() == {"success": 3, "crashed": 1}

    # And the trials' worker id is taken: a new worker gets a fresh one
    assert state.lock_and_get_optimizer_state().worker_ids == ["worker_0"]
    assert state.lock_and_set_new_worker_id() == "worker_1"


def test_with_allow_pickle_the_optimizer_state_and_pipeline_space_come_along(
    redis_url,
):
    result = import_run(SAMPLE, "moved", redis=redis_url, allow_pickle=True)

    assert result.optimizer_state == "imported"
    assert result.pipeline_space
    expected, _ = loads_optimizer_state((SAMPLE / "optimizer_state.pkl").read_bytes())
    state = load(redis_url, "moved")
    stored = state.lock_and_get_optimizer_state()
    assert stored.budget == expected.budget
    assert stored.budget.total_evaluations_to_spend == 4
    assert stored.seed_snapshot.py_rng == expected.seed_snapshot.py_rng
    assert stored.worker_ids == ["worker_0"]
    assert (
        state.client.get(state.keys.pipeline_space)
        == (SAMPLE / "pipeline_space.pkl").read_bytes()
    )


def test_the_trial_cache_pickle_is_never_read(redis_url, copy):
    (copy / "configs" / ".trial_cache.pkl").write_bytes(b"\x80\x05not a pickle")
    assert import_run(copy, "moved", redis=redis_url).trials == 4


def test_a_directory_moved_elsewhere_still_gets_relative_locations(redis_url, copy):
    import_run(copy, "moved", redis=redis_url)
    trial = load(redis_url, "moved").lock_and_get_trial_by_id("1_rung_0")
    assert trial.metadata.location == "configs/config_1_rung_0"


def test_a_trial_s_location_is_its_folder_whatever_its_metadata_says(redis_url, copy):
    # Given a folder whose metadata.json names another trial's folder (a
    # folder copied by hand keeps its old text)
    path = copy / "configs" / "config_1_rung_1" / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata["location"] = metadata["location"].replace("1_rung_1", "2_rung_0")
    metadata["previous_trial_location"] = "/elsewhere/configs/config_9"
    path.write_text(json.dumps(metadata))

    # When it is imported
    import_run(copy, "moved", redis=redis_url)

    # Then the stored locations are its own folder's and its previous trial's
    trial = load(redis_url, "moved").lock_and_get_trial_by_id("1_rung_1")
    assert trial.metadata.location == "configs/config_1_rung_1"
    assert trial.metadata.previous_trial_location == "configs/config_1_rung_0"


# --- corrupt input ---------------------------------------------------------------


def _error_lines(root: Path) -> list[str]:
    first = (root / ERRORS).read_text()
    second = json.dumps({**json.loads(first), "trial_id": "3_rung_0"})
    return [first, second]


def torn_last_line(root: Path) -> None:
    first, second = _error_lines(root)
    (root / ERRORS).write_text(first + "\n" + second[: len(second) // 2])


def two_objects_on_one_line(root: Path) -> None:
    first, second = _error_lines(root)
    (root / ERRORS).write_text(first + second)


def unreadable_config(root: Path) -> None:
    (root / "configs" / "config_1_rung_0" / "config.yaml").write_text(
        "epochs: 1\nx: [0.2,\n"
    )


def metadata_with_an_extra_key(root: Path) -> None:
    path = root / "configs" / "config_1_rung_0" / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "color": "red"}))


def metadata_without_a_key(root: Path) -> None:
    path = root / "configs" / "config_1_rung_0" / "metadata.json"
    data = json.loads(path.read_text())
    del data["time_end"]
    path.write_text(json.dumps(data))


def report_with_an_unknown_key(root: Path) -> None:
    path = root / "configs" / "config_3_rung_0" / "report.yaml"
    path.write_text(path.read_text() + "loss_curve: []\n")


def folder_escaping_the_directory(root: Path) -> None:
    outside = root.parent / "outside"
    shutil.copytree(root / "configs" / "config_1_rung_0", outside)
    (root / "configs" / "config_9").symlink_to(outside)


def folder_with_an_invalid_id(root: Path) -> None:
    shutil.copytree(
        root / "configs" / "config_1_rung_0", root / "configs" / "config_bad\x07id"
    )


def metadata_of_another_trial(root: Path) -> None:
    shutil.copytree(root / "configs" / "config_1_rung_0", root / "configs" / "config_7")


CORRUPTIONS: list[tuple[Callable[[Path], None], str, int | None, str]] = [
    (torn_last_line, ERRORS, 2, "not a whole JSON object"),
    (two_objects_on_one_line, ERRORS, 1, "two JSON values on one line"),
    (unreadable_config, "configs/config_1_rung_0/config.yaml", 3, "not valid YAML"),
    (
        metadata_with_an_extra_key,
        "configs/config_1_rung_0/metadata.json",
        1,
        "unknown key(s) ['color']",
    ),
    (
        metadata_without_a_key,
        "configs/config_1_rung_0/metadata.json",
        None,
        "missing key(s) ['time_end']",
    ),
    (
        report_with_an_unknown_key,
        "configs/config_3_rung_0/report.yaml",
        10,
        "unknown key(s) ['loss_curve']",
    ),
    (folder_escaping_the_directory, "configs/config_9", None, "outside the run"),
    (folder_with_an_invalid_id, "configs/config_bad\x07id", None, "control characters"),
    (
        metadata_of_another_trial,
        "configs/config_7/metadata.json",
        1,
        "does not match the folder name",
    ),
]


@pytest.mark.parametrize(
    ("corrupt", "path", "line", "reason"),
    CORRUPTIONS,
    ids=[c[0].__name__ for c in CORRUPTIONS],
)
def test_corrupt_input_is_refused_naming_file_and_line_and_nothing_is_written(
    redis_url, r, copy, corrupt, path, line, reason
):
    # Given a damaged copy of a NePS run, and what the server holds
    corrupt(copy)
    before = dump_keys(r)

    # When it is imported
    with pytest.raises(CorruptRunError) as raised:
        import_run(copy, "moved", redis=redis_url)

    # Then the error names the file and the line, and nothing was written
    error = raised.value
    assert error.path == copy / path
    assert error.line == line
    assert reason in error.reason
    where = f"{copy / path}, line {line}: " if line else f"{copy / path}: "
    assert str(error).startswith(where)
    assert dump_keys(r) == before


def test_skip_corrupt_imports_the_rest_and_lists_exactly_what_it_skipped(
    redis_url, copy
):
    # Given a torn last line and a report with an unknown key
    torn_last_line(copy)
    report_with_an_unknown_key(copy)

    # When imported with skip_corrupt
    result = import_run(copy, "moved", redis=redis_url, skip_corrupt=True)

    # Then everything else is there and the skipped parts are listed
    assert result.skipped == [
        Skipped(
            "configs/config_3_rung_0/report.yaml",
            10,
            "unknown key(s) ['loss_curve']; NePS expects exactly"
            " ['objective_to_minimize', 'cost', 'learning_curve', 'extra', 'err',"
            " 'tb', 'reported_as', 'evaluation_duration']",
        ),
        Skipped(
            ERRORS,
            2,
            "not a whole JSON object: Unterminated string starting at (column 121)",
        ),
    ]
    assert result.trials == 3
    assert result.errors == 1
    assert list(load(redis_url, "moved").lock_and_read_trials()) == [
        "1_rung_0",
        "2_rung_0",
        "1_rung_1",
    ]


def test_a_missing_optimizer_info_is_refused_even_with_skip_corrupt(redis_url, copy):
    (copy / "optimizer_info.yaml").unlink()
    with pytest.raises(CorruptRunError, match=r"optimizer_info\.yaml: missing"):
        import_run(copy, "moved", redis=redis_url, skip_corrupt=True)


def test_an_optimizer_state_that_cannot_be_unpickled_is_corrupt(redis_url, copy, r):
    # A pickle that would call a function of the standard library
    (copy / "optimizer_state.pkl").write_bytes(pickle.dumps(shutil.rmtree))
    with pytest.raises(CorruptRunError, match=r"refers to shutil\.rmtree"):
        import_run(copy, "moved", redis=redis_url, allow_pickle=True)
    assert dump_keys(r) == {}

    result = import_run(
        copy, "moved", redis=redis_url, allow_pickle=True, skip_corrupt=True
    )
    assert result.optimizer_state == "fresh"
    assert [s.path for s in result.skipped] == ["optimizer_state.pkl"]


class _Record:
    def __init__(self, **fields):
        self.__dict__.update(fields)


class _Budget016(_Record):
    pass


class _State016(_Record):
    pass


class _Snapshot016(_Record):
    pass


class _Writer016(pickle._Pickler):
    """Pickles the records above under NePS 0.16's class names."""

    NAMES = {
        _Budget016: ("neps.state.optimizer", "BudgetInfo"),
        _State016: ("neps.state.optimizer", "OptimizationState"),
        _Snapshot016: ("neps.state.seed_snapshot", "SeedSnapshot"),
    }

    def save_global(self, obj, name=None):
        if obj not in self.NAMES:
            super().save_global(obj, name)
            return
        module, qualname = self.NAMES[obj]
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)


def test_a_neps_0_16_optimizer_state_gets_0_17_s_budget_names(redis_url, copy):
    # Given an optimizer_state.pkl as NePS 0.16 wrote it
    snapshot = SeedSnapshot.new_capture()
    snapshot.torch_rng = snapshot.torch_cuda_rng = None
    old = _State016(
        budget=_Budget016(
            cost_to_spend=10.0,
            used_cost_budget=2.0,
            max_evaluations=8,
            used_evaluations=3,
            fidelities_to_spend=None,
        ),
        seed_snapshot=_Snapshot016(
            np_rng=snapshot.np_rng,
            py_rng=snapshot.py_rng,
            torch_rng=None,
            torch_cuda_rng=None,
        ),
        shared_state={},
        worker_ids=["worker_0"],
    )
    buffer = io.BytesIO()
    _Writer016(buffer, protocol=5).dump(old)
    (copy / "optimizer_state.pkl").write_bytes(buffer.getvalue())

    # When imported with pickles allowed
    import_run(copy, "old", redis=redis_url, allow_pickle=True)

    # Then the budget has 0.17's field names, and the RNG state is kept
    stored = load(redis_url, "old").lock_and_get_optimizer_state()
    assert stored.budget.worker_cost_to_spend == 10.0
    assert stored.budget.worker_evaluations_to_spend == 8
    assert stored.budget.used_evaluations == 3
    assert stored.budget.total_evaluations_to_spend is None
    assert stored.seed_snapshot == snapshot
    assert stored.worker_ids == ["worker_0"]


# --- existing runs -----------------------------------------------------------------


def test_importing_into_a_run_that_exists_is_refused_and_writes_nothing(redis_url, r):
    import_run(SAMPLE, "moved", redis=redis_url)
    before = dump_keys(r)

    with pytest.raises(RunExistsError, match="into_existing") as refused:
        import_run(SAMPLE, "moved", redis=redis_url)
    assert dump_keys(r) == before
    # The library's caller passes a keyword, not the command's flag
    assert "--into-existing" not in str(refused.value)


def test_the_import_command_refusing_an_existing_run_names_its_own_flag(redis_url):
    import_run(SAMPLE, "moved", redis=redis_url)

    result = CliRunner().invoke(
        import_command, [str(SAMPLE), "moved", "--redis", redis_url]
    )

    assert result.exit_code == 1
    assert "--into-existing" in result.stderr
    assert "into_existing=True" not in result.stderr


def test_into_existing_adds_the_trials_and_keeps_the_run_s_optimizer_state(
    redis_url, r
):
    # Given a run of the same optimizer with a trial of its own
    info, _ = read_optimizer_info(SAMPLE / "optimizer_info.yaml")
    state = RedisNePSState.create_or_load(
        "running",
        redis=redis_url,
        optimizer_info=info,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    sample(state, SampledConfig("10_rung_0", {"epochs": 1, "x": 0.5}))
    optimizer_state = state.lock_and_get_optimizer_state()

    # When the directory is imported into it
    result = import_run(SAMPLE, state, into_existing=True)

    # Then its trials follow the run's own, and its optimizer state stays
    assert result.optimizer_state == "kept"
    trials = state.lock_and_read_trials()
    assert list(trials) == ["10_rung_0", "1_rung_0", "2_rung_0", "3_rung_0", "1_rung_1"]
    assert state.lock_and_get_optimizer_state().seed_snapshot == (
        optimizer_state.seed_snapshot
    )
    assert len(state.lock_and_get_errors()) == 1

    # And a second import, whose ids are taken, changes nothing
    before = dump_keys(r)
    with pytest.raises(TrialAlreadyExistsError):
        import_run(SAMPLE, state, into_existing=True)
    assert dump_keys(r) == before


def test_into_existing_refuses_another_optimizer(redis_url, r):
    state = RedisNePSState.create_or_load(
        "other",
        redis=redis_url,
        optimizer_info={"name": "random_search", "info": {}},
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    before = dump_keys(r)
    with pytest.raises(NePSError, match="optimizer info"):
        import_run(SAMPLE, state, into_existing=True)
    assert dump_keys(r) == before


# --- round trips -------------------------------------------------------------------


def _mixed_without_numpy(state: RedisNePSState) -> None:
    build_mixed_run(state, numpy=False)


@pytest.mark.parametrize(
    "build",
    [_mixed_without_numpy, build_multi_objective_run],
    ids=["every-state", "multi-objective"],
)
def test_directory_to_redis_to_directory_gives_the_same_files(
    redis_url, tmp_path, build
):
    # Given a run with every trial state, exported (no numpy values: those
    # come back as plain numbers, see the next test)
    state = new_run(redis_url, "first")
    build(state)
    export_run(state, tmp_path / "exp1")

    # When that directory is imported and the new run exported again
    import_run(tmp_path / "exp1", "second", redis=redis_url, allow_pickle=True)
    export_run(load(redis_url, "second"), tmp_path / "exp2")

    # Then every file is the same, but for the directory's own path
    first, second = tree(tmp_path / "exp1"), tree(tmp_path / "exp2")
    assert first.keys() == second.keys()
    old, new = str(tmp_path / "exp1").encode(), str(tmp_path / "exp2").encode()
    for name, data in first.items():
        assert data.replace(old, new) == second[name], name


def test_numpy_values_come_back_as_plain_values_after_a_round_trip(redis_url, tmp_path):
    state = new_run(redis_url, "first")
    build_mixed_run(state)
    export_run(state, tmp_path / "exp1")
    import_run(tmp_path / "exp1", "second", redis=redis_url, allow_pickle=True)
    export_run(load(redis_url, "second"), tmp_path / "exp2")

    first, second = tree(tmp_path / "exp1"), tree(tmp_path / "exp2")
    old, new = str(tmp_path / "exp1").encode(), str(tmp_path / "exp2").encode()
    differ = {n for n, d in first.items() if d.replace(old, new) != second[n]}
    # The trial cache pickles numpy values as numpy, and the summary spells
    # them as numpy does; the YAML files hold plain values both times.
    assert differ == {"configs/.trial_cache.pkl", "summary/full.csv"}
    cache, _ = load_pickle(tmp_path / "exp2" / "configs" / ".trial_cache.pkl")
    assert cache["9_rung_0"].report.extra["confusion"] == [[5, 1], [0, 4]]


def test_the_neps_sample_round_trips_to_the_same_text_files(redis_url, tmp_path):
    # When NePS's directory goes to Redis and back out
    import_run(SAMPLE, "moved", redis=redis_url, allow_pickle=True)
    state = RedisNePSState.create_or_load(
        "moved", redis=redis_url, load_only=True, allow_pickle=True
    )
    export_run(state, tmp_path / "out")

    # Then the text files are NePS's, byte for byte (locations aside)
    theirs, ours = tree(SAMPLE), tree(tmp_path / "out")
    assert theirs.keys() == ours.keys()
    root = str(tmp_path / "out").encode()
    differ = {
        name
        for name, data in theirs.items()
        if data.replace(SAMPLE_ROOT.encode(), root) != ours[name]
    }
    # NePS's pickles are its own (the cache is an append log; the optimizer
    # state is pickled with memo), and config.yaml is read back with sorted
    # keys, which the summary's config columns then follow.
    assert differ == {
        "optimizer_state.pkl",
        "configs/.trial_cache.pkl",
        "summary/full.csv",
        "summary/short.csv",
        "summary/best_config.txt",
        "summary/best_config_trajectory.txt",
    }
    mine, _ = load_pickle(tmp_path / "out" / "optimizer_state.pkl")
    original, _ = loads_optimizer_state((SAMPLE / "optimizer_state.pkl").read_bytes())
    assert mine.budget == original.budget
    assert mine.worker_ids == original.worker_ids
    cache, _ = load_pickle(tmp_path / "out" / "configs" / ".trial_cache.pkl")
    report = yaml.safe_load(
        (SAMPLE / "configs" / "config_1_rung_1" / "report.yaml").read_text()
    )
    assert (
        cache["1_rung_1"].report.objective_to_minimize
        == (report["objective_to_minimize"])
    )


# --- progress ----------------------------------------------------------------------


def test_an_import_reports_its_progress_until_every_trial_is_stored(redis_url):
    # When an import is given a progress callback
    calls: list[tuple[str, int, int]] = []
    import_run(
        SAMPLE, "moved", redis=redis_url, progress=lambda *call: calls.append(call)
    )

    # Then each step counts up to the directory's 4 trials, reading first
    assert [c for c in calls if c[0] == "read"] == [
        ("read", n, 4) for n in (1, 2, 3, 4)
    ]
    assert calls[-2:] == [("store", 0, 4), ("store", 4, 4)]


def test_the_import_command_off_a_terminal_prints_no_progress(redis_url):
    result = CliRunner().invoke(
        import_command, [str(SAMPLE), "cli", "--redis", redis_url]
    )

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "Reading trials" not in result.stdout
    assert "━" not in result.stdout.split("\n", 1)[0]


def test_the_import_command_with_quiet_prints_nothing(redis_url):
    result = CliRunner().invoke(
        import_command, [str(SAMPLE), "cli", "--redis", redis_url, "--quiet"]
    )

    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert load(redis_url, "cli").lock_and_read_trials()


# --- the command -------------------------------------------------------------------


def test_the_import_command_prints_what_it_stored(redis_url):
    result = CliRunner().invoke(
        import_command, [str(SAMPLE), "cli", "--redis", redis_url]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "Imported" in output
    assert "4 trials, 1 shared error." in output
    assert "Note: optimizer_state.pkl was not read" in output


def test_the_import_command_names_the_corrupt_file_and_line_in_one_line(
    redis_url, copy
):
    torn_last_line(copy)
    result = CliRunner().invoke(
        import_command, [str(copy), "cli", "--redis", redis_url]
    )
    assert result.exit_code == 1
    assert f"{copy / ERRORS}, line 2:" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_the_import_command_lists_what_it_skipped(redis_url, copy, caplog):
    torn_last_line(copy)
    result = CliRunner().invoke(
        import_command, [str(copy), "cli", "--redis", redis_url, "--skip-corrupt"]
    )
    assert result.exit_code == 0, result.output
    assert "Skipped (1)" in result.output
    assert ERRORS in result.output
    # Once, in the table: not also as a warning of the log.
    assert not [
        record
        for record in caplog.records
        if record.levelno >= logging.WARNING and ERRORS in record.getMessage()
    ]


def test_the_import_command_into_an_existing_run_says_only_what_is_true_of_it(
    redis_url,
):
    # Given a run of the directory's optimizer
    info, _ = read_optimizer_info(SAMPLE / "optimizer_info.yaml")
    RedisNePSState.create_or_load(
        "running",
        redis=redis_url,
        optimizer_info=info,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    ).close()

    # When the directory is imported into it, twice
    added = CliRunner().invoke(
        import_command,
        [str(SAMPLE), "running", "--into-existing", "--redis", redis_url],
    )
    again = CliRunner().invoke(
        import_command,
        [str(SAMPLE), "running", "--into-existing", "--redis", redis_url],
    )

    # Then the first keeps the run's optimizer state and says nothing else
    # of it; the second, whose ids are taken, names the run and the directory
    assert added.exit_code == 0, added.output
    output = " ".join(added.output.split())
    assert "Optimizer state: the run's own, kept as it was" in output
    assert "fresh optimizer state" not in output
    assert "optimizer_state.pkl" not in output
    assert again.exit_code == 1
    assert re.match(
        rf"Error: Trial '\w+' of {re.escape(str(SAMPLE))} exists already in run"
        r" 'running'; nothing was imported\.",
        again.stderr,
    )
