"""The text files of a NePS run directory: written as NePS 0.17 writes them,
read back strictly.

Writers return bytes, byte for byte what NePS's file-based state writes for
the same values, with one deliberate difference: values are turned into
plain YAML/JSON types first (numpy scalars and arrays into numbers and
lists, tuples into lists), because NePS writes numpy values with Python tags
that its own safe loader then refuses.

Readers accept exactly NePS's formats and raise `CorruptRunError` naming
the file and, where it is known, the line: a file that NePS itself would
fail to read (extra or missing keys, a torn JSON line) is refused here too,
never half read. Nothing here touches Redis, and nothing imports `neps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from neps_redis.errors import CorruptRunError
from neps_redis.model import (
    MetaData,
    OptimizerInfo,
    Report,
    SerializableTrialError,
    State,
)

# NePS uses libyaml when PyYAML has it; so do we, so that line wrapping and
# quoting come out the same.
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

CONFIG_FILE = "config.yaml"
METADATA_FILE = "metadata.json"
REPORT_FILE = "report.yaml"
PREVIOUS_FILE = "previous_trial_id.txt"
OPTIMIZER_INFO_FILE = "optimizer_info.yaml"
OPTIMIZER_STATE_FILE = "optimizer_state.pkl"
PIPELINE_SPACE_FILE = "pipeline_space.pkl"
ERRORS_FILE = "shared_errors.jsonl"
CONFIGS_DIR = "configs"
TRIAL_CACHE_FILE = ".trial_cache.pkl"
SUMMARY_DIR = "summary"
CONFIG_PREFIX = "config_"

METADATA_KEYS = tuple(f.name for f in dataclass_fields(MetaData))
REPORT_KEYS = tuple(f.name for f in dataclass_fields(Report))
ERROR_KEYS = tuple(f.name for f in dataclass_fields(SerializableTrialError))

# What each metadata.json value may be, as NePS writes it.
_METADATA_KINDS = {
    "id": "text",
    "location": "text",
    "previous_trial_id": "text or null",
    "previous_trial_location": "text or null",
    "sampling_worker_id": "text",
    "time_sampled": "number",
    "evaluating_worker_id": "text or null",
    "evaluation_duration": "number or null",
    "time_submitted": "number or null",
    "time_started": "number or null",
    "time_end": "number or null",
}
_REPORTED_AS = ("success", "failed", "crashed")


# --- writing ---------------------------------------------------------------


def plain(value: Any) -> Any:
    """`value` made of YAML/JSON's own types: numpy values become Python
    numbers and lists, tuples lists, mappings dicts, exceptions their text."""
    if isinstance(value, np.generic):
        return plain(value.item())
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, BaseException):
        return str(value)
    return value


def dump_yaml(data: Any) -> bytes:
    """YAML as NePS writes it: block style, keys sorted."""
    return yaml.dump(plain(data), Dumper=_Dumper, sort_keys=True).encode()


def config_yaml(config: Mapping[str, Any]) -> bytes:
    """A trial's ``config.yaml``."""
    return dump_yaml(dict(config))


def metadata_json(metadata: MetaData) -> bytes:
    """A trial's ``metadata.json``: the 12 keys in field order, one line."""
    data = {name: plain(getattr(metadata, name)) for name in METADATA_KEYS}
    data["state"] = State(metadata.state).value
    return json.dumps(data).encode()


def report_yaml(report: Report) -> bytes:
    """A reported trial's ``report.yaml``: the 8 keys sorted, err as text."""
    data = {name: getattr(report, name) for name in REPORT_KEYS}
    if data["err"] is not None:
        data["err"] = str(data["err"])
    return dump_yaml(data)


def errors_jsonl(errors: list[SerializableTrialError]) -> bytes:
    """``shared_errors.jsonl``: one object a line, no newline after the last."""
    lines = [
        json.dumps({name: getattr(err, name) for name in ERROR_KEYS}) for err in errors
    ]
    return "\n".join(lines).encode()


