"""Pickles of NePS's own classes, written and read without NePS installed.

NePS keeps ``optimizer_state.pkl`` and ``configs/.trial_cache.pkl`` as
pickles of its classes (``neps.state.trial.Trial``, ``MetaData``,
``Report``, ``State``; ``neps.state.optimizer.OptimizationState`` and
``BudgetInfo``; ``neps.state.seed_snapshot.SeedSnapshot``). This package has
look-alike classes in `model`, and this module translates between the two at
the level of the pickle stream:

- Writing: a GLOBAL reference is only a module path and a name, so
  nothing of NePS is needed to write one. Each of this package's classes is
  written as the NePS class of the same name, with NePS's fields only (the
  claim token stays out), in the opcodes pickle itself writes for a
  dataclass; plain values inside go through the C pickler. Any exception is
  written as a plain builtin ``Exception(text)``: a user's exception class
  that cannot be rebuilt from its message would break every later read of
  the cache in NePS (case 001).
- Reading: an unpickler that maps those same names back onto records of
  this package, and refuses every other global except the few that numpy
  arrays and torch RNG tensors need. Reading runs only when the caller opted
  in to unpickling (see `export.import_run`), because a pickle can still run
  the code of the globals it is allowed.

Torch RNG states are written as ``torch.from_numpy(<uint8 array>)``, the
same tensor NePS pickles but the same bytes each time; on a machine
without torch there is no torch state to write (the state read from Redis
holds None there, see `codec`), and NePS reads None as "leave torch's RNG
as it is". This module never imports `neps` or `torch`.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import fields as dataclass_fields
from typing import Any

import numpy as np

from neps_redis.model import (
    BudgetInfo,
    MetaData,
    OptimizationState,
    Report,
    SeedSnapshot,
    State,
    Trial,
)

logger = logging.getLogger(__name__)

# The protocol NePS writes (pickle.HIGHEST_PROTOCOL on Python 3.8+).
PROTOCOL = 5

# This package's class -> (NePS module, NePS name).
NEPS_NAMES: dict[type, tuple[str, str]] = {
    Trial: ("neps.state.trial", "Trial"),
    MetaData: ("neps.state.trial", "MetaData"),
    Report: ("neps.state.trial", "Report"),
    State: ("neps.state.trial", "State"),
    OptimizationState: ("neps.state.optimizer", "OptimizationState"),
    BudgetInfo: ("neps.state.optimizer", "BudgetInfo"),
    SeedSnapshot: ("neps.state.seed_snapshot", "SeedSnapshot"),
}

# The fields NePS's dataclasses hold, in their order; anything else an
# instance of ours carries (the claim token) is not NePS's and stays out.
_NEPS_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclass_fields(cls) if f.name != "token")
    for cls in NEPS_NAMES
    if cls is not State
}


def _global(cls: type) -> bytes:
    """The GLOBAL opcode naming NePS's class for `cls`."""
    module, name = NEPS_NAMES[cls]
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


# Opcodes that never change, made once: each class's "cls.__new__(cls)",
# each field name, each State member, and builtins.Exception.
_NEW = {cls: _global(cls) + pickle.EMPTY_TUPLE + pickle.NEWOBJ for cls in _NEPS_FIELDS}
_KEYS = {
    name: pickle.dumps(name, protocol=3)[2:-1]
    for names in _NEPS_FIELDS.values()
    for name in names
}
_STATES = {
    member: _global(State)
    + pickle.dumps(member.value, protocol=3)[2:-1]
    + pickle.TUPLE1
    + pickle.REDUCE
    for member in State
}
_EXCEPTION = pickle.GLOBAL + b"builtins\nException\n"
_TORCH_FROM_NUMPY = pickle.GLOBAL + b"torch\nfrom_numpy\n"


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "numpy")


# Exact types: a subclass (an enum member is a str) may be a class of ours.
_PLAIN_TYPES = frozenset({type(None), bool, int, float, str, bytes})


