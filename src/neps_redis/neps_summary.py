"""The ``summary/`` folder of a NePS run, written without pandas.

NePS 0.17 writes four files there (`neps.status` and its SummaryWriter):

- ``full.csv``: one row per trial, sorted by time_sampled, indexed by id;
  columns ``config.<name>``, ``extra.<name>`` (nested mappings flattened
  with dots), the report's fields, then the metadata's; columns empty in
  every row are left out.
- ``short.csv``: the number of trials per state (``num_<state>``), then the
  best objective, its trial id and its config (single objective only).
- ``best_config_trajectory.txt``: each trial that improved on the best so
  far, with cumulative evaluations, fidelities, cost and time.
- ``best_config.txt``: the final best (or, for several objectives, the
  Pareto front).

NePS builds the CSVs with pandas, whose type inference decides how a value
is spelled (a float column whose values are all whole numbers is written
as integers; a whole number in an ``extra`` column with gaps as ``1.0``).
This module follows those rules for the values NePS's own runs hold:
numbers, strings, bools, lists and mappings. Values outside that (numpy
arrays of other shapes, mixed columns) are written with `str`, which is
what pandas does with object columns. Nothing here imports `neps` or
pandas.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neps_redis.model import MetaData, Report, State, Trial

SUMMARY_FILES = (
    "full.csv",
    "short.csv",
    "best_config.txt",
    "best_config_trajectory.txt",
)
RULE = "-" * 80
_HEADER = "Best configs and their objectives across evaluations:\n" + RULE + "\n"

_METADATA_COLUMNS = tuple(name for name in MetaData.__dataclass_fields__)
_REPORT_COLUMNS = tuple(name for name in Report.__dataclass_fields__ if name != "extra")


# --- CSV cells, the way pandas spells them ------------------------------------


def _missing(value: Any) -> bool:
    if value is None or value is _GAP:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


class _Gap:
    """A cell with no value at all (the row lacks the column)."""


_GAP = _Gap()


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(
        value, bool | np.bool_
    )


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float | np.floating)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_)


def _object_text(value: Any) -> str:
    return str(value)


def _float_spelling(present: list[Any], gaps: bool) -> Any:
    """How a float column's values are spelled: a column of one numpy float
    type without gaps keeps that type (float32 prints short); anything else
    is float64, printed as Python prints floats."""
    kinds = {type(v) for v in present}
    if not gaps and len(kinds) == 1 and issubclass(kinds.pop(), np.floating):
        return str
    return lambda v: repr(float(v))


def _converted_column(values: list[Any]) -> list[str]:
    """A column as pandas writes it after `convert_dtypes()` (the config,
    report and metadata parts of full.csv)."""
    present = [v for v in values if not _missing(v)]
    gaps = len(present) < len(values)
    spell: Any = _object_text
    if (
        present
        and all(_is_number(v) for v in present)
        and not any(_is_bool(v) for v in present)
    ):
        if all(_is_int(v) or float(v).is_integer() for v in present):
            spell = lambda v: str(int(v))  # noqa: E731
        else:
            spell = _float_spelling(present, gaps)
    return ["" if _missing(v) else spell(v) for v in values]


def _normalized_column(values: list[Any]) -> list[str]:
    """A column as pandas writes it after `json_normalize` (the extra part
    of full.csv): whole numbers with gaps become floats."""
    present = [v for v in values if not _missing(v)]
    gaps = len(present) < len(values)
    spell: Any = _object_text
    if present and all(_is_int(v) for v in present) and not gaps:
        spell = _object_text
    elif present and all(_is_number(v) for v in present):
        spell = _float_spelling(present, gaps)
    return ["" if _missing(v) else spell(v) for v in values]


def _flatten(extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` flattened as `json_normalize` does: the top level's plain
    values first, then each nested dict's values under dotted names."""
    flat = {str(k): v for k, v in extra.items() if not isinstance(v, dict)}
    for key, value in extra.items():
        if isinstance(value, dict):
            flat.update(_nested(value, str(key)))
    return flat


