"""Every Redis key of a run, spelled in this one place.

All keys of run R start with ``neps:{R}:``. The braces make R the hash tag,
so every key of a run lives in one Redis Cluster slot and a script may touch
any of them. Scripts never build keys: they receive them in ``KEYS``.

| key                        | type   | holds                                        |
|----------------------------|--------|----------------------------------------------|
| ``meta``                   | hash   | schema version, optimizer info, counters     |
| ``trial:<id>``             | hash   | one trial: metadata, config, report, lease   |
| ``trials``                 | zset   | every trial id, scored by creation order     |
| ``pending``                | zset   | pending ids, scored by time_sampled          |
| ``evaluating``             | zset   | evaluating ids, scored by lease deadline     |
| ``finished``               | zset   | every other id, scored by creation order     |
| ``counts``                 | hash   | number of trials per state                   |
| ``errors``                 | stream | the shared errors (NePS's shared_errors)     |
| ``events``                 | stream | every transition, capped                     |
| ``workers``                | zset   | worker ids, scored by registration order     |
| ``worker_info``            | hash   | worker id -> JSON record (host, pid, times)  |
| ``optimizer_state``        | hash   | budget, RNG snapshot, shared state           |
| ``optimizer_lease``        | string | token of the sampler holding the lease       |
| ``optimizer_free``         | list   | one element after each release, for waiters  |
| ``sweep_lock``             | string | token of the last requeue sweep; expires     |
| ``pipeline_space``         | string | pickled pipeline space (only when opted in)  |
| ``request:<id>``           | string | reply of a write, kept briefly for replays   |
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from neps_redis.errors import InvalidNameError

PREFIX = "neps"

# A trial id becomes the directory name ``config_<id>``; most filesystems
# cap a name at 255 bytes.
MAX_TRIAL_ID_BYTES = 255 - len("config_")
MAX_RUN_NAME_CHARS = 200


def _control_chars(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) == "Cc"]


def validate_run_name(run: str) -> str:
    """Return `run` if it can name a run, else raise InvalidNameError."""
    if not isinstance(run, str):
        raise InvalidNameError(f"A run name must be a str, got {type(run).__name__}.")
    if not run.strip():
        raise InvalidNameError("A run name must not be empty or only spaces.")
    if len(run) > MAX_RUN_NAME_CHARS:
        raise InvalidNameError(
            f"Run name is {len(run)} characters long; at most"
            f" {MAX_RUN_NAME_CHARS} are allowed."
        )
    if "{" in run or "}" in run:
        raise InvalidNameError(
            f"Run name {run!r} contains '{{' or '}}', which would break the hash"
            " tag that keeps a run's keys in one Redis Cluster slot."
        )
    if bad := _control_chars(run):
        raise InvalidNameError(f"Run name {run!r} contains control characters {bad!r}.")
    return run


def validate_trial_id(trial_id: str) -> str:
    """Return `trial_id` if it can name a trial, else raise InvalidNameError.

    Ids become directory names on export, so anything that is not a single
    safe path component is refused.
    """
    if not isinstance(trial_id, str):
        raise InvalidNameError(
            f"A trial id must be a str, got {type(trial_id).__name__}: {trial_id!r}."
        )
    if trial_id in ("", ".", ".."):
        raise InvalidNameError(
            f"Trial id {trial_id!r} is not allowed: it cannot name a directory."
        )
    for bad in ("/", "\\", "\x00"):
        if bad in trial_id:
            raise InvalidNameError(
                f"Trial id {trial_id!r} contains {bad!r}; ids become directory"
                " names (config_<id>) and must be one path component."
            )
    if bad_chars := _control_chars(trial_id):
        raise InvalidNameError(
            f"Trial id {trial_id!r} contains control characters {bad_chars!r}."
        )
    if len(trial_id.encode()) > MAX_TRIAL_ID_BYTES:
        raise InvalidNameError(
            f"Trial id {trial_id[:40]!r}... is longer than {MAX_TRIAL_ID_BYTES}"
            " bytes, too long for a directory name."
        )
    return trial_id


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run."""

    run: str

    def __post_init__(self) -> None:
        validate_run_name(self.run)

    @property
    def base(self) -> str:
        """The prefix shared by every key of the run, hash tag included."""
        return f"{PREFIX}:{{{self.run}}}:"

    @property
    def pattern(self) -> str:
        """A SCAN/ACL pattern matching every key of the run (and only those)."""
        escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in self.base)
        return escaped + "*"

    def _key(self, name: str) -> str:
        return self.base + name

    @property
    def meta(self) -> str:
        return self._key("meta")

    @property
    def trials(self) -> str:
        return self._key("trials")

    @property
    def pending(self) -> str:
        return self._key("pending")

    @property
    def evaluating(self) -> str:
        return self._key("evaluating")

    @property
    def finished(self) -> str:
        return self._key("finished")

    @property
    def counts(self) -> str:
        return self._key("counts")

    @property
    def errors(self) -> str:
        return self._key("errors")

    @property
    def events(self) -> str:
        return self._key("events")

    @property
    def workers(self) -> str:
        return self._key("workers")

    @property
    def worker_info(self) -> str:
        return self._key("worker_info")

    @property
    def optimizer_state(self) -> str:
        return self._key("optimizer_state")

    @property
    def optimizer_lease(self) -> str:
        return self._key("optimizer_lease")

    @property
    def optimizer_free(self) -> str:
        """A list that gets one element whenever the optimizer lease is given
        up; a sampler waiting for the lease blocks on it (BLPOP)."""
        return self._key("optimizer_free")

    @property
    def sweep_lock(self) -> str:
        return self._key("sweep_lock")

    @property
    def pipeline_space(self) -> str:
        return self._key("pipeline_space")

    def trial(self, trial_id: str) -> str:
        """The hash of one trial."""
        return self._key(f"trial:{trial_id}")

    def request(self, request_id: str) -> str:
        """Where the reply of one write request is kept for replays."""
        return self._key(f"request:{request_id}")

    def trial_id_of(self, key: str | bytes) -> str:
        """The trial id inside a trial key (inverse of `trial`)."""
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self._key("trial:")) :]

    def fixed(self) -> list[str]:
        """Every key of the run whose name does not depend on an id."""
        return [
            self.meta,
            self.trials,
            self.pending,
            self.evaluating,
            self.finished,
            self.counts,
            self.errors,
            self.events,
            self.workers,
            self.worker_info,
            self.optimizer_state,
            self.optimizer_lease,
            self.optimizer_free,
            self.sweep_lock,
            self.pipeline_space,
        ]
