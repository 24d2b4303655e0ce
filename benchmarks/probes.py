"""Single-process measurements of neps-redis on a server the caller started.

- `measure_floor`: what any command costs, PING and a trivial EVALSHA.
- `measure_growth`: claim, report, sample and read-all as a run grows, with
  export times at chosen sizes.
- `measure_memory`: Redis memory per typical trial, by what holds it.
- `count_round_trips`: round trips and server commands per step.

Each takes a Redis URL and works on runs of its own; none measures the
time it spends filling a run.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from benchmarks.workload import (
    MaxPlusOne,
    NextIds,
    RedisLifecycle,
    complete,
    summarize,
    typical_config,
    typical_result,
)
from neps_redis import ImportedConfig, RedisNePSState, SampledConfig
from neps_redis.connection import client_from_url

logger = logging.getLogger(__name__)

WORKER = "bench"
# Trials per import or sample call while filling a run: big enough that
# filling 100k trials takes seconds, small enough to keep each script short.
FILL_BATCH = 1_000
# The fewest timings a step gets, however slow it is.
MIN_TIMED = 3


def _elapsed_ns(call: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    started = time.perf_counter_ns()
    call(*args, **kwargs)
    return time.perf_counter_ns() - started


def _client(url: str, **kwargs: Any) -> redis.Redis:
    """A client configured as the state's own (retries, health checks)."""
    return client_from_url(url, **kwargs)


def flush(client: redis.Redis) -> None:
    """Empty the server before the next measurement, and wait for it: Valkey
    8 and later free a flushed dataset in the background by default, which
    would run during the next measurement and blur its memory figures."""
    client.execute_command("FLUSHALL", "SYNC")


# --------------------------------------------------------------------------
# The floor


