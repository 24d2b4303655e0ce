"""NePS's own runtime on a run kept in Redis; the only module that imports `neps`.

`run` is `neps.run` with the state in Redis: NePS's argument handling,
optimizers, worker loop, stopping criteria and error policies run unchanged,
and every read and write of the shared state goes to a `RedisNePSState`.
Workers on machines that share nothing but the Redis server work on one run;
each keeps a local root directory for what NePS writes locally (the trial
directories handed to the evaluation function, the summary files).

Importing this module installs three hooks into NePS (`install`), each a
name NePS 0.17 uses internally; `coupling_points` lists them and a test
checks they still exist:

- ``neps.state.NePSState.create_or_load``: a root directory holding the
  marker file (`MARKER`, written by `run` and `attach`) opens the Redis run
  it names, as a `RedisBackedNePSState`. So NePS's path-based entry points
  (``neps.status``, ``neps.save_pipeline_results``, ``neps.load_config``,
  ``neps.load_optimizer_info``, ``neps.load_pipeline_space``,
  ``neps.import_trials``, DDP ranks, the summary writer) find the run. Any
  other path goes to NePS's own file-based state, untouched.
- ``neps.runtime.DefaultWorker`` becomes `RedisWorker`, whose
  ``_get_next_trial`` claims with one atomic script and samples under the
  optimizer lease, storing its own new trial already claimed. On any other
  state it is NePS's own method.
- ``neps.import_trials`` holds the run's optimizer lease from reading the
  trials to storing the imported ones, so that ids chosen from the trials
  read cannot be taken by a sampler in between.

Besides these, `RedisBackedNePSState` serves the private members NePS's
runtime reaches into (``_trial_lock``, ``_optimizer_lock``, ``_err_lock``,
``_trial_repo``, ``_sample_trial``, ``_report_trial_evaluation``,
``_get_optimizer_state``, ``_optimizer_info``, ``path``), and converts
values between this package's types and NePS's exactly.

This module must never be imported by the lower floors: importing it
imports NePS (and torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import neps
import neps.api
import neps.runtime
from neps.exceptions import NePSError as NepsNePSError
from neps.exceptions import TrialAlreadyExistsError as NepsTrialAlreadyExistsError
from neps.exceptions import TrialNotFoundError as NepsTrialNotFoundError
from neps.runtime import DefaultWorker
from neps.state import NePSState
from neps.state.err_dump import ErrDump as NepsErrDump
from neps.state.err_dump import SerializableTrialError as NepsTrialError
from neps.state.neps_state import TrialRepo
from neps.state.optimizer import BudgetInfo as NepsBudgetInfo
from neps.state.optimizer import OptimizationState as NepsOptimizationState
from neps.state.seed_snapshot import SeedSnapshot as NepsSeedSnapshot
from neps.state.trial import Report as NepsReport
from neps.state.trial import Trial as NepsTrial
from neps.utils.files import serialize as neps_serialize

from neps_redis import defaults
from neps_redis.connection import URL_ENV, check_server, connect, describe_client
from neps_redis.errors import (
    LeaseLostError,
    NePSError,
    OptimizerInfoMismatchError,
    PipelineSpaceMismatchError,
    RunNotFoundError,
    TrialAlreadyExistsError,
    TrialNotFoundError,
)
from neps_redis.keys import RunKeys, validate_run_name
from neps_redis.model import (
    BudgetInfo,
    ErrDump,
    ImportedConfig,
    MetaData,
    OptimizationState,
    Report,
    SampledConfig,
    SeedSnapshot,
    SerializableTrialError,
    State,
    Trial,
)
from neps_redis.state import RedisNePSState, space_fingerprint

logger = logging.getLogger(__name__)

# The marker file in a root directory: which run, on which server. It never
# holds a password; a server that needs one is reached with NEPS_REDIS_URL.
MARKER = "neps_redis_run.json"
MARKER_FORMAT = 1

# A copy of the run's optimizer info in NePS's format, so that NePS's own
# checks of a root directory ("is this run continuing?", the fidelity name
# of the summary files) see the run as NePS would.
OPTIMIZER_INFO_COPY = "optimizer_info.yaml"

# The pipeline space a worker on this machine gave, pickled as NePS keeps it,
# so that ``neps.load_pipeline_space`` and resuming without a space work here
# without trusting pickles from Redis.
PIPELINE_SPACE_COPY = "pipeline_space.pkl"

# The version range this module is tested with (the `neps` extra).
TESTED_NEPS = ((0, 17), (0, 18))

# NePS's own `neps.run`, kept before anything here could wrap it.
_NEPS_RUN = neps.api.run


# --- conversions between this package's values and NePS's ------------------


def local_location(location: str | None, root: Path) -> str | None:
    """A stored location as a path on this machine.

    Locations are stored relative to the run's root directory
    (``configs/config_<id>``), and each machine resolves them under its own
    root. An absolute location (a run imported from a NePS directory) is
    kept as it is.
    """
    if location is None:
        return None
    path = Path(location)
    return location if path.is_absolute() else str(root / path)


def stored_location(location: str | None, root: Path) -> str | None:
    """The inverse of `local_location`: a path under `root` becomes relative."""
    if location is None:
        return None
    path = Path(location)
    if path.is_absolute() and path.is_relative_to(root):
        return str(path.relative_to(root))
    return location


def to_neps_report(report: Report) -> NepsReport:
    return NepsReport(
        objective_to_minimize=report.objective_to_minimize,
        cost=report.cost,
        learning_curve=report.learning_curve,
        extra=report.extra,
        err=report.err,
        tb=report.tb,
        reported_as=report.reported_as,
        evaluation_duration=report.evaluation_duration,
    )


def from_neps_report(report: NepsReport) -> Report:
    return Report(
        objective_to_minimize=report.objective_to_minimize,
        cost=report.cost,
        learning_curve=report.learning_curve,
        extra=report.extra,
        err=report.err,
        tb=report.tb,
        reported_as=report.reported_as,
        evaluation_duration=report.evaluation_duration,
    )


def _metadata_values(metadata: Any) -> dict[str, Any]:
    return {f.name: getattr(metadata, f.name) for f in dataclasses.fields(MetaData)}


def to_neps_trial(trial: Trial, root: Path) -> NepsTrial:
    """A NePS `Trial` equal to `trial`, its locations resolved under `root`."""
    values = _metadata_values(trial.metadata)
    values["state"] = NepsTrial.State(State(values["state"]).value)
    values["location"] = local_location(values["location"], root)
    values["previous_trial_location"] = local_location(
        values["previous_trial_location"], root
    )
    return NepsTrial(
        config=trial.config,
        metadata=NepsTrial.MetaData(**values),
        report=None if trial.report is None else to_neps_report(trial.report),
        source=trial.source,
    )


def from_neps_trial(trial: NepsTrial, root: Path) -> Trial:
    """This package's `Trial` equal to a NePS one, its locations stored
    relative to `root`."""
    values = _metadata_values(trial.metadata)
    values["state"] = State(NepsTrial.State(values["state"]).value)
    values["location"] = stored_location(values["location"], root)
    values["previous_trial_location"] = stored_location(
        values["previous_trial_location"], root
    )
    return Trial(
        config=trial.config,
        metadata=MetaData(**values),
        report=None if trial.report is None else from_neps_report(trial.report),
        source=trial.source,
    )


def _copy_fields(value: Any, cls: type) -> Any:
    """`cls` built from the fields of `value` that `cls` has too.

    BudgetInfo grows between NePS releases: a field one side lacks takes
    the other side's default rather than failing.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(
        **{
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if f.name in names
        }
    )