def _nested(value: dict[Any, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        name = f"{prefix}.{key}"
        if isinstance(inner, dict):
            flat.update(_nested(inner, name))
        else:
            flat[name] = inner
    return flat


def _records_columns(records: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Columns of a list of records: keys in order of first appearance."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return {name: [r.get(name, _GAP) for r in records] for name in names}


def _csv(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _report_values(report: Report | None) -> dict[str, Any]:
    if report is None:
        return {}
    return {name: getattr(report, name) for name in _REPORT_COLUMNS}


def _metadata_values(metadata: MetaData) -> dict[str, Any]:
    values = {name: getattr(metadata, name) for name in _METADATA_COLUMNS}
    values["state"] = State(metadata.state).value
    return values


def _table_order(trials: Sequence[Trial]) -> list[Trial]:
    """The rows' order: NePS groups the trials by state (in State's order)
    and sorts that by time_sampled; with NaN times (imported trials) the
    result depends on the order it started from, so it starts from the same."""
    grouped = [t for state in State for t in trials if t.metadata.state == state]
    return sorted(grouped, key=lambda t: t.metadata.time_sampled)


def full_csv(trials: Sequence[Trial]) -> bytes:
    """``summary/full.csv``; `trials` in the order the run stores them."""
    rows = _table_order(trials)
    if not rows:
        return b'""\n'

    columns: list[tuple[str, list[str]]] = []
    config = _records_columns([dict(t.config) for t in rows])
    columns += [(f"config.{k}", _converted_column(v)) for k, v in config.items()]
    extra = _records_columns(
        [_flatten(t.report.extra) if t.report is not None else {} for t in rows]
    )
    columns += [(f"extra.{k}", _normalized_column(v)) for k, v in extra.items()]
    report = _records_columns([_report_values(t.report) for t in rows])
    columns += [(k, _converted_column(v)) for k, v in report.items()]
    metadata = _records_columns([_metadata_values(t.metadata) for t in rows])
    ids = [str(v) for v in metadata.pop("id")]
    columns += [(k, _converted_column(v)) for k, v in metadata.items()]

    kept = [(name, cells) for name, cells in columns if any(c != "" for c in cells)]
    table = [["id", *(name for name, _ in kept)]]
    for i, trial_id in enumerate(ids):
        table.append([trial_id, *(cells[i] for _, cells in kept)])
    return _csv(table)


def _several_objectives(trials: Sequence[Trial]) -> bool:
    return any(
        t.report is not None
        and isinstance(t.report.objective_to_minimize, list | tuple)
        for t in trials
    )


def short_csv(trials: Sequence[Trial]) -> bytes:
    """``summary/short.csv``: counts per state, then the best trial."""
    if not trials:
        return b",0\n"
    counts: dict[str, int] = {}
    for trial in trials:
        state = State(trial.metadata.state).value
        counts[state] = counts.get(state, 0) + 1
    names = [f"num_{state.lower()}" for state in sorted(counts)]
    if _several_objectives(trials):
        rows = [[n, str(counts[s])] for n, s in zip(names, sorted(counts), strict=True)]
        return _csv([["summary", "value"], *rows])

    ordered = _table_order(trials)
    objectives = [
        None if t.report is None else t.report.objective_to_minimize for t in ordered
    ]
    present = [v for v in objectives if not _missing(v) and _is_number(v)]
    if not present:
        # Adding None for the best turns the counts into floats, as in pandas.
        rows = [
            [n, f"{counts[s]:.1f}"] for n, s in zip(names, sorted(counts), strict=True)
        ]
        rows += [["best_objective_to_minimize", ""], ["best_config_id", ""]]
        return _csv([["summary", "value"], *rows])

    # The best objective joins the counts in one column: pandas writes them
    # all as floats, unless every objective is a whole number.
    whole = all(_is_int(v) or float(v).is_integer() for v in present)
    best_index = min(
        (i for i, v in enumerate(objectives) if not _missing(v) and _is_number(v)),
        key=lambda i: objectives[i],
    )
    best = ordered[best_index]
    spell = (lambda v: str(int(v))) if whole else (lambda v: f"{float(v)!r}")
    rows = [[n, spell(counts[s])] for n, s in zip(names, sorted(counts), strict=True)]
    rows.append(["best_objective_to_minimize", spell(objectives[best_index])])
    rows.append(["best_config_id", best.id])
    rows += _best_config_cells(ordered, best_index)
    return _csv([["", "0"], *rows])


def _best_config_cells(ordered: Sequence[Trial], index: int) -> list[list[str]]:
    """The config cells of trial `index` as full.csv spells them."""
    config = _records_columns([dict(t.config) for t in ordered])
    cells = []
    for name, values in config.items():
        column = _converted_column(values)
        if any(c != "" for c in column):
            cells.append([name, column[index]])
    return cells


# --- the best config files -----------------------------------------------------


@dataclass
class _Usage:
    evaluations: int = 0
    cost: float = 0.0
    fidelities: float = 0.0
    time: float = 0.0

    def add(self, trial: Trial, fidelity_name: str | None) -> None:
        report = trial.report
        if report is None:
            return
        self.evaluations += 1
        if report.cost is not None:
            self.cost += report.cost
        if report.evaluation_duration is not None:
            self.time += report.evaluation_duration
        elif (
            trial.metadata.time_started is not None
            and trial.metadata.time_end is not None
        ):
            self.time += trial.metadata.time_end - trial.metadata.time_started
        if fidelity_name and trial.config.get(fidelity_name) is not None:
            self.fidelities += trial.config[fidelity_name]

    def lines(self) -> list[str]:
        return [
            f"Cumulative evaluations: {self.evaluations}",
            f"Cumulative fidelities: {self.fidelities}",
            f"Cumulative cost: {self.cost}",
            f"Cumulative time: {self.time}",
        ]

    def final_lines(self) -> list[str]:
        return [
            f"cumulative_evaluations: {self.evaluations}",
            f"cumulative_cost: {self.cost}",
            f"cumulative_fidelities: {self.fidelities}",
            f"cumulative_time: {self.time}",
        ]


def _valid_objective(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, list | tuple):
        return all(v is not None and not np.isnan(v) for v in value)
    return not np.isnan(value)


def _scores(value: Any) -> list[float]:
    if isinstance(value, Sequence):
        return [float(v) for v in value]
    return [float(value)]


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=False)) and any(
        x < y for x, y in zip(a, b, strict=False)
    )


def _entry(trial: Trial, usage: _Usage) -> str:
    assert trial.report is not None
    lines = [
        f"Config ID: {trial.id}",
        f"Objective to minimize: {trial.report.objective_to_minimize}",
    ]
    if trial.report.cost is not None:
        lines.append(f"Cost: {trial.report.cost}")
    lines += usage.lines()
    lines.append(f"Config: {trial.config}")
    return "\n".join(lines) + "\n" + RULE + "\n"


def best_config_texts(
    trials: Sequence[Trial], *, fidelity_name: str | None, final: bool
) -> tuple[str, str]:
    """(``best_config.txt``, ``best_config_trajectory.txt``); both empty
    when no trial has a valid result yet (NePS leaves them empty then)."""
    valid = [
        t
        for t in trials
        if t.report is not None
        and t.report.err is None
        and _valid_objective(t.report.objective_to_minimize)
    ]
    if not valid:
        return "", ""
    ordered = sorted(
        valid,
        key=lambda t: t.metadata.time_sampled if t.metadata.time_sampled else math.inf,
    )
    several = any(
        isinstance(t.report.objective_to_minimize, list)  # type: ignore[union-attr]
        for t in ordered
    )

    usage = _Usage()
    frontier: list[Trial] = []
    incumbents: list[Trial] = []
    entries: dict[str, str] = {}
    for trial in ordered:
        usage.add(trial, fidelity_name)
        scores = _scores(trial.report.objective_to_minimize)  # type: ignore[union-attr]
        if any(
            len(s) == len(scores) and _dominates(s, scores)
            for s in (_scores(f.report.objective_to_minimize) for f in frontier)  # type: ignore[union-attr]
        ):
            continue
        frontier = [
            f
            for f in frontier
            if not (
                len(_scores(f.report.objective_to_minimize)) == len(scores)  # type: ignore[union-attr]
                and _dominates(scores, _scores(f.report.objective_to_minimize))  # type: ignore[union-attr]
            )
        ]
        frontier.append(trial)
        if not several:
            incumbents.append(trial)
        entries[trial.id] = _entry(trial, usage)

    trajectory = ""
    if incumbents:
        trajectory = _HEADER + "".join(entries[t.id] for t in incumbents)
    best = _HEADER + "".join(entries[t.id] for t in frontier)
    if final:
        best += "\n" + RULE + "\nFinal cumulative metrics (Assuming completed run):"
        best += "".join(f"\n{line}" for line in usage.final_lines())
    return best, trajectory


def summary_files(
    trials: Sequence[Trial], *, fidelity_name: str | None, final: bool
) -> dict[str, bytes]:
    """Every file of ``summary/`` by name, for `trials` in stored order."""
    best, trajectory = best_config_texts(
        trials, fidelity_name=fidelity_name, final=final
    )
    return {
        "full.csv": full_csv(trials),
        "short.csv": short_csv(trials),
        "best_config.txt": best.encode(),
        "best_config_trajectory.txt": trajectory.encode(),
    }
