"""Fuzz targets: every parser and validator that reads bytes from outside, one function each.

A target takes arbitrary bytes, feeds them to the parser, and lets only the documented
error type through (it is caught here). Anything else escaping — ``RecursionError``,
``KeyError``, ``TypeError``, an ``OverflowError`` from numpy — is a crash: atheris
(``make fuzz``, ``scripts/fuzz``) saves the input, hypothesis (``test_properties.py``)
shrinks it. The same functions serve both, and ``tests/fuzz/corpus/<target>/`` holds seed
inputs and every crash ever found, replayed on each ``make test``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.device.agent.local_api import answer
from edgefleet.device.agent.settings import AgentConfig
from edgefleet.device.core.config import load_config
from edgefleet.device.core.errors import ConfigError, PackageError, UpdateRejected
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.runtime.manifest import MANIFEST_NAME, Manifest, load_package
from edgefleet.device.wire import scoring, updates
from edgefleet.device.wire import telemetry as wire_telemetry
from edgefleet.device.wire.frames import CobsError, FrameDecoder, cobs_decode
from edgefleet.server.telemetry.validate import Accepted, Rejected, validate_message

__all__ = ["TARGETS", "json_target_input"]

Target = Callable[[bytes], None]

_TOPICS = ("edgefleet/v1/dev1/metrics", "edgefleet/v1/dev1/event", "edgefleet/v1/dev1/status")


def _split(data: bytes) -> tuple[int, bytes]:
    """First byte as a selector, the rest as the payload."""
    return (data[0], data[1:]) if data else (0, b"")


def frames(data: bytes) -> None:
    """The serial decoder never raises; every frame it returns gives usable values."""
    dec = FrameDecoder(metrics=Metrics(), max_payload=1024)
    cut = data[0] if data else 0
    for piece in (data[:cut], data[cut:]):
        for frame in dec.feed(piece):
            frame.values()
    with contextlib.suppress(CobsError):
        cobs_decode(data)


def telemetry_validate(data: bytes) -> None:
    """The ingest's validator never raises: every message is accepted or rejected."""
    sel, payload = _split(data)
    topic = _TOPICS[sel % 3] if sel < 192 else payload[:40].decode("utf-8", "replace")
    result = validate_message(topic, payload)
    assert isinstance(result, Accepted | Rejected)


def telemetry_wire(data: bytes) -> None:
    """The wire models reject with ValidationError only; topics parse or give None."""
    sel, payload = _split(data)
    wire_telemetry.parse_topic(payload.decode("utf-8", "replace"))
    model = (wire_telemetry.Envelope, wire_telemetry.Status, wire_telemetry.MetricsBody)[sel % 3]
    with contextlib.suppress(ValidationError):
        model.model_validate_json(payload)


def scoring_wire(data: bytes) -> None:
    """Requests and replies fail with ScoreProtocolError only."""
    sel, payload = _split(data)
    scoring.valid_response_topic(payload[:80].decode("utf-8", "replace"))
    try:
        if sel % 2:
            scoring.decode_request(payload)
        else:
            scoring.decode_reply(payload, n_classes=1 + sel % 16)
    except scoring.ScoreProtocolError:
        pass


def updates_wire(data: bytes) -> None:
    """Assignments fail with UpdateRejected only; reports parse or give None."""
    updates.device_of(data[:120].decode("utf-8", "replace"))
    updates.decode_report(data)
    with contextlib.suppress(UpdateRejected):
        updates.decode_assignment(data)


_DIR: Path | None = None


def _scratch() -> Path:
    global _DIR
    if _DIR is None:
        _DIR = Path(tempfile.mkdtemp(prefix="edgefleet-fuzz-"))
    return _DIR


def manifest(data: bytes) -> None:
    """A package's manifest.json, whatever its bytes: PackageError only."""
    root = _scratch() / "pkg"
    root.mkdir(exist_ok=True)
    (root / MANIFEST_NAME).write_bytes(data)
    with contextlib.suppress(PackageError):
        load_package(root)
    with contextlib.suppress(ValidationError):
        Manifest.model_validate_json(data)


def agent_config(data: bytes) -> None:
    """agent.toml, whatever its bytes (and a JSON object as overrides): ConfigError only."""
    path = _scratch() / "agent.toml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(AgentConfig, [path])
    try:
        overrides: Any = json.loads(data)
    except (ValueError, RecursionError):
        return
    if isinstance(overrides, dict):
        with contextlib.suppress(ConfigError):
            load_config(AgentConfig, [], overrides)


def _predict(batch: Any) -> list[dict[str, Any]]:
    return [{"label": 0, "confidence": 1.0} for _ in range(len(batch))]


def local_api(data: bytes) -> None:
    """A request line to the local API always gets a reply object, never an exception."""
    reply = answer(data, _predict, Metrics())
    assert "predictions" in reply or "error" in reply


TARGETS: dict[str, Target] = {
    "frames": frames,
    "telemetry_validate": telemetry_validate,
    "telemetry_wire": telemetry_wire,
    "scoring": scoring_wire,
    "updates": updates_wire,
    "manifest": manifest,
    "agent_config": agent_config,
    "local_api": local_api,
}


def json_target_input(selector: int, value: Any) -> bytes:
    """Bytes for a target from a JSON-able structure (hypothesis builds these)."""
    return bytes([selector % 256]) + json.dumps(value).encode()