def to_neps_seed_snapshot(snapshot: SeedSnapshot) -> NepsSeedSnapshot:
    return NepsSeedSnapshot(
        np_rng=snapshot.np_rng,
        py_rng=snapshot.py_rng,
        torch_rng=snapshot.torch_rng,
        torch_cuda_rng=snapshot.torch_cuda_rng,
    )


def from_neps_seed_snapshot(snapshot: NepsSeedSnapshot) -> SeedSnapshot:
    return SeedSnapshot(
        np_rng=snapshot.np_rng,
        py_rng=snapshot.py_rng,
        torch_rng=snapshot.torch_rng,
        torch_cuda_rng=snapshot.torch_cuda_rng,
    )


def to_neps_optimization_state(state: OptimizationState) -> NepsOptimizationState:
    return NepsOptimizationState(
        budget=None
        if state.budget is None
        else _copy_fields(state.budget, NepsBudgetInfo),
        seed_snapshot=to_neps_seed_snapshot(state.seed_snapshot),
        shared_state=state.shared_state,
        worker_ids=None if state.worker_ids is None else list(state.worker_ids),
    )


def from_neps_optimization_state(state: NepsOptimizationState) -> OptimizationState:
    return OptimizationState(
        budget=None if state.budget is None else _copy_fields(state.budget, BudgetInfo),
        seed_snapshot=from_neps_seed_snapshot(state.seed_snapshot),
        shared_state=state.shared_state,
        worker_ids=None if state.worker_ids is None else list(state.worker_ids),
    )


def to_neps_err_dump(dump: ErrDump) -> NepsErrDump:
    return NepsErrDump(
        [
            NepsTrialError(
                trial_id=e.trial_id,
                worker_id=e.worker_id,
                err_type=e.err_type,
                err=e.err,
                tb=e.tb,
            )
            for e in dump.errs
        ]
    )


def from_neps_err_dump(dump: NepsErrDump) -> ErrDump:
    return ErrDump(
        [
            SerializableTrialError(
                trial_id=e.trial_id,
                worker_id=e.worker_id,
                err_type=e.err_type,
                err=e.err,
                tb=e.tb,
            )
            for e in dump.errs
        ]
    )


def to_neps_optimizer_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """NePS's `OptimizerInfo` is a TypedDict: a plain dict with the same keys."""
    converted = {"name": info["name"], "info": dict(info["info"] or {})}
    if "derived" in info:
        converted["derived"] = dict(info["derived"])
    return converted


# Exceptions: NePS's runtime catches its own classes (its create-or-load
# loop retries anything but a NePSError, the runtime tells an id clash by
# TrialAlreadyExistsError), so errors leave this module as classes that are
# both this package's and NePS's.
_NEPS_COUNTERPART: dict[type, type] = {
    TrialAlreadyExistsError: NepsTrialAlreadyExistsError,
    TrialNotFoundError: NepsTrialNotFoundError,
}


@functools.cache
def _neps_flavour(cls: type[NePSError]) -> type:
    counterpart = next(
        (v for k, v in _NEPS_COUNTERPART.items() if issubclass(cls, k)), NepsNePSError
    )
    return type(cls.__name__, (cls, counterpart), {"__module__": cls.__module__})


def as_neps_error(error: NePSError) -> BaseException:
    """`error` as an instance of a class that is also NePS's counterpart."""
    flavour = _neps_flavour(type(error))
    converted = flavour.__new__(flavour, *error.args)
    converted.__dict__.update(error.__dict__)
    return converted


@contextlib.contextmanager
def neps_errors() -> Iterator[None]:
    """Raise this package's errors as ones NePS's code recognises too."""
    try:
        yield
    except NePSError as error:
        if isinstance(error, NepsNePSError):
            raise
        raise as_neps_error(error).with_traceback(error.__traceback__) from error


# --- the marker file and the bindings of root directories ------------------


@dataclasses.dataclass
class Binding:
    """A root directory on this machine bound to a run in Redis."""

    run: str
    client: Any
    allow_pickle: bool | None = None


# Root directories bound in this process, with the caller's own client (which
# may carry a password that the marker file never holds).
_BINDINGS: dict[Path, Binding] = {}
_BINDINGS_LOCK = threading.Lock()


def _root(path: str | os.PathLike) -> Path:
    return Path(path).absolute().resolve()


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker in `root`, or None if there is none."""
    path = root / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise NePSError(f"The marker file {path} cannot be read: {error}") from None
    if not isinstance(data, dict) or "run" not in data or "server" not in data:
        raise NePSError(f"The marker file {path} does not name a run and a server.")
    return data


# Marks "keep what the marker says" where None means "not known".
_KEEP: Any = object()


def _write_marker(root: Path, run: str, client: Any, *, created: Any = _KEEP) -> None:
    """Write the marker; `created` is the creation time of the run's current
    incarnation, None while the run does not exist (by default, what the
    old marker says)."""
    if created is _KEEP:
        created = None
        with contextlib.suppress(NePSError):
            old = read_marker(root)
            if old is not None and old["run"] == run:
                created = old.get("created")
    data = {
        "neps_redis": MARKER_FORMAT,
        "run": run,
        "server": describe_client(client),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if created is not None:
        data["created"] = created
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".{MARKER}.{os.getpid()}"
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(root / MARKER)


def _created_at(client: Any, run: str) -> str | None:
    """When the run's current incarnation was created (None: no such run)."""
    value = client.hget(RunKeys(run).meta, "created_at")
    return None if value is None else value.decode()


