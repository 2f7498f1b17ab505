"""Property-based fuzzing (hypothesis) of every parser and validator of outside input.

Each target in :mod:`tests.fuzz.targets` gets arbitrary bytes, JSON structures (the shape
most parsers expect, so the fuzzing gets past ``json.loads``) and pathological nesting;
only its documented error type may escape. Then structure-level properties: validators
given arbitrary objects, round trips, and every saved crash and seed replayed.
``EDGEFLEET_FUZZ_EXAMPLES`` sets examples per property (default 100, for ``make test``).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.device.agent.settings import AgentConfig
from edgefleet.device.core.config import load_config
from edgefleet.device.core.errors import ConfigError, UpdateRejected
from edgefleet.device.runtime.manifest import Manifest
from edgefleet.device.wire import scoring, updates
from edgefleet.device.wire.federated import from_arrays
from edgefleet.server.telemetry.validate import Accepted, Rejected, validate_message
from tests.fuzz.targets import TARGETS, json_target_input

pytestmark = [pytest.mark.fuzz]

FUZZ = settings(max_examples=int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "100")),
                deadline=None, suppress_health_check=list(HealthCheck))
CORPUS = Path(__file__).parent / "corpus"

_KEYS = st.sampled_from(["v", "device", "boot", "seq", "ts", "kind", "body", "state", "model",
                         "version", "shadow", "rollout", "task", "mode", "features", "raw",
                         "deadline_ms", "ok", "label", "confidence", "error", "input", "id",
                         "latency_ms", "count", "bounds", "counts", "name", "variants",
                         "files", "device_id", "mqtt", "updates", "api", "x"])
_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
            | st.floats() | st.text(max_size=30)
            | st.sampled_from(["dev1", "0123abcd", "metrics", "event", "online", "features",
                               "1.0.0", "digits-mlp", "https://x/"]))
json_values = st.recursive(
    _SCALARS,
    lambda c: st.lists(c, max_size=6) | st.dictionaries(_KEYS | st.text(max_size=8), c,
                                                          max_size=8),
    max_leaves=40)
deep = st.tuples(st.integers(1, 60_000), st.sampled_from([b"[", b'{"a":', b'{"body":{"x":']))


def _nested(n: int, opener: bytes) -> bytes:
    closer = {b"[": b"]", b'{"a":': b"}", b'{"body":{"x":': b"}}"}[opener]
    return opener * n + b"1" + closer * n


@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(data=st.binary(max_size=4096))
def test_target_survives_any_bytes(name: str, data: bytes) -> None:
    TARGETS[name](data)


@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(sel=st.integers(0, 255), value=json_values)
def test_target_survives_any_json(name: str, sel: int, value: Any) -> None:
    TARGETS[name](json_target_input(sel, value))


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(sel=st.integers(0, 255), nest=deep)
def test_target_survives_deep_nesting(name: str, sel: int, nest: tuple[int, bytes]) -> None:
    TARGETS[name](bytes([sel]) + _nested(*nest))


def _corpus() -> list[Any]:
    return [pytest.param(p.parent.name, p, id=f"{p.parent.name}/{p.name}")
            for p in sorted(CORPUS.glob("*/*")) if p.is_file()]


@pytest.mark.parametrize(("name", "path"), _corpus())
def test_corpus_and_past_crashes_replay(name: str, path: Path) -> None:
    TARGETS[name](path.read_bytes())


# -- structures ---------------------------------------------------------------------------

_ENVELOPE = st.fixed_dictionaries({
    "v": st.just(1) | _SCALARS, "device": st.just("dev1") | _SCALARS,
    "boot": st.just("0123abcd") | _SCALARS, "seq": st.integers() | _SCALARS,
    "ts": st.floats() | _SCALARS, "kind": st.sampled_from(["metrics", "event"]) | _SCALARS,
    "body": st.dictionaries(_KEYS, json_values, max_size=6) | json_values})


@FUZZ
@given(env=_ENVELOPE, kind=st.sampled_from(["metrics", "event", "status"]))
def test_validate_message_never_raises_on_near_valid_envelopes(env: dict[str, Any],
                                                               kind: str) -> None:
    import json

    try:
        payload = json.dumps(env).encode()
    except ValueError:
        return
    result = validate_message(f"edgefleet/v1/dev1/{kind}", payload)
    assert isinstance(result, Accepted | Rejected)
    if isinstance(result, Accepted):
        assert result.device == "dev1"


@FUZZ
@given(value=json_values | st.dictionaries(_KEYS, json_values))
def test_assignment_from_any_structure_is_valid_or_rejected(value: Any) -> None:
    try:
        a = updates.Assignment.from_dict(value)
    except UpdateRejected as exc:
        assert exc.reason == "bad_assignment"
        return
    assert updates.decode_assignment(a.encode()) == a  # round trip


@FUZZ
@given(model=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
       version=st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){0,2}", fullmatch=True),
       shadow=st.booleans(), rollout=st.none() | st.text(max_size=64))
def test_assignment_round_trip(model: str, version: str, shadow: bool,
                               rollout: str | None) -> None:
    a = updates.Assignment(model, version, shadow, rollout)
    assert updates.decode_assignment(a.encode()) == a


@FUZZ
@given(features=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32),
                         min_size=1, max_size=50),
       deadline=st.floats(0.001, 60_000))
def test_score_request_round_trip(features: list[float], deadline: float) -> None:
    req = scoring.ScoreRequest(task="digits", model="m@1", mode="features",
                               features=features, deadline_ms=deadline)
    assert scoring.decode_request(scoring.encode(req)) == req


@FUZZ
@given(value=json_values | st.dictionaries(_KEYS, json_values))
def test_manifest_from_any_structure_validates_or_raises_validation_error(value: Any) -> None:
    with contextlib.suppress(ValidationError):
        Manifest.model_validate(value)


@FUZZ
@given(overrides=st.dictionaries(_KEYS, json_values, max_size=6))
def test_agent_config_from_any_overrides_is_a_config_error_at_worst(
        overrides: dict[str, Any]) -> None:
    try:
        cfg = load_config(AgentConfig, [], overrides)
    except ConfigError:
        return
    assert cfg.device_id


_ARRAYS = st.lists(
    st.tuples(st.sampled_from([np.float32, np.float64, np.int32, np.bool_]),
              st.lists(st.integers(0, 4), min_size=0, max_size=3),
              st.sampled_from([0.0, 1.0, math.nan, math.inf, -1e38])),
    max_size=6)


@FUZZ
@given(spec=_ARRAYS, sizes=st.none() | st.lists(st.integers(0, 4), max_size=4))
def test_global_model_arrays_are_valid_or_value_error(spec: list[Any],
                                                      sizes: list[int] | None) -> None:
    with np.errstate(invalid="ignore", over="ignore"):
        arrays = [np.full(shape, fill).astype(dtype) for dtype, shape, fill in spec]
    try:
        out = from_arrays(arrays, sizes)
    except ValueError:
        return
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in out)
