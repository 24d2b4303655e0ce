"""NePS's directory layout, out of Redis (snapshots) and into it (import).

Export: `export_run` writes a run as the directory NePS 0.17's file-based
state writes, so that NePS's own tools (``neps.status``, ``load_*``,
``NePSState.create_or_load(..., load_only=True)``) read it. Each export is
a complete snapshot in a fresh folder beside the target
(``DIR.snapshots/<time>-<n>/``); the target ``DIR`` is a symlink that is
switched to the new folder in one atomic rename, so a reader of ``DIR``
sees either the previous snapshot or the new one, never a mix. Files that
did not change since the previous snapshot are hard links to it.
`export_periodically` repeats this, re-encoding only the trials that
changed, found through the run's event stream.

Import: `import_run` reads a run directory written by NePS 0.16 or 0.17
(from the ``config_<id>`` folders, never from ``.trial_cache.pkl``) and
stores it in Redis in one script, all or nothing, so that a running study
can move to Redis and continue.

This module reads the run through the state's client and keys and writes
only through ``lua/import_run.lua``; it never imports `neps`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from redis.exceptions import RedisError

from neps_redis import defaults, neps_files, neps_pickle, neps_summary
from neps_redis.codec import (
    decode_hash,
    dumps_json,
    dumps_optimizer_info,
    error_to_fields,
    fields_to_error,
    fields_to_optimizer_state,
    fields_to_trial,
    loads_optimizer_info,
    optimizer_state_to_fields,
    trial_to_fields,
)
from neps_redis.connection import check_server, connect
from neps_redis.errors import (
    CorruptRunError,
    EncodingError,
    InvalidNameError,
    NePSError,
    RunExistsError,
    RunNotFoundError,
)
from neps_redis.keys import RunKeys, validate_trial_id
from neps_redis.model import (
    OptimizationState,
    OptimizerInfo,
    SeedSnapshot,
    SerializableTrialError,
    State,
    Trial,
)
from neps_redis.scripts import Scripts
from neps_redis.state import RedisNePSState, optimizer_info_matches

logger = logging.getLogger(__name__)

# How many snapshots of a directory are kept, the newest included. Two
# give a reader that resolved DIR just before a swap one whole period to
# finish reading.
DEFAULT_KEEP = 2

SNAPSHOTS_SUFFIX = ".snapshots"

# Hash fields that say who holds a trial's lease and where it sits in the
# run's order: nothing of NePS's, so a change to them is no change to export.
_NOT_EXPORTED = ("token", "lease_deadline_ms", "seq")

# How often a read is retried to catch trials that changed while it ran.
_READ_ATTEMPTS = 8

_TRIAL_CACHE = f"{neps_files.CONFIGS_DIR}/{neps_files.TRIAL_CACHE_FILE}"
_SUMMARY = neps_summary.SUMMARY_FILES

# `progress(step, done, total)`: `done` of the `total` trials have passed
# `step` ("read", "encode" and "write" in an export; "read" and "store" in
# an import). Called often; keep it cheap.
ProgressCallback = Callable[[str, int, int], None]

_SNAPSHOT_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-(\d+|replaced)$")
_LOCATION = re.compile(r"(?:^|/)(configs/config_[^/]+)/?$")


# --- reading a run at one moment ---------------------------------------------


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _after(position: str) -> str:
    """The smallest stream id after `position` (XRANGE's exclusive start
    needs Redis 6.2; this works everywhere)."""
    ms, seq = _stream_id(position)
    return f"{ms}-{seq + 1}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _exported_fields(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    fields = decode_hash(raw)
    for name in _NOT_EXPORTED:
        fields.pop(name, None)
    return fields


def _event_trial_ids(entries: Iterable[tuple[Any, Mapping[bytes, bytes]]]) -> set[str]:
    return {
        trial_id.decode()
        for _, entry in entries
        if (trial_id := entry.get(b"trial_id")) is not None
    }


@dataclass
class _RunView:
    """Everything one export writes, read from Redis."""

    ids: list[str]  # creation order
    raw: Mapping[str, dict[str, str]]  # id -> exported hash fields
    errors: list[SerializableTrialError]
    optimizer_info: OptimizerInfo
    optimizer_state: OptimizationState
    space_pickle: bytes | None
    consistent: bool
    full: bool


class _RunReader:
    """Keeps every trial's hash fields of one run, brought up to date by
    reading only the trials the event stream names.

    Every transition that changes a trial emits an event naming it (see
    ``lua/``), so the trials named by the events after the position the
    copy was current at are exactly the ones to read again. A read ends in
    one MULTI/EXEC that also reads the errors, the optimizer state and the
    events that arrived meanwhile; if those name trials it did not read, it
    reads them again, so that the view is the run at one moment: an error
    is listed exactly when its trial's report is.
    """

    def __init__(self, state: RedisNePSState, *, with_space: bool) -> None:
        self._client = state.client
        self._keys: RunKeys = state.keys
        self._run = state.run
        self._with_space = with_space
        self._raw: dict[str, dict[str, str]] = {}
        self._position: str | None = None
        self._created: str | None = None

    def read(self, progress: ProgressCallback | None = None) -> _RunView:
        """The run as it is now; raises RunNotFoundError if it is gone."""
        while True:
            pending = None if self._position is None else self._catch_up()
            full = pending is None
            if pending is None:
                self._bulk_read(progress)
                pending = set()
            view = self._settle(pending, full=full)
            if view is not None:
                return view
            logger.info(
                "The events of run %r no longer tell what changed (the run was"
                " created anew or its events trimmed); reading every trial.",
                self._run,
            )
            self._position = None

    def _settle(self, pending: set[str], *, full: bool) -> _RunView | None:
        """Transactions until one holds every trial as of its own moment."""
        view = None
        for _ in range(_READ_ATTEMPTS):
            view, stale = self._transaction(pending, full=full)
            if view is None or not stale:
                return view
            pending = stale
        logger.debug(
            "Run %r kept changing during %d reads; %d trials are a moment older.",
            self._run,
            _READ_ATTEMPTS,
            len(pending),
        )
        assert view is not None
        view.consistent = False
        return view

    def _catch_up(self) -> set[str] | None:
        """The trials changed since the last read, or None when the stream
        no longer tells (it was trimmed past our position or the run was
        created anew)."""
        assert self._position is not None
        keys = self._keys
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(keys.meta, "created_at")
        pipe.xrange(keys.events, "-", "+", count=1)
        pipe.xrange(keys.events, _after(self._position), "+")
        created, first, entries = pipe.execute()
        if _text(created) != self._created:
            return None
        if (
            first
            and self._position != "0-0"
            and _stream_id(_text(first[0][0]) or "0-0") > _stream_id(self._position)
        ):
            return None
        return _event_trial_ids(entries)

    def _bulk_read(self, progress: ProgressCallback | None) -> None:
        """Every trial, in chunks; trials that change meanwhile show up in
        the events after the position taken first."""
        keys = self._keys
        pipe = self._client.pipeline(transaction=False)
        pipe.xrevrange(keys.events, "+", "-", count=1)
        pipe.hget(keys.meta, "created_at")
        pipe.zrange(keys.trials, 0, -1)
        last, created, ids = pipe.execute()
        if created is None:
            raise RunNotFoundError(f"Run '{self._run}' does not exist.")
        self._created = _text(created)
        self._position = _text(last[0][0]) if last else "0-0"

        ids = [i.decode() for i in ids]
        self._raw = {}
        for start in range(0, len(ids), defaults.READ_CHUNK):
            chunk = ids[start : start + defaults.READ_CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for trial_id in chunk:
                pipe.hgetall(keys.trial(trial_id))
            for trial_id, raw in zip(chunk, pipe.execute(), strict=True):
                if raw:
                    self._raw[trial_id] = _exported_fields(raw)
            if progress is not None:
                progress("read", start + len(chunk), len(ids))

    def _transaction(
        self, pending: set[str], *, full: bool
    ) -> tuple[_RunView | None, set[str]]:
        """One MULTI/EXEC: `pending` trials, the events since our position
        and everything else of the run. Returns the view (None when the
        stream no longer tells what changed) and the trials it holds that
        are older than the rest."""
        assert self._position is not None
        keys = self._keys
        order = sorted(pending)
        pipe = self._client.pipeline(transaction=True)
        pipe.hmget(keys.meta, ["created_at", "optimizer_info"])
        pipe.zrange(keys.trials, 0, -1)
        pipe.xrange(keys.events, "-", "+", count=1)
        pipe.xrange(keys.events, _after(self._position), "+")
        pipe.xrange(keys.errors)
        pipe.hgetall(keys.optimizer_state)
        pipe.zrange(keys.workers, 0, -1)
        if self._with_space:
            pipe.get(keys.pipeline_space)
        for trial_id in order:
            pipe.hgetall(keys.trial(trial_id))
        replies = pipe.execute()

        (created, info), ids, first, entries, errors, opt_state, workers = replies[:7]
        space = replies[7] if self._with_space else None
        hashes = replies[8 if self._with_space else 7 :]
        if created is None or info is None:
            raise RunNotFoundError(f"Run '{self._run}' does not exist.")
        if _text(created) != self._created or (
            first
            and self._position != "0-0"
            and _stream_id(_text(first[0][0]) or "0-0") > _stream_id(self._position)
        ):
            return None, set()

        for trial_id, raw in zip(order, hashes, strict=True):
            if raw:
                self._raw[trial_id] = _exported_fields(raw)
            else:
                self._raw.pop(trial_id, None)
        ids = [i.decode() for i in ids]
        present = set(ids)
        for gone in set(self._raw) - present:
            del self._raw[gone]
        stale = (_event_trial_ids(entries) - pending) | (present - set(self._raw))
        if entries:
            self._position = _text(entries[-1][0])

        if not opt_state:
            raise RunNotFoundError(f"Run '{self._run}' has no optimizer state.")
        view = _RunView(
            ids=[i for i in ids if i in self._raw],
            raw=self._raw,
            errors=[fields_to_error(decode_hash(f)) for _, f in errors],
            optimizer_info=loads_optimizer_info(info),
            optimizer_state=fields_to_optimizer_state(
                opt_state, [w.decode() for w in workers] or None
            ),
            space_pickle=space,
            consistent=True,
            full=full,
        )
        return view, stale


# --- encoding a run as NePS's files ------------------------------------------


@dataclass
class _EncodedTrial:
    """One trial's files, and the hash fields they were made from."""

    raw: dict[str, str]
    trial: Trial
    files: dict[str, bytes]  # name inside config_<id>/ -> bytes
    cache_part: bytes  # its entry in .trial_cache.pkl