def _set_aside_earlier_incarnation(
    root: Path, marker: Any, current: str | None
) -> None:
    """Move this machine's files of an earlier incarnation of the run aside.

    A run started afresh elsewhere numbers its trials from 1 again: left in
    place, the old trial directories would be handed to the new trials'
    evaluations as their `pipeline_directory`, checkpoints and all.
    """
    recorded = None if marker is None else marker.get("created")
    if recorded is None or recorded == current:
        return
    aside = root / f"replaced-{recorded}"
    aside.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "summary", OPTIMIZER_INFO_COPY, PIPELINE_SPACE_COPY):
        if (root / name).exists():
            (root / name).replace(aside / name)
    logger.warning(
        "Run %r was started afresh since this machine last worked on it; its"
        " files of the earlier run were moved to %s.",
        marker["run"],
        aside,
    )


def attach(root_directory: str | os.PathLike, *, run: str, redis: Any = None) -> Path:
    """Bind a local directory to run `run`, so that NePS's path-based entry
    points (``neps.status``, ``neps.save_pipeline_results``, ...) given that
    directory reach the run in Redis. Returns the directory.

    `run` does this for its root directory. Another process needs it only
    for a directory `run` has not written on this machine; in a process that
    did not call `run`, import this module first.
    """
    validate_run_name(run)
    root = _root(root_directory)
    client = connect(redis)
    existing = read_marker(root)
    if existing is not None and existing["run"] != run:
        raise NePSError(
            f"{root} belongs to run '{existing['run']}', not '{run}'. Use"
            " another root directory for another run."
        )
    _write_marker(root, run, client)
    with _BINDINGS_LOCK:
        _BINDINGS[root] = Binding(run=run, client=client)
    return root


def binding_for(path: str | os.PathLike) -> Binding | None:
    """The run a root directory is bound to, or None (a NePS directory).

    A directory bound in this process uses that binding's client. Otherwise
    the marker file names the run and the server; the connection is
    NEPS_REDIS_URL when set (it carries a password the marker never holds),
    else the server the marker names.
    """
    root = _root(path)
    with _BINDINGS_LOCK:
        known = _BINDINGS.get(root)
    if known is not None:
        return known
    marker = read_marker(root)
    if marker is None:
        return None
    url = os.environ.get(URL_ENV)
    client = connect(url or marker["server"])
    if url and describe_client(client) != marker["server"]:
        logger.warning(
            "%s names the server %s; using %s from %s instead.",
            root / MARKER,
            marker["server"],
            describe_client(client),
            URL_ENV,
        )
    binding = Binding(run=marker["run"], client=client)
    with _BINDINGS_LOCK:
        _BINDINGS.setdefault(root, binding)
    return binding


def _write_optimizer_info_copy(root: Path, state: RedisNePSState) -> None:
    path = root / OPTIMIZER_INFO_COPY
    if not path.exists():
        info = to_neps_optimizer_info(state.lock_and_get_optimizer_info())
        neps_serialize(info, path=path)


# --- the optimizer lease, held per thread ------------------------------------

# The optimizer leases this thread holds, by (server, run). NePS takes its
# optimizer lock in nested ways, and `neps.import_trials` opens the state
# twice; a lease held by this thread is simply used again.
_HELD = threading.local()


def _held() -> dict[tuple[str, str], str]:
    if not hasattr(_HELD, "leases"):
        _HELD.leases = {}
    return _HELD.leases


class OptimizerLock:
    """NePS's optimizer lock, served by the run's optimizer lease.

    Re-entrant: a thread that holds the lease (through any state object of
    the same run) uses it again. `token` is the lease a store must present.
    """

    def __init__(self, state: RedisNePSState) -> None:
        self._state = state
        self._key = (state.server, state.run)

    @property
    def token(self) -> str | None:
        return _held().get(self._key)

    @contextlib.contextmanager
    def lock(self, *, worker_id: str | None = None) -> Iterator[None]:
        """Hold the optimizer lease (`worker_id` is accepted for NePS's callers)."""
        del worker_id
        if self.token is not None:
            yield
            return
        with neps_errors():
            token = self._state.take_optimizer_lease()
        _held()[self._key] = token
        try:
            yield
        finally:
            if _held().pop(self._key, None) is not None:
                self._state.release_optimizer_lease(token)

    def released(self) -> None:
        """A store gave the lease up already; leaving the block need not."""
        _held().pop(self._key, None)


class AtomicLock:
    """NePS's trial and error locks. Every operation NePS takes them around
    is one atomic script here, so there is nothing to hold."""

    @contextlib.contextmanager
    def lock(self, *, worker_id: str | None = None) -> Iterator[None]:
        del worker_id
        yield


# --- NePS's state, served by Redis -----------------------------------------


class RedisTrialRepo(TrialRepo):
    """NePS's trial repository (``state._trial_repo``), served by Redis."""

    def __init__(self, backed: RedisBackedNePSState) -> None:
        # NePS's TrialRepo is a dataclass over a directory; this one keeps
        # the directory only as the place of local trial directories.
        self._backed = backed
        self.directory = backed.path / "configs"
        self.cache_path = self.directory / TrialRepo.CACHE_FILE_NAME
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RedisTrialRepo({self._backed.redis!r})"

    def list_trial_ids(self) -> list[str]:
        return self._backed.all_trial_ids()

    def latest(self, *, create_cache_if_missing: bool = True) -> dict[str, NepsTrial]:
        del create_cache_if_missing
        return self._backed.lock_and_read_trials()

    def get_valid_evaluated_trials(self) -> dict[str, NepsTrial]:
        return {
            trial_id: trial
            for trial_id, trial in self.latest().items()
            if trial.report is not None
            and trial.report.err is None
            and self._is_valid_objective(trial.report.objective_to_minimize)
        }

    def store_new_trial(self, trial: NepsTrial | list[NepsTrial]) -> None:
        self._backed._store_new(trial if isinstance(trial, list) else [trial])

    def update_trial(self, trial: NepsTrial, *, hints: Any = None) -> None:
        self._backed.put_updated_trial(trial, hints=hints)

    def load_trial_from_disk(self, trial_id: str) -> NepsTrial:
        return self._backed.lock_and_get_trial_by_id(trial_id)


