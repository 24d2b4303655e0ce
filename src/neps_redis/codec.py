"""Python values to Redis fields and back, exactly, without pickle.

Trials are stored as hashes whose fields a person can read with
``redis-cli HGETALL``: ids, states and locations as plain text, numbers as
Python's own ``repr`` (``0.25``, ``nan``, ``-inf``, ``-0.0``), and configs,
learning curves and extra info as JSON.

JSON cannot hold every value exactly, so values it cannot hold are written as
a one-key object whose key starts with ``$`` (the *tagged form*):

====================================  =========================================
value                                 stored as
====================================  =========================================
``nan``, ``inf``, ``-inf``            ``{"$float": "nan"}``
tuple                                 ``{"$tuple": [...]}``
numpy scalar                          ``{"$np": ["float32", 0.5]}``
numpy array                           ``{"$ndarray": ["int64", [2, 2], [...]]}``
bytes                                 ``{"$bytes": "<base64>"}``
dict with non-str keys, or one key    ``{"$dict": [[key, value], ...]}``
starting with ``$``
====================================  =========================================

numpy scalars and arrays therefore come back as numpy values of the same
dtype. The optimizer state's RNG snapshot uses the same tagged form inside
msgpack, where arrays keep their raw bytes.

Anything else (objects, sets, complex numbers, object arrays...) is refused
with an `EncodingError` naming the field, the place inside it and the type,
before anything is written.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import fields as dataclass_fields
from typing import Any

import msgpack
import numpy as np

from neps_redis.errors import EncodingError
from neps_redis.model import (
    BudgetInfo,
    MetaData,
    OptimizationState,
    OptimizerInfo,
    Report,
    SeedSnapshot,
    SerializableTrialError,
    State,
    Trial,
)

logger = logging.getLogger(__name__)

_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_TAGS = ("$float", "$tuple", "$np", "$ndarray", "$bytes", "$dict", "$bigint", "$torch")
_MSGPACK_INT_RANGE = (-(2**63), 2**64 - 1)
# Values that are their own tagged form.
_PLAIN = {int, float, str, bool, type(None)}


# --- the tagged form -------------------------------------------------------


def to_tagged(value: Any, where: str, *, binary: bool = False) -> Any:
    """`value` as plain JSON/msgpack data; `where` names it in errors.

    With `binary`, bytes stay bytes (for msgpack) instead of base64 text.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if type(value) is int:
        low, high = _MSGPACK_INT_RANGE
        if binary and not low <= value <= high:
            return {"$bigint": str(value)}
        return value
    if type(value) is float:
        if math.isnan(value) or math.isinf(value):
            return {"$float": repr(value)}
        return value
    if isinstance(value, np.generic):
        return _tag_numpy_scalar(value, where, binary=binary)
    if isinstance(value, np.ndarray):
        return _tag_array(value, where, binary=binary)
    if isinstance(value, bytes):
        if binary:
            return {"$bytes": value}
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if type(value) is tuple:
        return {"$tuple": _tag_sequence(value, where, binary=binary)}
    if type(value) is list:
        return _tag_sequence(value, where, binary=binary)
    if isinstance(value, Mapping):
        return _tag_mapping(value, where, binary=binary)
    if _is_torch_tensor(value):
        return _tag_torch(value, where, binary=binary)
    raise EncodingError(
        f"Cannot store {where}: values of type {type(value).__module__}."
        f"{type(value).__qualname__} ({value!r:.60}) have no exact stored form."
        " Use numbers, strings, bools, None, lists, tuples, dicts, bytes or numpy"
        " values."
    )


def _tag_sequence(value: list | tuple, where: str, *, binary: bool) -> list:
    # Fast path for the common all-int or all-str sequence (an RNG state
    # holds 625 ints): nothing in it needs a tag.
    kinds = set(map(type, value))
    if kinds == {str} or (
        kinds == {int}
        and not (binary and not _MSGPACK_INT_RANGE[0] <= min(value))
        and not (binary and not max(value) <= _MSGPACK_INT_RANGE[1])
    ):
        return list(value)
    return [to_tagged(v, f"{where}[{i}]", binary=binary) for i, v in enumerate(value)]


