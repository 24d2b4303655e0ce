"""Liveness of claimed trials: heartbeats renew leases, sweeps requeue the
trials of dead workers.

A claimed trial is leased to its worker until its ``lease_deadline_ms``
(server clock). A `Heartbeat` thread in each worker process renews the
leases of every trial the process holds, in one script call, whatever the
evaluation is doing meanwhile. When a worker dies its renewals stop, the
deadline passes, and the next sweep (`sweep_expired`, run by any live
worker) puts the trial back to pending, or marks it crashed after its last
attempt. A worker that comes back after its trial was taken over learns it
from its next heartbeat, and its report is refused by the claim token it
carries.

This module never imports `state.py`, which composes it; it runs Lua only
through `scripts.py`.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from neps_redis import defaults
from neps_redis.codec import loads_json
from neps_redis.connection import private_client, retry_policy
from neps_redis.errors import TrialNotFoundError, WorkerLostError
from neps_redis.keys import RunKeys
from neps_redis.scripts import Scripts

logger = logging.getLogger(__name__)

# redis-py's own retries on a heartbeat's connection: enough to re-send a
# renewal whose reply was lost (the request key answers the copy), few
# enough that a long outage returns to the heartbeat loop, which keeps
# trying at its own pace and can be stopped.
_HEARTBEAT_CLIENT_RETRIES = 3

# A heartbeat waits this long at most for a reply, however long its
# interval: a partitioned server must not hold the thread for minutes.
_HEARTBEAT_MAX_TIMEOUT = 5.0


@dataclass(frozen=True)
class HeldTrial:
    """A trial this process holds: what its heartbeat presents to renew it."""

    trial_id: str
    token: str
    worker_id: str
    lease_ms: int


@dataclass(frozen=True)
class SweptTrial:
    """One trial a sweep acted on, and what became of it."""

    trial_id: str
    outcome: Literal["requeued", "crashed"]
    worker_id: str
    attempt: int


def _request(keys: RunKeys) -> str:
    # One per write call; redis-py re-sends the same one after a lost reply.
    return keys.request(uuid.uuid4().hex)


def server_time_ms(client: Any) -> int:
    """The server's clock in milliseconds, the clock leases are kept in."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def expired_trial_ids(client: Any, keys: RunKeys, now_ms: int, limit: int) -> list[str]:
    """Up to `limit` evaluating trials whose lease deadline is before `now_ms`,
    the longest expired first."""
    ids = client.zrangebyscore(keys.evaluating, "-inf", f"({now_ms}", 0, limit)
    return [i.decode() for i in ids]


def renew(
    scripts: Scripts,
    keys: RunKeys,
    worker_id: str,
    held: Sequence[HeldTrial],
    *,
    request_ttl_ms: int,
) -> list[str]:
    """Renew the leases of `held` and stamp the worker's record; returns the
    ids of the trials whose lease was lost."""
    args: list[Any] = [worker_id, request_ttl_ms]
    for trial in held:
        args += [trial.trial_id, trial.token, trial.lease_ms]
    reply = scripts.run(
        "heartbeat",
        [
            keys.evaluating,
            keys.worker_info,
            _request(keys),
            *(keys.trial(t.trial_id) for t in held),
        ],
        args,
    )
    return [i.decode() for i in reply]


def _log_swept(run: str, swept: Iterable[SweptTrial], max_attempts: int) -> None:
    for trial in swept:
        if trial.outcome == "requeued":
            logger.warning(
                "Lease of trial %r in run %r expired (worker %r, attempt %d);"
                " requeued.",
                trial.trial_id,
                run,
                trial.worker_id,
                trial.attempt,
            )
        else:
            logger.error(
                "Trial %r in run %r lost its worker %r on attempt %d of %d;"
                " marked crashed.",
                trial.trial_id,
                run,
                trial.worker_id,
                trial.attempt,
                max_attempts,
            )


