"""The whole models pipeline on real digits data: accuracy, parity, CLI and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.mlp import MLP, load_params
from edgefleet.models.core.tasks import get_task
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_int8_accuracy_and_parity(digits_package: Path) -> None:
    proc = run_cli("models", "eval", str(digits_package), "--json", "--runs", "20")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert set(res) == {"onnx-fp32", "onnx-int8", "tflite-int8"}
    for key in res:
        for field in ("accuracy", "ece", "size_bytes", "latency_ms_p50"):
            assert field in res[key]
    fp32 = res["onnx-fp32"]["accuracy"]
    for key in ("onnx-int8", "tflite-int8"):
        assert res[key]["accuracy"] >= 0.93
        assert abs(res[key]["accuracy"] - fp32) <= 0.01
        assert res[key]["agreement_with_fp32"] >= 0.98
        assert res[key]["size_bytes"] < res["onnx-fp32"]["size_bytes"]


def test_onnx_fp32_equals_numpy_forward(digits_package: Path) -> None:
    m = load_package(digits_package)
    model = MLP.from_params(load_params(digits_package / "params.npz"))
    x = normalize(get_task("digits").split().x_test, m.normalization)
    onnx_logits = open_backend(digits_package, m.variants["onnx-fp32"]).run(x)
    np.testing.assert_allclose(onnx_logits, model.forward(x), atol=1e-4)


def test_manifest_records_calibration_and_golden(digits_package: Path) -> None:
    m = load_package(digits_package)
    assert m.temperature > 0 and len(m.golden) >= 3
    assert m.metrics["ece_calibrated"] <= m.metrics["ece_uncalibrated"] + 0.01
    assert m.variants["tflite-int8"].input_quant is not None
    assert set(m.files) >= {"model_fp32.onnx", "model_int8.onnx", "model_int8.tflite"}


def _copy(pkg: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_altered_file_is_refused_with_one_line(digits_package: Path, tmp_path: Path,
                                              command: str) -> None:
    pkg = _copy(digits_package, tmp_path)
    data = bytearray((pkg / "model_int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (pkg / "model_int8.onnx").write_bytes(bytes(data))
    proc = run_cli("models", command, str(pkg))
    assert proc.returncode != 0
    assert "model_int8.onnx" in proc.stderr and "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_truncated_and_corrupt_manifest(digits_package: Path, tmp_path: Path) -> None:
    pkg = _copy(digits_package, tmp_path)
    tfl = pkg / "model_int8.tflite"
    tfl.write_bytes(tfl.read_bytes()[:100])
    proc = run_cli("models", "eval", str(pkg))
    assert proc.returncode != 0 and "truncated" in proc.stderr
    (pkg / "manifest.json").write_text("{not json")
    proc = run_cli("models", "inspect", str(pkg))
    assert proc.returncode != 0 and "not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_build_arguments(tmp_path: Path) -> None:
    proc = run_cli("models", "build", "--task", "nope", "--out", str(tmp_path / "x"))
    assert proc.returncode == 64 and "unknown task 'nope'" in proc.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        target = ro / "sub" / "pkg"
        proc = run_cli("models", "build", "--format", "onnx", "--out", str(target))
        if __import__("os").geteuid() == 0:
            # root ignores directory modes; a file in the way is the portable failure.
            (tmp_path / "file").write_text("x")
            proc = run_cli("models", "build", "--format", "onnx", "--out",
                           str(tmp_path / "file" / "pkg"))
        assert proc.returncode != 0
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        ro.chmod(0o700)


_NO_TF = """
import sys, json
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'tensorflow_model_optimization'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Block())
from pathlib import Path
from edgefleet.models.build.pipeline import BuildOptions, build_package
from edgefleet.device.core.errors import MissingExtraError
out = Path(sys.argv[1])
r = build_package(BuildOptions(out=out / 'onnx', formats='onnx', train=__import__(
    'edgefleet.models.core.train', fromlist=['x']).TrainConfig(epochs=10)))
print(json.dumps(sorted(r.manifest.variants)))
try:
    build_package(BuildOptions(out=out / 'tfl', formats='tflite'))
except MissingExtraError as exc:
    print(exc)
assert 'tensorflow' not in sys.modules
"""


def test_onnx_build_needs_no_tensorflow(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _NO_TF, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0]) == ["onnx-fp32", "onnx-int8"]
    assert "pip install 'edgefleet[models]'" in lines[1]


def test_qat_and_pruning(tmp_path: Path) -> None:
    proc = run_cli("models", "build", "--task", "digits", "--out", str(tmp_path / "q"),
                   "--format", "tflite", "--qat", "--prune", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    m = load_package(tmp_path / "q")
    assert m.lineage["tflite"]["qat"] is True
    assert 0.45 <= m.lineage["tflite"]["sparsity"] <= 0.55
    assert m.metrics["tflite-int8"]["accuracy"] >= 0.93