class RedisBackedNePSState(NePSState):
    """NePS's `NePSState`, served by a `RedisNePSState`.

    Every public method of NePS 0.17's NePSState, and the private members its
    runtime uses, with NePS's arguments, types and exceptions. `path` is this
    machine's root directory of the run.
    """

    def __init__(
        self, redis: RedisNePSState, root: Path, pipeline_space: Any = None
    ) -> None:
        # NePSState is a dataclass over files; none of its fields but `path`
        # and the private members NePS's runtime reaches into apply here.
        self.redis = redis
        self.path = root
        root.mkdir(parents=True, exist_ok=True)
        self._optimizer_lock = OptimizerLock(redis)
        self._trial_lock = AtomicLock()
        self._err_lock = AtomicLock()
        self._trial_repo = RedisTrialRepo(self)
        self._converted: dict[str, tuple[Trial, NepsTrial]] = {}
        self._optimizer_info = to_neps_optimizer_info(
            redis.lock_and_get_optimizer_info()
        )
        self._given_space = pipeline_space
        self._optimizer_info_path = root / OPTIMIZER_INFO_COPY
        self._optimizer_state_path = root / "optimizer_state.pkl"
        self._pipeline_space_path = root / PIPELINE_SPACE_COPY
        self._shared_errors_path = root / "shared_errors.jsonl"
        # NePS's trials cannot carry a claim token, so they are kept here:
        # those of the claims this object made, which fence its workers'
        # reports and are never replaced by a token read later (that would
        # be another worker's, after a takeover), and those read with
        # evaluating trials (a result saved later from another process
        # presents the token its trial is held under). Also the locations of
        # previous trials hidden from evaluations because their directory is
        # not on this machine.
        self._claims: dict[str, str] = {}
        self._read_tokens: dict[str, str] = {}
        self._hidden_previous: dict[str, str] = {}
        # The optimizer-state snapshot `_sample_trial` took, stored with the
        # trials by the next `store_new_trial` (NePS splits the two).
        self._sampled_state: OptimizationState | None = None
        self._poll = _Backoff()

    def __repr__(self) -> str:
        return f"RedisBackedNePSState({self.redis!r}, path={str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RedisBackedNePSState):
            return NotImplemented
        return self.redis == other.redis

    __hash__ = None  # type: ignore[assignment]

    @property
    def _optimizer_state(self) -> NepsOptimizationState:
        return self._get_optimizer_state()

    @property
    def _shared_errors(self) -> NepsErrDump:
        return self.lock_and_get_errors()

    @property
    def _pipeline_space(self) -> Any:
        # NePS's state holds the space it loaded; this one finds it on use,
        # and, where finding it needs a pickle from Redis that this process
        # may not unpickle, has none (as NePS has none for an old run).
        try:
            return self.lock_and_get_search_space()
        except NePSError:
            return None

    # --- conversions with this machine's root directory

    def to_neps(self, trial: Trial) -> NepsTrial:
        if trial.token is not None:
            self._read_tokens[trial.id] = trial.token
        return to_neps_trial(trial, self.path)

    def from_neps(self, trial: NepsTrial) -> Trial:
        converted = from_neps_trial(trial, self.path)
        hidden = self._hidden_previous.get(trial.id)
        if hidden is not None and trial.metadata.previous_trial_location is None:
            converted.metadata.previous_trial_location = hidden
        converted.token = self._claims.get(trial.id) or self._read_tokens.get(trial.id)
        return converted

    def _forget(self, trial_id: str) -> None:
        self._claims.pop(trial_id, None)
        self._read_tokens.pop(trial_id, None)
        self._hidden_previous.pop(trial_id, None)

    def _to_neps_trials(self, trials: Mapping[str, Trial]) -> dict[str, NepsTrial]:
        """NePS's trials for ours. A read-all returns the very objects of the
        last one for the trials that did not change, and so is each's
        conversion reused: converting costs with the changes, not the run."""
        done = self._converted
        converted: dict[str, tuple[Trial, NepsTrial]] = {}
        out: dict[str, NepsTrial] = {}
        for trial_id, trial in trials.items():
            known = done.get(trial_id)
            if known is not None and known[0] is trial:
                if trial.token is not None:
                    self._read_tokens[trial_id] = trial.token
                neps_trial = known[1]
            else:
                neps_trial = self.to_neps(trial)
            converted[trial_id] = (trial, neps_trial)
            out[trial_id] = neps_trial
        self._converted = converted
        return out

    def _hand_out(self, trial: Trial) -> NepsTrial:
        """The NePS trial a worker of this machine evaluates.

        Its directory is made here, with the config in it as NePS writes it
        on storing the trial (``neps.load_config`` reads it from there).
        A continuation whose previous trial ran on another machine gets no
        `previous_pipeline_directory` (None), with a warning: its checkpoint
        is not on this machine, and an evaluation function given a path that
        does not exist would fail where one given None starts afresh.
        """
        if trial.token is not None:
            self._claims[trial.id] = trial.token
        neps_trial = self.to_neps(trial)
        _make_directory(neps_trial.metadata.location, neps_trial.config)
        previous = neps_trial.metadata.previous_trial_location
        if previous is not None and not Path(previous).is_dir():
            stored = trial.metadata.previous_trial_location
            assert stored is not None
            self._hidden_previous[trial.id] = stored
            neps_trial.metadata.previous_trial_location = None
            logger.warning(
                "Trial %r continues trial %r, whose directory %s is not on this"
                " machine (it was evaluated elsewhere): the evaluation gets"
                " previous_pipeline_directory=None.",
                trial.id,
                trial.metadata.previous_trial_id,
                previous,
            )
        return neps_trial

    # --- workers

    def lock_and_set_new_worker_id(self, worker_id: str | None = None) -> str:
        with neps_errors():
            return self.redis.lock_and_set_new_worker_id(worker_id)

    # --- reads

    def all_trial_ids(self) -> list[str]:
        return self.redis.all_trial_ids()

    def lock_and_read_trials(self) -> dict[str, NepsTrial]:
        return self._to_neps_trials(self.redis.lock_and_read_trials())

    def lock_and_get_trial_by_id(self, trial_id: str) -> NepsTrial:
        with neps_errors():
            return self.to_neps(self.redis.lock_and_get_trial_by_id(trial_id))

    def unsafe_retry_get_trial_by_id(self, trial_id: str) -> NepsTrial:
        return self.lock_and_get_trial_by_id(trial_id)

    def lock_and_get_next_pending_trial(
        self, n: int | None = None
    ) -> NepsTrial | list[NepsTrial] | None:
        found = self.redis.lock_and_get_next_pending_trial(n)
        if n is None:
            return None if found is None else self.to_neps(found)
        return [self.to_neps(t) for t in found]

    def lock_and_get_current_evaluating_trials(self) -> list[NepsTrial]:
        """Every evaluating trial, in creation order.

        NePS's DDP ranks call this in a loop without pause. Calls closer
        together than the current interval wait for it; the interval doubles
        while the answer stays the same (up to `defaults.POLL_MAX_SECONDS`)
        and is reset when it changes, so a rank waiting for its trial asks
        about once a second and one that is answered sees news at once.
        """
        self._poll.wait()
        trials = self.redis.lock_and_get_current_evaluating_trials()
        self._poll.observed(tuple(t.id for t in trials))
        return [self.to_neps(t) for t in trials]

    def lock_and_get_errors(self) -> NepsErrDump:
        return to_neps_err_dump(self.redis.lock_and_get_errors())

    def lock_and_get_optimizer_info(self) -> dict[str, Any]:
        with neps_errors():
            return to_neps_optimizer_info(self.redis.lock_and_get_optimizer_info())

    @property
    def fidelity_name(self) -> str | None:
        return self.redis.fidelity_name

    def lock_and_get_search_space(self) -> Any:
        """The pipeline space: the one this process gave, else this machine's
        copy (``pipeline_space.pkl`` in the root directory, if it still is
        the run's), else the one stored in Redis (only with allow_pickle)."""
        if self._given_space is not None:
            return self._given_space
        local = _read_space_copy(self._pipeline_space_path)
        stored = getattr(self.redis, "_space_fingerprint", "")
        if local is not None and stored and space_fingerprint(local) == stored:
            return local
        with neps_errors():
            return self.redis.lock_and_get_search_space()

    def lock_and_get_optimizer_state(self) -> NepsOptimizationState:
        return self._get_optimizer_state()

    def _get_optimizer_state(self) -> NepsOptimizationState:
        with neps_errors():
            return to_neps_optimization_state(self.redis.lock_and_get_optimizer_state())

    def lock_and_get_global_budgets(
        self,
    ) -> tuple[int | None, float | None, int | float | None]:
        with neps_errors():
            return self.redis.lock_and_get_global_budgets()

    # --- sampling

    def _sample_trial(
        self,
        optimizer: Any,
        *,
        worker_id: str,
        trials: dict[str, NepsTrial],
        n: int | None,
    ) -> NepsTrial | list[NepsTrial]:
        """Ask the optimizer for new trials, as NePS's `_sample_trial`; the
        caller holds the optimizer lock and stores them with
        ``_trial_repo.store_new_trial``, together with the optimizer state
        sampled here."""
        ours = {trial_id: self.from_neps(t) for trial_id, t in trials.items()}
        with neps_errors():
            new, self._sampled_state = self.redis.ask(
                NepsOptimizer(optimizer, trials),
                worker_id=worker_id,
                trials=ours,
                n=n,
            )
        converted = [self.to_neps(t) for t in new]
        return converted[0] if n is None else converted

    def _store_new(self, trials: list[NepsTrial]) -> None:
        ours = [self.from_neps(t) for t in trials]
        for trial in ours:
            if trial.metadata.state == State.EVALUATING and trial.token is None:
                # NePS's own runtime may store its trial already evaluating:
                # it is held like any claimed trial, under a token of its own.
                trial.token = secrets.token_hex(16)
                self._claims[trial.id] = trial.token
        sampled_state, self._sampled_state = self._sampled_state, None
        worker_id = trials[0].metadata.sampling_worker_id if trials else ""
        with neps_errors():
            self.redis.store_new_trials(
                ours,
                worker_id=worker_id,
                token=self._optimizer_lock.token or "",
                optimizer_state=sampled_state,
            )
        # A trial's directory is made where it is evaluated (see _hand_out);
        # one stored already evaluating is evaluated here.
        for trial in trials:
            if trial.metadata.state == NepsTrial.State.EVALUATING:
                _make_directory(trial.metadata.location, trial.config)

    def lock_and_sample_trial(
        self, optimizer: Any, *, worker_id: str, n: int | None = None
    ) -> NepsTrial | list[NepsTrial]:
        with self._optimizer_lock.lock():
            trials = self._trial_repo.latest()
            sampled = self._sample_trial(
                optimizer, worker_id=worker_id, trials=trials, n=n
            )
            self._trial_repo.store_new_trial(sampled)
            return sampled

    def sample_and_claim(
        self,
        optimizer: Any,
        *,
        worker_id: str,
        trials: Mapping[str, Trial],
        neps_trials: Mapping[str, NepsTrial],
        n: int | None,
    ) -> NepsTrial:
        """Sample under the optimizer lock this thread holds and store the new
        trials, the first already claimed by `worker_id`, releasing the lease
        in the same script call; returns the claimed trial."""
        token = self._optimizer_lock.token
        assert token is not None, "sample_and_claim needs the optimizer lock"
        with neps_errors():
            new = self.redis.sample_and_claim(
                NepsOptimizer(optimizer, neps_trials),
                worker_id=worker_id,
                token=token,
                trials=trials,
                n=n,
            )
        self._optimizer_lock.released()
        return self._hand_out(new[0])

    def claim(self, worker_id: str) -> NepsTrial | None:
        """The oldest pending trial, claimed for `worker_id` in one atomic
        script call, as NePS would evaluate it on this machine; or None."""
        with neps_errors():
            trial = self.redis.claim_next_pending_trial(worker_id=worker_id)
        return None if trial is None else self._hand_out(trial)

    # --- reports, updates, imports

    def _report_trial_evaluation(
        self, trial: NepsTrial, report: NepsReport, *, worker_id: str | None
    ) -> None:
        """Store the report, fenced by the trial's claim token. A report
        refused because the trial was taken over (the state logs it, and
        keeps the result as a late_report event) does not stop the worker:
        NePS's loop would otherwise end on it."""
        trial.report = report
        ours = self.from_neps(trial)
        try:
            with neps_errors():
                self.redis.lock_and_report_trial_evaluation(
                    ours, ours.report, worker_id=worker_id or ""
                )
        except LeaseLostError:
            logger.debug(
                "Worker %r goes on after losing trial %r.", worker_id, trial.id
            )
        finally:
            self._forget(trial.id)

    def lock_and_report_trial_evaluation(
        self, trial: NepsTrial, report: NepsReport, *, worker_id: str
    ) -> None:
        self._report_trial_evaluation(trial, report, worker_id=worker_id)

    def put_updated_trial(self, trial: NepsTrial, *, hints: Any = None) -> None:
        ours = self.from_neps(trial)
        with neps_errors():
            self.redis.put_updated_trial(ours, hints=hints)
        # A put that claims (NePS's runtime sets a pending trial evaluating)
        # holds it under a fresh token, which its report must present.
        if ours.token is None:
            self._forget(trial.id)
        else:
            self._claims[trial.id] = ours.token

    def lock_and_import_trials(
        self, imported_configs: list, *, worker_id: str
    ) -> list[NepsTrial]:
        if not isinstance(imported_configs, list):
            raise ValueError(
                f"imported_configs must be a list, got {type(imported_configs)}."
            )
        trials = Trial.load_from_dict(
            [
                ImportedConfig(id=c.id, config=c.config, result=c.result)
                for c in imported_configs
            ],
            worker_id=worker_id,
            trial_directory=RedisNePSState.TRIAL_DIRECTORY,
        )
        with self._optimizer_lock.lock(), neps_errors():
            self.redis.store_new_trials(
                trials,
                worker_id=worker_id,
                token=self._optimizer_lock.token or "",
                event="imported",
            )
        for trial in trials:
            logger.info(
                "Imported trial %s with result: %s.",
                trial.id,
                trial.report.objective_to_minimize if trial.report else None,
            )
        return [self.to_neps(t) for t in trials]

    def lock_and_update_global_budgets(
        self,
        *,
        total_evaluations_to_spend: int | None,
        total_cost_to_spend: float | None,
        total_fidelities_to_spend: int | float | None,
    ) -> None:
        updates = {
            "total_evaluations_to_spend": total_evaluations_to_spend,
            "total_cost_to_spend": total_cost_to_spend,
            "total_fidelities_to_spend": total_fidelities_to_spend,
        }
        updates = {k: v for k, v in updates.items() if v is not None}
        if not updates:
            return
        with self._optimizer_lock.lock(), neps_errors():
            opt_state = self.redis.lock_and_get_optimizer_state()
            if opt_state.budget is None:
                opt_state.budget = BudgetInfo()
            for name, value in updates.items():
                setattr(opt_state.budget, name, value)
            self.redis.store_new_trials(
                [],
                worker_id="",
                token=self._optimizer_lock.token or "",
                optimizer_state=opt_state,
                event="budget",
            )

    def lock_and_remove_trial_by_id(self, trial_id: str) -> None:
        """Remove a trial and its own shared errors (NePS drops them all)."""
        with neps_errors():
            self.redis.lock_and_remove_trial_by_id(trial_id)

    def lock_and_reset_trial_by_id(self, trial_id: str) -> None:
        """Reset a trial to pending, dropping its own shared errors (NePS drops
        them all)."""
        with neps_errors():
            self.redis.lock_and_reset_trial_by_id(trial_id)

    # --- opening

    @classmethod
    def open(
        cls,
        binding: Binding,
        root: Path,
        *,
        load_only: bool = False,
        optimizer_info: Mapping[str, Any] | None = None,
        optimizer_state: NepsOptimizationState | None = None,
        pipeline_space: Any = None,
    ) -> RedisBackedNePSState:
        """NePS's `create_or_load` for a root directory bound to a run.

        A different optimizer info or pipeline space raises NePS's NePSError
        in NePS's words, which name what is "on disk": here, the run that
        the root directory is bound to.
        """
        try:
            with neps_errors():
                if load_only:
                    state = RedisNePSState.create_or_load(
                        binding.run,
                        redis=binding.client,
                        load_only=True,
                        allow_pickle=binding.allow_pickle,
                    )
                else:
                    assert optimizer_info is not None
                    assert optimizer_state is not None
                    state = RedisNePSState.create_or_load(
                        binding.run,
                        redis=binding.client,
                        optimizer_info=to_neps_optimizer_info(optimizer_info),
                        optimizer_state=from_neps_optimization_state(optimizer_state),
                        pipeline_space=pipeline_space,
                        allow_pickle=binding.allow_pickle,
                    )
        except (OptimizerInfoMismatchError, PipelineSpaceMismatchError) as error:
            if isinstance(error, OptimizerInfoMismatchError):
                cls_, what = OptimizerInfoMismatchError, "optimizer info"
            else:
                cls_, what = PipelineSpaceMismatchError, "pipeline space"
            worded = cls_(
                f"The {what} on disk does not match the one provided: {root}"
                f" is run '{binding.run}' in Redis.\n{error}"
            )
            raise as_neps_error(worded) from error
        backed = cls(state, root, pipeline_space)
        if not load_only:
            created = _created_at(binding.client, binding.run)
            with contextlib.suppress(NePSError):
                marker = read_marker(root)
                if marker is not None and marker.get("created") != created:
                    _write_marker(root, binding.run, binding.client, created=created)
            _write_optimizer_info_copy(root, state)
            if pipeline_space is not None:
                # As NePS does, hand back the space as it reads back: equal
                # spaces then pickle to equal bytes in every process.
                _write_space_copy(backed._pipeline_space_path, pipeline_space)
                copy = _read_space_copy(backed._pipeline_space_path)
                if copy is not None and (
                    space_fingerprint(copy) == space_fingerprint(pipeline_space)
                ):
                    backed._given_space = copy
        return backed