def _tag_mapping(value: Mapping, where: str, *, binary: bool) -> Any:
    keys = list(value.keys())
    plain_keys = all(type(k) is str for k in keys)
    looks_tagged = len(keys) == 1 and plain_keys and keys[0].startswith("$")
    if plain_keys and not looks_tagged and type(value) is dict:
        return {
            k: to_tagged(v, f"{where}[{k!r}]", binary=binary) for k, v in value.items()
        }
    return {
        "$dict": [
            [
                to_tagged(k, f"{where} key {k!r}", binary=binary),
                to_tagged(v, f"{where}[{k!r}]", binary=binary),
            ]
            for k, v in value.items()
        ]
    }


def _tag_numpy_scalar(value: np.generic, where: str, *, binary: bool) -> Any:
    if value.dtype.kind not in "biufU":
        raise EncodingError(
            f"Cannot store {where}: numpy scalar of dtype {value.dtype} has no"
            " exact stored form."
        )
    inner = to_tagged(value.item(), where, binary=binary)
    return {"$np": [_dtype_name(value.dtype), inner]}


def _tag_array(value: np.ndarray, where: str, *, binary: bool) -> Any:
    if value.dtype.kind not in "biufU":
        raise EncodingError(
            f"Cannot store {where}: numpy array of dtype {value.dtype} has no"
            " exact stored form."
        )
    if binary and value.dtype.kind != "U":
        data: Any = np.ascontiguousarray(value).tobytes()
    else:
        data = to_tagged(value.tolist(), where, binary=binary)
    return {"$ndarray": [_dtype_name(value.dtype), list(value.shape), data]}


def _dtype_name(dtype: np.dtype) -> str:
    """A dtype's readable name ("float32") where it names it exactly; byte
    order and width otherwise ("<U5")."""
    return dtype.str if dtype.kind == "U" or dtype.byteorder == ">" else dtype.name


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "numpy")


def _tag_torch(value: Any, where: str, *, binary: bool) -> Any:
    array = value.detach().cpu().numpy()
    return {"$torch": _tag_array(array, where, binary=binary)["$ndarray"]}