def _absolute(location: str | None, root: Path) -> str | None:
    """A stored location (relative to a machine's run directory) made
    absolute inside the export; absolute ones are kept as they are."""
    if location is None or Path(location).is_absolute():
        return location
    return str(root / location)


def _trial_location(trial_id: str) -> str:
    """A trial's location as Redis stores it: relative to the run directory."""
    return f"configs/config_{trial_id}"


def _relative(location: str | None) -> str | None:
    """A NePS location (``<root>/configs/config_<id>``) as Redis stores it
    (``configs/config_<id>``); any other form is kept as it is."""
    if location is None:
        return None
    match = _LOCATION.search(location.replace(os.sep, "/"))
    return match.group(1) if match else location


def _encode_trial(raw: dict[str, str], root: Path) -> _EncodedTrial:
    stored = fields_to_trial(raw)
    metadata = replace(
        stored.metadata,
        location=_absolute(stored.metadata.location, root),
        previous_trial_location=_absolute(
            stored.metadata.previous_trial_location, root
        ),
    )
    trial = Trial(
        config=stored.config,
        metadata=metadata,
        report=stored.report,
        source=stored.source,
    )
    files = {
        neps_files.CONFIG_FILE: neps_files.config_yaml(trial.config),
        neps_files.METADATA_FILE: neps_files.metadata_json(trial.metadata),
    }
    if trial.report is not None:
        files[neps_files.REPORT_FILE] = neps_files.report_yaml(trial.report)
    if trial.metadata.previous_trial_id is not None:
        files[neps_files.PREVIOUS_FILE] = trial.metadata.previous_trial_id.encode()
    return _EncodedTrial(
        raw=raw, trial=trial, files=files, cache_part=neps_pickle.trial_opcodes(trial)
    )


