"""A process's copy of a run's trials, brought up to date from the event stream.

Every script that changes a trial appends an event naming it to the run's
event stream. A read therefore asks only for the events after the last one
this copy has seen and re-reads just the trials they name, instead of every
trial of the run. It falls back to a full read when it cannot be sure it saw
every change: on the first read, when the stream was trimmed past its
position, or when the run was deleted and created again.

Why it is exact: the position is taken *before* the trials are read, so a
change made meanwhile is both already visible in what was read and named
again by the next read. A trial read twice is merely read twice.

The trials it returns are shared between reads: change a copy, not them.
This module reads Redis and never writes; it never imports `state`.
"""

from __future__ import annotations

from typing import Any

from neps_redis import defaults
from neps_redis.codec import decode_hash, fields_to_trial
from neps_redis.keys import RunKeys
from neps_redis.model import Trial


def _stream_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class TrialCache:
    """The trials of one run, in creation order, as of the last `read`."""

    def __init__(self, client: Any, keys: RunKeys) -> None:
        self._client = client
        self._keys = keys
        self._trials: dict[str, tuple[int, Trial]] = {}
        self._position: bytes | None = None
        self._created_at: bytes | None = None
        self._stale: set[str] = set()

    def forget(self, trial_id: str) -> None:
        """Read this trial again next time, whatever the events say: this
        process wrote it, and its caller may have changed the shared copy."""
        self._stale.add(trial_id)

    def read(self) -> dict[str, Trial]:
        """Every trial of the run, in creation order, up to date."""
        keys = self._keys
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(keys.meta, "created_at")
        pipe.xrange(keys.events, count=1)
        if self._position is not None:
            pipe.xrange(keys.events, min=b"(" + self._position)
        created_at, first, *changes = pipe.execute()

        if (
            self._position is None
            or created_at != self._created_at
            or not first
            or _stream_id(first[0][0]) > _stream_id(self._position)
        ):
            return self._full_read(created_at)

        events = changes[0]
        changed = {
            fields[b"trial_id"].decode()
            for _, fields in events
            if b"trial_id" in fields
        }
        changed |= self._stale
        self._stale = set()
        if changed:
            self._refresh(sorted(changed, key=lambda i: self._order(i)))
        if events:
            self._position = events[-1][0]
        return {trial_id: trial for trial_id, (_, trial) in self._trials.items()}

    def _order(self, trial_id: str) -> int:
        known = self._trials.get(trial_id)
        return known[0] if known is not None else 1 << 62

    def _full_read(self, created_at: bytes | None) -> dict[str, Trial]:
        keys = self._keys
        last = self._client.xrevrange(keys.events, count=1)
        ids = [i.decode() for i in self._client.zrange(keys.trials, 0, -1)]
        self._trials = {}
        self._stale = set()
        self._refresh(ids)
        self._position = last[0][0] if last else b"0-0"
        self._created_at = created_at
        return {trial_id: trial for trial_id, (_, trial) in self._trials.items()}

    def _refresh(self, ids: Any) -> None:
        ids = list(ids)
        fetched: list[tuple[int, str, Trial]] = []
        for start in range(0, len(ids), defaults.READ_CHUNK):
            chunk = ids[start : start + defaults.READ_CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for trial_id in chunk:
                pipe.hgetall(self._keys.trial(trial_id))
            for trial_id, raw in zip(chunk, pipe.execute(), strict=True):
                if not raw:
                    self._trials.pop(trial_id, None)
                    continue
                fields = decode_hash(raw)
                seq = int(fields.get("seq", 0))
                known = self._trials.get(trial_id)
                if known is not None and known[0] == seq:
                    self._trials[trial_id] = (seq, fields_to_trial(fields))
                else:
                    # New, or removed and created again under the same id:
                    # its place in creation order is at the end.
                    self._trials.pop(trial_id, None)
                    fetched.append((seq, trial_id, fields_to_trial(fields)))
        for seq, trial_id, trial in sorted(fetched, key=lambda item: item[0]):
            self._trials[trial_id] = (seq, trial)
