"""Python values to stored text and bytes and back: exact, or refused clearly."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neps_redis import (
    BudgetInfo,
    EncodingError,
    OptimizationState,
    Report,
    SeedSnapshot,
    Trial,
)
from neps_redis.codec import (
    decode_number,
    dumps_json,
    dumps_msgpack,
    encode_number,
    fields_to_optimizer_state,
    fields_to_trial,
    loads_json,
    loads_msgpack,
    optimizer_state_to_fields,
    trial_to_fields,
)


def same(a, b) -> bool:
    """Equality that also checks types, numpy dtypes, NaN and the sign of 0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and same(a.item(), b.item())
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


EXACT_VALUES = [
    0,
    -(2**80),
    0.1,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    1e-310,
    True,
    None,
    "",
    "ünïcödé and \n newlines",
    (1, (2.5, "x"), []),
    {"nested": {"list": [1, 2.0, None]}},
    {"$float": "not a tag"},
    {1: "int key", (2, 3): "tuple key"},
    b"\x00\xff raw bytes",
    np.float32(0.01),
    np.float64(math.nan),
    np.int64(-3),
    np.uint32(7),
    np.bool_(True),
    np.array([[5, 1], [0, 4]]),
    np.array([0.5, math.nan, -math.inf], dtype=np.float32),
    np.zeros((0, 3)),
]


@pytest.mark.parametrize("value", EXACT_VALUES, ids=repr)
def test_a_value_comes_back_exactly_through_json(value):
    # When
    back = loads_json(dumps_json(value, "config['x']"))

    # Then
    assert same(value, back)


@pytest.mark.parametrize("value", EXACT_VALUES, ids=repr)
def test_a_value_comes_back_exactly_through_msgpack(value):
    assert same(value, loads_msgpack(dumps_msgpack(value, "shared_state")))


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
nested = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(nested)
def test_any_nesting_of_plain_values_round_trips_exactly(value):
    assert same(value, loads_json(dumps_json(value, "v")))
    assert same(value, loads_msgpack(dumps_msgpack(value, "v")))


@given(st.floats(allow_nan=True) | st.integers())
def test_numbers_are_stored_as_readable_text_and_come_back_exactly(number):
    text = encode_number(number, "objective_to_minimize")
    assert not text.startswith("{")
    assert same(number, decode_number(text))


def test_special_floats_read_as_plain_words():
    assert encode_number(math.nan, "x") == "nan"
    assert encode_number(-math.inf, "x") == "-inf"
    assert encode_number(-0.0, "x") == "-0.0"


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"lr": Opaque()}, "config['lr']"),
        ({"a": [1, {2, 3}]}, "config['a'][1]"),
        ({"z": 1j}, "config['z']"),
        ({"o": np.array([object()], dtype=object)}, "config['o']"),
    ],
)
def test_a_value_without_an_exact_form_is_refused_naming_where_it_is(value, named):
    with pytest.raises(EncodingError) as error:
        dumps_json(value, "config")
    assert named in str(error.value)


def make_trial(**report_kw) -> Trial:
    trial = Trial.new(
        trial_id="3_rung_1",
        config={"lr": np.float32(0.01), "layers": np.int64(3), "opt": "adam"},
        location="configs/config_3_rung_1",
        previous_trial="3_rung_0",
        previous_trial_location="configs/config_3_rung_0",
        time_sampled=time.time(),
        worker_id="worker_0",
    )
    trial.set_evaluating(time_started=time.time(), worker_id="worker_1")
    if report_kw:
        trial.report = trial.set_complete(
            report_as=report_kw.pop("report_as", "success"),
            time_end=time.time(),
            objective_to_minimize=report_kw.pop("objective_to_minimize", 0.5),
            cost=report_kw.pop("cost", None),
            learning_curve=report_kw.pop("learning_curve", None),
            err=report_kw.pop("err", None),
            tb=report_kw.pop("tb", None),
            extra=report_kw.pop("extra", None),
            evaluation_duration=1.5,
        )
    return trial


@pytest.mark.parametrize(
    "report",
    [
        {},
        {"objective_to_minimize": math.nan, "cost": math.inf},
        {"objective_to_minimize": [0.1, math.nan]},
        {"learning_curve": [[0.5, 0.4], [0.3]], "extra": {"acc": np.float32(0.9)}},
        {"report_as": "crashed", "objective_to_minimize": None, "err": KeyError("x")},
    ],
    ids=["success", "nan", "multi-objective", "curves", "crashed"],
)
def test_a_trial_round_trips_through_its_hash_fields(report):
    # Given
    trial = make_trial(**report)

    # When
    back = fields_to_trial(trial_to_fields(trial))

    # Then
    assert back == trial
    assert back.report == trial.report
    assert same(dict(back.config), dict(trial.config))


def test_a_stored_error_keeps_its_text_and_type_name():
    trial = make_trial(report_as="crashed", err=ValueError("bad lr"), tb="tb text")
    fields = trial_to_fields(trial)
    assert fields["err"] == "bad lr"
    assert fields["err_type"] == "ValueError"
    back = fields_to_trial(fields)
    assert str(back.report.err) == "bad lr"


def test_hash_fields_are_readable_text():
    fields = trial_to_fields(make_trial(objective_to_minimize=0.25))
    assert fields["state"] == "success"
    assert fields["objective_to_minimize"] == "0.25"
    assert fields["config"].startswith('{"lr": {"$np": ["float32"')
    assert '"opt": "adam"' in fields["config"]


def test_the_optimizer_state_round_trips_with_its_rng_snapshot():
    # Given
    np.random.seed(7)
    state = OptimizationState(
        budget=BudgetInfo(worker_evaluations_to_spend=5, used_cost_budget=1.5),
        seed_snapshot=SeedSnapshot.new_capture(),
        shared_state={"rungs": (1, 2), "best": math.nan},
        worker_ids=["worker_0"],
    )

    # When
    raw = {k.encode(): v for k, v in optimizer_state_to_fields(state).items()}
    raw = {k: v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}
    back = fields_to_optimizer_state(raw, ["worker_0"])

    # Then
    assert back.budget == state.budget
    assert back.seed_snapshot == state.seed_snapshot
    assert same(back.shared_state, state.shared_state)
    back.seed_snapshot.set_as_global_seed_state()
    expected = np.random.rand()
    state.seed_snapshot.set_as_global_seed_state()
    assert np.random.rand() == expected


def test_budget_fields_from_a_newer_version_are_ignored_not_fatal():
    from neps_redis.codec import json_to_budget

    budget = json_to_budget('{"used_evaluations": 3, "field_from_the_future": 1}')
    assert budget == BudgetInfo(used_evaluations=3)


def test_reports_compare_errors_by_text_and_nan_as_equal():
    a = Report(math.nan, None, None, {}, ValueError("x"), None, "crashed", None)
    b = Report(math.nan, None, None, {}, Exception("x"), None, "crashed", None)
    assert a == b
    assert a != Report(1.0, None, None, {}, Exception("x"), None, "crashed", None)