def measure_floor(urls: Mapping[str, str], calls: int) -> dict[str, Any]:
    """p50/p99 of PING and of EVALSHA of ``return 1``, per transport.

    The two commands alternate, so that a slow spell of a busy machine
    lands on both alike.
    """
    floor: dict[str, Any] = {}
    for transport, url in urls.items():
        client = _client(url)
        sha = client.script_load("return 1")
        for _ in range(max(10, calls // 10)):
            client.ping()
            client.evalsha(sha, 0)
        ping, evalsha = [], []
        for _ in range(calls):
            ping.append(_elapsed_ns(client.ping))
            evalsha.append(_elapsed_ns(client.evalsha, sha, 0))
        client.close()
        floor[transport] = {"ping": summarize(ping), "evalsha": summarize(evalsha)}
        logger.info(
            "Floor over %s: PING p50 %.0f us, EVALSHA p50 %.0f us.",
            transport,
            floor[transport]["ping"]["p50_us"],
            floor[transport]["evalsha"]["p50_us"],
        )
    return floor


# --------------------------------------------------------------------------
# Filling a run


def new_run(url: str, run: str, **kwargs: Any) -> RedisNePSState:
    """Create an empty run and open it."""
    RedisLifecycle.create(url, run)
    return RedisNePSState.create_or_load(run, redis=url, load_only=True, **kwargs)


def _imported(trial_id: int) -> ImportedConfig:
    result = typical_result(trial_id)
    return ImportedConfig(
        id=str(trial_id),
        config=typical_config(trial_id),
        result={
            **result,
            "info_dict": {"evaluation_duration": result["cost"]},
        },
    )


def fill(state: RedisNePSState, *, start: int, finished: int, pending: int) -> int:
    """Add `finished` imported trials, then `pending` sampled ones, with ids
    from `start` on; returns the next free id.

    Imports are the fast way to a big run: one script stores a thousand
    finished trials. The pending ones are sampled in one call, so that the
    claims to come find them in the queue as in a real run.
    """
    next_id = start
    end = start + finished
    while next_id < end:
        stop = min(next_id + FILL_BATCH, end)
        state.lock_and_import_trials(
            [_imported(i) for i in range(next_id, stop)], worker_id=WORKER
        )
        next_id = stop
    if pending:
        state.lock_and_sample_trial(
            MaxPlusOne(SampledConfig), worker_id=WORKER, n=pending
        )
        next_id += pending
    return next_id


def _claim_and_report(state: RedisNePSState) -> None:
    trial = state.claim_next_pending_trial(worker_id=WORKER)
    if trial is None:
        raise RuntimeError("The run has no pending trial left to claim.")
    state.lock_and_report_trial_evaluation(trial, complete(trial), worker_id=WORKER)


# --------------------------------------------------------------------------
# Export


def find_exporter() -> tuple[Callable[[Path], Callable[[Any], Any]] | None, str]:
    """A factory of export calls for a directory, and how it was found.

    Prefers `neps_redis.export.Exporter`, which re-encodes only what changed
    between two exports of one directory; falls back to `export_run`.
    """
    try:
        from neps_redis import export
    except ImportError as error:
        return None, f"neps_redis.export is not importable ({error})"

    exporter_class = getattr(export, "Exporter", None)
    if exporter_class is not None and hasattr(exporter_class, "export"):
        return (lambda directory: exporter_class(directory).export), "Exporter.export"
    export_run = getattr(export, "export_run", None)
    if export_run is not None:
        return (
            lambda directory: lambda state: export_run(state, directory)
        ), "export_run"
    return None, "neps_redis.export has neither Exporter nor export_run"


def _export_summary(seconds: float, result: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {"seconds": round(seconds, 3)}
    for name in ("trials", "encoded", "files_written", "files_linked", "full_read"):
        if hasattr(result, name):
            summary[name] = getattr(result, name)
    timings = getattr(result, "timings", None)
    if isinstance(timings, Mapping):
        summary["timings_s"] = {k: round(float(v), 3) for k, v in timings.items()}
    return summary


def _remove_export(directory: Path) -> None:
    # An export is a symlink to a folder in DIR.snapshots; both are ours.
    snapshots = directory.with_name(directory.name + ".snapshots")
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
    shutil.rmtree(snapshots, ignore_errors=True)


def measure_export(
    state: RedisNePSState,
    make_export: Callable[[Path], Callable[[Any], Any]],
    directory: Path,
    *,
    changes: int,
) -> dict[str, Any]:
    """A full export of the run, then one after `changes` pending trials
    were claimed and reported, into the same directory."""
    export = make_export(directory)
    try:
        started = time.perf_counter()
        result = export(state)
        full = _export_summary(time.perf_counter() - started, result)

        for _ in range(changes):
            _claim_and_report(state)

        started = time.perf_counter()
        result = export(state)
        changed = {
            "changed": changes,
            **_export_summary(time.perf_counter() - started, result),
        }
    finally:
        _remove_export(directory)
    return {"full": full, "after_changed": changed}


# --------------------------------------------------------------------------
# Steps as the run grows


def _within(spent_ns: int, budget_s: float, count: int) -> bool:
    return count < MIN_TIMED or spent_ns < budget_s * 1e9


def _time_steps(
    state: RedisNePSState,
    *,
    ops: int,
    read_budget_s: float,
    sample_budget_s: float,
    next_id: int,
) -> dict[str, Any]:
    """Time `ops` claims and reports of pending trials, a read-all after each
    of them while the read budget lasts, then samples while theirs lasts
    (ids from `next_id` on).

    A trivial EVALSHA on the state's own connection goes before each claim
    and each sample: on a busy machine the floor moves, and a step is best
    compared with the floor measured beside it.
    """
    client = state.client
    sha = client.script_load("return 1")
    floor, claims, reports, reads = [], [], [], []
    read_spent = 0

    def read() -> None:
        nonlocal read_spent
        if _within(read_spent, read_budget_s, len(reads)):
            reads.append(_elapsed_ns(state.lock_and_read_trials))
            read_spent += reads[-1]

    # A read first, so that each timed read follows exactly one change.
    state.lock_and_read_trials()
    for _ in range(ops):
        floor.append(_elapsed_ns(client.evalsha, sha, 0))
        started = time.perf_counter_ns()
        trial = state.claim_next_pending_trial(worker_id=WORKER)
        claims.append(time.perf_counter_ns() - started)
        if trial is None:
            raise RuntimeError("The run has no pending trial left to claim.")
        read()
        report = complete(trial)
        reports.append(
            _elapsed_ns(
                state.lock_and_report_trial_evaluation, trial, report, worker_id=WORKER
            )
        )
        read()

    optimizer = NextIds(SampledConfig, next_id)
    samples, own = [], []
    while _within(sum(samples), sample_budget_s, len(samples)) and len(samples) < ops:
        floor.append(_elapsed_ns(client.evalsha, sha, 0))
        samples.append(
            _elapsed_ns(state.lock_and_sample_trial, optimizer, worker_id=WORKER)
        )
        own.append(samples[-1] - optimizer.last_ns)

    return {
        "evalsha_floor": summarize(floor),
        "claim": summarize(claims),
        "report": summarize(reports),
        "sample": summarize(samples),
        "sample_excl_optimizer": summarize(own),
        "read_all_after_1_change": summarize(reads),
    }


def measure_growth(
    url: str,
    sizes: Sequence[int],
    *,
    ops: int,
    read_budget_s: float,
    sample_budget_s: float,
    export_sizes: Sequence[int] = (),
    export_changes: int = 100,
    export_root: Path | None = None,
    run: str = "bench-growth",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Grow one run through `sizes` (ascending) and time each step at each.

    Returns the per-size step statistics and the export measurements
    (``{"available": False, "note": ...}`` when there is no exporter).
    """
    make_export, how = find_exporter() if export_sizes else (None, "not asked for")
    exports: dict[str, Any] = {"available": make_export is not None, "api": how}
    if make_export is None:
        exports["note"] = f"Export not measured: {how}."
    exports["runs"] = []

    state = new_run(url, run)
    admin = _client(url)
    next_id, total = 1, 0
    growth = []
    for size in sorted(sizes):
        exporting = make_export is not None and size in export_sizes
        pending = ops + (export_changes if exporting else 0)
        if size - total < pending:
            raise ValueError(
                f"Size {size} leaves no room for {pending} pending trials."
            )

        started = time.monotonic()
        next_id = fill(
            state, start=next_id, finished=size - total - pending, pending=pending
        )
        total = size
        logger.info(
            "Run grown to %d trials in %.1f s.", size, time.monotonic() - started
        )
        # Growing the run doubles the append-only file, so the server
        # rewrites it in a forked child; timing steps while that child and
        # the parent's copy-on-write faults compete for two cores would
        # measure the rewrite, which a run meets only when its file doubles.
        _settled_memory(admin, timeout=600.0)

        steps = _time_steps(
            state,
            ops=ops,
            read_budget_s=read_budget_s,
            sample_budget_s=sample_budget_s,
            next_id=next_id,
        )
        sampled = steps["sample"]["n"]
        next_id += sampled
        total += sampled
        growth.append({"trials": size, "steps": steps})
        logger.info(
            "At %d trials: claim p50 %.0f us, report %.0f us, sample %.0f us,"
            " read-all %.0f us.",
            size,
            steps["claim"]["p50_us"],
            steps["report"]["p50_us"],
            steps["sample"]["p50_us"],
            steps["read_all_after_1_change"]["p50_us"],
        )

        if exporting:
            assert make_export is not None and export_root is not None
            try:
                measured = measure_export(
                    state,
                    make_export,
                    export_root / f"export-{size}",
                    changes=export_changes,
                )
            except Exception as error:
                # The exporter is another part of the package; its failure
                # is reported, and the steps measured so far are kept.
                logger.exception("Export of %d trials failed.", total)
                exports["note"] = f"Export failed at {total:,} trials: {error!r}."
                make_export = None
                continue
            exports["runs"].append({"trials": total, **measured})
            logger.info(
                "Export of %d trials: %.2f s full, %.2f s after %d changed.",
                total,
                measured["full"]["seconds"],
                measured["after_changed"]["seconds"],
                export_changes,
            )
    state.close()
    admin.close()
    return growth, exports


# --------------------------------------------------------------------------
# Memory


def _settled_memory(client: redis.Redis, timeout: float = 60.0) -> dict[str, int]:
    """INFO memory once no AOF rewrite runs and nothing waits to be freed:
    a rewrite's buffers, or a dataset still being freed, would count as the
    run's memory."""
    deadline = time.monotonic() + timeout
    while True:
        persistence = client.info("persistence")
        memory = client.info("memory")
        busy = (
            persistence.get("aof_rewrite_in_progress")
            or persistence.get("aof_rewrite_scheduled")
            or memory.get("lazyfree_pending_objects")
        )
        if not busy or time.monotonic() > deadline:
            return {k: int(memory[k]) for k in ("used_memory", "used_memory_dataset")}
        time.sleep(0.1)


def _memory_usage(client: redis.Redis, key: str) -> int:
    # SAMPLES 0 reads every element: exact, and these keys are few.
    return int(client.memory_usage(key, samples=0) or 0)


def _scan(client: redis.Redis, pattern: str) -> Iterator[bytes]:
    yield from client.scan_iter(match=pattern, count=1000)


def measure_memory(url: str, trials: int, run: str = "bench-memory") -> dict[str, Any]:
    """Growth of ``used_memory`` per trial over `trials` typical trials, each
    sampled, claimed and reported as in a real run; and what holds it."""
    client = _client(url)
    flush(client)
    state = new_run(url, run)
    keys = state.keys
    before = _settled_memory(client)

    # Sampled a thousand a call, since each sample reads the whole run;
    # claimed and reported one by one, as workers do.
    optimizer = MaxPlusOne(SampledConfig)
    started = time.monotonic()
    for done in range(0, trials, FILL_BATCH):
        batch = min(FILL_BATCH, trials - done)
        state.lock_and_sample_trial(optimizer, worker_id=WORKER, n=batch)
        for _ in range(batch):
            _claim_and_report(state)
    logger.info(
        "Stored %d typical trials in %.1f s.", trials, time.monotonic() - started
    )
    after = _settled_memory(client)

    # Trial hashes all look alike; a spread of them stands for the rest.
    step = max(1, trials // 200)
    sample = [
        _memory_usage(client, keys.trial(str(i))) for i in range(1, trials + 1, step)
    ]
    hashes = sum(sample) / len(sample) * trials
    indexes = sum(
        _memory_usage(client, key)
        for key in (keys.trials, keys.pending, keys.evaluating, keys.finished)
    )
    events = _memory_usage(client, keys.events)
    request_pattern = keys.pattern[: -len("*")] + "request:*"
    request_keys = list(_scan(client, request_pattern))
    requests = sum(_memory_usage(client, k) for k in request_keys[:200])
    requests = requests / max(1, min(200, len(request_keys))) * len(request_keys)
    event_count = client.xlen(keys.events)
    shape = _hash_shape(client, keys.trial(str(trials)))
    state.close()
    client.close()

    grown = after["used_memory"] - before["used_memory"]
    per_trial = {
        "trial_hash": hashes / trials,
        "indexes": indexes / trials,
        "event_stream": events / trials,
        "request_keys": requests / trials,
    }
    return {
        "trials": trials,
        # A run sampling one trial a call keeps one more request key per
        # trial than this one, until the keys expire.
        "sampled_per_call": FILL_BATCH,
        "used_memory_before": before["used_memory"],
        "used_memory_after": after["used_memory"],
        "bytes_per_trial": round(grown / trials, 1),
        "dataset_bytes_per_trial": round(
            (after["used_memory_dataset"] - before["used_memory_dataset"]) / trials, 1
        ),
        "bytes_per_trial_without_request_keys": round((grown - requests) / trials, 1),
        # MEMORY USAGE's estimates: they need not add up to the growth.
        "per_trial_by_holder": {k: round(v, 1) for k, v in per_trial.items()},
        "events": event_count,
        "request_keys": len(request_keys),
        "trial_hash_sample": len(sample),
        "trial_hash": shape,
    }


def _hash_shape(client: redis.Redis, key: str) -> dict[str, Any]:
    """How the server stores one trial hash, and what decides it: a hash
    with a value longer than hash-max-listpack-value (64 bytes by default)
    leaves the compact listpack encoding."""
    fields = client.hgetall(key)
    longest = max(fields, key=lambda name: len(fields[name]))
    # Redis 6.2 knows the limit by its older name.
    limit = client.config_get("hash-max-listpack-value") or client.config_get(
        "hash-max-ziplist-value"
    )
    return {
        "encoding": client.object("encoding", key).decode(),
        "fields": len(fields),
        "bytes_of_names_and_values": sum(len(k) + len(v) for k, v in fields.items()),
        "longest_field": longest.decode(),
        "longest_value_bytes": len(fields[longest]),
        "listpack_value_limit": int(next(iter(limit.values()))) if limit else None,
    }


# --------------------------------------------------------------------------
# Round trips and commands per step


class _RoundTrips:
    """Counts what a client sends: one packed write is one round trip, a
    single command or a whole pipeline alike."""

    count = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        _RoundTrips.count += 1
        super().send_packed_command(command, check_health)  # type: ignore[misc]


class _CountedConnection(_RoundTrips, redis.connection.Connection):
    pass


class _CountedUnixConnection(_RoundTrips, redis.connection.UnixDomainSocketConnection):
    pass


# Commands the counting itself sends.
_OWN_COMMANDS = {"info", "config|resetstat", "config"}


def _commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
    }
    return {k: v for k, v in calls.items() if k not in _OWN_COMMANDS}


@contextlib.contextmanager
def _counting(admin: redis.Redis, tally: dict[str, Any]) -> Iterator[None]:
    admin.config_resetstat()
    sent = _RoundTrips.count
    yield
    tally["round_trips"] += _RoundTrips.count - sent
    for name, calls in _commands(admin).items():
        tally["commands"][name] = tally["commands"].get(name, 0) + calls


def count_round_trips(
    url: str, *, trials: int, lifecycles: int, run: str = "bench-round-trips"
) -> dict[str, Any]:
    """Round trips the client makes and commands the server runs (those
    inside scripts included) per step, averaged over `lifecycles`
    lifecycles on a run of about `trials` trials."""
    admin = _client(url)
    flush(admin)
    unix = url.startswith("unix://")
    counted = _client(
        url, connection_class=_CountedUnixConnection if unix else _CountedConnection
    )
    RedisLifecycle.create(url, run)
    state = RedisNePSState.create_or_load(run, redis=counted, load_only=True)
    fill(state, start=1, finished=trials, pending=0)

    optimizer = MaxPlusOne(SampledConfig)
    # One lifecycle first: each script's first call in a process loads it.
    state.lock_and_sample_trial(optimizer, worker_id=WORKER)
    _claim_and_report(state)

    steps = ("sample", "claim", "report", "read_all")
    tallies: dict[str, dict[str, Any]] = {
        s: {"round_trips": 0, "commands": {}} for s in steps
    }
    for _ in range(lifecycles):
        with _counting(admin, tallies["sample"]):
            state.lock_and_sample_trial(optimizer, worker_id=WORKER)
        with _counting(admin, tallies["claim"]):
            trial = state.claim_next_pending_trial(worker_id=WORKER)
        assert trial is not None
        report = complete(trial)
        with _counting(admin, tallies["report"]):
            state.lock_and_report_trial_evaluation(trial, report, worker_id=WORKER)
        with _counting(admin, tallies["read_all"]):
            state.lock_and_read_trials()
    state.close()
    counted.close()
    admin.close()

    per_step: dict[str, Any] = {"trials": trials, "lifecycles": lifecycles}
    for step, tally in tallies.items():
        commands = {
            name: round(calls / lifecycles, 2)
            for name, calls in sorted(tally["commands"].items(), key=lambda kv: -kv[1])
        }
        per_step[step] = {
            "round_trips": round(tally["round_trips"] / lifecycles, 2),
            "server_commands": round(sum(commands.values()), 2),
            "commands": commands,
        }
    return per_step
