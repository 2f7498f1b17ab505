"""Drift-triggered retraining on loopback, every part real.

The demo fleet (server/demo/fleet.py: broker with ACL, registry, ingest, scorer, SuperLink,
3 enrolled agents on ptys with their SuperNodes) runs the bootstrap digits model while
the simulators send a shifted field (dimmer camera + noise). The devices' drift monitors
report it, the ingest raises drift alerts, `edgefleet retrain watch --once` (twice: the
policy wants 2 sustained evaluations) trains federatedly on the devices' shifted samples,
registers the model, runs a canary and promotes it; every device ends on the new model.
Accuracy on shifted data from the same shift is measured for both packages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgefleet.device.agent.enroll as enroll
from edgefleet.models.sim.shift import Shift, package_accuracy, shifted_dataset
from edgefleet.server.demo.fleet import BIN, Demo, DemoOptions, _wait
from edgefleet.server.fleet.audit import AuditLog

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SHIFT = "intensity=0.5,noise=1"


def _drifted(demo: Demo) -> int:
    return len(_drifted_devices(demo))


def _drifted_devices(demo: Demo) -> set[str]:
    st = demo._store()
    try:
        return {a["device"] for a in st.open_alerts() if a["kind"] == "drift"}
    finally:
        st.close()


def _drift_raised(demo: Demo) -> set[str]:
    """Devices that raised a drift alert at any time."""
    st = demo._store()
    try:
        return {e["device"] for e in st.events(limit=10_000, prefix="alert.drift")}
    finally:
        st.close()


def _scored_windows(demo: Demo) -> list[int]:
    """Each device's drift window in its last report (0 before any input score)."""
    st = demo._store()
    try:
        rows = [st.device(d) for d in demo.s.devices]
    finally:
        st.close()
    drifts = [((r or {}).get("last_metrics") or {}).get("drift") or {} for r in rows]
    return [int(d["window"]) if d.get("input_psi") is not None else 0 for d in drifts]


def _with_shifted_samples(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each device's FL data: labelled samples it stored from the shifted field."""
    real = enroll.install_bundle
    count = iter(range(100))

    def install(bundle: Path, state: Path, **kw: Any) -> Path:
        i = next(count)
        x, y = shifted_dataset("digits", Shift.parse(SHIFT, "digits"), 400, seed=1000 + i)
        data = tmp_path / f"samples-{i}.npz"
        np.savez(data, x=x, y=y)
        cfg = real(bundle, state, **kw)
        # A pilot's provisioned file, imported into the device's sample store.
        res = subprocess.run([str(BIN / "edgefleet-agent"), "data", "import", str(data), "-c",
                              str(cfg), "--json"], capture_output=True, text=True,
                             timeout=120, check=False)
        assert res.returncode == 0 and '"stored": 400' in res.stdout, res.stderr[-2000:]
        return cfg

    monkeypatch.setattr(enroll, "install_bundle", install)


def _shift_simulators(demo: Demo) -> None:
    """Restart every simulator on the same pty path, now sending the shifted field."""
    for i, name in enumerate(demo.s.devices):
        demo.procs.stop_many([f"sim-{name}"], 10, signal.SIGINT)
        sensor = demo.s.work / "devices" / name / "sensor"
        demo.procs.start(f"sim2-{name}", [
            str(BIN / "edgefleet-sensor-sim"), "--task", "digits", "--create-pty", str(sensor),
            "--rate", "20", "--seed", str(50 + i), "--shift", SHIFT, "--label-every", "5"])


@pytest.mark.timeout(480)
def test_shift_drift_retrain_canary_promote(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _with_shifted_samples(monkeypatch, tmp_path)
    demo = Demo(DemoOptions(devices=3, rate=20.0, workdir=tmp_path / "fleet",
                            device_shifts=False),
                lambda _msg: None)
    try:
        demo.build_models()
        demo.start_services()
        demo.start_devices()
        # The field the bootstrap model was trained on: every device scores whole windows
        # (from 100 samples up to the full 500, a report a second) and none ever alerts.
        _wait(lambda: min(_scored_windows(demo)) >= 300, 120, "drift scores on every device")
        assert _drift_raised(demo) == set()
        _shift_simulators(demo)
        _wait(lambda: _drifted(demo) == 3, 120, "drift alerts from the shifted devices")
        assert _drifted_devices(demo) == set(demo.s.devices)
        w = demo.s.work
        cfg = w / "retrain.toml"
        cfg.write_text("[retrain]\nkinds = [\"drift\"]\nmin_share = 0.5\n"
                       "sustain_evaluations = 2\ntask = \"digits\"\nrounds = 3\n"
                       "epsilon = 8.0\nmin_nodes = 2\npretrain_epochs = 20\n"
                       "canary_percent = 34\ncanary_watch_seconds = 6\n"
                       "canary_threshold = 0.6\n")
        op = demo.home.service_credentials("operator")
        env = {**os.environ, "EDGEFLEET_MQTT_USERNAME": op.username,
               "EDGEFLEET_MQTT_PASSWORD": op.password}
        assert demo.s.broker is not None and demo.fed is not None
        cmd = [str(BIN / "edgefleet"), "retrain", "watch", "--group", "demo", "--db",
               str(w / "fleet.db"), "--fleet", str(w / "fleet"), "--registry",
               str(w / "registry"), "--broker", f"127.0.0.1:{demo.s.broker.port}",
               "--superlink", f"127.0.0.1:{demo.fed.port}", "--root-certificates",
               str(demo.fed.certs.ca), "--config", str(cfg), "--once", "--json"]
        evs = []
        for _ in range(2):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                                 check=False)
            assert res.returncode == 0, res.stderr[-3000:]
            evs.append(json.loads(res.stdout))
        assert [e["action"] for e in evs] == ["counting", "retrained"], evs
        done = evs[1]["detail"]
        assert done["canary"] == "promoted", done
        model, version = done["model"], done["version"]
        _wait(lambda: demo._on_version(version, model) >= 3, 120, f"every device on {version}")
        actions = [e["action"] for e in AuditLog(w / "registry" / "audit.jsonl").entries()]
        steps = [a for a in actions if a.startswith("retrain.")]
        assert steps == ["retrain.trigger", "retrain.run_started", "retrain.run_finished",
                         "retrain.registered", "retrain.canary_started", "retrain.promoted"]
        assert "rollout.start" in actions and "rollout.promote" in actions
        AuditLog(w / "registry" / "audit.jsonl").verify()
        # Accuracy on fresh shifted data (same shift, other seed) before and after.
        x, y = shifted_dataset("digits", Shift.parse(SHIFT, "digits"), 1000, seed=7)
        pkgs = sorted((w / "registry" / "retrain" / "packages").iterdir())
        assert len(pkgs) == 1
        before = package_accuracy(demo.s.device_pkg, x, y)  # type: ignore[arg-type]
        after = package_accuracy(pkgs[0], x, y)
        print(f"accuracy on shifted data: bootstrap {before:.3f}, retrained {after:.3f}")
        assert after > before + 0.2, (before, after)
    finally:
        demo.close()
