"""One PNG of a benchmark's results: six panels, one per question.

matplotlib is imported here only, inside `draw`, and only the benchmark
needs it (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_STEPS = ("claim", "report", "sample_excl_optimizer", "read_all_after_1_change")
_LABELS = {
    "claim": "claim",
    "report": "report",
    "sample_excl_optimizer": "sample (own)",
    "read_all_after_1_change": "read-all",
}
_BACKEND_STYLE = {"neps-redis": "-o", "neps": "--s"}


def _floor_and_steps(ax: Any, results: dict[str, Any]) -> None:
    names, p50, p99 = [], [], []
    for transport, floor in results.get("floor", {}).items():
        for command in ("ping", "evalsha"):
            names.append(f"{command.upper()}\n{transport}")
            p50.append(floor[command]["p50_us"])
            p99.append(floor[command]["p99_us"])
    if results.get("growth"):
        first = results["growth"][0]
        for step in _STEPS:
            names.append(f"{_LABELS[step]}\n{first['trials']:,}")
            p50.append(first["steps"][step]["p50_us"])
            p99.append(first["steps"][step]["p99_us"])
    positions = range(len(names))
    ax.bar([x - 0.2 for x in positions], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in positions], p99, width=0.4, label="p99")
    ax.set_xticks(list(positions), names, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("µs")
    ax.set_title(f"Floor and steps, one process ({results['transport']})")
    ax.legend(fontsize=8)


def _throughput(ax: Any, results: dict[str, Any]) -> None:
    runs = results.get("lifecycle", [])
    if not runs:
        ax.set_axis_off()
        return
    for backend in ("neps-redis", "neps"):
        for trials in sorted({r["trials"] for r in runs}):
            points = sorted(
                (r["processes"], r["lifecycles_per_s"])
                for r in runs
                if r["backend"] == backend and r["trials"] == trials
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    _BACKEND_STYLE[backend],
                    label=f"{backend}, {trials:,} trials",
                )
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["processes"] for r in runs}))
    ax.set_xlabel("processes")
    ax.set_ylabel("lifecycles / s")
    ax.set_title("Sample → claim → report throughput")
    ax.legend(fontsize=7)


def _growth(ax: Any, results: dict[str, Any]) -> None:
    growth = results.get("growth")
    if not growth:
        ax.set_axis_off()
        return
    sizes = [g["trials"] for g in growth]
    for step in _STEPS:
        ax.plot(
            sizes,
            [g["steps"][step]["p50_us"] for g in growth],
            "-o",
            label=_LABELS[step],
        )
    ax.plot(
        sizes,
        [g["steps"]["evalsha_floor"]["p50_us"] for g in growth],
        ":",
        color="grey",
        label="EVALSHA floor beside them",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trials in the run")
    ax.set_ylabel("p50 µs")
    ax.set_title("Steps as the run grows")
    ax.legend(fontsize=7)


def _memory(ax: Any, results: dict[str, Any]) -> None:
    memory = results.get("memory")
    if not memory:
        ax.set_axis_off()
        return
    # The growth of used_memory first, then MEMORY USAGE's estimates of
    # what holds it (they need not add up to it exactly).
    bars = {"used_memory\ngrowth": memory["bytes_per_trial"]}
    plain = results.get("memory_default_hash_limit")
    if plain:
        bars["growth, default\nhash limit"] = plain["bytes_per_trial"]
    bars.update(memory["per_trial_by_holder"])
    colors = ["tab:red"] * (2 if plain else 1)
    colors += ["tab:blue"] * (len(bars) - len(colors))
    ax.bar(list(bars), list(bars.values()), color=colors)
    ax.axhline(1024, color="grey", linestyle=":", label="1 KiB target")
    ax.set_ylabel("bytes per trial")
    ax.set_title(
        f"Redis memory: {memory['bytes_per_trial']:.0f} B / trial"
        f" ({memory['trials']:,} trials)"
    )
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)


def _export(ax: Any, results: dict[str, Any]) -> None:
    export = results.get("export") or {}
    runs = export.get("runs") or []
    if not runs:
        ax.text(0.5, 0.5, export.get("note", "Export not measured."), ha="center")
        ax.set_axis_off()
        return
    names = [f"{r['trials']:,}" for r in runs]
    positions = range(len(runs))
    ax.bar(
        [x - 0.2 for x in positions],
        [r["full"]["seconds"] for r in runs],
        0.4,
        label="full",
    )
    ax.bar(
        [x + 0.2 for x in positions],
        [r["after_changed"]["seconds"] for r in runs],
        0.4,
        label=f"after {runs[0]['after_changed']['changed']} changed",
    )
    ax.set_xticks(list(positions), names)
    ax.set_xlabel("trials")
    ax.set_ylabel("seconds")
    ax.set_title("Export")
    ax.legend(fontsize=7)


def _targets(ax: Any, results: dict[str, Any]) -> None:
    ax.set_axis_off()
    rows = []
    for name, target in results["targets"].items():
        value = target["value"]
        met = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        shown = "-" if value is None else f"{value:.3g}"
        rows.append([name, f"{shown} {target['compare']} {target['target']:g}", met])
    table = ax.table(cellText=rows, colLabels=["target", "measured", ""], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(6)
    table.scale(1, 1.2)
    ax.set_title("Targets")


def draw(results: dict[str, Any], path: Path) -> None:
    """Write the results' plot to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(18, 10))
    _floor_and_steps(axes[0][0], results)
    _throughput(axes[0][1], results)
    _growth(axes[0][2], results)
    _memory(axes[1][0], results)
    _export(axes[1][1], results)
    _targets(axes[1][2], results)
    mode = "quick" if results["quick"] else "full"
    env = results["environment"]
    figure.suptitle(
        f"neps-redis benchmark ({mode}): {env['server']}, {env['cpus']} CPUs,"
        f" load {env['loadavg_start'][0]:.1f} at start"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