def _fidelity_name(info: OptimizerInfo) -> str | None:
    derived = info.get("derived") or {}
    fidelity = derived.get("fidelity") if isinstance(derived, Mapping) else None
    name = fidelity.get("name") if isinstance(fidelity, Mapping) else None
    return name if isinstance(name, str) else None


def allows_pickle(state: RedisNePSState) -> bool:
    """Whether `state` was opened with allow_pickle."""
    return state.allow_pickle


# --- snapshot folders and the atomic swap ------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What one export did."""

    directory: Path  # the symlink readers use
    snapshot: Path  # the folder it points to now
    trials: int
    encoded: int  # trials (re-)encoded this time; the rest were reused
    files_written: int
    files_linked: int  # hard links to the previous snapshot
    errors: int
    full_read: bool  # every trial was read (first export, or the stream could not tell)
    consistent: bool  # False when the run kept changing during every retry
    seconds: float
    # Seconds per step: read, encode, write (DIR is switched at its end), prune.
    timings: Mapping[str, float] = field(default_factory=dict)
    # Snapshots deleted after the swap (none listed when a periodic exporter
    # deletes them in the background).
    removed: tuple[Path, ...] = ()


def snapshots_dir(directory: Path) -> Path:
    """Where the snapshots of export directory `directory` live."""
    return directory.with_name(directory.name + SNAPSHOTS_SUFFIX)


def _our_link(directory: Path) -> Path | None:
    """Where `directory` points, if it is a symlink into its snapshots
    folder (the snapshot itself may be gone)."""
    if not directory.is_symlink():
        return None
    target = directory.parent / directory.readlink()
    if target.parent.resolve() != snapshots_dir(directory).resolve():
        return None
    return target


def _current_snapshot(directory: Path) -> Path | None:
    """The snapshot `directory` points to, if it is one of ours and exists."""
    target = _our_link(directory)
    return target if target is not None and target.is_dir() else None


