"""A process's copy of a run's trials, brought up to date from the event stream.

Every script that changes a trial appends an event naming it to the run's
event stream. A read therefore asks only for the events after the last one
this copy has seen and re-reads just the trials they name, instead of every
trial of the run: after one change, a read is two round trips whatever the
run's size.

Why it never misses a change:

- The copy's *position* is the last event whose change it has taken in.
  Each read asks for the events from the position on, and re-reads the
  trials named after it. The position is taken *before* the trials are
  read, so a change made meanwhile is both already visible in what was
  read and named again by the next read. A trial read twice is merely read
  twice.
- What was read may thus be newer than the position, so the copy also
  keeps an *anchor*: the newest event, read after the trials, so that every
  write the copy shows has its event at or before the anchor.
- Each read trusts the events only if the position and the anchor are both
  still there, same id and same fields. If not, the stream was trimmed past
  them, the run was deleted and created again, or the server went back in
  time (a failover to a replica that had not received the last writes, a
  restart from an older snapshot; a replica holds a prefix of its primary's
  writes, so a lost write takes every later event with it, the anchor
  included): the copy may hold changes the server no longer has, so it is
  thrown away and read again in full. So it is, every time, while the
  stream is empty: then there is nothing to check against.
- A trial this process wrote itself is re-read on the next read, whatever
  the events say (`forget`): its caller may have changed the shared object.

A read returns a `TrialsView`: a read-only mapping that later reads never
change, handed out without copying. The copy keeps its own dict and gives
the very same dict to the views; before its next change, it moves to a new
dict if a view (or anything else) still holds the old one, which then stays
as it was. A read-all therefore costs nothing per trial when the caller has
let go of the previous result, as callers that read, decide and drop do.
The trials in it are shared between reads: change a copy, not them.

This module reads Redis and never writes; it never imports `state`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from fractions import Fraction
from typing import Any

from neps_redis import defaults
from neps_redis.codec import decode_hash, fields_to_trial
from neps_redis.keys import RunKeys
from neps_redis.model import Trial


class TrialsView(Mapping[str, Trial]):
    """The trials of one read, by id in creation order; read-only, and not
    changed by later reads."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Trial]) -> None:
        self._data = data

    def __getitem__(self, trial_id: str) -> Trial:
        return self._data[trial_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, trial_id: object) -> bool:
        return trial_id in self._data

    def keys(self) -> KeysView[str]:
        return self._data.keys()

    def values(self) -> ValuesView[Trial]:
        return self._data.values()

    def items(self) -> ItemsView[str, Trial]:
        return self._data.items()

    def get(self, trial_id: str, default: Any = None) -> Any:
        return self._data.get(trial_id, default)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TrialsView):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> dict[str, Trial]:
        """A plain dict of the same trials (the trials themselves shared)."""
        return dict(self._data)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled and deep-copied as the plain dict it stands for.
        return (dict, (self._data,))

    def __repr__(self) -> str:
        return f"TrialsView({len(self._data)} trials)"


def read_trial_hashes(
    client: Any, keys: RunKeys, ids: list[str], *, then_tail: bool = False
) -> tuple[list[tuple[str, dict[str, str] | None]], Entry | None]:
    """Each trial's decoded hash (None where it is gone), in the order of
    `ids`, read in pipelined chunks; with `then_tail`, also the run's newest
    event, read after the last trial (else None)."""
    hashes: list[tuple[str, dict[str, str] | None]] = []
    tail = None
    starts: Any = range(0, len(ids), defaults.READ_CHUNK)
    if not ids:
        starts = [0] if then_tail else []
    for begin in starts:
        chunk = ids[begin : begin + defaults.READ_CHUNK]
        pipe = client.pipeline(transaction=False)
        for trial_id in chunk:
            pipe.hgetall(keys.trial(trial_id))
        last = begin == starts[-1]
        if then_tail and last:
            pipe.xrevrange(keys.events, count=1)
        replies = pipe.execute()
        if then_tail and last:
            newest = replies.pop()
            tail = _entry(newest[0]) if newest else None
        for trial_id, raw in zip(chunk, replies, strict=True):
            hashes.append((trial_id, decode_hash(raw) if raw else None))
    return hashes, tail


# An event-stream entry: its id and its fields.
Entry = tuple[bytes, dict[bytes, bytes]]


def _entry(raw: Any) -> Entry:
    return (raw[0], raw[1])


def _stream_id(entry: Entry) -> tuple[int, int]:
    ms, _, seq = entry[0].decode().partition("-")
    return int(ms), int(seq or 0)


def _held_elsewhere(data: dict[str, Trial]) -> bool:
    """Whether anything but the copy itself refers to `data`: the caller's
    own name for it and the argument of getrefcount make two."""
    return sys.getrefcount(data) > 3


