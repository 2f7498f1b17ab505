"""Emulated arm64 devices (cross/): the rootfs really is aarch64, our int8 models run in
it through edgefleet's own code, and it computes what x86-64 computes.

The first test builds the cached rootfs when it is missing (minutes, once per machine;
see docs/arm64.md); afterwards this file takes well under a minute of emulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.server.fleet.broker import MosquittoBroker
from tests.conftest import run_cli
from tests.support.cross import REPO, device_argv, ensure_rootfs, parity_module, run_in_device

pytestmark = [pytest.mark.arm, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def rootfs() -> Path:
    return ensure_rootfs()


def test_device_is_aarch64_with_the_checkout_installed(rootfs: Path) -> None:
    out = run_in_device(
        ["sh", "-c", "uname -m; python -c 'import platform, sys; "
         "print(platform.machine(), sys.version_info[:2])'; edgefleet-agent --version"],
        rootfs=rootfs, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "aarch64"
    assert lines[1] == "aarch64 (3, 11)"
    host = run_cli("--version", program="edgefleet-agent")
    assert lines[2] == host.stdout.strip()


def test_each_device_keeps_its_own_disk(rootfs: Path, tmp_path: Path) -> None:
    pi1, pi2 = tmp_path / "pi1", tmp_path / "pi2"
    write = run_in_device(["sh", "-c", "echo pi1 > /etc/edgefleet-id; hostname"],
                          rootfs=rootfs, state=pi1, hostname="pi1")
    assert write.returncode == 0, write.stderr
    assert write.stdout.strip() == "pi1"
    again = run_in_device(["cat", "/etc/edgefleet-id"], rootfs=rootfs, state=pi1)
    assert again.stdout.strip() == "pi1"
    other = run_in_device(["cat", "/etc/edgefleet-id"], rootfs=rootfs, state=pi2)
    assert other.returncode != 0
    assert not (rootfs / "etc" / "edgefleet-id").exists()


def test_device_reads_a_host_pty_and_reaches_a_loopback_broker(
        rootfs: Path, mosquitto: MosquittoBroker) -> None:
    """What an emulated agent will need: frames from a host pty (via pyserial) and the
    host's broker on 127.0.0.1 (via paho), both running on aarch64."""
    import os
    import subprocess
    import threading

    import paho.mqtt.client as mqtt

    got: list[bytes] = []
    done = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_connect = lambda c, *_: c.subscribe("arm/test", qos=1)
    sub.on_message = lambda c, u, m: (got.append(m.payload), done.set())
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    master, slave = os.openpty()
    code = (
        "import platform, serial, paho.mqtt.publish as pub\n"
        f"s = serial.Serial({os.ttyname(slave)!r}, 115200, timeout=60)\n"
        "print('open', flush=True)\n"
        "line = s.readline().strip().decode()\n"
        f"pub.single('arm/test', platform.machine() + ' ' + line, qos=1, "
        f"hostname={mosquitto.host!r}, port={mosquitto.port})\n"
    )
    proc = subprocess.Popen(device_argv(["python", "-c", code], rootfs=rootfs),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open"
        os.write(master, b"frame-42\n")
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
        assert done.wait(30)
    finally:
        proc.kill()
        proc.wait()
        sub.loop_stop()
        os.close(master)
        os.close(slave)
    assert got == [b"aarch64 frame-42"]


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_int8_inference_inside_the_device_matches_the_host(
        rootfs: Path, digits_package: Path, tmp_path: Path, backend: str) -> None:
    from edgefleet.models.core.tasks import get_task

    rows = get_task("digits").split().x_test[:64]
    np.save(tmp_path / "rows.npy", rows)
    dev = run_in_device(
        ["edgefleet", "predict", "/mnt/pkg", "--input", "/mnt/io/rows.npy",
         "--backend", backend, "--threads", "1", "--json"],
        rootfs=rootfs, ro_binds={digits_package: "/mnt/pkg", tmp_path: "/mnt/io"})
    assert dev.returncode == 0, dev.stderr
    host = run_cli("predict", str(digits_package), "--input", str(tmp_path / "rows.npy"),
                   "--backend", backend, "--threads", "1", "--json")
    assert host.returncode == 0, host.stderr
    dev_labels = [r["label"] for r in json.loads(dev.stdout)]
    host_labels = [r["label"] for r in json.loads(host.stdout)]
    assert len(dev_labels) == len(rows)
    assert dev_labels == host_labels


def test_device_refuses_a_tampered_package(rootfs: Path, digits_package: Path,
                                           tmp_path: Path) -> None:
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(digits_package, pkg)
    blob = bytearray((pkg / "model_int8.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (pkg / "model_int8.tflite").write_bytes(bytes(blob))
    np.save(tmp_path / "rows.npy", np.zeros((1, 64), dtype=np.float32))
    dev = run_in_device(
        ["edgefleet", "predict", "/mnt/pkg", "--input", "/mnt/io/rows.npy",
         "--backend", "tflite"],
        rootfs=rootfs, ro_binds={pkg: "/mnt/pkg", tmp_path: "/mnt/io"})
    assert dev.returncode != 0
    assert "model_int8.tflite" in dev.stderr + dev.stdout
    assert "Traceback" not in dev.stderr


def test_arm64_and_x86_64_agree(rootfs: Path, digits_package: Path) -> None:
    report = parity_module().compare(digits_package, str(rootfs))
    assert report["device_machine"] == "aarch64"
    assert report["n_test"] > 300
    for name in ("onnx-int8", "tflite-int8"):
        v = report["variants"][name]
        assert v["argmax_agreement"] >= 0.995, (name, v)
        assert v["accuracy_arm64"] > 0.9, (name, v)
        assert v["golden_arm64"] == v["golden_x86"] == "passes", (name, v)
    dp = report["dp"]
    assert dp["update_norm"] > 0
    assert dp["within_tolerance"], dp


def test_an_imported_package_agrees_on_arm64(rootfs: Path, tmp_path: Path) -> None:
    """``parity.compare_data`` (the arm64 rows of scripts/bench_mobilenetv2.py): a package
    written by ``models import`` (input spec, no TFLite, no params.npz) on both
    architectures, the device running this checkout's sources rather than its installed
    edgefleet."""
    from sklearn.datasets import load_digits

    from edgefleet.device.runtime.mlp import MLP
    from edgefleet.models.build.importer import ImportOptions, import_model
    from edgefleet.models.build.onnx_export import export_onnx_fp32
    from edgefleet.models.core.train import TrainConfig, train_sgd

    d = load_digits()
    x, y = d.images.reshape(-1, 64).astype(np.float32), d.target.astype(np.int64)
    model = MLP.init((64, 32, 10), seed=0)
    train_sgd(model, x[:1000] / 16.0, y[:1000], TrainConfig(epochs=15))
    onnx = export_onnx_fp32(model, tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=x[1000:1400], y=y[1000:1400])
    np.savez(tmp_path / "eval.npz", x=x[1400:], y=y[1400:])
    pkg = import_model(ImportOptions(model=onnx, calibration=tmp_path / "calib.npz",
                                     eval=tmp_path / "eval.npz", out=tmp_path / "pkg",
                                     scale=1 / 16)).path
    report = parity_module().compare_data(pkg, x[1400:1500], y[1400:1500], rootfs=str(rootfs),
                                          source=REPO)
    assert report["device_machine"] == "aarch64"
    assert set(report["variants"]) == {"onnx-int8", "onnx-fp32"}
    for name, v in report["variants"].items():
        assert v["argmax_agreement"] >= 0.99, (name, v)
        assert v["accuracy_arm64"] > 0.85, (name, v)
        assert v["golden_arm64"] == v["golden_x86"] == "passes", (name, v)
    assert report["variants"]["onnx-fp32"]["max_abs_logit_diff"] < 1e-3


def test_an_imported_int8_cnn_passes_its_golden_check_on_arm64_and_a_perturbed_one_does_not(
        rootfs: Path, tmp_path: Path) -> None:
    """The worked example's Keras CNN, imported: each int8 variant passes its golden check
    (the ``int8-gap`` rule) on the emulated Pi as on x86-64, and the same package with
    its int8 ONNX weights moved by 10 % noise (re-hashed, as a signer would) is refused
    there."""
    import shutil

    from edgefleet.models.build.importer import import_model
    from tests.support.byom import import_opts, make_data, make_keras_model
    from tests.support.updates import perturb_int8_weights, rehash

    data = make_data(tmp_path)
    pkg = import_model(import_opts(data, make_keras_model(data), tmp_path / "cnn")).path
    x, y = data["x_eval"][:64], data["y_eval"][:64]
    report = parity_module().compare_data(pkg, x, y, rootfs=str(rootfs), source=REPO)
    assert report["device_machine"] == "aarch64"
    assert set(report["variants"]) == {"onnx-int8", "tflite-int8", "onnx-fp32"}
    for name, v in report["variants"].items():
        assert v["golden_arm64"] == v["golden_x86"] == "passes", (name, v)
        assert v["argmax_agreement"] >= 0.95, (name, v)
    bad = tmp_path / "perturbed"
    shutil.copytree(pkg, bad)
    perturb_int8_weights(bad / "model_int8.onnx", 0.10)
    rehash(bad)
    np.save(tmp_path / "rows.npy", x[:1])
    dev = run_in_device(
        ["edgefleet", "predict", "/mnt/pkg", "--input", "/mnt/io/rows.npy",
         "--backend", "onnx", "--threads", "1"],
        rootfs=rootfs, ro_binds={bad: "/mnt/pkg", tmp_path: "/mnt/io"})
    assert dev.returncode != 0
    assert "onnx-int8: golden inputs give different outputs" in dev.stderr + dev.stdout
    assert "Traceback" not in dev.stderr
