"""Checks that a run's keys agree with each other: the invariants that every
transition keeps.

`inspect_run` reads a run in one MULTI/EXEC snapshot (the indexes, the
counts, every trial hash the indexes name, the event stream and the shared
errors), so that a run in use is seen at one instant, and returns what is
wrong with it. It reads without SCAN: a trial hash that no index names is
not found. This module only reads; it never writes and never repairs.

Violations, by kind:

| kind                        | what is wrong                                  |
|-----------------------------|------------------------------------------------|
| ``no_state_index``          | a trial of ``trials`` is in no state index     |
| ``several_state_indexes``   | a trial is in more than one state index        |
| ``wrong_state_index``       | the index holding a trial is not its state's   |
| ``missing_hash``            | an index names a trial whose hash is gone      |
| ``not_in_trials``           | a state index names a trial ``trials`` lacks   |
| ``id_mismatch``             | a trial hash's ``id`` is not the id it is under |
| ``evaluating_without_lease``| evaluating, but no token or lease deadline     |
| ``lease_without_evaluating``| a token or lease deadline on another state     |
| ``lease_score_mismatch``    | evaluating score is not the hash's deadline    |
| ``counts_mismatch``         | ``counts`` disagrees with the hashes' states   |
| ``missing_seq``             | a trial hash without ``seq``                   |
| ``duplicate_seq``           | two trials with one ``seq``                    |
| ``next_seq_too_small``      | ``meta.next_seq`` below the number of trials   |
| ``event_state_mismatch``    | a trial's latest event names another state     |

Notes (information, not violations): ``lease_expired`` (a trial whose lease
has passed and that no sweep has requeued yet) and ``error_of_unknown_trial``
(a shared error naming a trial the run no longer has, as after a removal).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from neps_redis.errors import RunNotFoundError
from neps_redis.keys import RunKeys

# Trial hash fields the checks read.
_FIELDS = ("id", "state", "seq", "token", "lease_deadline_ms")

# The state each event leaves its trial in: a state name, a field of the
# event holding it, or None for a trial that no longer exists. Events not
# listed (late_report, late_update, ...) change no trial.
_EVENT_STATE: Mapping[str, str | None] = {
    "sampled": "field:state",
    "imported": "field:state",
    "reported": "field:state",
    "updated": "field:state",
    "lease_expired": "field:state",
    "claimed": "evaluating",
    "reset": "pending",
    "removed": None,
}

# How often the snapshot is taken again when trials appeared between
# reading the indexes and the snapshot itself.
_SNAPSHOT_TRIES = 5


@dataclass(frozen=True)
class Violation:
    """One thing wrong with a run (or, among notes, worth knowing)."""

    kind: str
    detail: str
    trial_id: str | None = None

    def __str__(self) -> str:
        where = f"trial {self.trial_id!r}: " if self.trial_id is not None else ""
        return f"{self.kind}: {where}{self.detail}"


@dataclass
class CheckResult:
    """What `inspect_run` found."""

    run: str
    trials: int
    violations: list[Violation] = field(default_factory=list)
    notes: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def check_run(client: Any, run: str) -> list[Violation]:
    """Every violation of the run's invariants; empty when the run is sound.

    Raises:
        RunNotFoundError: The run does not exist.
    """
    return inspect_run(client, run).violations


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _members(reply: Iterable[tuple[bytes, float]]) -> dict[str, float]:
    return {member.decode(): score for member, score in reply}


@dataclass
class _Snapshot:
    now_ms: int
    meta: dict[str, str]
    counts: dict[str, str]
    trials: dict[str, float]
    indexes: dict[str, dict[str, float]]  # state index name -> id -> score
    hashes: dict[str, dict[str, str | None] | None]  # None: no such hash
    events: list[dict[str, str]]
    errors: list[dict[str, str]]

    def named_ids(self) -> set[str]:
        ids = set(self.trials)
        for index in self.indexes.values():
            ids |= set(index)
        return ids


def _take_snapshot(client: Any, keys: RunKeys, ids: list[str]) -> _Snapshot:
    # A cluster's transaction takes only commands on its one slot, so there
    # the clock (which only dates the expired leases noted) is read from the
    # run's primary just before it.
    clock = None
    if isinstance(client, redis.RedisCluster):
        clock = client.time(target_nodes=client.get_node_from_key(keys.meta))
    pipe = client.pipeline(transaction=True)
    if clock is None:
        pipe.time()
    pipe.hgetall(keys.meta)
    pipe.hgetall(keys.counts)
    pipe.zrange(keys.trials, 0, -1, withscores=True)
    for index in (keys.pending, keys.evaluating, keys.finished):
        pipe.zrange(index, 0, -1, withscores=True)
    pipe.xrange(keys.events)
    pipe.xrange(keys.errors)
    for trial_id in ids:
        pipe.hmget(keys.trial(trial_id), _FIELDS)
    reply = pipe.execute()
    if clock is not None:
        reply.insert(0, clock)

    seconds, micros = reply[0]
    hashes: dict[str, dict[str, str | None] | None] = {}
    for trial_id, values in zip(ids, reply[9:], strict=True):
        decoded = [_text(v) for v in values]
        # HMGET answers nils for a missing hash; every trial hash has an id.
        if decoded[0] is None:
            hashes[trial_id] = None
        else:
            hashes[trial_id] = dict(zip(_FIELDS, decoded, strict=True))
    return _Snapshot(
        now_ms=int(seconds) * 1000 + int(micros) // 1000,
        meta={_text(k): _text(v) for k, v in reply[1].items()},  # type: ignore[misc]
        counts={_text(k): _text(v) for k, v in reply[2].items()},  # type: ignore[misc]
        trials=_members(reply[3]),
        indexes={
            "pending": _members(reply[4]),
            "evaluating": _members(reply[5]),
            "finished": _members(reply[6]),
        },
        hashes=hashes,
        events=[_entry(fields) for _, fields in reply[7]],
        errors=[_entry(fields) for _, fields in reply[8]],
    )


def _entry(fields: Mapping[bytes, bytes] | list[bytes]) -> dict[str, str]:
    # redis-py's cluster transactions leave a stream entry's fields as the
    # flat list the server sent.
    if not isinstance(fields, Mapping):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return {_text(k): _text(v) for k, v in fields.items()}  # type: ignore[misc]


def _snapshot(client: Any, keys: RunKeys) -> _Snapshot:
    """A snapshot holding the hash of every trial any index names.

    The ids are read first and the snapshot after; trials created in
    between are not in it, so it is taken again with them.
    """
    ids: set[str] = set()
    for index in (keys.trials, keys.pending, keys.evaluating, keys.finished):
        ids |= {m.decode() for m in client.zrange(index, 0, -1)}
    snapshot = _take_snapshot(client, keys, sorted(ids))
    for _ in range(_SNAPSHOT_TRIES):
        named = snapshot.named_ids()
        if named <= set(snapshot.hashes):
            break
        snapshot = _take_snapshot(client, keys, sorted(named | set(snapshot.hashes)))
    return snapshot


def _index_name(state: str) -> str:
    return state if state in ("pending", "evaluating") else "finished"


def _check_indexes(snap: _Snapshot, out: list[Violation]) -> None:
    for trial_id in sorted(snap.named_ids()):
        trial = snap.hashes.get(trial_id)
        held_by = [name for name, index in snap.indexes.items() if trial_id in index]
        if trial is None:
            where = ", ".join(held_by + (["trials"] if trial_id in snap.trials else []))
            out.append(
                Violation("missing_hash", f"named by {where} but has no hash", trial_id)
            )
            continue
        if trial_id not in snap.trials:
            out.append(
                Violation(
                    "not_in_trials",
                    f"in the {', '.join(held_by)} index but not in trials",
                    trial_id,
                )
            )
        if trial["id"] != trial_id:
            out.append(
                Violation("id_mismatch", f"its hash says id {trial['id']!r}", trial_id)
            )
        state = trial["state"] or "(none)"
        if not held_by:
            out.append(
                Violation(
                    "no_state_index", f"state {state}, in no state index", trial_id
                )
            )
        elif len(held_by) > 1:
            out.append(
                Violation(
                    "several_state_indexes",
                    f"state {state}, in the {' and '.join(held_by)} indexes",
                    trial_id,
                )
            )
        elif held_by[0] != _index_name(state):
            out.append(
                Violation(
                    "wrong_state_index",
                    f"state {state}, but in the {held_by[0]} index",
                    trial_id,
                )
            )


def _check_leases(
    snap: _Snapshot, out: list[Violation], notes: list[Violation]
) -> None:
    for trial_id, trial in sorted(snap.hashes.items()):
        if trial is None:
            continue
        deadline = trial["lease_deadline_ms"]
        has_lease = trial["token"] is not None or deadline is not None
        if trial["state"] != "evaluating":
            if has_lease:
                out.append(
                    Violation(
                        "lease_without_evaluating",
                        f"state {trial['state']} but holds a claim token or lease",
                        trial_id,
                    )
                )
            continue
        if trial["token"] is None or deadline is None:
            lacks = "claim token" if trial["token"] is None else "lease_deadline_ms"
            out.append(
                Violation(
                    "evaluating_without_lease", f"evaluating without {lacks}", trial_id
                )
            )
            continue
        score = snap.indexes["evaluating"].get(trial_id)
        if score is not None and score != float(deadline):
            out.append(
                Violation(
                    "lease_score_mismatch",
                    f"scored {score:.0f} in the evaluating index, but its lease"
                    f" ends {deadline}",
                    trial_id,
                )
            )
        if float(deadline) < snap.now_ms:
            ago = (snap.now_ms - float(deadline)) / 1000
            notes.append(
                Violation(
                    "lease_expired",
                    f"lease ended {ago:.1f} s ago; the next sweep requeues it",
                    trial_id,
                )
            )


def _check_counts(snap: _Snapshot, out: list[Violation]) -> None:
    actual = Counter(t["state"] for t in snap.hashes.values() if t is not None)
    for state in sorted(set(actual) | set(snap.counts), key=str):
        stored = int(snap.counts.get(state) or 0)
        if stored != actual.get(state, 0):
            out.append(
                Violation(
                    "counts_mismatch",
                    f"counts says {stored} {state}, the trial hashes"
                    f" {actual.get(state, 0)}",
                )
            )


def _check_seq(snap: _Snapshot, out: list[Violation]) -> None:
    seqs: dict[str, list[str]] = {}
    for trial_id, trial in sorted(snap.hashes.items()):
        if trial is None:
            continue
        if trial["seq"] is None:
            out.append(Violation("missing_seq", "its hash has no seq", trial_id))
            continue
        seqs.setdefault(trial["seq"], []).append(trial_id)
    for seq, ids in sorted(seqs.items()):
        if len(ids) > 1:
            out.append(
                Violation("duplicate_seq", f"seq {seq} is shared by trials {ids}")
            )
    next_seq = int(snap.meta.get("next_seq") or 0)
    if next_seq < len(snap.trials):
        out.append(
            Violation(
                "next_seq_too_small",
                f"meta next_seq is {next_seq}, but the run has {len(snap.trials)}"
                " trials",
            )
        )


def _check_events(snap: _Snapshot, out: list[Violation]) -> None:
    latest: dict[str, tuple[str, str | None]] = {}
    for event in snap.events:
        name = event.get("event") or ""
        if name == "deleted":
            # The run was deleted and may have been created anew: earlier
            # events describe trials that are gone.
            latest.clear()
            continue
        trial_id = event.get("trial_id")
        if trial_id is None or name not in _EVENT_STATE:
            continue
        implied = _EVENT_STATE[name]
        if implied is not None and implied.startswith("field:"):
            implied = event.get(implied.removeprefix("field:"))
        latest[trial_id] = (name, implied)

    named = snap.named_ids()
    for trial_id, (name, implied) in sorted(latest.items()):
        trial = snap.hashes.get(trial_id)
        if trial is None and trial_id in named:
            continue  # reported as missing_hash already
        state = None if trial is None else trial["state"]
        if implied != state and not (implied is None and trial is None):
            says = "the trial is gone" if implied is None else f"state {implied}"
            has = "is not in the run" if trial is None else f"has state {state}"
            out.append(
                Violation(
                    "event_state_mismatch",
                    f"its latest event ({name}) says {says}; it {has}",
                    trial_id,
                )
            )


def _check_errors(snap: _Snapshot, notes: list[Violation]) -> None:
    unknown = Counter(
        e.get("trial_id")
        for e in snap.errors
        if snap.hashes.get(e.get("trial_id") or "") is None
    )
    for trial_id, n in sorted(unknown.items(), key=lambda kv: str(kv[0])):
        notes.append(
            Violation(
                "error_of_unknown_trial",
                f"{n} shared error(s) name a trial the run no longer has",
                trial_id,
            )
        )


def inspect_run(client: Any, run: str) -> CheckResult:
    """Check run `run`; returns its violations and notes.

    Raises:
        RunNotFoundError: The run does not exist.
    """
    keys = RunKeys(run)
    snap = _snapshot(client, keys)
    if not snap.meta:
        raise RunNotFoundError(f"No NePS run '{run}' to check.")

    result = CheckResult(run=run, trials=len(snap.trials))
    _check_indexes(snap, result.violations)
    _check_leases(snap, result.violations, result.notes)
    _check_counts(snap, result.violations)
    _check_seq(snap, result.violations)
    _check_events(snap, result.violations)
    _check_errors(snap, result.notes)
    return result
