"""The bridge between NePS's runtime and a run in Redis, in one process:
hooks, conversions, locks, claims and what path-based entry points find."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from redis.connection import AbstractConnection

neps = pytest.importorskip(
    "neps", reason="neural-pipeline-search is not installed (pip install '.[neps]')"
)

import torch  # noqa: E402
from neps.exceptions import NePSError as NepsNePSError  # noqa: E402
from neps.exceptions import TrialAlreadyExistsError as NepsExistsError  # noqa: E402
from neps.optimizers import load_optimizer  # noqa: E402
from neps.state import (  # noqa: E402
    BudgetInfo,
    DefaultReportValues,
    NePSState,
    OnErrorPossibilities,
    OptimizationState,
    SeedSnapshot,
    Trial,
    WorkerSettings,
)

from neps_redis import (  # noqa: E402
    ErrDump,
    RedisNePSState,
    SerializableTrialError,
    TrialAlreadyExistsError,
)
from neps_redis import Trial as OurTrial  # noqa: E402
from neps_redis import neps_bridge as bridge  # noqa: E402
from neps_redis.connection import describe_client  # noqa: E402
from tests.neps_worker import FidelitySpace, PlainSpace  # noqa: E402

pytestmark = [pytest.mark.neps, pytest.mark.timeout(120)]

INFO = {"name": "random_search", "info": {"use_priors": False}}


@pytest.fixture(autouse=True)
def _quiet_heartbeats(monkeypatch):
    # Command counts must not include a heartbeat that happens to fire.
    monkeypatch.setenv("NEPS_REDIS_HEARTBEAT", "0")


def open_state(tmp_path, redis_url, run="bridge", *, budget=None, name="root"):
    root = bridge.attach(tmp_path / name, run=run, redis=redis_url)
    state = NePSState.create_or_load(
        root,
        optimizer_info=dict(INFO),
        optimizer_state=OptimizationState(
            budget=budget, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    assert isinstance(state, bridge.RedisBackedNePSState)
    return state


def random_search():
    optimizer, _info = load_optimizer("random_search", PlainSpace())
    return optimizer


def settings(**limits):
    values = {
        "worker_evaluations_to_spend": None,
        "worker_cost_to_spend": None,
        "worker_fidelities_to_spend": None,
        **limits,
    }
    return WorkerSettings(
        on_error=OnErrorPossibilities.IGNORE,
        default_report_values=DefaultReportValues(),
        include_in_progress_evaluations_towards_maximum=True,
        max_evaluation_time_total_seconds=None,
        max_wallclock_time_seconds=None,
        batch_size=None,
        **values,
    )


def command_names(packed: bytes) -> list[str]:
    """The names of the RESP commands in `packed` (as redis-py sends them)."""
    names, pos = [], 0
    while pos < len(packed):
        assert packed[pos : pos + 1] == b"*", packed[pos : pos + 20]
        end = packed.index(b"\r\n", pos)
        count = int(packed[pos + 1 : end])
        pos = end + 2
        for i in range(count):
            end = packed.index(b"\r\n", pos)
            length = int(packed[pos + 1 : end])
            if i == 0:
                names.append(packed[end + 2 : end + 2 + length].decode().upper())
            pos = end + 2 + length + 2
    return names


@pytest.fixture
def sent(monkeypatch):
    """Every command this process sends to a server, by name, in order.

    The server's own counters (INFO commandstats) also count the commands
    scripts run inside, so they cannot tell one script call from many
    round trips."""
    commands: list[str] = []
    original = AbstractConnection.send_packed_command

    def record(self, command, check_health=True):
        chunks = [command] if isinstance(command, bytes | str) else command
        data = b"".join(
            bytes(c, "utf-8") if isinstance(c, str) else bytes(c) for c in chunks
        )
        commands.extend(command_names(data))
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", record)
    return commands


# --- hooks -------------------------------------------------------------------


def test_every_neps_internal_the_bridge_relies_on_exists():
    for name, value in bridge.coupling_points().items():
        assert value is not None, name
    assert neps.runtime.DefaultWorker is bridge.RedisWorker
    assert neps.import_trials is neps.api.import_trials
    assert neps.import_trials.__wrapped__ is not None


def test_the_redis_state_overrides_everything_neps_s_state_defines():
    # A NePS release that adds a method would otherwise reach files that
    # do not exist; this names it.
    inherited = [
        name
        for name, value in vars(NePSState).items()
        if (callable(value) or isinstance(value, property | classmethod))
        and not name.startswith("__")
        and name != "create_or_load"
        and name not in vars(bridge.RedisBackedNePSState)
    ]
    assert inherited == []


def test_a_directory_without_a_marker_stays_neps_s_own_file_based_state(tmp_path):
    state = NePSState.create_or_load(
        tmp_path / "files",
        optimizer_info=dict(INFO),
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    assert type(state) is NePSState
    assert (tmp_path / "files" / "optimizer_state.pkl").exists()


def test_run_refuses_a_keyword_neps_run_does_not_take(tmp_path, redis_url):
    with pytest.raises(TypeError, match="total_evaluatons"):
        bridge.run(
            lambda x, y: x,
            PlainSpace(),
            run="typo",
            redis=redis_url,
            root_directory=tmp_path,
            total_evaluatons_to_spend=3,
        )


# --- the marker and other processes -----------------------------------------


def test_the_marker_names_the_run_and_server_and_never_a_password(tmp_path, redis_url):
    root = bridge.attach(tmp_path / "m", run="marked", redis=redis_url)
    marker = bridge.read_marker(root)
    client = RedisNePSState.create_or_load(
        "marked",
        redis=redis_url,
        optimizer_info=INFO,
        optimizer_state=bridge.from_neps_optimization_state(
            OptimizationState(
                budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
            )
        ),
    ).client
    assert marker["run"] == "marked"
    assert marker["server"] == describe_client(client)
    assert "@" not in (root / bridge.MARKER).read_text()


def test_a_root_directory_of_run_leads_neps_status_in_another_process_to_redis(
    tmp_path, redis_url
):
    # Given a run started with neps_redis.run in this process
    root = tmp_path / "here"
    bridge.run(
        lambda x, y: x + y,
        PlainSpace(),
        run="elsewhere",
        redis=redis_url,
        root_directory=root,
        optimizer="random_search",
        total_evaluations_to_spend=2,
    )

    # When another process asks NePS about that directory
    code = f"""
        import neps, neps_redis.neps_bridge
        _, short = neps.status({str(root)!r})
        print(int(short["num_success"]))
        print(neps.load_optimizer_info({str(root)!r})["name"])
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            k: v for k, v in __import__("os").environ.items() if k != "NEPS_REDIS_URL"
        },
    )

    # Then NePS found the run in Redis from the marker alone
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "random_search"]