class NepsOptimizer:
    """A NePS optimizer as `RedisNePSState.ask` calls it: it is shown the
    NePS trials `trials` (the same trials as those `ask` is given, already
    converted) and a NePS BudgetInfo, and its configs come back as this
    package's."""

    def __init__(self, optimizer: Any, trials: Mapping[str, NepsTrial]) -> None:
        self._optimizer = optimizer
        self._trials = trials

    def __call__(
        self, trials: Any, budget_info: BudgetInfo | None, n: int | None = None
    ) -> SampledConfig | list[SampledConfig]:
        del trials
        budget = None
        if budget_info is not None:
            budget = _copy_fields(budget_info, NepsBudgetInfo)
        # NePS calls optimizers by keyword in its state and positionally in
        # AskAndTell; optimizers accept both.
        sampled = self._optimizer(trials=self._trials, budget_info=budget, n=n)
        if isinstance(sampled, list):
            return [self._ours(c) for c in sampled]
        return self._ours(sampled)

    @staticmethod
    def _ours(config: Any) -> SampledConfig:
        return SampledConfig(
            id=config.id,
            config=config.config,
            previous_config_id=config.previous_config_id,
        )


def _write_space_copy(path: Path, space: Any) -> None:
    if path.exists():
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_bytes(pickle.dumps(space, protocol=pickle.HIGHEST_PROTOCOL))
        temporary.replace(path)
    except Exception as error:
        # Without the copy, the space comes from the caller or from Redis.
        logger.debug("Could not keep a copy of the pipeline space: %s", error)