def _is_plain(value: Any) -> bool:
    """Whether `value` holds none of the classes this module renames."""
    if type(value) in _PLAIN_TYPES or isinstance(value, np.generic):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype != object
    if type(value) in (list, tuple):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _opcodes(value: Any) -> bytes:
    """The opcodes that push `value`, without a stream's header and end.

    Each part stands on its own, so parts can be joined into one stream:
    NePS's classes are written here by hand (GLOBAL, NEWOBJ, the fields'
    dict, BUILD: what pickle writes for a dataclass); plain values go
    through the C pickler with protocol 3, which has no frames and whose
    memo opcodes name their slots explicitly, so a part only ever reads
    back slots it wrote itself.
    """
    cls = type(value)
    names = _NEPS_FIELDS.get(cls)
    if names is not None:
        fields = [_KEYS[name] + _opcodes(getattr(value, name)) for name in names]
        return (
            b"".join(
                [_NEW[cls], pickle.EMPTY_DICT, pickle.MARK, *fields, pickle.SETITEMS]
            )
            + pickle.BUILD
        )
    if isinstance(value, State):
        return _STATES[State(value)]
    if isinstance(value, BaseException):
        text = pickle.dumps(str(value), protocol=3)[2:-1]
        return _EXCEPTION + text + pickle.TUPLE1 + pickle.REDUCE
    if _is_plain(value):
        return pickle.dumps(value, protocol=3)[2:-1]
    if _is_torch_tensor(value):
        # torch's own pickle embeds a random id, so an unchanged RNG state
        # would never be the same bytes twice; from_numpy of its bytes is.
        array = value.detach().cpu().numpy()
        return _TORCH_FROM_NUMPY + _opcodes(array) + pickle.TUPLE1 + pickle.REDUCE
    buffer = io.BytesIO()
    _NePSPickler(buffer).save(value)
    return buffer.getvalue()


class _NePSPickler(pickle._Pickler):  # type: ignore[name-defined]
    """The pure-Python pickler, for the rare value that is neither plain
    nor one of NePS's classes (a torch RNG tensor, a container holding an
    exception): it writes any part of it that is NePS's through `_opcodes`.
    Memoization is off ("fast" mode) so that its output stands alone.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self.fast = True

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if type(obj) in _NEPS_FIELDS or isinstance(obj, State | BaseException):
            self.write(_opcodes(obj))
            return
        super().save(obj, save_persistent_id)


def _stream(body: bytes) -> bytes:
    return pickle.PROTO + bytes([PROTOCOL]) + body + pickle.STOP


def dumps(value: Any) -> bytes:
    """A pickle of `value` in which this package's classes are NePS's."""
    return _stream(_opcodes(value))


def trial_opcodes(trial: Trial) -> bytes:
    """One trial's part of a trial cache (see `dumps_trial_cache`)."""
    return _opcodes(trial)


def dumps_trial_cache(parts: list[tuple[str, bytes]]) -> bytes:
    """NePS's ``.trial_cache.pkl``: a pickled dict of trial id -> Trial.

    `parts` are (trial id, `trial_opcodes(trial)`) in the dict's order. Each
    part was pickled on its own, so an exporter re-pickles only the trials
    that changed.
    """
    body = [pickle.EMPTY_DICT]
    for start in range(0, len(parts), 1000):
        body.append(pickle.MARK)
        for trial_id, opcodes in parts[start : start + 1000]:
            body.append(pickle.dumps(trial_id, protocol=3)[2:-1])
            body.append(opcodes)
        body.append(pickle.SETITEMS)
    return _stream(b"".join(body))


# --- reading ---------------------------------------------------------------


class _Record:
    """The fields of one NePS object as its pickle held them."""

    neps_name = ""

    def __init__(self, *args: Any) -> None:
        # NePS pickles dataclasses as cls.__new__ + BUILD; positional
        # arguments would mean a layout this reader does not know.
        if args:
            raise pickle.UnpicklingError(
                f"{self.neps_name} was pickled with constructor arguments."
            )

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.neps_name} has no field mapping.")
        self.__dict__.update(state)


def _record_class(name: str) -> type[_Record]:
    return type(f"_{name}Record", (_Record,), {"neps_name": name})


