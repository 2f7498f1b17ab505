"""`edgefleet predict` and `edgefleet models bench` as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefleet.models.core.tasks import get_task
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    split = get_task("digits").split()
    d = tmp_path_factory.mktemp("rows")
    np.save(d / "batch.npy", split.x_test[:30])
    np.save(d / "one.npy", split.x_test[0])
    return d / "batch.npy", d / "one.npy", split.y_test[:30]


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_predict_json_batch_and_row(digits_package: Path, rows: tuple[Path, Path, np.ndarray],
                                    backend: str) -> None:
    batch, one, y = rows
    proc = run_cli("predict", str(digits_package), "--input", str(batch), "--backend", backend,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert isinstance(out, list) and len(out) == len(y)
    assert {"label", "confidence", "latency_ms"} <= set(out[0])
    assert np.mean([r["label"] for r in out] == y) >= 0.9
    assert all(0.0 < r["confidence"] <= 1.0 for r in out)
    proc = run_cli("predict", str(digits_package), "--input", str(one), "--backend", backend,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    single = json.loads(proc.stdout)
    assert len(single) == 1 and single[0]["label"] == out[0]["label"]


def test_predict_bad_input_is_one_line_error(digits_package: Path, tmp_path: Path) -> None:
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full(64, np.nan, np.float32))
    proc = run_cli("predict", str(digits_package), "--input", str(bad))
    assert proc.returncode == 65
    assert "NaN" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("predict", str(digits_package), "--input", str(tmp_path / "none.npy"))
    assert proc.returncode == 64 and "no such file" in proc.stderr
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    proc = run_cli("predict", str(digits_package), "--input", str(tmp_path / "junk.npy"))
    assert proc.returncode == 64 and "Traceback" not in proc.stderr


def test_bench_json_keys(digits_package: Path) -> None:
    proc = run_cli("models", "bench", str(digits_package), "--runs", "200", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert set(res) == {"onnx", "tflite"}
    for r in res.values():
        assert r["predictor_ms_p50"] > 0 and r["raw_ms_p50"] > 0
        assert r["ratio"] == pytest.approx(r["predictor_ms_p50"] / r["raw_ms_p50"])
        assert r["cascade_ms_p50"] > 0


@pytest.mark.parametrize("victim", ["model_int8.onnx", "model_int8.tflite"])
def test_altered_package_refused_by_both(digits_package: Path, rows: tuple[Path, Path, np.ndarray],
                                         tmp_path: Path, victim: str) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(digits_package, pkg)
    data = bytearray((pkg / victim).read_bytes())
    data[-10] ^= 0xFF
    (pkg / victim).write_bytes(bytes(data))
    for args in (("predict", str(pkg), "--input", str(rows[1])), ("models", "bench", str(pkg))):
        proc = run_cli(*args)
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and victim in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_predict_an_imported_image_package_by_its_spec(tmp_path: Path) -> None:
    """(n, 8, 8, 1) images, flat rows and a grayscale (8, 8) image are all the model's
    input; a 3-channel image is one line naming the expected spec."""
    from tests.support.imported import image_model

    pkg = image_model(tmp_path)
    d = np.load(tmp_path / "eval.npz")
    x, y = d["x"][:40], d["y"][:40]
    labels = []
    for name, arr in (("nhwc", x), ("flat", x.reshape(40, 64))):
        np.save(tmp_path / f"{name}.npy", arr)
        proc = run_cli("predict", str(pkg), "--input", str(tmp_path / f"{name}.npy"), "--json")
        assert proc.returncode == 0, proc.stderr
        labels.append([r["label"] for r in json.loads(proc.stdout)])
    assert labels[0] == labels[1] and np.mean(np.array(labels[0]) == y) >= 0.85
    np.save(tmp_path / "gray.npy", x[5, ..., 0])
    proc = run_cli("predict", str(pkg), "--input", str(tmp_path / "gray.npy"), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["label"] == labels[0][5]
    np.save(tmp_path / "rgb.npy", np.zeros((2, 8, 8, 3), np.float32))
    proc = run_cli("predict", str(pkg), "--input", str(tmp_path / "rgb.npy"))
    assert proc.returncode == 65 and "Traceback" not in proc.stderr
    assert "3 channel(s), not 1" in proc.stderr and "expected float32 [8, 8, 1]" in proc.stderr