# --- conversions ---------------------------------------------------------------


def test_a_trial_round_trips_through_redis_exactly_as_neps_compares_it(
    tmp_path, redis_url
):
    # Given a NePS trial with a NaN objective, an error, numpy values in its
    # extra info, and a report, claimed from the state
    state = open_state(tmp_path, redis_url)
    trial = state.lock_and_sample_trial(random_search(), worker_id="s")
    claimed = state.claim("w")
    assert claimed.id == trial.id
    report = claimed.set_complete(
        report_as="crashed",
        time_end=time.time(),
        objective_to_minimize=math.nan,
        cost=float("inf"),
        learning_curve=[1.0, 0.5],
        err=KeyError("missing"),
        tb="Traceback ...",
        extra={"n": np.int64(3), "lr": np.float32(0.01)},
        evaluation_duration=0.25,
    )

    # When it is reported and read back
    state._report_trial_evaluation(claimed, report, worker_id="w")
    back = state.lock_and_get_trial_by_id(trial.id)

    # Then NePS's own equality holds, with NePS's types
    assert isinstance(back, Trial)
    assert back.metadata == claimed.metadata
    assert back.report == claimed.report
    assert back.metadata.state is Trial.State.CRASHED
    assert str(back.report.err) == str(KeyError("missing"))
    assert math.isnan(back.report.objective_to_minimize)
    assert back.report.extra["n"].dtype == np.int64
    assert back.report.extra["lr"] == np.float32(0.01)
    assert back.metadata.location == str(state.path / "configs" / f"config_{trial.id}")
    stored = state.redis.lock_and_get_trial_by_id(trial.id)
    assert stored.metadata.location == f"configs/config_{trial.id}"
    errors = state.lock_and_get_errors()
    assert [(e.trial_id, e.err_type) for e in errors.errs] == [(trial.id, "KeyError")]