def _claim(directory: Path, *, force: bool) -> None:
    """Make sure `directory` is ours to switch; refuse anything else unless
    `force`, which moves it aside (it is deleted with old snapshots)."""
    if _our_link(directory) is not None:
        return
    if not directory.is_symlink() and not directory.exists():
        return
    if not force:
        kind = "a symlink elsewhere" if directory.is_symlink() else "a real directory"
        if directory.exists() and not directory.is_dir():
            kind = "a file"
        raise NePSError(
            f"{directory} exists and is {kind}, not an export of neps-redis (a"
            f" symlink into {snapshots_dir(directory)}). Refusing to replace it;"
            " pass force=True (--force) to replace it, deleting what it holds."
        )
    if directory.is_symlink():
        directory.unlink()
        return
    folder = snapshots_dir(directory)
    folder.mkdir(parents=True, exist_ok=True)
    aside = folder / f"{_stamp()}-replaced"
    directory.replace(aside)
    logger.warning("Moved %s aside to %s (force).", directory, aside)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _new_snapshot(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    for n in range(1000):
        path = folder / f"{stamp}-{n}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise NePSError(f"Cannot create a new snapshot folder in {folder}.")


def _swap(directory: Path, snapshot: Path) -> None:
    """Point `directory` at `snapshot` in one rename."""
    temporary = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.swap")
    temporary.symlink_to(os.path.relpath(snapshot, directory.parent))
    try:
        temporary.replace(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    # The rename is atomic for readers at once; this makes it survive a crash.
    with contextlib.suppress(OSError):
        fd = os.open(directory.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prune(directory: Path, keep: int) -> tuple[Path, ...]:
    """Delete all but the newest `keep` snapshots (never the current one)."""
    folder = snapshots_dir(directory)
    current = _current_snapshot(directory)
    names = sorted(p.name for p in folder.iterdir() if _SNAPSHOT_NAME.match(p.name))
    removed = []
    for name in names[: max(0, len(names) - keep)]:
        path = folder / name
        if current is not None and path.resolve() == current.resolve():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return tuple(removed)


def _same_file(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


class _SnapshotWriter:
    """Writes one snapshot's files, hard-linking the unchanged ones."""

    def __init__(self, snapshot: Path, previous: Path | None) -> None:
        self.snapshot = snapshot
        self.previous = previous
        self.written = 0
        self.linked = 0

    def place(self, relative: str, data: bytes, same: bool | None) -> None:
        """Write `data` at `relative`, or link the previous snapshot's file
        when it holds the same bytes (`same`: known from memory; None:
        compare with the file on disk)."""
        target = self.snapshot / relative
        if self.previous is not None and same is not False:
            source = self.previous / relative
            if same or _same_file(source, data):
                try:
                    os.link(source, target)
                except OSError:
                    pass
                else:
                    self.linked += 1
                    return
        target.write_bytes(data)
        self.written += 1


class Exporter:
    """Exports one run to one directory, again and again, cheaply.

    It remembers the hash fields and files of every trial it exported, so a
    later export re-encodes only the trials whose fields changed, and links
    every unchanged file to the previous snapshot. Its memory holds about
    three times the run's encoded size. A new Exporter (a restarted
    exporter) starts with a full read and encoding, and still links every
    file that is byte for byte the same as in the snapshot DIR points to.
    Run one exporter per directory: each deletes snapshots it did not make.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = DEFAULT_KEEP,
        force: bool = False,
        prune_in_background: bool = False,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}.")
        # Locations are written under the symlink, not the snapshot folder
        # behind it, so that they stay valid after the next swap.
        self.directory = Path(directory).absolute()
        self.keep = keep
        self._force = force
        self._reader: _RunReader | None = None
        self._run: tuple[str, str] | None = None
        self._trials: dict[str, _EncodedTrial] = {}
        self._globals: dict[str, bytes] = {}
        self._last_snapshot: Path | None = None
        # Deleting an old snapshot unlinks every file of the run again; a
        # periodic exporter does that beside its next round, not before it.
        self._prune_in_background = prune_in_background
        self._pruner: threading.Thread | None = None

    def close(self) -> None:
        """Wait for a background deletion of old snapshots, and delete any
        that a skipped one left."""
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None
            _prune(self.directory, self.keep)

    def _prune(self) -> tuple[Path, ...]:
        if not self._prune_in_background:
            return _prune(self.directory, self.keep)
        if self._pruner is None or not self._pruner.is_alive():
            # Another round's deletion still running will be caught up with
            # by the next one: pruning keeps the newest, whatever is older.
            self._pruner = threading.Thread(
                target=_prune,
                args=(self.directory, self.keep),
                name=f"prune {self.directory.name}",
                daemon=True,
            )
            self._pruner.start()
        return ()

    def export(
        self,
        state: RedisNePSState,
        *,
        previous: Path | None = None,
        progress: ProgressCallback | None = None,
    ) -> ExportResult:
        """Write a new snapshot of `state`'s run and switch DIR to it.

        `previous` names a snapshot to hard-link unchanged files from
        (default: the one DIR points to); `progress` hears of each step's
        trials (see `ProgressCallback`).
        """
        started = time.perf_counter()
        with_space = allows_pickle(state)
        if self._reader is None or self._run != (state.run, state.server):
            self._reader = _RunReader(state, with_space=with_space)
            self._run = (state.run, state.server)
            self._trials, self._globals, self._last_snapshot = {}, {}, None
        view = self._reader.read(progress)
        read_done = time.perf_counter()

        trials, encoded = self._encode_trials(view, progress)
        unchanged = encoded == 0 and [t.trial.id for t in trials] == list(self._trials)
        global_files = self._global_files(view, trials, unchanged=unchanged)
        encode_done = time.perf_counter()

        _claim(self.directory, force=self._force)
        self._force = False
        current = _current_snapshot(self.directory)
        source = Path(previous) if previous is not None else current
        known = source is not None and source == self._last_snapshot
        snapshot = _new_snapshot(snapshots_dir(self.directory))
        try:
            writer = _SnapshotWriter(snapshot, source)
            self._write_snapshot(
                writer, trials, global_files, known=known, progress=progress
            )
            _swap(self.directory, snapshot)
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        write_done = time.perf_counter()

        self._trials = {t.raw["id"]: t for t in trials}
        self._globals = global_files
        self._last_snapshot = snapshot
        removed = self._prune()
        done = time.perf_counter()

        result = ExportResult(
            directory=self.directory,
            snapshot=snapshot,
            trials=len(trials),
            encoded=encoded,
            files_written=writer.written,
            files_linked=writer.linked,
            errors=len(view.errors),
            full_read=view.full,
            consistent=view.consistent,
            seconds=done - started,
            timings={
                "read": read_done - started,
                "encode": encode_done - read_done,
                "write": write_done - encode_done,
                "prune": done - write_done,
            },
            removed=removed,
        )
        logger.info(
            "Exported run %r to %s: %d trials, %d encoded, %d files written,"
            " %d linked, in %.3f s.",
            state.run,
            snapshot,
            result.trials,
            result.encoded,
            result.files_written,
            result.files_linked,
            result.seconds,
        )
        return result

    def _encode_trials(
        self, view: _RunView, progress: ProgressCallback | None
    ) -> tuple[list[_EncodedTrial], int]:
        trials = []
        encoded = 0
        for trial_id in view.ids:
            raw = view.raw[trial_id]
            old = self._trials.get(trial_id)
            if old is not None and old.raw == raw:
                trials.append(old)
            else:
                trials.append(_encode_trial(raw, self.directory))
                encoded += 1
            if progress is not None:
                progress("encode", len(trials), len(view.ids))
        return trials, encoded

    def _global_files(
        self, view: _RunView, trials: list[_EncodedTrial], *, unchanged: bool
    ) -> dict[str, bytes]:
        """The files outside the config folders. With `unchanged` (the same
        trials as last time, none encoded again) the trial cache and the
        summary are last time's: they depend on the trials alone."""
        info = neps_files.optimizer_info_yaml(view.optimizer_info)
        files = {
            neps_files.OPTIMIZER_INFO_FILE: info,
            neps_files.OPTIMIZER_STATE_FILE: neps_pickle.dumps(view.optimizer_state),
        }
        # NePS writes the errors file with the first error and deletes it
        # when errors are dropped; so does the export.
        if view.errors:
            files[neps_files.ERRORS_FILE] = neps_files.errors_jsonl(view.errors)
        if view.space_pickle is not None:
            files[neps_files.PIPELINE_SPACE_FILE] = view.space_pickle

        derived = [_TRIAL_CACHE, *(f"{neps_files.SUMMARY_DIR}/{n}" for n in _SUMMARY)]
        if unchanged and self._globals.get(neps_files.OPTIMIZER_INFO_FILE) == info:
            files.update({name: self._globals[name] for name in derived})
            return files

        files[_TRIAL_CACHE] = neps_pickle.dumps_trial_cache(
            [(t.trial.id, t.cache_part) for t in trials]
        )
        # NePS adds the final totals to best_config.txt when neps.run ends;
        # here the run counts as ended when nothing is pending or evaluating.
        plain = [t.trial for t in trials]
        busy = (State.PENDING, State.EVALUATING)
        final = bool(plain) and not any(t.metadata.state in busy for t in plain)
        summary = neps_summary.summary_files(
            plain, fidelity_name=_fidelity_name(view.optimizer_info), final=final
        )
        for name, data in summary.items():
            files[f"{neps_files.SUMMARY_DIR}/{name}"] = data
        return files

    def _write_snapshot(
        self,
        writer: _SnapshotWriter,
        trials: list[_EncodedTrial],
        global_files: dict[str, bytes],
        *,
        known: bool,
        progress: ProgressCallback | None,
    ) -> None:
        snapshot = writer.snapshot
        (snapshot / neps_files.CONFIGS_DIR).mkdir()
        (snapshot / neps_files.SUMMARY_DIR).mkdir()
        for name, data in global_files.items():
            same = (self._globals.get(name) == data) if known else None
            writer.place(name, data, same)

        for done, encoded in enumerate(trials, start=1):
            folder = (
                f"{neps_files.CONFIGS_DIR}/{neps_files.CONFIG_PREFIX}{encoded.trial.id}"
            )
            (snapshot / folder).mkdir()
            old = self._trials.get(encoded.trial.id) if known else None
            for name, data in encoded.files.items():
                if not known:
                    same = None
                elif old is None:
                    same = False
                else:
                    same = old.files.get(name) == data
                writer.place(f"{folder}/{name}", data, same)
            if progress is not None:
                progress("write", done, len(trials))


def export_run(
    state: RedisNePSState,
    directory: str | Path,
    *,
    previous: Path | None = None,
    keep: int = DEFAULT_KEEP,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> ExportResult:
    """Export `state`'s run to `directory` as NePS 0.17 lays a run out.

    `directory` becomes a symlink to a new snapshot folder in
    ``<directory>.snapshots/``, switched atomically; the newest `keep`
    snapshots are kept. Each trial's ``location`` (stored relative to a
    machine's run directory) is written as an absolute path under
    `directory`, so that NePS's tools find the trial's files there.
    ``pipeline_space.pkl`` is written (its stored bytes, unread) only when
    the run stores one and `state` was opened with allow_pickle.

    Files unchanged since `previous` (default: the snapshot `directory`
    points to) are hard links to it. A NePS run must not be continued in
    an export: NePS rewrites files in place, which would change the linked
    files of older snapshots too; copy the directory first. Only the swap
    is made durable (the directory is fsynced), not each file: after a
    power loss the newest snapshot may be incomplete; export again.

    `progress`, if given, is called as ``progress(step, done, total)`` while
    the trials are read, encoded and written (see `ProgressCallback`).

    Raises:
        NePSError: `directory` exists and is not an export (unless `force`,
            which replaces it).
        RunNotFoundError: The run does not exist.
    """
    exporter = Exporter(directory, keep=keep, force=force)
    return exporter.export(state, previous=previous, progress=progress)


def export_periodically(
    state: RedisNePSState,
    directory: str | Path,
    *,
    every: float,
    stop_event: threading.Event | None = None,
    max_rounds: int | None = None,
    keep: int = DEFAULT_KEEP,
    force: bool = False,
    on_round: Callable[[ExportResult], None] | None = None,
) -> ExportResult | None:
    """Export every `every` seconds until `stop_event` is set or
    `max_rounds` exports are done; returns the last result.

    Each round re-encodes only the trials that changed since the one
    before. A round that fails because Redis cannot be reached is logged
    and retried at the next tick; the exporter then catches up from the
    event stream, or reads everything again if the stream no longer tells
    (the server lost its data, or the stream was trimmed past the
    exporter's position).

    Raises:
        RunNotFoundError: The run does not exist (any more).
        NePSError: `directory` is not an export (see `export_run`).
    """
    if every <= 0:
        raise ValueError(f"every must be positive, got {every}.")
    stop = stop_event or threading.Event()
    exporter = Exporter(directory, keep=keep, force=force, prune_in_background=True)
    last: ExportResult | None = None
    rounds = 0
    next_start = time.monotonic()
    try:
        while not stop.is_set() and (max_rounds is None or rounds < max_rounds):
            try:
                last = exporter.export(state)
            except RedisError as error:
                logger.warning(
                    "Export of run %r failed, retrying: %s", state.run, error
                )
            else:
                if on_round is not None:
                    on_round(last)
            rounds += 1
            next_start += every
            if max_rounds is not None and rounds >= max_rounds:
                break
            stop.wait(max(0.0, next_start - time.monotonic()))
    finally:
        exporter.close()
    return last


# --- import ------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A part of a run directory that was not imported, and why."""

    path: str  # relative to the run directory
    line: int | None
    reason: str


@dataclass(frozen=True)
class ImportResult:
    """What `import_run` stored."""

    run: str
    directory: Path
    trials: int
    counts: Mapping[str, int]  # trials per state
    errors: int
    worker_ids: list[str]
    optimizer_state: Literal["imported", "fresh", "kept"]
    pipeline_space: bool
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class RunDirectory:
    """What a NePS run directory holds, as `import_run` stores it."""

    optimizer_info: OptimizerInfo
    optimizer_state: OptimizationState | None
    space_pickle: bytes | None
    trials: list[Trial]
    errors: list[SerializableTrialError]
    skipped: list[Skipped]
    notes: list[str]
    # What becomes of the optimizer state in a new run; a run imported into
    # keeps its own, and these do not apply to it.
    state_notes: list[str] = field(default_factory=list)


class _Collector:
    """Raises on a corrupt part, or records it as skipped."""

    def __init__(self, root: Path, *, skip: bool) -> None:
        self.root = root
        self.skip = skip
        self.skipped: list[Skipped] = []

    def corrupt(self, error: CorruptRunError) -> None:
        if not self.skip:
            raise error
        path = Path(error.path)
        with contextlib.suppress(ValueError):
            path = path.relative_to(self.root)
        self.skipped.append(Skipped(path.as_posix(), error.line, error.reason))
        # INFO, not WARNING: the caller asked for skipping and gets the list
        # in the result, which the command line prints once.
        logger.info("Skipped %s: %s", error.path, error.reason)


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _trial_file(folder: Path, stem: str) -> Path | None:
    """``<stem>.yaml``, else ``<stem>.json`` (NEPS_CONFIG_SERIALIZE_FORMAT)."""
    for suffix in (".yaml", ".json"):
        path = folder / f"{stem}{suffix}"
        if path.exists() or path.is_symlink():
            return path
    return None


def _read_trial(folder: Path, root: Path) -> Trial:
    trial_id = folder.name[len(neps_files.CONFIG_PREFIX) :]
    try:
        validate_trial_id(trial_id)
    except InvalidNameError as error:
        raise CorruptRunError(
            folder, None, f"not a valid trial folder: {error}"
        ) from None
    if not _inside(folder, root):
        raise CorruptRunError(
            folder, None, f"a link to {folder.resolve()}, outside the run directory"
        )

    metadata_path = folder / neps_files.METADATA_FILE
    config_path = _trial_file(folder, "config")
    report_path = _trial_file(folder, "report")
    previous_path = folder / neps_files.PREVIOUS_FILE
    for path in (metadata_path, config_path, report_path, previous_path):
        if path is not None and path.is_symlink() and not _inside(path, root):
            raise CorruptRunError(
                path, None, f"a link to {path.resolve()}, outside the run directory"
            )
    if not metadata_path.is_file():
        raise CorruptRunError(metadata_path, None, "missing")
    if config_path is None or not config_path.is_file():
        raise CorruptRunError(folder / neps_files.CONFIG_FILE, None, "missing")

    metadata = neps_files.read_metadata(metadata_path)
    if metadata.id != trial_id:
        raise CorruptRunError(
            metadata_path,
            1,
            f"id {metadata.id!r} does not match the folder name {folder.name!r}",
        )
    if previous_path.exists():
        written = neps_files.read_previous_trial_id(previous_path)
        if written != metadata.previous_trial_id:
            raise CorruptRunError(
                previous_path,
                1,
                f"holds {written!r}, but metadata.json's previous_trial_id is"
                f" {metadata.previous_trial_id!r}",
            )
    config = neps_files.read_config(config_path)
    report = None if report_path is None else neps_files.read_report(report_path)

    # Where the trial's files are is its folder, whatever metadata.json says
    # (a folder copied or renamed by hand keeps the old text); the same for
    # the trial it continues.
    metadata.location = _trial_location(trial_id)
    metadata.previous_trial_location = (
        None
        if metadata.previous_trial_id is None
        or metadata.previous_trial_location is None
        else _trial_location(metadata.previous_trial_id)
    )
    # NePS's files do not record a trial's source; only an import makes a
    # trial external, so that is what such a trial came from.
    source = "imported" if metadata.state == State.EXTERNAL else "run"
    trial = Trial(config=config, metadata=metadata, report=report, source=source)
    try:
        trial_to_fields(trial)
    except EncodingError as error:
        raise CorruptRunError(folder, None, str(error)) from None
    return trial


def _natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _creation_order(trial: Trial) -> tuple[Any, ...]:
    """Sampled trials by time_sampled; imported ones (NaN time) after them,
    by id with numbers compared as numbers."""
    sampled = trial.metadata.time_sampled
    if isinstance(sampled, int | float) and not math.isnan(sampled):
        return (0, sampled, _natural(trial.id))
    return (1, 0.0, _natural(trial.id))


def read_run_directory(
    directory: str | Path,
    *,
    skip_corrupt: bool = False,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> RunDirectory:
    """Everything `import_run` stores, read from a NePS run directory;
    `progress` hears of each ``config_<id>`` folder read ("read" step).

    Raises:
        CorruptRunError: A file cannot be read as NePS wrote it (unless
            `skip_corrupt`, which records it and goes on; a missing or
            unreadable optimizer_info.yaml is never skipped).
    """
    root = Path(directory)
    if not root.is_dir():
        raise CorruptRunError(root, None, "not a directory")
    collector = _Collector(root, skip=skip_corrupt)
    notes: list[str] = []

    info_path = root / neps_files.OPTIMIZER_INFO_FILE
    if not info_path.is_file():
        raise CorruptRunError(info_path, None, "missing; NePS writes it with the run")
    optimizer_info, ignored = neps_files.read_optimizer_info(info_path)
    if ignored:
        notes.append(
            f"optimizer_info.yaml keys NePS does not read were left out: {ignored}"
        )

    optimizer_state = None
    state_notes: list[str] = []
    state_path = root / neps_files.OPTIMIZER_STATE_FILE
    if not state_path.is_file():
        state_notes.append(
            "There is no optimizer_state.pkl: the run gets a fresh optimizer state."
        )
    elif not allow_pickle:
        state_notes.append(
            "optimizer_state.pkl was not read (unpickling was not allowed): the run"
            " gets a fresh optimizer state (new RNG snapshot, no budget, no shared"
            " state); worker ids come from the trials."
        )
    else:
        try:
            optimizer_state, pickle_notes = neps_pickle.loads_optimizer_state(
                state_path.read_bytes()
            )
            state_notes += pickle_notes
        except Exception as error:
            collector.corrupt(
                CorruptRunError(state_path, None, f"cannot be unpickled: {error}")
            )
            state_notes.append("The run gets a fresh optimizer state instead.")

    space_pickle = None
    space_path = root / neps_files.PIPELINE_SPACE_FILE
    if space_path.is_file():
        if allow_pickle:
            space_pickle = space_path.read_bytes()
        else:
            notes.append(
                "pipeline_space.pkl was not imported (pickles are stored only with"
                " allow_pickle)."
            )

    trials: list[Trial] = []
    configs = root / neps_files.CONFIGS_DIR
    folders = []
    if configs.is_dir():
        folders = [
            folder
            for folder in sorted(configs.iterdir(), key=lambda p: _natural(p.name))
            if folder.name.startswith(neps_files.CONFIG_PREFIX) and folder.is_dir()
        ]
    for done, folder in enumerate(folders, start=1):
        try:
            trials.append(_read_trial(folder, root))
        except CorruptRunError as error:
            collector.corrupt(error)
        if progress is not None:
            progress("read", done, len(folders))
    trials.sort(key=_creation_order)

    errors: list[SerializableTrialError] = []
    errors_path = root / neps_files.ERRORS_FILE
    if errors_path.is_file():
        for _, entry in neps_files.iter_errors(errors_path):
            if isinstance(entry, CorruptRunError):
                collector.corrupt(entry)
            else:
                errors.append(entry)

    return RunDirectory(
        optimizer_info=optimizer_info,
        optimizer_state=optimizer_state,
        space_pickle=space_pickle,
        trials=trials,
        errors=errors,
        skipped=collector.skipped,
        notes=notes,
        state_notes=state_notes,
    )


def _pending_score(time_sampled: Any) -> str:
    """A pending trial's place in the pending index (as the state scores
    it): its time_sampled, NaN last."""
    if time_sampled is None or (
        isinstance(time_sampled, float) and math.isnan(time_sampled)
    ):
        return "inf"
    return repr(float(time_sampled))


def _worker_ids(parsed: RunDirectory) -> list[str]:
    """The run's worker ids: the optimizer state's when it was read; else
    every id the trials name, so that a new worker's default name
    (``worker_<n>``) cannot be one the directory's trials already carry."""
    if parsed.optimizer_state is not None:
        return list(parsed.optimizer_state.worker_ids or [])
    seen: dict[str, None] = {}
    for trial in parsed.trials:
        for worker_id in (
            trial.metadata.sampling_worker_id,
            trial.metadata.evaluating_worker_id,
        ):
            if worker_id:
                seen.setdefault(worker_id)
    return list(seen)


def _flatten(fields: Mapping[str, Any]) -> list[Any]:
    return [x for pair in fields.items() for x in pair]


def import_run(
    directory: str | Path,
    state_or_run: RedisNePSState | str,
    *,
    redis: Any = None,
    into_existing: bool = False,
    skip_corrupt: bool = False,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Store the NePS run in `directory` as run `state_or_run` in Redis.

    Every trial comes with its exact state, metadata, config and report,
    read from the ``config_<id>`` folders with safe loaders; the shared
    errors in their order; the optimizer info. The optimizer state (budget,
    RNG snapshot, shared state, worker ids) lives in ``optimizer_state.pkl``
    and is read only with `allow_pickle` (by an unpickler that loads NePS's
    optimizer classes, numpy arrays and torch tensors and nothing else);
    without it the run gets a fresh optimizer state and the worker ids seen
    in the trials, and the result says so. Locations become relative
    (``configs/config_<id>``), as the state stores them. Trials that were
    evaluating are stored evaluating with a fresh lease.

    Everything is written in one script: on any error nothing is written.

    Args:
        directory: The NePS run directory (NePS 0.16 or 0.17).
        state_or_run: A run name (a new run, on `redis`) or an open state
            (its run, with `into_existing`).
        redis: A URL or client, as for `RedisNePSState.create_or_load`.
        into_existing: Add to a run that exists: its optimizer info must
            match (NePS's rule); it keeps its optimizer state; trial ids
            must be new.
        skip_corrupt: Import everything readable and list what was skipped
            (file, line, reason) instead of raising.
        allow_pickle: Read optimizer_state.pkl, and store pipeline_space.pkl.
        progress: Called as ``progress(step, done, total)``: "read" for each
            trial folder read, "store" once the one script has stored them.

    Raises:
        CorruptRunError: A file cannot be read as NePS wrote it.
        RunExistsError: The run exists and `into_existing` is False.
        RunNotFoundError: `into_existing` and the run does not exist.
        TrialAlreadyExistsError: `into_existing` and a trial id is taken.
    """
    root = Path(directory)
    parsed = read_run_directory(
        root, skip_corrupt=skip_corrupt, allow_pickle=allow_pickle, progress=progress
    )

    if isinstance(state_or_run, RedisNePSState):
        client, run = state_or_run.client, state_or_run.run
    else:
        client, run = connect(redis), state_or_run
        check_server(client)
    keys = RunKeys(run)

    mode = "existing" if into_existing else "new"
    notes = list(parsed.notes)
    stored_info = client.hget(keys.meta, "optimizer_info")
    if mode == "new" and stored_info is not None:
        raise RunExistsError(
            f"Run '{run}' exists already; import into a new run name, or pass"
            " into_existing=True to add the directory's trials to it."
        )
    if mode == "existing":
        if stored_info is None:
            raise RunNotFoundError(f"No run '{run}' to import into.")
        if not optimizer_info_matches(
            loads_optimizer_info(stored_info), parsed.optimizer_info
        ):
            raise NePSError(
                f"The optimizer info of run '{run}' does not match the directory's."
                f"\nStored: {loads_optimizer_info(stored_info)}"
                f"\nDirectory: {parsed.optimizer_info}"
            )
        if parsed.optimizer_state is not None:
            notes.append(
                f"Run '{run}' keeps its own optimizer state; the directory's"
                " optimizer_state.pkl was not used."
            )
        if parsed.space_pickle is not None:
            notes.append(
                f"Run '{run}' keeps its own pipeline space; the directory's"
                " pipeline_space.pkl was not used."
            )

    state_fields: dict[str, Any] = {}
    state_source: Literal["imported", "fresh", "kept"] = "kept"
    if mode == "new":
        notes += parsed.state_notes
        optimizer_state = parsed.optimizer_state
        state_source = "imported"
        if optimizer_state is None:
            state_source = "fresh"
            optimizer_state = OptimizationState(
                budget=None, seed_snapshot=SeedSnapshot.new_capture(), shared_state=None
            )
        state_fields = optimizer_state_to_fields(optimizer_state)

    worker_ids = _worker_ids(parsed)
    record = dumps_json(
        {
            "host": None,
            "pid": None,
            "started": None,
            "imported_from": str(root.absolute()),
        },
        "worker record",
    )
    trial_args: list[Any] = []
    for trial in parsed.trials:
        fields = trial_to_fields(trial)
        trial_args += [
            trial.id,
            fields["state"],
            _pending_score(trial.metadata.time_sampled),
            2 * len(fields),
            *_flatten(fields),
        ]
    error_args: list[Any] = []
    for err in parsed.errors:
        fields = error_to_fields(err)
        error_args += [2 * len(fields), *_flatten(fields)]

    if progress is not None:
        progress("store", 0, len(parsed.trials))
    Scripts(client).run(
        "import_run",
        [
            keys.meta,
            keys.optimizer_state,
            keys.pipeline_space,
            keys.trials,
            keys.pending,
            keys.evaluating,
            keys.finished,
            keys.counts,
            keys.errors,
            keys.events,
            keys.workers,
            keys.worker_info,
            keys.request(uuid.uuid4().hex),
            *(keys.trial(t.id) for t in parsed.trials),
        ],
        [
            mode,
            defaults.SCHEMA_VERSION,
            dumps_optimizer_info(parsed.optimizer_info),
            "",
            repr(time.time()),
            int(defaults.env_float("NEPS_REDIS_EVENTS_MAXLEN", defaults.EVENTS_MAXLEN)),
            int(
                1000
                * defaults.env_float(
                    "NEPS_REDIS_REQUEST_TTL_SECONDS", defaults.REQUEST_TTL_SECONDS
                )
            ),
            int(
                1000
                * defaults.env_float("NEPS_REDIS_LEASE_SECONDS", defaults.LEASE_SECONDS)
            ),
            (parsed.space_pickle or b"") if mode == "new" else b"",
            2 * len(state_fields),
            *_flatten(state_fields),
            2 * len(worker_ids),
            *(x for worker_id in worker_ids for x in (worker_id, record)),
            len(parsed.errors),
            *error_args,
            len(parsed.trials),
            *trial_args,
        ],
    )

    if progress is not None:
        progress("store", len(parsed.trials), len(parsed.trials))

    counts: dict[str, int] = {}
    for trial in parsed.trials:
        counts[trial.metadata.state.value] = (
            counts.get(trial.metadata.state.value, 0) + 1
        )
    evaluating = counts.get(State.EVALUATING.value, 0)
    if evaluating:
        notes.append(
            f"{evaluating} {'trial was' if evaluating == 1 else 'trials were'}"
            " evaluating in the directory; each is stored evaluating with a fresh"
            " lease, and a worker of this run takes it over once the lease expires."
        )
    if parsed.space_pickle is not None and mode == "new":
        notes.append(
            "pipeline_space.pkl is stored as its bytes, unread; the run has no"
            " space fingerprint, so a worker's pipeline_space is not compared"
            " with it."
        )
    logger.info(
        "Imported %s into run %r: %d trials, %d errors, %d skipped.",
        root,
        run,
        len(parsed.trials),
        len(parsed.errors),
        len(parsed.skipped),
    )
    return ImportResult(
        run=run,
        directory=root,
        trials=len(parsed.trials),
        counts=counts,
        errors=len(parsed.errors),
        worker_ids=worker_ids,
        optimizer_state=state_source,
        pipeline_space=parsed.space_pickle is not None and mode == "new",
        skipped=parsed.skipped,
        notes=notes,
    )