def sweep_expired(
    client: Any,
    keys: RunKeys,
    *,
    scripts: Scripts,
    max_attempts: int,
    lock_ms: int,
    force: bool,
    events_maxlen: int,
    request_ttl_ms: int,
    batch: int = defaults.SWEEP_BATCH,
) -> list[SweptTrial] | None:
    """Requeue every trial whose lease has expired (crash it after its last
    attempt); returns what was done.

    The run's sweep lock keeps sweeps apart. A sweep takes it for `lock_ms`
    and leaves it to expire, so all workers of a run together sweep at most
    once per `lock_ms`; without `force`, a sweep that finds the lock taken
    does nothing and returns None. With `force` (a sweep asked for on
    demand) it takes the lock over: a sweep in progress then finds its
    token gone and stops before writing, so still only one acts.
    """
    now = server_time_ms(client)
    if not expired_trial_ids(client, keys, now, 1):
        return []
    token = secrets.token_hex(16)
    if force:
        client.set(keys.sweep_lock, token, px=lock_ms)
    elif not client.set(keys.sweep_lock, token, nx=True, px=lock_ms):
        return None

    swept: list[SweptTrial] = []
    takeovers = 0
    busy = False
    while ids := expired_trial_ids(client, keys, server_time_ms(client), batch):
        reply = scripts.run(
            "requeue_expired",
            [
                keys.sweep_lock,
                keys.pending,
                keys.evaluating,
                keys.finished,
                keys.counts,
                keys.errors,
                keys.events,
                _request(keys),
                *(keys.trial(i) for i in ids),
            ],
            [
                token,
                max_attempts,
                repr(time.time()),
                WorkerLostError.__name__,
                events_maxlen,
                request_ttl_ms,
                *ids,
            ],
        )
        if reply[0] == b"busy":
            # Another sweep took the lock after this one read its candidates.
            if not force or takeovers >= 3:
                busy = True
                break
            takeovers += 1
            client.set(keys.sweep_lock, token, px=lock_ms)
            continue
        acted = [
            SweptTrial(
                trial_id=reply[i].decode(),
                outcome=reply[i + 1].decode(),  # type: ignore[arg-type]
                worker_id=reply[i + 2].decode(),
                attempt=int(reply[i + 3]),
            )
            for i in range(1, len(reply), 4)
        ]
        swept += acted
        # A candidate the script leaves alone stays at the head of the index;
        # without progress, reading it again would loop for ever.
        if len(ids) < batch or not acted:
            break

    _log_swept(keys.run, swept, max_attempts)
    return None if busy and not swept and not force else swept


def read_history(client: Any, keys: RunKeys, trial_id: str) -> list[dict[str, Any]]:
    """The attempts of a trial that lost their lease, oldest first."""
    pipe = client.pipeline(transaction=False)
    pipe.exists(keys.trial(trial_id))
    pipe.hget(keys.trial(trial_id), "history")
    exists, raw = pipe.execute()
    if not exists:
        raise TrialNotFoundError(f"Trial '{trial_id}' not found in run '{keys.run}'.")
    return [] if raw is None else list(loads_json(raw))