def test_the_rng_snapshot_with_torch_states_round_trips_exactly(tmp_path, redis_url):
    torch.manual_seed(7)
    np.random.seed(7)
    snapshot = SeedSnapshot.new_capture()
    budget = BudgetInfo(
        worker_evaluations_to_spend=3, total_cost_to_spend=2.5, used_evaluations=1
    )
    state = open_state(tmp_path, redis_url, budget=budget)
    state.lock_and_update_global_budgets(
        total_evaluations_to_spend=9,
        total_cost_to_spend=None,
        total_fidelities_to_spend=None,
    )

    stored = bridge.to_neps_optimization_state(
        state.redis.lock_and_get_optimizer_state()
    )
    state.redis.store_new_trials(
        [],
        worker_id="",
        token="",
        optimizer_state=bridge.from_neps_optimization_state(
            OptimizationState(
                budget=stored.budget, seed_snapshot=snapshot, shared_state=None
            )
        ),
    )
    back = state.lock_and_get_optimizer_state()

    assert back.seed_snapshot == snapshot
    assert isinstance(back.seed_snapshot.torch_rng, torch.Tensor)
    assert back.seed_snapshot.np_rng[1].dtype == snapshot.np_rng[1].dtype
    assert back.budget == BudgetInfo(
        worker_evaluations_to_spend=3,
        total_cost_to_spend=2.5,
        used_evaluations=1,
        total_evaluations_to_spend=9,
    )


def test_optimizer_info_keeps_its_derived_part(tmp_path, redis_url):
    root = bridge.attach(tmp_path / "d", run="derived", redis=redis_url)
    info = {
        "name": "hyperband",
        "info": {"eta": 3},
        "derived": {"fidelity": {"name": "epochs", "lower": 1, "upper": 9}},
    }
    state = NePSState.create_or_load(
        root,
        optimizer_info=info,
        optimizer_state=OptimizationState(
            budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
        ),
    )
    assert state.lock_and_get_optimizer_info() == info
    assert state.fidelity_name == "epochs"
    assert neps.load_optimizer_info(root) == info


def test_shared_errors_convert_both_ways_exactly():
    ours = ErrDump(
        [
            SerializableTrialError("1", "w", "ValueError", "bad", "Traceback ..."),
            SerializableTrialError("2", "w", "KeyError", "'k'", None),
        ]
    )
    theirs = bridge.to_neps_err_dump(ours)
    assert type(theirs).__module__.startswith("neps.")
    assert str(theirs.latest_err_as_raisable()) == str(ours.latest_err_as_raisable())
    assert bridge.from_neps_err_dump(theirs) == ours


def test_errors_leave_as_neps_s_classes_and_as_this_package_s():
    error = bridge.as_neps_error(TrialAlreadyExistsError("7"))
    assert isinstance(error, NepsExistsError)
    assert isinstance(error, TrialAlreadyExistsError)
    assert isinstance(error, NepsNePSError)
    assert error.trial_id == "7"
    assert str(error) == "Trial with id 7 already exists!"


