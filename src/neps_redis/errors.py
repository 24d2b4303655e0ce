"""Exceptions, and the one table of error codes that the Lua scripts return.

A script fails with an error reply whose first word is a code from
`ERROR_CODES`; `scripts.py` turns that word back into the exception class
listed here. The same table is handed to every script as a Lua table, so a
code cannot exist on one side only.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from typing import Any


class NePSError(Exception):
    """Base class of every error this package raises, as in NePS."""


class TrialAlreadyExistsError(NePSError):
    """A trial with this id is already stored in the run."""

    def __init__(self, trial_id: str, *args: Any) -> None:
        super().__init__(trial_id, *args)
        self.trial_id = trial_id

    def __str__(self) -> str:
        return f"Trial with id {self.trial_id} already exists!"


class TrialNotFoundError(NePSError):
    """No trial with this id is stored in the run."""


class RunNotFoundError(NePSError, FileNotFoundError):
    """The run does not exist (it is also a FileNotFoundError, as in NePS)."""


class InvalidArgumentError(NePSError, ValueError):
    """A value the caller gave is refused as such, before anything was
    changed: the command line reports it as a usage error (exit code 2)."""


class InvalidNameError(InvalidArgumentError):
    """A run name or trial id that cannot be stored safely."""


class InvalidURLError(InvalidArgumentError):
    """A Redis URL that cannot be parsed, or whose scheme is unknown."""


class EncodingError(NePSError, TypeError):
    """A value that cannot be stored exactly; the message names field and type."""


class SchemaVersionError(NePSError):
    """The run was written by an incompatible version of the key layout."""


class LeaseLostError(NePSError):
    """The caller no longer holds the lease it presents (trial or optimizer)."""


class WorkerLostError(NePSError):
    """A trial lost its worker (its lease expired) on every allowed attempt.

    Never raised: its name is the `err_type` of the crash that the requeue
    sweep records in the shared errors.
    """


class OptimizerInfoMismatchError(NePSError):
    """A run was reopened with optimizer info other than the stored one."""


class PipelineSpaceMismatchError(NePSError):
    """A run was reopened with a pipeline space other than the stored one."""


class RunInUseError(NePSError):
    """The run cannot start afresh: workers are alive in it.

    `live` lists, per trial evaluating under a live lease, the trial id, the
    worker id and the lease deadline (ms, server clock); `sampling` is True
    when a worker holds the optimizer lease.
    """

    def __init__(self, message: str, live: list[tuple[str, str, int]], sampling: bool):
        super().__init__(message)
        self.live = live
        self.sampling = sampling


class UnsafeServerError(NePSError):
    """The Redis server is configured so that it could silently lose the run."""


class ServerNotFoundError(NePSError):
    """No redis-server or valkey-server binary could be found."""


class InvalidStateError(NePSError):
    """A transition was asked for a trial in a state that does not allow it."""


class RunExistsError(NePSError):
    """The run exists already, where a new one was asked for."""


class CorruptRunError(NePSError):
    """A file of a NePS run directory cannot be read as NePS wrote it.

    `path` is the file, `line` the line (1-based) where known, else None,
    and `reason` what is wrong with it.
    """

    def __init__(self, path: Any, line: int | None, reason: str) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


# code -> (exception class, what it means). Lua sees the codes as `E.<CODE>`.
ERROR_CODES: dict[str, tuple[type[NePSError], str]] = {
    "NEPS_TRIAL_EXISTS": (TrialAlreadyExistsError, "a trial id is already stored"),
    "NEPS_TRIAL_NOT_FOUND": (TrialNotFoundError, "no trial with this id"),
    "NEPS_RUN_NOT_FOUND": (RunNotFoundError, "the run has not been created"),
    "NEPS_LEASE_LOST": (LeaseLostError, "the presented lease token is not current"),
    "NEPS_WORKER_EXISTS": (NePSError, "the worker id is already registered"),
    "NEPS_SCHEMA": (SchemaVersionError, "the run's layout version is not ours"),
    "NEPS_BAD_STATE": (InvalidStateError, "the trial's state forbids this"),
    "NEPS_BAD_ARGUMENT": (NePSError, "a script argument is malformed"),
    "NEPS_RUN_EXISTS": (RunExistsError, "the run exists already"),
}