def from_tagged(value: Any) -> Any:
    """The inverse of `to_tagged`."""
    if isinstance(value, list):
        if set(map(type, value)) <= _PLAIN:
            return value
        return [from_tagged(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag in _TAGS:
            return _untag(tag, inner)
    return {k: from_tagged(v) for k, v in value.items()}


def _untag(tag: str, inner: Any) -> Any:
    if tag == "$float":
        return _SPECIAL_FLOATS[inner]
    if tag == "$tuple":
        return tuple(from_tagged(inner))
    if tag == "$bigint":
        return int(inner)
    if tag == "$bytes":
        return inner if isinstance(inner, bytes) else base64.b64decode(inner)
    if tag == "$dict":
        return {from_tagged(k): from_tagged(v) for k, v in inner}
    if tag == "$np":
        dtype, item = inner
        return np.dtype(dtype).type(from_tagged(item))
    if tag == "$ndarray":
        return _untag_array(inner)
    # "$torch": a tensor where torch exists; without torch there is nothing
    # to hold it, and NePS itself treats a missing torch state as None.
    try:
        import torch
    except ImportError:
        logger.warning("A stored torch RNG state was dropped: torch is not installed.")
        return None
    return torch.from_numpy(_untag_array(inner).copy())


def _untag_array(inner: list) -> np.ndarray:
    dtype, shape, data = inner
    if isinstance(data, bytes):
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
    return np.array(from_tagged(data), dtype=np.dtype(dtype)).reshape(shape)


def dumps_json(value: Any, where: str) -> str:
    """JSON text of `value` in tagged form (raises EncodingError)."""
    try:
        text = json.dumps(to_tagged(value, where), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise EncodingError(f"Cannot store {where}: it is nested too deeply.") from None
    return _checked_text(text, where)


def _checked_text(text: str, where: str) -> str:
    """`text` if it can be sent as UTF-8 (a lone surrogate cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise EncodingError(
            f"Cannot store {where}: it contains {text[error.start : error.end]!r},"
            " which is not valid unicode text."
        ) from None
    return text


def loads_json(text: str | bytes) -> Any:
    """The value `dumps_json` wrote."""
    return from_tagged(json.loads(text))


def dumps_msgpack(value: Any, where: str) -> bytes:
    """msgpack bytes of `value` in tagged form (raises EncodingError)."""
    return msgpack.packb(to_tagged(value, where, binary=True), use_bin_type=True)


def loads_msgpack(data: bytes) -> Any:
    """The value `dumps_msgpack` wrote."""
    return from_tagged(msgpack.unpackb(data, raw=False, strict_map_key=False))


# --- plain-text scalars ----------------------------------------------------


def encode_number(value: Any, where: str) -> str | None:
    """A number as readable text (`repr`), anything else as tagged JSON.

    None is "no field" and returns None.
    """
    if value is None:
        return None
    if type(value) is float or type(value) is int:
        return repr(value)
    return dumps_json(value, where)


def decode_number(text: str) -> Any:
    """The inverse of `encode_number`."""
    if text[:1] in ("[", "{", '"') or text in ("true", "false"):
        return loads_json(text)
    if text in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text]
    try:
        return int(text)
    except ValueError:
        return float(text)


def _encode_text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EncodingError(
            f"Cannot store {where}: expected a str, got {type(value).__name__}"
            f" ({value!r:.60})."
        )
    return _checked_text(str(value), where)


def error_text(err: BaseException) -> str:
    """An error's message; its repr or type name when `str()` itself fails,
    so that a badly written exception cannot block its own report."""
    for describe in (str, repr):
        try:
            text = describe(err)
        except Exception:  # whatever fails, the next description is tried
            continue
        if isinstance(text, str):
            return text
    return type(err).__name__


# --- trials ----------------------------------------------------------------

# Metadata fields that hold text and numbers, in NePS's order.
_TEXT_METADATA = (
    "id",
    "location",
    "previous_trial_id",
    "previous_trial_location",
    "sampling_worker_id",
    "evaluating_worker_id",
)
_NUMBER_METADATA = (
    "time_sampled",
    "evaluation_duration",
    "time_submitted",
    "time_started",
    "time_end",
)
# Report fields, as stored in the trial's hash.
REPORT_FIELDS = (
    "reported_as",
    "objective_to_minimize",
    "cost",
    "learning_curve",
    "extra",
    "err",
    "err_type",
    "tb",
    "report_evaluation_duration",
)
METADATA_FIELDS = tuple(f.name for f in dataclass_fields(MetaData))


def error_type_name(err: BaseException | None) -> str | None:
    """The name under which an error is listed in the shared errors."""
    return None if err is None else type(err).__name__


def report_to_fields(report: Report, where: str = "report") -> dict[str, str]:
    """The report's hash fields; None values are left out."""
    if report.reported_as not in ("success", "failed", "crashed"):
        raise EncodingError(
            f"Cannot store {where}.reported_as: {report.reported_as!r} is not"
            " 'success', 'failed' or 'crashed'."
        )
    if not isinstance(report.extra, Mapping):
        raise EncodingError(
            f"Cannot store {where}.extra: expected a mapping, got"
            f" {type(report.extra).__name__}."
        )
    err = report.err
    values: dict[str, str | None] = {
        "reported_as": report.reported_as,
        "objective_to_minimize": encode_number(
            report.objective_to_minimize, f"{where}.objective_to_minimize"
        ),
        "cost": encode_number(report.cost, f"{where}.cost"),
        "learning_curve": (
            None
            if report.learning_curve is None
            else dumps_json(report.learning_curve, f"{where}.learning_curve")
        ),
        "extra": dumps_json(report.extra, f"{where}.extra"),
        "err": None if err is None else _checked_text(error_text(err), f"{where}.err"),
        "err_type": error_type_name(err),
        "tb": _encode_text(report.tb, f"{where}.tb"),
        "report_evaluation_duration": encode_number(
            report.evaluation_duration, f"{where}.evaluation_duration"
        ),
    }
    return {k: v for k, v in values.items() if v is not None}


def _encode_time(value: Any, where: str) -> str | None:
    """A time or duration as plain number text. numpy numbers become Python
    numbers: these fields are scores of the state indexes, which must be
    plain numbers for Redis."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise EncodingError(
            f"Cannot store {where}: expected a number or None, got"
            f" {type(value).__name__} ({value!r:.60})."
        )
    number = value.item() if isinstance(value, np.generic) else value
    if isinstance(number, complex):
        raise EncodingError(f"Cannot store {where}: complex numbers are not times.")
    return repr(number)


def metadata_to_fields(metadata: MetaData, where: str = "metadata") -> dict[str, str]:
    """The metadata's hash fields; None values are left out."""
    values: dict[str, str | None] = {
        name: _encode_text(getattr(metadata, name), f"{where}.{name}")
        for name in _TEXT_METADATA
    }
    values.update(
        {
            name: _encode_time(getattr(metadata, name), f"{where}.{name}")
            for name in _NUMBER_METADATA
        }
    )
    values["state"] = State(metadata.state).value
    return {k: v for k, v in values.items() if v is not None}


def trial_to_fields(trial: Trial) -> dict[str, str]:
    """Every hash field of a trial (report included, lease fields excluded)."""
    where = f"trial {trial.metadata.id!r}"
    if not isinstance(trial.config, Mapping):
        raise EncodingError(
            f"Cannot store {where} config: expected a mapping, got"
            f" {type(trial.config).__name__}."
        )
    fields = metadata_to_fields(trial.metadata, f"{where} metadata")
    fields["config"] = dumps_json(dict(trial.config), f"{where} config")
    fields["source"] = _encode_text(trial.source, f"{where} source") or "run"
    if trial.report is not None:
        fields.update(report_to_fields(trial.report, f"{where} report"))
    return fields


def _text(raw: dict[str, str], name: str) -> str | None:
    return raw.get(name)


def _number(raw: dict[str, str], name: str) -> Any:
    text = raw.get(name)
    return None if text is None else decode_number(text)


def decode_hash(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash as read by redis-py (bytes) to str -> str."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (
            v.decode() if isinstance(v, bytes) else v
        )
        for k, v in raw.items()
    }


def fields_to_trial(raw: dict[str, str]) -> Trial:
    """A trial from its (decoded) hash fields."""
    metadata = MetaData(
        id=raw["id"],
        location=raw.get("location", ""),
        state=State(raw["state"]),
        previous_trial_id=_text(raw, "previous_trial_id"),
        previous_trial_location=_text(raw, "previous_trial_location"),
        sampling_worker_id=raw.get("sampling_worker_id", ""),
        time_sampled=_number(raw, "time_sampled"),
        evaluating_worker_id=_text(raw, "evaluating_worker_id"),
        evaluation_duration=_number(raw, "evaluation_duration"),
        time_submitted=_number(raw, "time_submitted"),
        time_started=_number(raw, "time_started"),
        time_end=_number(raw, "time_end"),
    )
    report = None
    if "reported_as" in raw:
        report = Report(
            objective_to_minimize=_number(raw, "objective_to_minimize"),
            cost=_number(raw, "cost"),
            learning_curve=(
                loads_json(raw["learning_curve"]) if "learning_curve" in raw else None
            ),
            extra=loads_json(raw["extra"]) if "extra" in raw else {},
            err=Exception(raw["err"]) if "err" in raw else None,
            tb=_text(raw, "tb"),
            reported_as=raw["reported_as"],  # type: ignore[arg-type]
            evaluation_duration=_number(raw, "report_evaluation_duration"),
        )
    trial = Trial(
        config=loads_json(raw["config"]),
        metadata=metadata,
        report=report,
        source=raw.get("source", "run"),  # type: ignore[arg-type]
    )
    trial.token = raw.get("token")
    return trial


# --- errors ----------------------------------------------------------------


def error_to_fields(err: SerializableTrialError) -> dict[str, str]:
    """A shared-errors stream entry."""
    fields = {
        "trial_id": err.trial_id,
        "worker_id": err.worker_id,
        "err_type": err.err_type,
        "err": err.err,
    }
    if err.tb is not None:
        fields["tb"] = err.tb
    return fields


def fields_to_error(raw: dict[str, str]) -> SerializableTrialError:
    """The inverse of `error_to_fields`."""
    return SerializableTrialError(
        trial_id=raw["trial_id"],
        worker_id=raw["worker_id"],
        err_type=raw["err_type"],
        err=raw["err"],
        tb=raw.get("tb"),
    )


# --- optimizer info and state ----------------------------------------------


def dumps_optimizer_info(info: Mapping[str, Any]) -> str:
    """Optimizer info as JSON, refusing what NePS could not store either."""
    if not isinstance(info, Mapping) or "name" not in info or "info" not in info:
        raise EncodingError(
            "Cannot store optimizer_info: expected a mapping with keys 'name' and"
            f" 'info', got {info!r:.80}."
        )
    if not isinstance(info["name"], str):
        raise EncodingError(
            "Cannot store optimizer_info['name']: expected a str, got"
            f" {type(info['name']).__name__}."
        )
    return dumps_json(dict(info), "optimizer_info")


def loads_optimizer_info(text: str | bytes) -> OptimizerInfo:
    """The inverse of `dumps_optimizer_info`."""
    data = loads_json(text)
    info = OptimizerInfo(name=data["name"], info=data["info"] or {})
    if isinstance(data.get("derived"), dict):
        info["derived"] = data["derived"]
    return info


_BUDGET_FIELDS = tuple(f.name for f in dataclass_fields(BudgetInfo))


def budget_to_json(budget: BudgetInfo) -> str:
    """A budget as a JSON object of its fields."""
    values = {name: getattr(budget, name) for name in _BUDGET_FIELDS}
    return dumps_json(values, "optimizer_state.budget")


def json_to_budget(text: str | bytes) -> BudgetInfo:
    """A budget; fields this version does not know are ignored, not fatal."""
    values = loads_json(text)
    known = {k: v for k, v in values.items() if k in _BUDGET_FIELDS}
    if unknown := sorted(set(values) - set(known)):
        logger.debug("Ignoring budget fields unknown to this version: %r", unknown)
    return BudgetInfo(**known)


def seed_snapshot_to_bytes(snapshot: SeedSnapshot) -> bytes:
    """The RNG snapshot as msgpack, arrays kept as raw bytes."""
    return dumps_msgpack(
        {
            "np_rng": snapshot.np_rng,
            "py_rng": snapshot.py_rng,
            "torch_rng": snapshot.torch_rng,
            "torch_cuda_rng": snapshot.torch_cuda_rng,
        },
        "optimizer_state.seed_snapshot",
    )


def bytes_to_seed_snapshot(data: bytes) -> SeedSnapshot:
    """The inverse of `seed_snapshot_to_bytes`."""
    values = loads_msgpack(data)
    return SeedSnapshot(
        np_rng=values["np_rng"],
        py_rng=values["py_rng"],
        torch_rng=values.get("torch_rng"),
        torch_cuda_rng=values.get("torch_cuda_rng"),
    )


def optimizer_state_to_fields(state: OptimizationState) -> dict[str, bytes | str]:
    """The optimizer state's hash fields (worker ids live in their own key)."""
    if not isinstance(state.seed_snapshot, SeedSnapshot):
        raise EncodingError(
            "Cannot store optimizer_state.seed_snapshot: expected a SeedSnapshot,"
            f" got {type(state.seed_snapshot).__name__}."
        )
    fields: dict[str, bytes | str] = {
        "seed_snapshot": seed_snapshot_to_bytes(state.seed_snapshot)
    }
    if state.budget is not None:
        fields["budget"] = budget_to_json(state.budget)
    if state.shared_state is not None:
        fields["shared_state"] = dumps_json(
            state.shared_state, "optimizer_state.shared_state"
        )
    return fields


def fields_to_optimizer_state(
    raw: Mapping[bytes, bytes], worker_ids: list[str] | None
) -> OptimizationState:
    """An optimizer state from its hash fields and the run's worker ids."""
    budget = raw.get(b"budget")
    shared = raw.get(b"shared_state")
    return OptimizationState(
        budget=None if budget is None else json_to_budget(budget),
        seed_snapshot=bytes_to_seed_snapshot(raw[b"seed_snapshot"]),
        shared_state=None if shared is None else loads_json(shared),
        worker_ids=worker_ids,
    )