def _read_space_copy(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return pickle.loads(path.read_bytes())  # written by this machine's run
    except Exception as error:
        logger.warning("Could not read %s: %s", path, error)
        return None


def _make_directory(location: str, config: Mapping[str, Any]) -> None:
    """Make a trial's directory on this machine with its ``config.yaml``, as
    NePS does on storing the trial."""
    directory = Path(location)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.yaml"
        if not path.exists():
            neps_serialize(dict(config), path=path, sort_keys=True)
    except Exception as error:
        # The directory is a courtesy to the evaluation function and NePS's
        # path-based tools; the trial itself lives in Redis.
        logger.warning("Could not write trial directory %s: %s", location, error)


class _Backoff:
    """Paces a caller that asks the same question in a loop."""

    def __init__(self) -> None:
        self._interval = 0.0
        self._next = 0.0
        self._last: Any = None

    def wait(self) -> None:
        pause = self._next - time.monotonic()
        if pause > 0:
            time.sleep(pause)

    def observed(self, answer: Any) -> None:
        if answer == self._last:
            self._interval = min(
                max(2 * self._interval, defaults.POLL_MIN_SECONDS),
                defaults.POLL_MAX_SECONDS,
            )
        else:
            self._interval = 0.0
        self._last = answer
        self._next = time.monotonic() + self._interval


# --- NePS's worker, claiming and sampling with one script call each --------


class RedisWorker(DefaultWorker):
    """NePS's `DefaultWorker`, whose next trial comes from Redis.

    NePS's worker takes its optimizer lock and its trial lock, reads every
    trial, checks its stopping criteria, then either sets the oldest pending
    trial evaluating or samples and stores. Here:

    - without run-wide budgets, a claim decides nothing another worker's
      limits depend on, so it needs no lock: this worker's own limits are
      checked on the trials read, then one script claims the oldest pending
      trial;
    - with run-wide budgets, or when nothing is pending, the decision is
      taken under the optimizer lease as in NePS: read, check, then claim or
      sample, and the sample is stored with this worker's own new trial
      already claimed, the lease released in the same script call.
    """

    def _get_next_trial(self) -> NepsTrial | Literal["break"]:
        state = self.state
        if not isinstance(state, RedisBackedNePSState):
            return super()._get_next_trial()

        # Mirrors DefaultWorker._requires_global_stopping_criterion, split
        # into the run's budgets and this worker's own limits. With a run-wide
        # budget the decision is taken under the optimizer lease, as NePS
        # takes it under its optimizer lock: otherwise two workers could both
        # take the last unit of the budget.
        totals = any(v is not None for v in state.lock_and_get_global_budgets())
        settings = self.settings
        own_limits = any(
            value is not None
            for value in (
                settings.worker_evaluations_to_spend,
                settings.worker_cost_to_spend,
                settings.worker_fidelities_to_spend,
                settings.max_evaluation_time_total_seconds,
            )
        )

        if not totals:
            if own_limits and self._should_stop(state.lock_and_read_trials()):
                return "break"
            trial = state.claim(self.worker_id)
            if trial is not None:
                logger.info(
                    "Worker '%s' picked up pending trial: %s.", self.worker_id, trial.id
                )
                return trial

        with state._optimizer_lock.lock(worker_id=self.worker_id):
            ours = state.redis.lock_and_read_trials()
            trials = state._to_neps_trials(ours)
            if (totals or own_limits) and self._should_stop(trials):
                return "break"
            if any(t.metadata.state == State.PENDING for t in ours.values()):
                trial = state.claim(self.worker_id)
                if trial is not None:
                    logger.info(
                        "Worker '%s' picked up pending trial: %s.",
                        self.worker_id,
                        trial.id,
                    )
                    return trial
            trial = state.sample_and_claim(
                self.optimizer,
                worker_id=self.worker_id,
                trials=ours,
                neps_trials=trials,
                n=self.settings.batch_size,
            )
            logger.info("Worker '%s' sampled new trial: %s.", self.worker_id, trial.id)
            return trial

    def _should_stop(self, trials: Mapping[str, NepsTrial]) -> bool:
        should_stop, _usage = self._check_global_stopping_criterion(
            trials, log_status=True
        )
        if should_stop is not False:
            logger.info(should_stop)
            return True
        return False


# --- hooks into NePS ---------------------------------------------------------

_ORIGINAL: dict[str, Any] = {}
_INSTALL_LOCK = threading.Lock()


def _create_or_load(
    cls: type,
    path: Path,
    *,
    load_only: bool = False,
    optimizer_info: Any = None,
    optimizer_state: Any = None,
    pipeline_space: Any = None,
) -> NePSState:
    """NePS's `NePSState.create_or_load`, routed to Redis for a bound root."""
    binding = binding_for(path)
    if binding is None:
        return _ORIGINAL["create_or_load"](
            cls,
            path,
            load_only=load_only,
            optimizer_info=optimizer_info,
            optimizer_state=optimizer_state,
            pipeline_space=pipeline_space,
        )
    return RedisBackedNePSState.open(
        binding,
        _root(path),
        load_only=load_only,
        optimizer_info=optimizer_info,
        optimizer_state=optimizer_state,
        pipeline_space=pipeline_space,
    )


def _import_trials(
    evaluated_trials: Any,
    root_directory: Path | str,
    pipeline_space: Any = None,
    overwrite_root_directory: bool = False,
    optimizer: Any = "auto",
) -> None:
    """`neps.import_trials`, holding the optimizer lease of a bound root's
    run from reading its trials to storing the imported ones."""
    original = _ORIGINAL["import_trials"]
    binding = binding_for(root_directory)
    if binding is None:
        return original(
            evaluated_trials,
            root_directory,
            pipeline_space,
            overwrite_root_directory,
            optimizer,
        )
    root = _root(root_directory)
    if overwrite_root_directory:
        start_afresh(binding, root, worker_id="import_trials")
    try:
        state = RedisNePSState.create_or_load(
            binding.run, redis=binding.client, load_only=True
        )
    except RunNotFoundError:
        # A new run: no sampler can be choosing ids in it yet.
        return original(evaluated_trials, root, pipeline_space, False, optimizer)
    with OptimizerLock(state).lock():
        return original(evaluated_trials, root, pipeline_space, False, optimizer)


def coupling_points() -> dict[str, Any]:
    """The names of NePS's internals this module relies on, with their values
    (a test checks that each exists in the installed NePS)."""
    return {
        "neps.state.NePSState.create_or_load": NePSState.create_or_load,
        "neps.runtime.DefaultWorker": neps.runtime.DefaultWorker,
        "neps.runtime.DefaultWorker._get_next_trial": DefaultWorker._get_next_trial,
        "neps.runtime.DefaultWorker._check_global_stopping_criterion": (
            DefaultWorker._check_global_stopping_criterion
        ),
        "neps.runtime._is_ddp_and_not_rank_zero": (
            neps.runtime._is_ddp_and_not_rank_zero
        ),
        "neps.api.run": neps.api.run,
        "neps.api.import_trials": neps.api.import_trials,
        "neps.state.neps_state.TrialRepo": TrialRepo,
        "neps.utils.files.serialize": neps_serialize,
    }


def install() -> None:
    """Install the hooks into NePS (idempotent; importing this module does it)."""
    with _INSTALL_LOCK:
        if _ORIGINAL:
            return
        _check_neps_version()
        _ORIGINAL["create_or_load"] = NePSState.__dict__["create_or_load"].__func__
        NePSState.create_or_load = classmethod(  # type: ignore[method-assign]
            functools.wraps(_ORIGINAL["create_or_load"])(_create_or_load)
        )
        neps.runtime.DefaultWorker = RedisWorker  # type: ignore[misc]
        _ORIGINAL["import_trials"] = neps.api.import_trials
        wrapped = functools.wraps(neps.api.import_trials)(_import_trials)
        neps.api.import_trials = wrapped
        neps.import_trials = wrapped


def _check_neps_version() -> None:
    from importlib.metadata import version

    text = version("neural-pipeline-search")
    numbers = tuple(int(x) for x in re.findall(r"\d+", text)[:2])
    low, high = TESTED_NEPS
    if not low <= numbers < high:
        logger.warning(
            "neural-pipeline-search %s is installed; neps-redis is tested with"
            " %d.%d.x and may not work with it.",
            text,
            *low,
        )


# --- running -----------------------------------------------------------------


def default_root(run: str) -> Path:
    """The default root directory of run `run` on this machine."""
    name = re.sub(r"[^\w.-]+", "_", run).strip("_") or "run"
    if name != run:
        # Two runs whose names differ only in characters replaced above must
        # not share a directory.
        name += "-" + hashlib.sha256(run.encode()).hexdigest()[:8]
    return Path.cwd() / "neps_redis_runs" / name


def start_afresh(binding: Binding, root: Path, *, worker_id: str = "") -> None:
    """NePS's ``overwrite_root_directory=True``: delete the run in Redis and
    this machine's root directory, unless a worker is alive in the run.

    Raises:
        RunInUseError: (also NePS's NePSError) naming the live workers;
            nothing is deleted.
    """
    with neps_errors():
        deleted = RedisNePSState.delete_run(
            binding.run, redis=binding.client, worker_id=worker_id
        )
    if root.exists():
        logger.info("Deleting root directory %s to start afresh.", root)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_marker(root, binding.run, binding.client)
    logger.info("Run %r starts afresh (%d trials deleted).", binding.run, deleted)


def run(
    evaluate_pipeline: Callable[..., Any] | str,
    pipeline_space: Any = None,
    *,
    run: str,
    redis: Any = None,
    root_directory: str | os.PathLike | None = None,
    allow_pickle: bool | None = None,
    **kwargs: Any,
) -> None:
    """`neps.run`, with the run's shared state in Redis.

    Takes every keyword argument of ``neps.run`` (0.17) with its meaning,
    and:

    Args:
        run: The run's name in Redis. Workers with the same name and server
            work on one run, wherever they are.
        redis: A URL, a redis-py client, or None (NEPS_REDIS_URL, else the
            embedded server if running, else redis://localhost:6379/0).
        root_directory: This machine's directory for what NePS writes
            locally: trial directories (``pipeline_directory``) and summary
            files. Default: ``neps_redis_runs/<run>`` in the working directory.
        allow_pickle: Store the pipeline space in Redis as a pickle, and
            unpickle it when a worker or ``neps.load_pipeline_space`` asks for
            it (NePS keeps it as a pickle file). Default:
            NEPS_REDIS_ALLOW_PICKLE.

    ``overwrite_root_directory=True`` starts the run afresh: it deletes the
    run in Redis and this root directory, but refuses with `RunInUseError`
    (also NePS's NePSError), deleting nothing, while any worker is alive in
    the run.
    """
    validate_run_name(run)
    accepted = set(inspect.signature(_NEPS_RUN).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"neps.run() got unexpected keyword arguments: {unknown}")
    overwrite = bool(kwargs.pop("overwrite_root_directory", False))

    client = connect(redis)
    check_server(client)
    root = _root(root_directory if root_directory is not None else default_root(run))
    binding = Binding(run=run, client=client, allow_pickle=allow_pickle)

    # A DDP rank other than 0 only joins the trials rank 0 evaluates; it
    # must not start the run afresh under it.
    if overwrite and not neps.runtime._is_ddp_and_not_rank_zero():
        start_afresh(binding, root, worker_id=kwargs.get("worker_id") or "")
    existing = read_marker(root)
    if existing is not None and existing["run"] != run:
        raise NePSError(
            f"{root} belongs to run '{existing['run']}', not '{run}'. Use another"
            " root directory for another run."
        )
    current = _created_at(client, run)
    _set_aside_earlier_incarnation(root, existing, current)
    _write_marker(root, run, client, created=current)
    with _BINDINGS_LOCK:
        _BINDINGS[root] = binding

    # NePS decides "is this run continuing?" from the root directory: a copy
    # of the stored optimizer info there makes it see the run in Redis.
    with contextlib.suppress(RunNotFoundError):
        stored = RedisNePSState.create_or_load(
            run, redis=client, load_only=True, allow_pickle=allow_pickle
        )
        _write_optimizer_info_copy(root, stored)

    logger.info(
        "Running NePS on run %r at %s, root directory %s.",
        run,
        describe_client(client),
        root,
    )
    _NEPS_RUN(
        evaluate_pipeline,
        pipeline_space,
        root_directory=root,
        overwrite_root_directory=False,
        **kwargs,
    )


install()

__all__ = [
    "MARKER",
    "Binding",
    "RedisBackedNePSState",
    "RedisWorker",
    "attach",
    "binding_for",
    "coupling_points",
    "install",
    "run",
    "start_afresh",
]