def optimizer_info_yaml(info: Mapping[str, Any]) -> bytes:
    """``optimizer_info.yaml``."""
    return dump_yaml(dict(info))


# --- reading ---------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptRunError(path, None, f"not UTF-8 text ({error})") from None
    except OSError as error:
        raise CorruptRunError(path, None, f"cannot be read ({error})") from None


def _yaml_mapping(path: Path) -> tuple[str, dict[str, Any]]:
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_Loader)  # a safe loader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        problem = getattr(error, "problem", None) or str(error)
        raise CorruptRunError(path, line, f"not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise CorruptRunError(
            path, 1, f"expected a mapping, found {type(data).__name__}"
        )
    return text, data


def _yaml_key_line(text: str, key: str) -> int | None:
    """The line on which a top-level key of a YAML mapping stands."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, _ in node.value:
        if getattr(key_node, "value", None) == key:
            return key_node.start_mark.line + 1
    return None


def _json_key_line(text: str, key: str) -> int:
    position = text.find(json.dumps(key))
    return 1 if position < 0 else text.count("\n", 0, position) + 1


def _check_keys(
    path: Path, data: Mapping[str, Any], expected: tuple[str, ...], locate: Any
) -> None:
    """Refuse extra or missing keys, as NePS's dataclass constructors do."""
    extra = [k for k in data if k not in expected]
    if extra:
        raise CorruptRunError(
            path,
            locate(str(extra[0])),
            f"unknown key(s) {extra}; NePS expects exactly {list(expected)}",
        )
    missing = [k for k in expected if k not in data]
    if missing:
        raise CorruptRunError(
            path, None, f"missing key(s) {missing}; NePS expects {list(expected)}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(path: Path, line: Any, name: str, value: Any, kind: str) -> None:
    ok = {
        "text": isinstance(value, str),
        "text or null": value is None or isinstance(value, str),
        "number": _is_number(value),
        "number or null": value is None or _is_number(value),
    }[kind]
    if not ok:
        raise CorruptRunError(
            path, line, f"{name} must be {kind}, found {type(value).__name__} {value!r}"
        )


def read_optimizer_info(path: Path) -> tuple[OptimizerInfo, list[str]]:
    """``optimizer_info.yaml``: name, info and (optional) derived; returns
    the info and the names of keys NePS does not read (ignored)."""
    text, data = _yaml_mapping(path)
    for key in ("name", "info"):
        if key not in data:
            raise CorruptRunError(path, None, f"missing key {key!r}")
    if not isinstance(data["name"], str):
        raise CorruptRunError(path, _yaml_key_line(text, "name"), "name must be text")
    if not isinstance(data["info"], dict | None):
        raise CorruptRunError(
            path, _yaml_key_line(text, "info"), "info must be a mapping"
        )
    info = OptimizerInfo(name=data["name"], info=data["info"] or {})
    if isinstance(data.get("derived"), dict):
        info["derived"] = data["derived"]
    ignored = [str(k) for k in data if k not in ("name", "info", "derived")]
    return info, ignored


def read_config(path: Path) -> dict[str, Any]:
    """A trial's ``config.yaml`` (or ``config.json``), a mapping."""
    if path.suffix == ".json":
        text = _read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CorruptRunError(
                path, error.lineno, f"not valid JSON: {error.msg}"
            ) from None
        if not isinstance(data, dict):
            raise CorruptRunError(path, 1, "expected a JSON object")
        return data
    return _yaml_mapping(path)[1]


def read_metadata(path: Path) -> MetaData:
    """A trial's ``metadata.json``: exactly the 12 MetaData keys."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptRunError(
            path, error.lineno, f"not valid JSON: {error.msg}"
        ) from None
    if not isinstance(data, dict):
        raise CorruptRunError(path, 1, "expected a JSON object")
    _check_keys(path, data, METADATA_KEYS, lambda key: _json_key_line(text, key))

    def line(key: str) -> int:
        return _json_key_line(text, key)

    for name, kind in _METADATA_KINDS.items():
        _check_type(path, line(name), name, data[name], kind)
    try:
        data["state"] = State(data["state"])
    except ValueError:
        raise CorruptRunError(
            path,
            line("state"),
            f"state {data['state']!r} is not one of {[s.value for s in State]}",
        ) from None
    return MetaData(**data)


def _is_objective(value: Any) -> bool:
    if value is None or _is_number(value):
        return True
    return isinstance(value, list) and all(v is None or _is_number(v) for v in value)


def read_report(path: Path) -> Report:
    """A trial's ``report.yaml`` (or ``report.json``): exactly the 8 keys."""
    if path.suffix == ".json":
        text = _read_text(path)
        data = read_config(path)

        def locate(key: str) -> int | None:
            return _json_key_line(text, key)

    else:
        text, data = _yaml_mapping(path)

        def locate(key: str) -> int | None:
            return _yaml_key_line(text, key)

    _check_keys(path, data, REPORT_KEYS, locate)

    if data["reported_as"] not in _REPORTED_AS:
        raise CorruptRunError(
            path,
            locate("reported_as"),
            f"reported_as {data['reported_as']!r} is not one of {list(_REPORTED_AS)}",
        )
    if not _is_objective(data["objective_to_minimize"]):
        raise CorruptRunError(
            path,
            locate("objective_to_minimize"),
            "objective_to_minimize must be a number, a list of numbers or null",
        )
    for name in ("cost", "evaluation_duration"):
        _check_type(path, locate(name), name, data[name], "number or null")
    for name in ("err", "tb"):
        _check_type(path, locate(name), name, data[name], "text or null")
    if data["learning_curve"] is not None and not isinstance(
        data["learning_curve"], list
    ):
        raise CorruptRunError(
            path, locate("learning_curve"), "learning_curve must be a list or null"
        )
    if not isinstance(data["extra"], dict):
        raise CorruptRunError(path, locate("extra"), "extra must be a mapping")
    return Report(**data)


def read_previous_trial_id(path: Path) -> str:
    """``previous_trial_id.txt``: the id, as written (no newline)."""
    return _read_text(path)


def iter_errors(
    path: Path,
) -> Iterator[tuple[int, SerializableTrialError | CorruptRunError]]:
    """Each line of ``shared_errors.jsonl`` with its number: the error, or
    the `CorruptRunError` that says why the line cannot be read.

    A line must hold exactly one JSON object with NePS's five keys. A line
    cut in the middle, or two objects on one line (what an append that
    crashed on a shared filesystem leaves), is corrupt. Empty lines carry
    nothing and are passed over.
    """
    text = _read_text(path)
    decoder = json.JSONDecoder()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data, end = decoder.raw_decode(line, _skip_space(line))
        except json.JSONDecodeError as error:
            yield (
                number,
                CorruptRunError(
                    path,
                    number,
                    f"not a whole JSON object: {error.msg} (column {error.colno})",
                ),
            )
            continue
        rest = line[end:].strip()
        if rest:
            yield (
                number,
                CorruptRunError(
                    path,
                    number,
                    "two JSON values on one line (the second starts at column"
                    f" {line.index(rest, end) + 1}); NePS writes one per line",
                ),
            )
            continue
        if not isinstance(data, dict):
            yield number, CorruptRunError(path, number, "expected a JSON object")
            continue
        try:
            _check_keys(path, data, ERROR_KEYS, lambda key, n=number: n)
            for name in ("trial_id", "worker_id", "err_type", "err"):
                _check_type(path, number, name, data[name], "text")
            _check_type(path, number, "tb", data["tb"], "text or null")
        except CorruptRunError as error:
            yield number, error
            continue
        yield number, SerializableTrialError(**data)


def _skip_space(line: str) -> int:
    return len(line) - len(line.lstrip())


def is_nan(value: Any) -> bool:
    """True for a float NaN (numpy's included)."""
    return isinstance(value, float | np.floating) and math.isnan(value)
