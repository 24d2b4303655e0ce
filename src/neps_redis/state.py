"""`RedisNePSState`: NePS 0.17's `NePSState` API, kept in Redis.

Every method of NePS's file-based state is here with the same arguments,
return types, ordering and exceptions. Where NePS takes a file lock around
several reads and writes, this class sends one atomic Lua script (see
``lua/``); where NePS must hold a lock across Python code (the optimizer
choosing new configs), it holds the run's optimizer lease, a token with an
expiry that the storing script checks.

A claimed trial is leased to its worker; the state's heartbeat (see
`leases.py`) renews the lease while the trial is held, and live workers
requeue the trials of dead ones.

This module composes the lower floors (model, codec, keys, scripts,
connection, leases); it never imports `neps`, the CLI, the exporter or the
demo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import secrets
import socket
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, overload

from neps_redis import defaults
from neps_redis.cache import TrialCache, TrialsView, read_trial_hashes
from neps_redis.codec import (
    METADATA_FIELDS,
    REPORT_FIELDS,
    decode_hash,
    dumps_json,
    dumps_optimizer_info,
    error_text,
    error_to_fields,
    error_type_name,
    fields_to_error,
    fields_to_optimizer_state,
    fields_to_trial,
    loads_optimizer_info,
    optimizer_state_to_fields,
    trial_to_fields,
)
from neps_redis.connection import (
    aof_wait_ms,
    check_server,
    connect,
    describe_client,
)
from neps_redis.errors import (
    EncodingError,
    InvalidNameError,
    InvalidStateError,
    LeaseLostError,
    NePSError,
    OptimizerInfoMismatchError,
    PipelineSpaceMismatchError,
    RunInUseError,
    RunNotFoundError,
    SchemaVersionError,
    TrialNotFoundError,
)
from neps_redis.keys import RunKeys, validate_trial_id
from neps_redis.leases import (
    Heartbeat,
    HeldTrial,
    SweptTrial,
    read_history,
    renew,
    sweep_expired,
)
from neps_redis.model import (
    BudgetInfo,
    ErrDump,
    ImportedConfig,
    OptimizationState,
    OptimizerInfo,
    Report,
    SampledConfig,
    SerializableTrialError,
    State,
    Trial,
)
from neps_redis.scripts import Scripts

logger = logging.getLogger(__name__)

ALLOW_PICKLE_ENV = "NEPS_REDIS_ALLOW_PICKLE"

# Fields the server manages; a caller's copy of a trial never carries them.
# How long a sampler waiting for the optimizer lease blocks before it tries
# again without being woken (the holder may have died).
_LEASE_RECHECK_SECONDS = 0.1
_LEASE_FIELDS = ("token", "lease_deadline_ms")
_OPTIONAL_FIELDS = (
    tuple(
        name
        for name in METADATA_FIELDS
        if name not in ("id", "state", "location", "sampling_worker_id", "time_sampled")
    )
    + REPORT_FIELDS
)
_EVALUATION_FIELDS = (
    "evaluating_worker_id",
    "evaluation_duration",
    "time_submitted",
    "time_started",
    "time_end",
)


def space_fingerprint(space: Any) -> str:
    """A digest that is equal for pipeline spaces NePS considers equal.

    NePS compares `PipelineSpace`s by their parameter definitions
    (`get_attrs()`) and anything else by its pickle; so does this. Computing
    it pickles, it never unpickles.
    """
    subject = space.get_attrs() if hasattr(space, "get_attrs") else space
    try:
        data = pickle.dumps(subject, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        raise EncodingError(
            f"Cannot fingerprint pipeline_space of type {type(space).__name__}:"
            f" it cannot be pickled ({error})."
        ) from None
    return hashlib.sha256(data).hexdigest()


def optimizer_info_matches(stored: Mapping, given: Mapping) -> bool:
    """NePS's rule: same name, and every stored setting given with the same
    value; settings the stored run lacks are accepted; `derived` is ignored."""
    if stored["name"] != given["name"]:
        return False
    stored_info, given_info = stored["info"] or {}, given["info"] or {}
    return all(k in given_info and given_info[k] == v for k, v in stored_info.items())


def _score(time_sampled: Any) -> str:
    """A pending trial's place in the pending index; NaN sorts last."""
    if time_sampled is None:
        return "inf"
    value = float(time_sampled)
    return "inf" if math.isnan(value) else repr(value)


def _flatten(fields: Mapping[str, Any]) -> list[Any]:
    return [x for pair in fields.items() for x in pair]