# --- locks ---------------------------------------------------------------------


def test_locks_taken_in_a_nested_way_do_not_deadlock(tmp_path, redis_url):
    state = open_state(tmp_path, redis_url)
    again = NePSState.create_or_load(state.path, load_only=True)
    with state._optimizer_lock.lock(worker_id="w"):
        with (
            state._trial_lock.lock(),
            state._err_lock.lock(),
            state._err_lock.lock(),
            again._optimizer_lock.lock(),
        ):
            trial = again.lock_and_sample_trial(random_search(), worker_id="w")
        state._trial_repo.update_trial(trial)
    assert not state.redis.client.exists(state.redis.keys.optimizer_lease)
    assert state.lock_and_read_trials()[trial.id] == trial


def test_the_optimizer_lock_excludes_another_thread(tmp_path, redis_url):
    state = open_state(tmp_path, redis_url)
    state.redis.optimizer_wait_seconds = 0.3
    entered = threading.Event()
    failures = []

    def other():
        try:
            with state._optimizer_lock.lock():
                entered.set()
        except NepsNePSError as error:
            failures.append(error)

    with state._optimizer_lock.lock():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert not entered.is_set()
    assert failures and "optimizer lease" in str(failures[0])


# --- the worker's claim and sample -----------------------------------------------


def test_a_worker_claims_a_pending_trial_with_one_script_call(
    tmp_path, redis_url, sent
):
    # Given three pending trials sampled by another worker
    state = open_state(tmp_path, redis_url)
    state.lock_and_sample_trial(random_search(), worker_id="sampler", n=3)
    other = NePSState.create_or_load(state.path, load_only=True)
    worker = neps.runtime.DefaultWorker.new(
        state=other,
        optimizer=random_search(),
        settings=settings(),
        evaluation_fn=lambda **_: 0.0,
        worker_id="claimer",
    )
    sent.clear()

    # When the worker gets its next trial
    trial = worker._get_next_trial()

    # Then one script call claimed the oldest, after two reads (the run's
    # budgets, the head of the queue), and nothing was locked
    assert trial.id == "1"
    assert trial.metadata.evaluating_worker_id == "claimer"
    assert sent == ["HGETALL", "ZRANGE", "ZRANGE", "EVALSHA"]
    assert Path(trial.metadata.location).is_dir()


def test_with_a_run_wide_budget_the_claim_is_decided_under_the_optimizer_lease(
    tmp_path, redis_url, r, sent
):
    state = open_state(
        tmp_path, redis_url, budget=BudgetInfo(total_evaluations_to_spend=5)
    )
    state.lock_and_sample_trial(random_search(), worker_id="sampler", n=2)
    worker = neps.runtime.DefaultWorker.new(
        state=state,
        optimizer=random_search(),
        settings=settings(),
        evaluation_fn=lambda **_: 0.0,
        worker_id="claimer",
    )
    sent.clear()

    trial = worker._get_next_trial()

    # The lease taken, the run read, the claim, the lease given back.
    assert trial.id == "1"
    assert sent.count("SET") == 1
    assert sent.count("EVALSHA") == 2
    assert sent.index("SET") < sent.index("EVALSHA")
    assert not r.exists(state.redis.keys.optimizer_lease)


def test_a_sampling_worker_stores_its_own_trial_claimed_with_a_lease(
    tmp_path, redis_url, r
):
    # Given an empty run
    state = open_state(tmp_path, redis_url)
    worker = neps.runtime.DefaultWorker.new(
        state=state,
        optimizer=random_search(),
        settings=settings(),
        evaluation_fn=lambda **_: 0.0,
        worker_id="sampler",
    )

    # When the worker gets its next trial
    trial = worker._get_next_trial()

    # Then it sampled it and stored it already evaluating, leased to it, in
    # the same step that stored the optimizer state and released the lease
    keys = state.redis.keys
    fields = r.hgetall(keys.trial(trial.id))
    assert fields[b"state"] == b"evaluating"
    assert fields[b"evaluating_worker_id"] == b"sampler"
    assert fields[b"token"] and int(fields[b"lease_deadline_ms"]) > 0
    assert r.zrange(keys.evaluating, 0, -1) == [trial.id.encode()]
    events = [f for _, f in r.xrange(keys.events) if f[b"event"] == b"sampled"]
    assert events[-1][b"state"] == b"evaluating"
    assert not r.exists(keys.optimizer_lease)
    assert trial.metadata.state is Trial.State.EVALUATING