class Heartbeat:
    """Renews, from a thread of its own, the leases of the trials a process
    holds, and sweeps the run for expired leases now and then.

    It starts with the first trial it is given to hold and runs until
    `stop`. The thread has its own connections, so it neither waits behind
    the caller's commands nor shares a pipeline with them; it renews every
    `interval` seconds however long the evaluation runs, and when the server
    cannot be reached it keeps trying with backoff. A trial found lost (its
    lease expired and it was requeued, or another worker took it over) is
    dropped from the held set and remembered, so the worker can ask
    `is_lost` and stop evaluating early.
    """

    def __init__(
        self,
        client: Any,
        keys: RunKeys,
        *,
        interval: float,
        sweep_interval: float | None,
        max_attempts: int,
        events_maxlen: int,
        request_ttl_ms: int,
    ) -> None:
        self._source = client
        self._keys = keys
        self.interval = interval
        self.sweep_interval = sweep_interval
        self.max_attempts = max_attempts
        self.events_maxlen = events_maxlen
        self.request_ttl_ms = request_ttl_ms

        self._held: dict[str, HeldTrial] = {}
        self._workers: set[str] = set()
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._client: Any = None
        self._scripts: Scripts | None = None
        self._last_sweep = -float("inf")
        self.beats = 0

    def __repr__(self) -> str:
        return (
            f"Heartbeat(run={self._keys.run!r}, interval={self.interval:g},"
            f" held={sorted(self._held)})"
        )

    # --- what it holds ---------------------------------------------------

    def hold(self, trial: HeldTrial) -> None:
        """Renew `trial`'s lease from now on; starts the thread if needed."""
        with self._lock:
            self._held[trial.trial_id] = trial
            self._workers.add(trial.worker_id)
            self._lost.discard(trial.trial_id)
        self._ensure_running()

    def release(self, trial_id: str) -> None:
        """Stop renewing the trial's lease (it was reported, reset, removed)."""
        with self._lock:
            self._held.pop(trial_id, None)
            self._lost.discard(trial_id)

    def held(self) -> list[str]:
        """The ids of the trials whose leases it renews."""
        with self._lock:
            return sorted(self._held)

    def is_lost(self, trial_id: str) -> bool:
        """Whether a heartbeat found that this process lost the trial."""
        with self._lock:
            return trial_id in self._lost

    # --- one beat --------------------------------------------------------

    def _connect(self) -> tuple[Any, Scripts]:
        with self._connect_lock:
            if self._client is None or self._scripts is None:
                timeout = max(1.0, min(_HEARTBEAT_MAX_TIMEOUT, self.interval))
                self._client = private_client(
                    self._source,
                    retry=retry_policy(_HEARTBEAT_CLIENT_RETRIES),
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                )
                self._scripts = Scripts(self._client)
            return self._client, self._scripts

    def beat(self) -> list[str]:
        """Renew every held lease now, in one script call per worker id;
        returns the ids of the trials found lost."""
        _client, scripts = self._connect()
        with self._lock:
            by_worker: dict[str, list[HeldTrial]] = {w: [] for w in self._workers}
            for trial in self._held.values():
                by_worker.setdefault(trial.worker_id, []).append(trial)

        lost: list[str] = []
        for worker_id, held in by_worker.items():
            gone = renew(
                scripts,
                self._keys,
                worker_id,
                held,
                request_ttl_ms=self.request_ttl_ms,
            )
            sent = {t.trial_id: t for t in held}
            with self._lock:
                for trial_id in gone:
                    # The caller may have reported the trial (or claimed it
                    # again) while the renewal was on its way; only the claim
                    # that was presented is lost.
                    if self._held.get(trial_id) == sent[trial_id]:
                        del self._held[trial_id]
                        self._lost.add(trial_id)
                        lost.append(trial_id)
                        logger.warning(
                            "Worker %r lost its lease on trial %r in run %r: it"
                            " expired or was taken over, so its report will be"
                            " refused.",
                            worker_id,
                            trial_id,
                            self._keys.run,
                        )
        self.beats += 1
        return lost

    def sweep(self) -> list[SweptTrial] | None:
        """One sweep of the run for expired leases, unless another worker
        swept within the sweep interval (then None)."""
        client, scripts = self._connect()
        interval = self.sweep_interval or self.interval
        return sweep_expired(
            client,
            self._keys,
            scripts=scripts,
            max_attempts=self.max_attempts,
            lock_ms=max(1, int(interval * 1000)),
            force=False,
            events_maxlen=self.events_maxlen,
            request_ttl_ms=self.request_ttl_ms,
        )

    # --- the thread ------------------------------------------------------

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._pid == os.getpid()

    def _ensure_running(self) -> None:
        with self._lock:
            if self.running or self._stopping.is_set():
                return
            # After a fork the child has the parent's thread object but no
            # thread, and must not use the parent's connections.
            if self._pid != os.getpid():
                self._client = self._scripts = None
                self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run,
                name=f"neps-redis-heartbeat-{self._keys.run}",
                daemon=True,
            )
            self._thread.start()
        logger.debug("Heartbeat of run %r started.", self._keys.run)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close its connections; held leases are left to
        expire (or to be reported)."""
        self._stopping.set()
        thread = self._thread
        current = threading.current_thread()
        if thread is not None and thread.is_alive() and thread is not current:
            thread.join(timeout)
        with self._connect_lock:
            client, self._client, self._scripts = self._client, None, None
        if client is not None and client is not self._source:
            client.close()

    def _run(self) -> None:
        failures = 0
        delay = self.interval
        while not self._stopping.wait(delay):
            try:
                self.beat()
                if (
                    self.sweep_interval is not None
                    and time.monotonic() - self._last_sweep >= self.sweep_interval
                ):
                    self._last_sweep = time.monotonic()
                    self.sweep()
            except (RedisConnectionError, RedisTimeoutError) as error:
                failures += 1
                # Full jitter, capped by the interval: many workers that lost
                # one server must not all come back in the same instant.
                delay = random.uniform(0, min(self.interval, 0.1 * 2**failures))
                log = logger.warning if failures == 1 else logger.debug
                log(
                    "Heartbeat of run %r cannot reach the server (%s); retrying.",
                    self._keys.run,
                    error,
                )
                continue
            except Exception:
                logger.exception("Heartbeat of run %r failed.", self._keys.run)
                failures = 0
                delay = self.interval
                continue
            if failures:
                logger.info(
                    "Heartbeat of run %r reached the server again after %d failed"
                    " tries.",
                    self._keys.run,
                    failures,
                )
            failures = 0
            delay = self.interval