class RedisNePSState:
    """The shared state of one run, in Redis.

    Create it with `create_or_load`. All instances of one run, in any process
    on any machine, see the same state.
    """

    # Where trials live relative to a machine's run directory; `location` is
    # stored relative to it, so that each machine can resolve it locally.
    TRIAL_DIRECTORY = Path("configs")

    def __init__(
        self,
        *,
        run: str,
        client: Any,
        optimizer_info: OptimizerInfo,
        optimizer_state: OptimizationState,
        shared_errors: ErrDump,
        pipeline_space: Any,
        space_fingerprint: str,
        allow_pickle: bool,
        heartbeat: bool | None = None,
    ) -> None:
        self.run = run
        self.keys = RunKeys(run)
        self._client = client
        self._scripts = Scripts(client)
        self._optimizer_info = optimizer_info
        self._optimizer_state = optimizer_state
        self._shared_errors = shared_errors
        self._pipeline_space = pipeline_space
        self._space_fingerprint = space_fingerprint
        self._allow_pickle = allow_pickle
        self._pending_hint: list[str] = []
        self._cache = TrialCache(client, self.keys)

        self.lease_seconds = defaults.lease_seconds()
        self.optimizer_lease_seconds = defaults.optimizer_lease_seconds()
        self.optimizer_wait_seconds = defaults.optimizer_wait_seconds()
        self.events_maxlen = defaults.events_maxlen()
        self.request_ttl_ms = defaults.request_ttl_ms()
        # Set by create_or_load: how long a report waits for the AOF, if at all.
        self.wait_aof_ms: int | None = None

        # Liveness (see leases.py): read when the heartbeat starts, so a
        # caller may change them on a fresh state.
        self.heartbeat_enabled = (
            defaults.heartbeat_enabled() if heartbeat is None else heartbeat
        )
        self.heartbeat_seconds = defaults.heartbeat_seconds(self.lease_seconds)
        self.sweep_seconds = defaults.sweep_seconds()
        self.max_attempts = defaults.max_attempts()
        self._heartbeat: Heartbeat | None = None
        self._last_sweep = -math.inf

    def __repr__(self) -> str:
        return f"RedisNePSState(run={self.run!r}, server={self.server!r})"

    @property
    def client(self) -> Any:
        """The redis-py client this state uses."""
        return self._client

    @property
    def server(self) -> str:
        """Where the state lives, without any password."""
        return describe_client(self._client)

    @property
    def allow_pickle(self) -> bool:
        """Whether this state may store and unpickle the pipeline space."""
        return self._allow_pickle

    # --- creation ----------------------------------------------------------

    @classmethod
    def create_or_load(
        cls,
        run: str,
        *,
        redis: Any = None,
        load_only: bool = False,
        optimizer_info: OptimizerInfo | None = None,
        optimizer_state: OptimizationState | None = None,
        pipeline_space: Any = None,
        allow_pickle: bool | None = None,
        heartbeat: bool | None = None,
        wait_aof: bool | None = None,
    ) -> RedisNePSState:
        """Create run `run`, or load it if it exists.

        Args:
            run: The run's name (spaces, colons and unicode are fine; braces
                and control characters are not).
            redis: A URL, a redis-py client, or None (NEPS_REDIS_URL, else the
                embedded server if running, else redis://localhost:6379/0).
            load_only: Only load; raise FileNotFoundError if it does not exist.
            optimizer_info: Required unless `load_only`; compared with the
                stored one as NePS does (NePSError when it differs).
            optimizer_state: Required unless `load_only`; stored on creation.
            pipeline_space: Compared with the stored one by fingerprint
                (NePSError when it differs). Its pickle is stored only when
                `allow_pickle`.
            allow_pickle: Store the pipeline space as a pickle, and unpickle
                it when asked for it. Default: NEPS_REDIS_ALLOW_PICKLE.
            heartbeat: Renew the leases of the trials this state claims from
                a background thread (started with the first claim, stopped
                by `close`). False for callers that keep leases alive
                themselves. Default: on, unless NEPS_REDIS_HEARTBEAT=0.
            wait_aof: Make each report wait until the server wrote it to its
                AOF on disk (WAITAOF; Redis 7.2 and Valkey, with appendonly
                yes). Default: NEPS_REDIS_WAIT_AOF.

        Raises:
            FileNotFoundError: `load_only` and the run does not exist.
            NePSError: Different optimizer info or pipeline space; a run
                written by an incompatible layout version; an evicting server;
                `wait_aof` on a server that cannot wait for its AOF.
        """
        keys = RunKeys(run)
        client = connect(redis)
        wait_aof_ms = aof_wait_ms(client, check_server(client), wait_aof)
        if allow_pickle is None:
            allow_pickle = defaults.env_flag(ALLOW_PICKLE_ENV)

        if load_only:
            stored = cls._read_meta(client, keys)
            if stored is None:
                raise RunNotFoundError(
                    f"No NePS run '{run}' at {describe_client(client)}."
                )
            cls._check_schema(run, stored.get("schema_version"))
            state = cls._load(
                run,
                client,
                stored,
                pipeline_space=None,
                allow_pickle=allow_pickle,
                heartbeat=heartbeat,
            )
            state.wait_aof_ms = wait_aof_ms
            return state

        if optimizer_info is None or optimizer_state is None:
            raise ValueError(
                "optimizer_info and optimizer_state are required unless load_only."
            )

        # Encode everything before the first write: a value that cannot be
        # stored fails here, with nothing written.
        info_json = dumps_optimizer_info(optimizer_info)
        state_fields = optimizer_state_to_fields(optimizer_state)
        fingerprint = (
            "" if pipeline_space is None else space_fingerprint(pipeline_space)
        )
        space_pickle = b""
        if pipeline_space is not None and allow_pickle:
            space_pickle = pickle.dumps(
                pipeline_space, protocol=pickle.HIGHEST_PROTOCOL
            )

        scripts = Scripts(client)
        reply = scripts.run(
            "create_run",
            [keys.meta, keys.optimizer_state, keys.pipeline_space, keys.events],
            [
                defaults.SCHEMA_VERSION,
                info_json,
                fingerprint,
                repr(time.time()),
                defaults.events_maxlen(),
                space_pickle,
                len(state_fields),
                *_flatten(state_fields),
            ],
        )
        outcome = reply[0].decode()
        if outcome == "created":
            logger.info("Created run %r at %s.", run, describe_client(client))
            if optimizer_state.worker_ids:
                for worker_id in optimizer_state.worker_ids:
                    cls._register(client, keys, worker_id)
        else:
            stored_version, stored_info, stored_fingerprint = (
                x.decode() for x in reply[1:4]
            )
            cls._check_schema(run, stored_version)
            existing = loads_optimizer_info(stored_info)
            if not optimizer_info_matches(existing, optimizer_info):
                raise OptimizerInfoMismatchError(
                    "The optimizer info stored for run"
                    f" '{run}' does not match the one provided.\nStored:"
                    f" {existing}\nProvided: {optimizer_info}"
                )
            if fingerprint and stored_fingerprint and fingerprint != stored_fingerprint:
                raise PipelineSpaceMismatchError(
                    f"The pipeline space of run '{run}' does not match the one"
                    " provided.\n\nTo continue this run: either omit the"
                    " pipeline_space parameter or load the existing one. To start"
                    " a new run with a different pipeline space, use a different"
                    " run name or start it afresh."
                )
        stored = cls._read_meta(client, keys)
        assert stored is not None
        state = cls._load(
            run,
            client,
            stored,
            pipeline_space=pipeline_space,
            allow_pickle=allow_pickle,
            heartbeat=heartbeat,
        )
        state.wait_aof_ms = wait_aof_ms
        return state

    @classmethod
    def delete_run(cls, run: str, *, redis: Any = None, worker_id: str = "") -> int:
        """Delete run `run` so that it can start afresh, unless a worker is
        alive in it; returns how many trials were deleted (0: no run).

        A worker is alive while a trial it evaluates has an unexpired lease,
        or while it holds the optimizer lease. The check and the deletion
        are one atomic step. The run's event stream is kept, with a
        `deleted` entry naming `worker_id`, as the record of what was there.

        Raises:
            RunInUseError: (a NePSError) Workers are alive in the run; its
                message names them. Nothing is deleted.
        """
        keys = RunKeys(run)
        client = connect(redis)
        named = [
            keys.meta,
            keys.trials,
            keys.evaluating,
            keys.optimizer_lease,
            keys.worker_info,
            keys.events,
        ]
        others = [k for k in keys.fixed() if k not in named]
        scripts = Scripts(client)
        # The trial index may grow between reading it and the script; the
        # script then answers 'stale' and the read is repeated.
        for _ in range(100):
            ids = [i.decode() for i in client.zrange(keys.trials, 0, -1)]
            reply = scripts.run(
                "delete_run",
                [*named, *others, *(keys.trial(i) for i in ids)],
                [len(others), defaults.events_maxlen(), worker_id, *ids],
            )
            outcome = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            if outcome == "missing":
                return 0
            if outcome == "deleted":
                logger.warning(
                    "Run %r deleted to start afresh: %d trials.", run, int(reply[1])
                )
                return int(reply[1])
            if outcome == "live":
                raise cls._in_use(run, reply[1:])
        raise NePSError(f"Run '{run}' kept changing while it was being deleted.")

    @staticmethod
    def _in_use(run: str, reply: list[Any]) -> RunInUseError:
        texts = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
        sampling = texts[0] == "1"
        live: list[tuple[str, str, int]] = []
        lines = []
        for i in range(1, len(texts), 4):
            trial_id, worker, deadline, record = texts[i : i + 4]
            live.append((trial_id, worker, int(float(deadline))))
            where = ""
            if record:
                info = json.loads(record)
                where = f" on {info.get('host')} (pid {info.get('pid')})"
            lines.append(
                f"  worker '{worker or '?'}'{where} is evaluating trial"
                f" '{trial_id}', lease until"
                f" {time.strftime('%H:%M:%S', time.localtime(int(deadline) / 1000))}"
            )
        if sampling:
            lines.append("  a worker holds the optimizer lease (it is sampling)")
        return RunInUseError(
            f"Run '{run}' has live workers, so it was not deleted to start"
            " afresh:\n" + "\n".join(lines) + "\nStop them first, or join the"
            " run without starting it afresh.",
            live,
            sampling,
        )

    @staticmethod
    def _read_meta(client: Any, keys: RunKeys) -> dict[str, str] | None:
        raw = client.hgetall(keys.meta)
        return decode_hash(raw) if raw else None

    @staticmethod
    def _check_schema(run: str, version: Any) -> None:
        if str(version) != str(defaults.SCHEMA_VERSION):
            raise SchemaVersionError(
                f"Run '{run}' was written with key layout version {version}; this"
                f" neps-redis reads version {defaults.SCHEMA_VERSION}. Use a"
                " neps-redis release that matches the run."
            )

    @classmethod
    def _load(
        cls,
        run: str,
        client: Any,
        meta: dict[str, str],
        *,
        pipeline_space: Any,
        allow_pickle: bool,
        heartbeat: bool | None = None,
    ) -> RedisNePSState:
        state = cls(
            run=run,
            client=client,
            optimizer_info=loads_optimizer_info(meta["optimizer_info"]),
            optimizer_state=None,  # type: ignore[arg-type]
            shared_errors=ErrDump(),
            pipeline_space=pipeline_space,
            space_fingerprint=meta.get("space_fingerprint", ""),
            allow_pickle=allow_pickle,
            heartbeat=heartbeat,
        )
        state._optimizer_state = state._read_optimizer_state()
        state._shared_errors = state.lock_and_get_errors()
        return state

    @staticmethod
    def _register(client: Any, keys: RunKeys, worker_id: str | None) -> str:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        reply = Scripts(client).run(
            "register_worker",
            [keys.meta, keys.workers, keys.worker_info, keys.events, _request(keys)],
            [
                worker_id or "",
                dumps_json(record, "worker record"),
                defaults.events_maxlen(),
                defaults.request_ttl_ms(),
            ],
        )
        return reply.decode()

    # --- equality ----------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RedisNePSState):
            return NotImplemented
        return (
            self.run == other.run
            and self.server == other.server
            and self._optimizer_info == other._optimizer_info
            and self._optimizer_state == other._optimizer_state
            and self._shared_errors == other._shared_errors
            and self._space_fingerprint == other._space_fingerprint
        )

    __hash__ = None  # type: ignore[assignment]

    # --- workers -----------------------------------------------------------

    def lock_and_set_new_worker_id(self, worker_id: str | None = None) -> str:
        """Reserve a worker id (default ``worker_<n>``) and return it.

        Raises:
            NePSError: The id is already taken.
        """
        if worker_id is not None and not isinstance(worker_id, str):
            raise InvalidNameError(
                f"A worker id must be a str, got {type(worker_id).__name__}."
            )
        worker_id = self._register(self._client, self.keys, worker_id)
        logger.info("Worker %r registered in run %r.", worker_id, self.run)
        return worker_id

    # --- reads -------------------------------------------------------------

    def all_trial_ids(self) -> list[str]:
        """Every trial id, in creation order."""
        return [i.decode() for i in self._client.zrange(self.keys.trials, 0, -1)]

    def _read_trials(self, ids: Iterable[str]) -> dict[str, Trial]:
        """The trials with these ids, in the order given; missing ones skipped."""
        return {
            trial_id: fields_to_trial(fields)
            for trial_id, fields in read_trial_hashes(
                self._client, self.keys, list(ids)
            )[0]
            if fields is not None
        }

    def lock_and_read_trials(self) -> TrialsView:
        """Every trial, by id in creation order, as a read-only mapping.

        Served from this process's copy of the run, brought up to date from
        the event stream: the cost grows with the changes since the last
        read, not with the run. A later read never changes what an earlier
        one returned, but the trials themselves are shared between reads:
        change a copy (`copy.deepcopy`), not them. `.copy()` gives a dict.
        """
        return self._cache.read()

    def lock_and_get_trial_by_id(self, trial_id: str) -> Trial:
        """One trial.

        Raises:
            TrialNotFoundError: No trial has this id.
        """
        raw = self._client.hgetall(self.keys.trial(trial_id))
        if not raw:
            raise TrialNotFoundError(
                f"Trial '{trial_id}' not found in run '{self.run}'."
            )
        return fields_to_trial(decode_hash(raw))

    def unsafe_retry_get_trial_by_id(self, trial_id: str) -> Trial:
        """One trial; connection faults are retried by the client itself, so
        this is `lock_and_get_trial_by_id` (kept for NePS's callers)."""
        return self.lock_and_get_trial_by_id(trial_id)

    @overload
    def lock_and_get_next_pending_trial(self) -> Trial | None: ...

    @overload
    def lock_and_get_next_pending_trial(self, n: int) -> list[Trial]: ...

    def lock_and_get_next_pending_trial(
        self, n: int | None = None
    ) -> Trial | list[Trial] | None:
        """The oldest pending trial(s) by time_sampled, without claiming them."""
        count = 1 if n is None else n
        if count <= 0:
            return None if n is None else []
        ids = [i.decode() for i in self._client.zrange(self.keys.pending, 0, count - 1)]
        trials = list(self._read_trials(ids).values())
        if n is None:
            return trials[0] if trials else None
        return trials

    def lock_and_get_current_evaluating_trials(self) -> list[Trial]:
        """Every evaluating trial, in creation order."""
        ids = [i.decode() for i in self._client.zrange(self.keys.evaluating, 0, -1)]
        trials = self._read_trials(ids)
        order = {
            i.decode(): s
            for i, s in self._client.zrange(self.keys.trials, 0, -1, withscores=True)
            if i.decode() in trials
        }
        return sorted(trials.values(), key=lambda t: order.get(t.id, math.inf))

    def lock_and_get_errors(self) -> ErrDump:
        """The shared errors, oldest first."""
        entries = self._client.xrange(self.keys.errors)
        return ErrDump([fields_to_error(decode_hash(fields)) for _, fields in entries])

    def lock_and_get_optimizer_info(self) -> OptimizerInfo:
        """The stored optimizer info."""
        raw = self._client.hget(self.keys.meta, "optimizer_info")
        if raw is None:
            raise RunNotFoundError(f"Run '{self.run}' no longer exists.")
        return loads_optimizer_info(raw)

    @property
    def fidelity_name(self) -> str | None:
        """The config key of the fidelity, if the optimizer recorded one."""
        derived = self._optimizer_info.get("derived") or {}
        return (derived.get("fidelity") or {}).get("name")

    def _read_optimizer_state(self) -> OptimizationState:
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self.keys.optimizer_state)
        pipe.zrange(self.keys.workers, 0, -1)
        return self._optimizer_state_from(*pipe.execute())

    def _optimizer_state_from(
        self, raw: Any, workers: list[bytes]
    ) -> OptimizationState:
        if not raw:
            raise RunNotFoundError(f"Run '{self.run}' has no optimizer state.")
        worker_ids = [w.decode() for w in workers] or None
        return fields_to_optimizer_state(raw, worker_ids)

    def worker_ids(self) -> list[str]:
        """Every registered worker id, in registration order."""
        return [w.decode() for w in self._client.zrange(self.keys.workers, 0, -1)]

    def lock_and_get_optimizer_state(self) -> OptimizationState:
        """The stored optimizer state, worker ids included."""
        return self._read_optimizer_state()

    def lock_and_get_search_space(self) -> Any:
        """The pipeline space.

        The pickled space stored in Redis is unpickled only when this state
        was opened with `allow_pickle`; otherwise the space this process gave
        to `create_or_load` is returned (None if it gave none).
        """
        if self._pipeline_space is not None:
            return self._pipeline_space
        if not self._allow_pickle:
            if self._client.exists(self.keys.pipeline_space):
                raise NePSError(
                    f"Run '{self.run}' stores a pickled pipeline space, but"
                    " unpickling data read from Redis runs code of whoever can"
                    " write to it. Open the state with allow_pickle=True (or set"
                    f" {ALLOW_PICKLE_ENV}=1) if you trust the server."
                )
            return None
        data = self._client.get(self.keys.pipeline_space)
        return None if data is None else pickle.loads(data)  # opted in above

    def lock_and_get_global_budgets(
        self,
    ) -> tuple[int | None, float | None, int | float | None]:
        """The run-wide budgets (evaluations, cost, fidelities)."""
        budget = self._read_optimizer_state().budget
        if budget is None:
            return None, None, None
        return (
            budget.total_evaluations_to_spend,
            budget.total_cost_to_spend,
            budget.total_fidelities_to_spend,
        )

    # --- the optimizer lease -----------------------------------------------

    def _acquire_optimizer_lease(self) -> str:
        """Take the run's optimizer lease, waiting for it; returns its token."""
        token = secrets.token_hex(16)
        ttl_ms = int(self.optimizer_lease_seconds * 1000)
        deadline = time.monotonic() + self.optimizer_wait_seconds
        while not self._client.set(
            self.keys.optimizer_lease, token, nx=True, px=ttl_ms
        ):
            # A SET whose reply was lost is sent again by the client and then
            # finds the lease taken: by its own first copy.
            if self._client.get(self.keys.optimizer_lease) == token.encode():
                break
            if time.monotonic() > deadline:
                raise NePSError(
                    f"Could not take the optimizer lease of run '{self.run}' within"
                    f" {self.optimizer_wait_seconds:.0f} s."
                )
            self._wait_for_release(deadline)
        return token

    def _lease_and_read(self) -> tuple[str, TrialsView, OptimizationState]:
        """Take the run's optimizer lease, waiting for it, and read the trials
        and the optimizer state under it; the lease and the reads share their
        first round trip. Returns the lease's token and what was read."""
        token = secrets.token_hex(16)
        ttl_ms = int(self.optimizer_lease_seconds * 1000)
        deadline = time.monotonic() + self.optimizer_wait_seconds
        keys = self.keys

        def take_and_read(pipe: Any) -> None:
            pipe.set(keys.optimizer_lease, token, nx=True, px=ttl_ms)
            # A SET whose reply was lost is sent again by the client and then
            # finds the lease taken: by its own first copy.
            pipe.get(keys.optimizer_lease)
            pipe.hgetall(keys.optimizer_state)
            pipe.zrange(keys.workers, 0, -1)

        while True:
            trials, (taken, holder, raw, workers) = self._cache.read_with(take_and_read)
            if taken or holder == token.encode():
                return token, trials, self._optimizer_state_from(raw, workers)
            if time.monotonic() > deadline:
                raise NePSError(
                    f"Could not take the optimizer lease of run '{self.run}' within"
                    f" {self.optimizer_wait_seconds:.0f} s."
                )
            self._wait_for_release(deadline)

    def _wait_for_release(self, deadline: float) -> None:
        """Block until a holder gives the optimizer lease up, or a tenth of a
        second passes: a holder that died gives nothing up, its lease merely
        expires, so the waiter must look again now and then."""
        timeout = min(_LEASE_RECHECK_SECONDS, deadline - time.monotonic())
        if timeout > 0:
            self._client.blpop([self.keys.optimizer_free], timeout=timeout)

    def _release_optimizer_lease(self, token: str) -> None:
        self._scripts.run(
            "release_lease",
            [self.keys.optimizer_lease, self.keys.optimizer_free],
            [token],
        )

    def _store(
        self,
        trials: list[Trial],
        *,
        state_fields: Mapping[str, Any],
        token: str,
        release: bool,
        event: str,
        worker_id: str,
    ) -> None:
        """Run store_trials for new trials and optimizer-state fields."""
        args: list[Any] = [
            token,
            "1" if release else "",
            event,
            worker_id,
            self.events_maxlen,
            self.request_ttl_ms,
            int(self.lease_seconds * 1000),
            len(state_fields),
            *_flatten(state_fields),
        ]
        trial_keys = []
        for trial in trials:
            fields = trial_to_fields(trial)
            if fields["state"] == State.EVALUATING.value and trial.token is None:
                # Every evaluating trial is held under a token: without one
                # its report could not be fenced, nor its lease renewed.
                trial.token = secrets.token_hex(16)
            if trial.token is not None:
                fields["token"] = trial.token
            if fields["state"] == State.EVALUATING.value:
                # Stored already claimed: this is its first claim.
                fields["attempts"] = "1"
            args += [
                trial.id,
                fields["state"],
                _score(trial.metadata.time_sampled),
                len(fields),
                *_flatten(fields),
            ]
            trial_keys.append(self.keys.trial(trial.id))
        keys = self.keys
        self._scripts.run(
            "store_trials",
            [
                keys.meta,
                keys.optimizer_lease,
                keys.optimizer_state,
                keys.trials,
                keys.pending,
                keys.evaluating,
                keys.finished,
                keys.counts,
                keys.events,
                _request(keys),
                keys.optimizer_free,
                *trial_keys,
            ],
            args,
        )
        lease_ms = int(self.lease_seconds * 1000)
        for trial in trials:
            if trial.metadata.state == State.EVALUATING and trial.token:
                holder = trial.metadata.evaluating_worker_id or worker_id
                self._hold(trial.id, trial.token, holder, lease_ms)

    # --- sampling ----------------------------------------------------------

    @overload
    def lock_and_sample_trial(
        self, optimizer: Any, *, worker_id: str, n: None = None
    ) -> Trial: ...

    @overload
    def lock_and_sample_trial(
        self, optimizer: Any, *, worker_id: str, n: int
    ) -> list[Trial]: ...

    def lock_and_sample_trial(
        self, optimizer: Any, *, worker_id: str, n: int | None = None
    ) -> Trial | list[Trial]:
        """Ask the optimizer for new trials and store them, pending.

        The optimizer sees every trial and the budget exactly as NePS passes
        them. Reading, asking and storing form one critical section under the
        optimizer lease, so ids chosen from the trials seen cannot collide.

        Raises:
            TrialAlreadyExistsError: The optimizer chose an id that exists;
                nothing is stored.
            LeaseLostError: The optimizer took longer than the lease.
        """
        token, seen, opt_state = self._lease_and_read()
        try:
            new, opt_state = self._ask(
                optimizer,
                worker_id=worker_id,
                seen=seen,
                used_cost=self._cache.used_cost(),
                opt_state=opt_state,
                n=n,
            )
            self.store_new_trials(
                new,
                worker_id=worker_id,
                token=token,
                optimizer_state=opt_state,
                release=True,
            )
            logger.debug("Worker %r sampled %s.", worker_id, [t.id for t in new])
        except BaseException:
            self._release_optimizer_lease(token)
            raise
        if n is None:
            return new[0]
        return new

    def ask(
        self,
        optimizer: Any,
        *,
        worker_id: str,
        trials: Mapping[str, Trial] | None = None,
        n: int | None = None,
    ) -> tuple[list[Trial], OptimizationState]:
        """Run the optimizer as NePS does, and store nothing.

        The caller holds the optimizer lease. The optimizer sees `trials`
        (default: every trial, read now) and the stored budget with NePS's
        usage filled in, with the stored RNG snapshot as the global RNG state.
        Returns the new trials, pending, and the optimizer state to store
        with them (`store_new_trials`), its RNG snapshot taken after sampling.
        """
        if trials is None:
            seen: Mapping[str, Trial] = self.lock_and_read_trials()
            used_cost = self._cache.used_cost()
        else:
            seen = trials
            used_cost = sum(
                t.report.cost
                for t in seen.values()
                if t.report is not None and t.report.cost is not None
            )
        return self._ask(
            optimizer,
            worker_id=worker_id,
            seen=seen,
            used_cost=used_cost,
            opt_state=self._read_optimizer_state(),
            n=n,
        )

    def _ask(
        self,
        optimizer: Any,
        *,
        worker_id: str,
        seen: Mapping[str, Trial],
        used_cost: float,
        opt_state: OptimizationState,
        n: int | None,
    ) -> tuple[list[Trial], OptimizationState]:
        opt_state.seed_snapshot.set_as_global_seed_state()
        if opt_state.budget is not None:
            opt_state.budget.used_cost_budget = used_cost
            opt_state.budget.used_evaluations = len(seen)

        sampled = optimizer(
            trials=seen,
            budget_info=None if opt_state.budget is None else opt_state.budget.clone(),
            n=n,
        )
        if not isinstance(sampled, list):
            sampled = [sampled]
        # Duck-typed: NePS's own SampledConfig class is as good as ours.
        if not sampled or not all(
            hasattr(c, "id") and hasattr(c, "config") for c in sampled
        ):
            raise TypeError(
                "The optimizer must return a SampledConfig or a non-empty list"
                f" of them; it returned {sampled!r:.100}. Nothing was stored."
            )

        new: list[Trial] = []
        for config in sampled:
            new.append(self._new_trial(config, seen, worker_id))
        opt_state.seed_snapshot.recapture()
        return new, opt_state

    def store_new_trials(
        self,
        trials: list[Trial],
        *,
        worker_id: str,
        token: str,
        optimizer_state: OptimizationState | None = None,
        release: bool = False,
        event: str = "sampled",
    ) -> None:
        """Store new trials, and the optimizer state sampled with them, in one
        step fenced by the optimizer lease `token` the caller holds.

        A trial in state evaluating is stored claimed: its lease starts now
        and its `token` (set by the caller) fences its report. With `release`
        the optimizer lease is given up in the same step.

        Raises:
            TrialAlreadyExistsError: An id exists; nothing is stored.
            LeaseLostError: The optimizer lease expired; nothing is stored.
        """
        for trial in trials:
            validate_trial_id(trial.id)
        fields = {} if optimizer_state is None else self._state_fields(optimizer_state)
        self._store(
            trials,
            state_fields=fields,
            token=token,
            release=release,
            event=event,
            worker_id=worker_id,
        )
        # The sampler usually claims next: offer its new trials first, so the
        # claim needs no extra round trip to learn the head of the queue.
        pending = [t.id for t in trials if t.metadata.state == State.PENDING]
        self._pending_hint = pending + self._pending_hint

    def sample_and_claim(
        self,
        optimizer: Any,
        *,
        worker_id: str,
        token: str,
        trials: Mapping[str, Trial] | None = None,
        n: int | None = None,
    ) -> list[Trial]:
        """The sampling worker's step in NePS's runtime: ask the optimizer,
        then store the new trials with the first one already evaluating for
        `worker_id` (its lease and claim token set), releasing the optimizer
        lease `token` the caller holds, all in one script call.

        Returns the new trials, the claimed one first. See `ask` and
        `store_new_trials` for what the optimizer sees and what may fail.
        """
        new, opt_state = self.ask(optimizer, worker_id=worker_id, trials=trials, n=n)
        mine = new[0]
        mine.set_evaluating(time_started=time.time(), worker_id=worker_id)
        mine.token = secrets.token_hex(16)
        self.store_new_trials(
            new,
            worker_id=worker_id,
            token=token,
            optimizer_state=opt_state,
            release=True,
        )
        logger.info(
            "Worker %r sampled %s and claimed trial %r.",
            worker_id,
            [t.id for t in new],
            mine.id,
        )
        return new

    def take_optimizer_lease(self) -> str:
        """Take the run's optimizer lease, waiting for it, for a critical
        section of the caller's own; returns its token. Give it up with
        `release_optimizer_lease`, or by storing with `release`."""
        return self._acquire_optimizer_lease()

    def release_optimizer_lease(self, token: str) -> None:
        """Give up the optimizer lease, if `token` still holds it."""
        self._release_optimizer_lease(token)

    def _new_trial(
        self, config: SampledConfig, seen: Mapping[str, Trial], worker_id: str
    ) -> Trial:
        validate_trial_id(config.id)
        previous_location = None
        if config.previous_config_id is not None:
            previous = seen.get(config.previous_config_id)
            if previous is None:
                raise ValueError(
                    f"Previous trial '{config.previous_config_id}' not found."
                )
            previous_location = previous.metadata.location
        return Trial.new(
            trial_id=config.id,
            config=config.config,
            # Exactly the id: NePS strips leading zeros of rung ids here, which
            # would give "1_rung_01" and "1_rung_1" one directory.
            location=str(self.TRIAL_DIRECTORY / f"config_{config.id}"),
            previous_trial=config.previous_config_id,
            previous_trial_location=previous_location,
            time_sampled=time.time(),
            worker_id=worker_id,
        )

    @staticmethod
    def _state_fields(opt_state: OptimizationState) -> dict[str, Any]:
        fields: dict[str, Any] = {"budget": "", "shared_state": ""}
        fields.update(optimizer_state_to_fields(opt_state))
        return fields

    def lock_and_update_global_budgets(
        self,
        *,
        total_evaluations_to_spend: int | None,
        total_cost_to_spend: float | None,
        total_fidelities_to_spend: int | float | None,
    ) -> None:
        """Set the run-wide budgets that are not None."""
        updates = {
            "total_evaluations_to_spend": total_evaluations_to_spend,
            "total_cost_to_spend": total_cost_to_spend,
            "total_fidelities_to_spend": total_fidelities_to_spend,
        }
        updates = {k: v for k, v in updates.items() if v is not None}
        if not updates:
            return
        token = self._acquire_optimizer_lease()
        try:
            opt_state = self._read_optimizer_state()
            if opt_state.budget is None:
                opt_state.budget = BudgetInfo()
            for name, value in updates.items():
                setattr(opt_state.budget, name, value)
            self._store(
                [],
                state_fields=self._state_fields(opt_state),
                token=token,
                release=True,
                event="budget",
                worker_id="",
            )
        except BaseException:
            self._release_optimizer_lease(token)
            raise

    # --- imports -----------------------------------------------------------

    def lock_and_import_trials(
        self, imported_configs: list[ImportedConfig], *, worker_id: str
    ) -> list[Trial]:
        """Store results obtained elsewhere as finished trials (state
        external), all or none.

        Raises:
            ValueError: `imported_configs` is not a list.
            TrialAlreadyExistsError: An id exists; nothing is imported.
        """
        if not isinstance(imported_configs, list):
            raise ValueError(
                f"imported_configs must be a list, got {type(imported_configs)}."
            )
        trials = Trial.load_from_dict(
            imported_configs,
            worker_id=worker_id,
            trial_directory=self.TRIAL_DIRECTORY,
        )
        for trial in trials:
            validate_trial_id(trial.id)
        token = self._acquire_optimizer_lease()
        try:
            self._store(
                trials,
                state_fields={},
                token=token,
                release=True,
                event="imported",
                worker_id=worker_id,
            )
        except BaseException:
            self._release_optimizer_lease(token)
            raise
        logger.info("Imported %d trials into run %r.", len(trials), self.run)
        return trials

    # --- claiming ----------------------------------------------------------

    def claim_next_pending_trial(
        self, *, worker_id: str, lease_seconds: float | None = None
    ) -> Trial | None:
        """The oldest pending trial, now evaluating for `worker_id`, or None.

        One atomic step: no trial is ever given to two workers. The returned
        trial carries the claim token that fences its report, and this
        state's heartbeat renews its lease until it is reported.
        `lease_seconds` (default NEPS_REDIS_LEASE_SECONDS) sets this claim's
        lease, for a trial that must outlive this process without being
        renewed (results that arrive later from elsewhere).

        When nothing is pending, trials whose lease expired are requeued
        first (at most once per sweep interval, run-wide), so a dead
        worker's trial is claimed again.
        """
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidNameError("worker_id must be a non-empty str.")
        lease_ms = int(1000 * (lease_seconds or self.lease_seconds))
        trial = self._claim(worker_id, lease_ms)
        if trial is None and self._sweep_if_due():
            trial = self._claim(worker_id, lease_ms)
        return trial

    def _claim(self, worker_id: str, lease_ms: int) -> Trial | None:
        time_started = repr(time.time())
        token = secrets.token_hex(16)
        request = _request(self.keys)
        candidates = self._pending_hint[: defaults.CLAIM_CANDIDATES]
        if not candidates:
            # Without a hint, reading the head of the queue first makes the
            # claim one script call rather than a blind one answered 'stale'.
            head = self._client.zrange(
                self.keys.pending, 0, defaults.CLAIM_CANDIDATES - 1
            )
            candidates = [i.decode() for i in head]
            if not candidates:
                return None
        while True:
            keys = self.keys
            try:
                reply = self._scripts.run(
                    "claim",
                    [
                        keys.pending,
                        keys.evaluating,
                        keys.finished,
                        keys.counts,
                        keys.events,
                        request,
                        *(keys.trial(c) for c in candidates),
                    ],
                    [
                        worker_id,
                        time_started,
                        lease_ms,
                        token,
                        self.events_maxlen,
                        self.request_ttl_ms,
                        *candidates,
                    ],
                )
            except LeaseLostError:
                # This claim's reply was lost and, before the client sent it
                # again, the trial was taken away (reset, removed, taken
                # over). It is not ours: claim afresh.
                request, token = _request(self.keys), secrets.token_hex(16)
                continue
            outcome = reply[0].decode()
            if outcome == "empty":
                self._pending_hint = []
                return None
            if outcome == "stale":
                candidates = [i.decode() for i in reply[1:]]
                continue
            trial_id = reply[1].decode()
            self._pending_hint = [c for c in candidates if c != trial_id]
            fields = dict(zip(reply[2::2], reply[3::2], strict=True))
            trial = fields_to_trial(decode_hash(fields))
            self._hold(trial_id, token, worker_id, lease_ms)
            logger.info("Worker %r claimed trial %r.", worker_id, trial_id)
            return trial

    # --- reports and updates -----------------------------------------------

    def lock_and_report_trial_evaluation(
        self, trial: Trial, report: Report, *, worker_id: str
    ) -> None:
        """Store the report of an evaluated trial (set complete beforehand with
        `Trial.set_complete`), and its error in the shared errors.

        A trial returned by `claim_next_pending_trial` carries a claim token:
        if the trial is no longer held under it (its lease expired and it was
        requeued, or it was reset or taken over), nothing is stored, the
        result is kept as a `late_report` event and LeaseLostError is raised.
        A copy without a token reports only a trial that nobody holds and that
        has no result yet.

        Raises:
            LeaseLostError: The trial is no longer held under the copy's token.
            InvalidStateError: The trial already has a result (success, failed
                or crashed); reset it first to evaluate it again. The refused
                result is kept as a `late_report` event.
        """
        self._cache.forget(trial.id)
        trial.report = report
        fields = trial_to_fields(trial)
        clear = [f for f in (*_OPTIONAL_FIELDS, *_LEASE_FIELDS) if f not in fields]
        err_fields: dict[str, str] = {}
        if report.err is not None:
            err_fields = error_to_fields(
                SerializableTrialError(
                    trial_id=trial.id,
                    worker_id=worker_id,
                    err_type=error_type_name(report.err) or "Exception",
                    err=error_text(report.err),
                    tb=report.tb,
                )
            )
        keys = self.keys
        try:
            self._scripts.run(
                "report",
                [
                    keys.trial(trial.id),
                    keys.pending,
                    keys.evaluating,
                    keys.finished,
                    keys.counts,
                    keys.errors,
                    keys.events,
                    _request(keys),
                ],
                [
                    trial.id,
                    trial.token or "",
                    worker_id,
                    fields["state"],
                    _score(trial.metadata.time_sampled),
                    self.events_maxlen,
                    self.request_ttl_ms,
                    int(self.lease_seconds * 1000),
                    len(clear),
                    *clear,
                    2 * len(fields),
                    *_flatten(fields),
                    2 * len(err_fields),
                    *_flatten(err_fields),
                ],
                wait_aof_ms=self.wait_aof_ms,
            )
        except LeaseLostError:
            self._release(trial.id)
            logger.warning(
                "Worker %r's report of trial %r in run %r was refused: its lease"
                " was lost (expired or taken over); kept as a late_report event.",
                worker_id,
                trial.id,
                self.run,
            )
            raise
        except InvalidStateError:
            logger.warning(
                "Worker %r's report of trial %r in run %r was refused: the trial"
                " already has a result; kept as a late_report event.",
                worker_id,
                trial.id,
                self.run,
            )
            raise
        self._release(trial.id)
        if trial.metadata.state != State.EVALUATING:
            # The claim ended with the report; the stored trial has no token.
            trial.token = None
        logger.info(
            "Worker %r reported trial %r as %s.",
            worker_id,
            trial.id,
            report.reported_as,
        )

    def put_updated_trial(
        self, trial: Trial, *, hints: list[str] | str | None = None
    ) -> None:
        """Replace the stored trial with this copy (`hints` are accepted for
        NePS's callers; the whole trial is always written, in one step).

        Fenced like a report: the copy must carry the claim token the stored
        trial is held under (a copy read from the run does), else nothing is
        written and LeaseLostError is raised. A copy made evaluating from a
        pending one (NePS's runtime claims that way) gets a fresh claim token,
        set on `trial`, and its lease is renewed by this state's heartbeat.
        """
        del hints
        self._cache.forget(trial.id)
        fields = trial_to_fields(trial)
        clear = [f for f in _OPTIONAL_FIELDS if f not in fields]
        evaluating = trial.metadata.state == State.EVALUATING
        token = (trial.token or secrets.token_hex(16)) if evaluating else None
        if token is None:
            clear += list(_LEASE_FIELDS)
        else:
            fields["token"] = token
        worker_id = trial.metadata.evaluating_worker_id or ""
        lease_ms = int(self.lease_seconds * 1000)
        try:
            self._put(trial, fields, clear, worker_id, lease_ms)
        except LeaseLostError:
            self._release(trial.id)
            logger.warning(
                "An update of trial %r in run %r was refused: it is held under"
                " another claim token; kept as a late_update event.",
                trial.id,
                self.run,
            )
            raise
        trial.token = token
        if token is None:
            self._release(trial.id)
        else:
            self._hold(trial.id, token, worker_id, lease_ms)

    def _put(
        self,
        trial: Trial,
        fields: dict[str, str],
        clear: list[str],
        worker_id: str,
        lease_ms: int,
    ) -> None:
        keys = self.keys
        self._scripts.run(
            "put_trial",
            [
                keys.trial(trial.id),
                keys.pending,
                keys.evaluating,
                keys.finished,
                keys.counts,
                keys.events,
                _request(keys),
            ],
            [
                trial.id,
                worker_id,
                fields["state"],
                _score(trial.metadata.time_sampled),
                self.events_maxlen,
                self.request_ttl_ms,
                lease_ms,
                trial.token or "",
                len(clear),
                *clear,
                2 * len(fields),
                *_flatten(fields),
            ],
        )

    def lock_and_reset_trial_by_id(self, trial_id: str) -> None:
        """Put a trial back to pending, dropping its report and its errors.

        Raises:
            TrialNotFoundError: (a NePSError) No trial has this id.
        """
        keys = self.keys
        self._scripts.run(
            "reset_trial",
            [
                keys.trial(trial_id),
                keys.pending,
                keys.evaluating,
                keys.finished,
                keys.counts,
                keys.errors,
                keys.events,
                _request(keys),
            ],
            [
                trial_id,
                self.events_maxlen,
                self.request_ttl_ms,
                *REPORT_FIELDS,
                *_EVALUATION_FIELDS,
                *_LEASE_FIELDS,
                # A reset trial starts over: as many lost workers as a new
                # one before it is marked crashed (its history stays).
                "attempts",
            ],
        )
        self._release(trial_id)
        logger.info("Trial %r of run %r reset to pending.", trial_id, self.run)

    def lock_and_remove_trial_by_id(self, trial_id: str) -> None:
        """Delete a trial and its own shared errors.

        Raises:
            TrialNotFoundError: (a NePSError) No trial has this id.
        """
        keys = self.keys
        self._scripts.run(
            "remove_trial",
            [
                keys.trial(trial_id),
                keys.trials,
                keys.pending,
                keys.evaluating,
                keys.finished,
                keys.counts,
                keys.errors,
                keys.events,
                _request(keys),
            ],
            [trial_id, self.events_maxlen, self.request_ttl_ms],
        )
        self._release(trial_id)
        logger.info("Trial %r removed from run %r.", trial_id, self.run)

    # --- liveness (see leases.py) -------------------------------------------

    def _heartbeat_thread(self) -> Heartbeat:
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(
                self._client,
                self.keys,
                interval=self.heartbeat_seconds,
                sweep_interval=self.sweep_seconds,
                max_attempts=self.max_attempts,
                events_maxlen=self.events_maxlen,
                request_ttl_ms=self.request_ttl_ms,
            )
            # A state dropped without `close` must not leave its thread
            # renewing leases nobody will report.
            weakref.finalize(self, self._heartbeat.stop, 0)
        return self._heartbeat

    def _hold(self, trial_id: str, token: str, worker_id: str, lease_ms: int) -> None:
        if self.heartbeat_enabled:
            self._heartbeat_thread().hold(
                HeldTrial(trial_id, token, worker_id, lease_ms)
            )

    def _release(self, trial_id: str) -> None:
        if self._heartbeat is not None:
            self._heartbeat.release(trial_id)

    def lease_lost(self, trial_id: str) -> bool:
        """Whether this state's heartbeat found that it lost the trial (its
        lease expired and it was requeued, or it was reset or taken over):
        its report will be refused, so its evaluation may stop early."""
        return self._heartbeat is not None and self._heartbeat.is_lost(trial_id)

    def renew_lease(self, trial: Trial, *, lease_seconds: float | None = None) -> bool:
        """Renew the lease of a trial this caller holds, now; returns False
        if it is lost. For callers that keep leases alive themselves (with
        ``heartbeat=False``), or a process finishing a trial that another
        one claimed (async evaluation), which holds it by its token."""
        if not trial.token:
            return False
        lease_ms = int(1000 * (lease_seconds or self.lease_seconds))
        held = HeldTrial(
            trial.id, trial.token, trial.metadata.evaluating_worker_id or "", lease_ms
        )
        lost = renew(
            self._scripts,
            self.keys,
            held.worker_id,
            [held],
            request_ttl_ms=self.request_ttl_ms,
        )
        return trial.id not in lost

    def _sweep_if_due(self) -> bool:
        """Requeue expired trials unless this state swept within the sweep
        interval; returns whether any trial went back to pending."""
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_seconds:
            return False
        self._last_sweep = now
        swept = self._sweep(force=False)
        return any(s.outcome == "requeued" for s in swept or [])

    def _sweep(self, *, force: bool) -> list[SweptTrial] | None:
        return sweep_expired(
            self._client,
            self.keys,
            scripts=self._scripts,
            max_attempts=self.max_attempts,
            lock_ms=max(1, int(self.sweep_seconds * 1000)),
            force=force,
            events_maxlen=self.events_maxlen,
            request_ttl_ms=self.request_ttl_ms,
        )

    def requeue_expired(self) -> list[tuple[str, str]]:
        """Requeue now every trial whose lease expired; returns each trial
        acted on with its outcome: 'requeued' (back to pending), or
        'crashed' (it had used its NEPS_REDIS_MAX_ATTEMPTS attempts).

        Live workers do this by themselves; this is for doing it on demand
        (``neps-redis reap``). A sweep of another worker in progress is
        taken over, so only one acts at a time.
        """
        return [(s.trial_id, s.outcome) for s in self._sweep(force=True) or []]

    def attempt_history(self, trial_id: str) -> list[dict[str, Any]]:
        """The attempts of a trial that lost their lease, oldest first: each
        ``{"attempt", "worker_id", "time_started", "lease_deadline_ms",
        "reason"}``. Kept apart from the shared errors, which NePS's error
        policy acts on.

        Raises:
            TrialNotFoundError: No trial has this id.
        """
        return read_history(self._client, self.keys, trial_id)

    def close(self) -> None:
        """Stop this state's heartbeat. Leases of trials still held are left
        to expire, so a live worker should report (or reset) them first."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()

    def __enter__(self) -> RedisNePSState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- counts ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of trials in each state (states with none are left out)."""
        raw = decode_hash(self._client.hgetall(self.keys.counts))
        return {k: int(v) for k, v in raw.items() if int(v) > 0}


def _request(keys: RunKeys) -> str:
    """A fresh request key: one per write call, reused by redis-py's replays."""
    return keys.request(uuid.uuid4().hex)