class TrialCache:
    """The trials of one run, in creation order, as of the last `read`."""

    def __init__(self, client: Any, keys: RunKeys) -> None:
        self._client = client
        self._keys = keys
        self._trials: dict[str, Trial] = {}
        self._seq: dict[str, int] = {}
        self._cost: dict[str, float] = {}
        self._cost_total = Fraction(0)  # of the finite costs
        self._odd_cost: dict[str, float] = {}  # NaN and infinite ones
        self._position: Entry | None = None
        self._anchor: Entry | None = None
        self._created_at: bytes | None = None
        self._loaded = False
        self._stale: set[str] = set()
        self.full_reads = 0

    def forget(self, trial_id: str) -> None:
        """Read this trial again next time, whatever the events say: this
        process wrote it, and its caller may have changed the shared copy."""
        self._stale.add(trial_id)

    def read(self) -> TrialsView:
        """Every trial of the run, in creation order, up to date."""
        return self.read_with(None)[0]

    def read_with(self, first: Callable[[Any], None] | None) -> tuple[TrialsView, list]:
        """`read`, with the commands `first` queues on the pipeline it is
        given sent ahead of the read's own, in its first round trip; returns
        the trials and the replies to those commands."""
        keys = self._keys
        pipe = self._client.pipeline(transaction=False)
        if first is not None:
            first(pipe)
        own = len(pipe)
        position = self._position if self._loaded else None
        if position is not None:
            pipe.hget(keys.meta, "created_at")
            pipe.xrange(keys.events, min=position[0])
        replies = pipe.execute()
        extra = replies[:own]
        if position is None:
            self._full_read()
            return TrialsView(self._trials), extra

        created_at, raw_events = replies[own:]
        events = [_entry(e) for e in raw_events]
        if (
            created_at != self._created_at
            or not events
            or events[0] != position
            or not self._anchor_among(events)
        ):
            self._full_read()
            return TrialsView(self._trials), extra
        events = events[1:]

        changed = {
            fields[b"trial_id"].decode()
            for _, fields in events
            if b"trial_id" in fields
        }
        changed |= self._stale
        if changed:
            self._anchor = self._refresh(sorted(changed, key=self._order))
        # Only now: a read that failed half-way is done again in full.
        self._stale = set()
        if events:
            self._position = events[-1]
            if self._anchor is None or _stream_id(self._anchor) < _stream_id(
                self._position
            ):
                # Both exist, and a replica keeps a prefix of the writes:
                # the newer one vouches for the older.
                self._anchor = self._position
        return TrialsView(self._trials), extra

    def _anchor_among(self, events: list[Entry]) -> bool:
        anchor = self._anchor
        if anchor is None:
            return False
        return any(entry == anchor for entry in events if entry[0] == anchor[0])

    def used_cost(self) -> float | int:
        """The sum of the reported costs of the trials as of the last read,
        exact and independent of the order they were reported in; 0 when no
        trial reported a cost."""
        if not self._cost:
            return 0
        # NaN and infinities cannot be exact fractions; float sums give
        # them their usual meaning.
        return float(self._cost_total) + sum(self._odd_cost.values())

    def _order(self, trial_id: str) -> int:
        return self._seq.get(trial_id, 1 << 62)

    def _full_read(self) -> None:
        # Until it is done, the copy is not to be built on.
        self._loaded = False
        keys = self._keys
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(keys.meta, "created_at")
        pipe.xrevrange(keys.events, count=1)
        pipe.zrange(keys.trials, 0, -1)
        created_at, last, ids = pipe.execute()
        self._trials, self._seq, self._cost, self._odd_cost = {}, {}, {}, {}
        self._cost_total = Fraction(0)
        self._stale = set()
        tail = self._refresh([i.decode() for i in ids], always_tail=True)
        self._position = _entry(last[0]) if last else None
        self._anchor = tail
        self._created_at = created_at
        self._loaded = True
        self.full_reads += 1

    def _refresh(self, ids: list[str], *, always_tail: bool = False) -> Entry | None:
        """Read these trials into the copy; returns the run's newest event,
        read after them."""
        if not ids and not always_tail:
            return self._anchor
        if ids and _held_elsewhere(self._trials):
            # A view handed out earlier still holds it: it stays as it is.
            self._trials = dict(self._trials)
        hashes, tail = read_trial_hashes(self._client, self._keys, ids, then_tail=True)
        fetched: list[tuple[int, str, Trial]] = []
        for trial_id, fields in hashes:
            if fields is None:
                self._drop(trial_id)
                continue
            seq = int(fields.get("seq", 0))
            trial = fields_to_trial(fields)
            if self._seq.get(trial_id) == seq:
                self._trials[trial_id] = trial  # keeps its place
                self._count_cost(trial_id, trial)
            else:
                # New, or removed and created again under the same id: its
                # place in creation order is at the end.
                self._drop(trial_id)
                fetched.append((seq, trial_id, trial))
        for seq, trial_id, trial in sorted(fetched, key=lambda item: item[0]):
            self._trials[trial_id] = trial
            self._seq[trial_id] = seq
            self._count_cost(trial_id, trial)
        return tail

    def _drop(self, trial_id: str) -> None:
        self._trials.pop(trial_id, None)
        self._seq.pop(trial_id, None)
        self._uncount_cost(trial_id)

    def _uncount_cost(self, trial_id: str) -> None:
        cost = self._cost.pop(trial_id, None)
        self._odd_cost.pop(trial_id, None)
        if cost is not None and math.isfinite(cost):
            self._cost_total -= Fraction(cost)

    def _count_cost(self, trial_id: str, trial: Trial) -> None:
        self._uncount_cost(trial_id)
        cost = None if trial.report is None else trial.report.cost
        if cost is not None:
            value = float(cost)
            self._cost[trial_id] = value
            if math.isfinite(value):
                self._cost_total += Fraction(value)
            else:
                self._odd_cost[trial_id] = value