_RECORDS = {
    ("neps.state.optimizer", "OptimizationState"): _record_class("OptimizationState"),
    ("neps.state.optimizer", "BudgetInfo"): _record_class("BudgetInfo"),
    ("neps.state.seed_snapshot", "SeedSnapshot"): _record_class("SeedSnapshot"),
}

# Globals numpy needs to rebuild arrays, dtypes and scalars (numpy 1 and 2).
_NUMPY_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}

# Globals a pickled torch tensor (an RNG state) refers to.
_TORCH_GLOBALS = {
    ("torch", "from_numpy"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.storage", "_load_from_bytes"),
    ("collections", "OrderedDict"),
}


def _no_torch(*args: Any, **kwargs: Any) -> None:
    """Stands in for torch's rebuild functions where torch is not installed."""


class _NePSUnpickler(pickle.Unpickler):
    """Reads NePS's optimizer state pickles into records, nothing else."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.torch_dropped = False

    def find_class(self, module: str, name: str) -> Any:
        record = _RECORDS.get((module, name))
        if record is not None:
            return record
        if (module, name) == ("neps.state.trial", "State"):
            return State
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in _TORCH_GLOBALS:
            try:
                import torch  # noqa: F401
            except ImportError:
                self.torch_dropped = True
                return dict if name == "OrderedDict" else _no_torch
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which is not part of a NePS"
            " optimizer state; it is not loaded"
        )


# NePS 0.17 renamed the per-worker budgets of 0.16 (same meaning: cost
# cooling reads worker_cost_to_spend where it read cost_to_spend).
_RENAMED_BUDGET_FIELDS = {
    "cost_to_spend": "worker_cost_to_spend",
    "max_evaluations": "worker_evaluations_to_spend",
    "fidelities_to_spend": "worker_fidelities_to_spend",
}


def _fields(record: Any, cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields of `cls` found on `record`, `defaults` for missing ones."""
    values = dict(defaults)
    names = {f.name for f in dataclass_fields(cls)}
    for name, value in vars(record).items():
        if name in names:
            values[name] = value
        else:
            logger.debug("Ignoring %s field %r unknown here.", cls.__name__, name)
    return values


def loads_optimizer_state(data: bytes) -> tuple[OptimizationState, list[str]]:
    """NePS's ``optimizer_state.pkl`` (0.16 or 0.17) as this package's type.

    Returns the state and notes on what could not be kept (a torch RNG state
    on a machine without torch). Fields a NePS release added or dropped take
    their defaults. Raises `pickle.UnpicklingError` (or another exception of
    unpickling) for anything else.
    """
    unpickler = _NePSUnpickler(io.BytesIO(data))
    top = unpickler.load()
    if not isinstance(top, _RECORDS[("neps.state.optimizer", "OptimizationState")]):
        raise pickle.UnpicklingError(
            f"it holds a {type(top).__name__}, not a NePS OptimizationState"
        )

    budget = getattr(top, "budget", None)
    if budget is not None:
        for old, new in _RENAMED_BUDGET_FIELDS.items():
            if old in vars(budget):
                setattr(budget, new, vars(budget).pop(old))
        budget = BudgetInfo(**_fields(budget, BudgetInfo, {}))
    snapshot_record = getattr(top, "seed_snapshot", None)
    if snapshot_record is None:
        raise pickle.UnpicklingError("its seed_snapshot is missing")
    snapshot = SeedSnapshot(
        **_fields(
            snapshot_record,
            SeedSnapshot,
            {"torch_rng": None, "torch_cuda_rng": None},
        )
    )
    if isinstance(snapshot.torch_cuda_rng, list) and not any(
        x is not None for x in snapshot.torch_cuda_rng
    ):
        snapshot.torch_cuda_rng = None
    worker_ids = getattr(top, "worker_ids", None)
    state = OptimizationState(
        budget=budget,
        seed_snapshot=snapshot,
        shared_state=getattr(top, "shared_state", None),
        worker_ids=list(worker_ids) if worker_ids is not None else None,
    )
    notes = []
    if unpickler.torch_dropped:
        notes.append(
            "optimizer_state.pkl holds a torch RNG state; torch is not installed"
            " here, so it was dropped (NePS then leaves torch's RNG as it is)."
        )
    return state, notes