def test_a_worker_s_report_stays_fenced_after_it_has_read_a_takeover(
    tmp_path, redis_url
):
    # Given a trial claimed here, then reset and claimed by another worker,
    # and this machine reading the run meanwhile (neps.status in the
    # evaluation, say)
    state = open_state(tmp_path, redis_url)
    state.lock_and_sample_trial(random_search(), worker_id="s")
    mine = state.claim("slow")
    state.lock_and_reset_trial_by_id(mine.id)
    other = NePSState.create_or_load(state.path, load_only=True)
    assert other.claim("fast").id == mine.id
    state.lock_and_read_trials()

    # When this worker reports its result late
    report = mine.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=9.0,
        cost=None,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=1.0,
    )
    state._report_trial_evaluation(mine, report, worker_id="slow")

    # Then the report is refused: the trial is the other worker's
    stored = state.lock_and_get_trial_by_id(mine.id)
    assert stored.metadata.state is Trial.State.EVALUATING
    assert stored.metadata.evaluating_worker_id == "fast"
    assert stored.report is None


def test_a_ddp_rank_polling_for_its_trial_backs_off(tmp_path, redis_url, sent):
    # Given an evaluating trial that does not change
    state = open_state(tmp_path, redis_url)
    state.lock_and_sample_trial(random_search(), worker_id="s")
    state.claim("rank0")
    sent.clear()

    # When a rank asks for the evaluating trials in a tight loop for 2.5 s
    calls = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert len(state.lock_and_get_current_evaluating_trials()) == 1
        calls += 1

    # Then it asked the server only a few times
    assert calls < 15
    assert len(sent) < 4 * 15


def test_a_continuation_whose_previous_trial_ran_elsewhere_gets_no_previous_directory(
    tmp_path, redis_url
):
    # Given a promoted trial whose previous trial ran on another machine
    optimizer, _ = load_optimizer("hyperband", FidelitySpace())
    state = open_state(tmp_path, redis_url)
    first = state.lock_and_sample_trial(optimizer, worker_id="s")
    with state._optimizer_lock.lock():
        follow = bridge.to_neps_trial(
            OurTrial.new(
                trial_id="1_rung_1",
                config=dict(first.config),
                location="configs/config_1_rung_1",
                previous_trial=first.id,
                previous_trial_location=f"configs/config_{first.id}",
                time_sampled=time.time() + 1,
                worker_id="s",
            ),
            state.path,
        )
        state._trial_repo.store_new_trial(follow)
    elsewhere = open_state(tmp_path, redis_url, name="other-machine")
    other_first = elsewhere.claim("far")  # the first trial, evaluated there
    assert other_first.id == first.id

    # When this machine claims the continuation
    trial = state.claim("here")

    # Then its previous directory is None here, and the stored one is kept
    assert trial.id == "1_rung_1"
    assert trial.metadata.previous_trial_location is None
    report = trial.set_complete(
        report_as="success",
        time_end=time.time(),
        objective_to_minimize=1.0,
        cost=1.0,
        learning_curve=None,
        err=None,
        tb=None,
        extra=None,
        evaluation_duration=1.0,
    )
    state._report_trial_evaluation(trial, report, worker_id="here")
    stored = state.redis.lock_and_get_trial_by_id("1_rung_1")
    assert stored.metadata.previous_trial_location == f"configs/config_{first.id}"
