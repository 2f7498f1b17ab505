"""The local predict API over a real Unix socket: answers, bad requests, oversize lines."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.agent.local_api import MAX_REQUEST_BYTES, LocalApiServer, request
from edgefleet.device.core.errors import InputError
from edgefleet.device.core.metrics import Metrics


def _predict(batch: np.ndarray) -> list[dict[str, Any]]:
    if batch.shape[1] != 3:
        raise InputError(f"expected 3 features, got {batch.shape[1]}", reason="shape")
    if not np.isfinite(batch).all():
        raise InputError("NaN", reason="nan")
    if batch[0, 0] < -100:
        raise RuntimeError("a bug")
    return [{"label": int(row.argmax()), "confidence": 1.0} for row in batch]


@pytest.fixture
def api(tmp_path: Path):  # type: ignore[no-untyped-def]
    metrics = Metrics()
    srv = LocalApiServer(tmp_path / "agent.sock", _predict, metrics).start()
    yield srv, metrics
    srv.stop()


def test_answers_single_and_batch(api: Any) -> None:
    srv, metrics = api
    r = request(srv.path, {"id": 1, "input": [0.0, 5.0, 1.0]})
    assert r == {"id": 1, "predictions": [{"label": 1, "confidence": 1.0}]}
    r = request(srv.path, {"id": "b", "input": [[9, 0, 0], [0, 0, 9]]})
    assert [p["label"] for p in r["predictions"]] == [0, 2]
    assert metrics.counter("api_requests_ok") == 2
    assert srv.path.stat().st_mode & 0o777 == 0o660


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"id": 2, "input": [1, 2]}, "invalid_input:shape"),
        ({"id": 3, "input": ["a", "b", "c"]}, "bad_request"),
        ({"id": 4}, "bad_request"),
        ({"id": 5, "input": [-1000, 0, 0]}, "internal"),
    ],
)
def test_bad_requests_get_error_replies(api: Any, payload: dict[str, Any], code: str) -> None:
    srv, _ = api
    r = request(srv.path, payload)
    assert r["error"]["code"] == code
    # the server is still up
    assert "predictions" in request(srv.path, {"id": 9, "input": [1, 0, 0]})


def test_garbage_and_oversize(api: Any) -> None:
    srv, metrics = api
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(srv.path))
        s.sendall(b"{not json\n")
        assert b"bad_json" in s.recv(4096)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(srv.path))
        s.sendall(b"[" + b"1," * (MAX_REQUEST_BYTES // 2 + 10))
        assert b"oversize" in s.recv(4096)
    assert metrics.counter("api_errors_oversize") == 1
    assert metrics.counter("api_errors_bad_json") == 1
    assert "predictions" in request(srv.path, {"id": 9, "input": [1, 0, 0]})


def test_socket_path_over_the_af_unix_limit_is_a_config_error(tmp_path: Path) -> None:
    from edgefleet.device.core.errors import ConfigError

    deep = tmp_path / ("d" * 120) / "agent.sock"
    with pytest.raises(ConfigError, match=r"api\.socket"):
        LocalApiServer(deep, _predict)
