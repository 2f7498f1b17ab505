"""The guarded JSON reader: every limit, no recursion, finite numbers only."""

from __future__ import annotations

import json
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.device.core.guarded_json import (
    JsonLimits,
    JsonRejected,
    check_timestamp,
    loads_guarded,
)


def _reason(data: bytes, limits: JsonLimits | None = None) -> str:
    with pytest.raises(JsonRejected) as info:
        loads_guarded(data, limits or JsonLimits())
    return info.value.reason


def test_ordinary_documents_parse_as_json_would() -> None:
    doc = {"v": 1, "a": [1, 2.5, -3, "x", None, True], "b": {"c": {"d": "]}[{\\\""}}}
    raw = json.dumps(doc).encode()
    assert loads_guarded(raw) == json.loads(raw)
    assert loads_guarded(b"[]") == [] and loads_guarded(b'"s"') == "s"


def test_size_is_checked_before_anything_else() -> None:
    assert _reason(b"[" + b" " * 100 + b"]", JsonLimits(max_bytes=50)) == "too_large"
    assert _reason(b"\xff" * 100, JsonLimits(max_bytes=50)) == "too_large"


@pytest.mark.parametrize("depth", [33, 300, 50_000, 200_000])
def test_deep_nesting_is_refused_without_recursion(depth: int) -> None:
    data = b"[" * depth + b"]" * depth
    limits = JsonLimits(max_bytes=4 << 20)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(100)  # a recursive checker would die long before depth 33
    try:
        assert _reason(data, limits) == "too_deep"
        assert _reason(b'{"a":' * depth + b"1" + b"}" * depth, limits) == "too_deep"
    finally:
        sys.setrecursionlimit(old)


def test_naive_json_loads_really_dies_at_that_depth() -> None:
    with pytest.raises(RecursionError):
        json.loads("[" * 200_000 + "]" * 200_000)


def test_depth_limit_is_exact_and_brackets_in_strings_do_not_count() -> None:
    ok = b"[" * 32 + b"]" * 32
    assert loads_guarded(ok) is not None
    assert _reason(b"[" * 33 + b"]" * 33) == "too_deep"
    s = json.dumps(["[[[[" * 50 + '\\"' + "{{{{" * 50]).encode()
    assert loads_guarded(s, JsonLimits(max_depth=1)) == json.loads(s)


@pytest.mark.parametrize("data", [b"NaN", b"[Infinity]", b'{"ts": -Infinity}', b"1e999",
                                  b'{"a": [1, {"b": -1e400}]}', b'{"ts": Infinity}'])
def test_non_finite_numbers_are_refused_anywhere(data: bytes) -> None:
    assert _reason(data) == "non_finite"


def test_keys_lists_strings_and_integers_are_bounded() -> None:
    many = json.dumps({f"k{i}": i for i in range(11)}).encode()
    assert _reason(many, JsonLimits(max_keys=10)) == "too_many_keys"
    nested = json.dumps([{"a": 1, "b": 2}] * 6).encode()  # 12 keys over several objects
    assert _reason(nested, JsonLimits(max_keys=10)) == "too_many_keys"
    assert _reason(json.dumps([[0] * 11]).encode(), JsonLimits(max_list=10)) == "list_too_long"
    assert _reason(json.dumps(["x" * 11]).encode(), JsonLimits(max_string=10)) == "string_too_long"
    assert _reason(b"1" * 25) == "number_too_large"
    assert loads_guarded(b"-9223372036854775808") == -(2**63)


@pytest.mark.parametrize("data", [b"{oops", b"", b"[1,]", b'{"a" 1}', b"[" * 10])
def test_malformed_input_is_one_typed_error(data: bytes) -> None:
    assert _reason(data) in ("malformed", "too_deep")


def test_bad_utf8() -> None:
    assert _reason(b'"\xff\xfe"') == "bad_utf8"


def test_timestamps_within_skew_only() -> None:
    now = time.time()
    assert check_timestamp(now - 10, now) == pytest.approx(now - 10)
    assert check_timestamp(now + 100, now, max_future_s=300) > now
    for ts, reason in ((now + 10 * 365 * 86400, "clock_skew"), (float("inf"), "non_finite"),
                       (float("nan"), "non_finite"), (-1.0, "clock_skew"), ("now", "clock_skew"),
                       (True, "clock_skew")):
        with pytest.raises(JsonRejected) as info:
            check_timestamp(ts, now)
        assert info.value.reason == reason, ts
    with pytest.raises(JsonRejected):
        check_timestamp(now - 100, now, max_age_s=50)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=8),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(_json_values, st.integers(1, 25), st.integers(1, 12))
def test_skipping_the_walk_never_lets_a_limit_through(doc: object, digits: int,
                                                       small: int) -> None:
    """The byte-level shortcut skips the walk only where the walk could not refuse."""
    from edgefleet.device.core.guarded_json import _fits_unwalked, _walk

    raw = json.dumps(doc).encode()  # may hold NaN/Infinity: the parser refuses those
    limits = JsonLimits(max_keys=small, max_list=small, max_string=small * 4,
                        max_int_digits=digits)
    if _fits_unwalked(raw, limits):
        _walk(json.loads(raw), limits)  # must not raise


@settings(max_examples=300, deadline=None)
@given(_json_values, st.integers(1, 25), st.integers(1, 12), st.integers(1, 6))
def test_bytes_proven_within_limits_parse_within_them(doc: object, digits: int, small: int,
                                                      depth: int) -> None:
    """What :func:`within_limits_unparsed` lets a consumer parse without the guarded
    reader, the guarded reader accepts: no limit, no non-finite number is missed."""
    from edgefleet.device.core.guarded_json import within_limits_unparsed

    raw = json.dumps(doc).encode()  # may hold NaN/Infinity, 1e308 * 10 as 1e+309 ...
    limits = JsonLimits(max_keys=small, max_list=small, max_string=small * 4,
                        max_int_digits=digits, max_depth=depth)
    if within_limits_unparsed(raw, limits):
        loads_guarded(raw, limits)  # must not raise


@pytest.mark.parametrize(("data", "proven"), [
    (b'{"boot": "3e123f0e000a", "x": [1.5, 2e10, 3E-999]}', True),  # hex is not a number
    (b'{"x": 1e999}', False), (b'{"x": [1.0E+400]}', False), (b'{"x": 2e308 }', False),
    (b'{"x": NaN}', False), (b'{"x": -Infinity}', False),
    (b'{"x": 1' + b"0" * 21 + b"}", False),  # too many digits
    (b'{"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}', False),
    (b'{"x": "' + b"a" * 20_000 + b'"}', False),
])
def test_within_limits_unparsed_refuses_what_it_cannot_prove(data: bytes,
                                                             proven: bool) -> None:
    from edgefleet.device.core.guarded_json import within_limits_unparsed

    assert within_limits_unparsed(data) is proven
