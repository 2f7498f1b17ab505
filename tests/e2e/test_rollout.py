"""Rollouts end to end: a registry on loopback HTTP, a real mosquitto, ten devices.

A 10 % canary reaches exactly one device; a bad candidate (it sends almost everything
to the cloud fallback) stops by itself and its device returns to the old version; a good
candidate is promoted to all ten; shadow mode changes no answer; the audit log verifies.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.runtime.manifest import MANIFEST_NAME
from edgefleet.server.registry.http import RegistryServer
from edgefleet.server.rollout.controller import RolloutController
from edgefleet.server.rollout.fleet_view import FleetView
from tests.support.updates import make_registry, package_version, start_agent, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]

N_DEVICES = 10


def _miscalibrated(m: dict[str, Any], _pkg: Path) -> None:
    m["temperature"] = 100.0
    m["fallback_threshold"] = 0.5


def test_canary_stop_promote_and_shadow(tmp_path: Path, digits_package: Path,
                                        mosquitto: Any) -> None:
    reg = make_registry(tmp_path / "registry")
    reg.push(package_version(digits_package, tmp_path / "p" / "1.0.0", "1.0.0"))
    reg.push(package_version(digits_package, tmp_path / "p" / "1.1.0", "1.1.0"))
    reg.push(package_version(digits_package, tmp_path / "p" / "1.2.0", "1.2.0", _miscalibrated))
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts).start()
    fleet_view = FleetView("127.0.0.1", mosquitto.port)
    ctl = RolloutController(reg, fleet_view, fleet_view, min_inferences=20)

    devices = {f"dev{i:02d}": start_agent(f"dev{i:02d}", tmp_path / f"dev{i:02d}", reg, srv.url,
                                           mosquitto.port) for i in range(N_DEVICES)}
    golden = json.loads((digits_package / MANIFEST_NAME).read_text())["golden"]
    samples = [np.asarray(g["input"], dtype=np.float32) for g in golden]
    stop, failures = threading.Event(), []

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            for _agent, dev in devices.values():
                if dev.serving.active is not None:
                    try:
                        dev.serving.predict(samples[i % len(samples)])
                    except Exception as exc:
                        failures.append(exc)
            i += 1
            stop.wait(0.01)

    def versions() -> dict[str, str | None]:
        return {d: (dev.serving.active.manifest.version if dev.serving.active else None)
                for d, (_a, dev) in devices.items()}

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        # Assignments are signed per device: the fleet is who the view has heard from.
        wait_for(lambda: len(fleet_view.fleet(0.0)) == N_DEVICES, what="device states")
        ctl.start("digits-mlp", "1.0.0", fleet={}, everyone=True)
        wait_for(lambda: set(versions().values()) == {"1.0.0"}, what="fleet on 1.0.0")
        wait_for(lambda: len(fleet_view.fleet(0.0)) == N_DEVICES
                 and set(fleet_view.fleet(0.0).values()) == {"1.0.0"}, what="states")

        # A bad candidate at 10 %: one device, then the canary stops by itself.
        bad = ctl.start("digits-mlp", "1.2.0", fleet=fleet_view.fleet(0.5), canary_pct=10,
                        threshold=0.2)
        assert len(bad.devices) == 1
        canary = bad.devices[0]
        wait_for(lambda: versions()[canary] == "1.2.0", what="canary on 1.2.0")
        assert sum(v == "1.2.0" for v in versions().values()) == 1
        bad = ctl.watch(bad, seconds=60, interval=0.2)
        assert bad.status == "stopped", bad
        assert "fallback rate" in (bad.reason or "")
        wait_for(lambda: set(versions().values()) == {"1.0.0"}, what="canary back on 1.0.0")

        # Shadow: the candidate runs beside 1.0.0; answers (and the active model) stay.
        shadow = ctl.start("digits-mlp", "1.1.0", fleet=fleet_view.fleet(0.0),
                           devices=["dev03"], shadow=True)
        _a3, dev3 = devices["dev03"]
        wait_for(lambda: dev3.serving.shadow is not None, what="shadow loaded")
        wait_for(lambda: (dev3.metrics.counter("shadow_inferences") > 20), what="shadowing")
        assert versions()["dev03"] == "1.0.0"
        assert dev3.serving.shadow_agreement() == 1.0  # same weights: same answers
        wait_for(lambda: fleet_view.states["dev03"].get("shadow_agreement") == 1.0
                 and fleet_view.states["dev03"].get("shadow_latency_ms", 0) > 0,
                 what="shadow figures in the state message")
        ctl.stop(shadow, "shadow done")
        wait_for(lambda: dev3.serving.shadow is None, what="shadow stopped")

        # A good candidate at 10 %, healthy under the watch, then promoted to everyone.
        good = ctl.start("digits-mlp", "1.1.0", fleet=fleet_view.fleet(0.0), canary_pct=10)
        assert len(good.devices) == 1
        wait_for(lambda: versions()[good.devices[0]] == "1.1.0", what="good canary")
        good = ctl.watch(good, seconds=3, interval=0.2)
        assert good.status == "running"
        ctl.promote("digits-mlp")
        wait_for(lambda: set(versions().values()) == {"1.1.0"}, what="fleet on 1.1.0")

        # Rolling back the promotion returns everyone to 1.0.0.
        ctl.rollback("digits-mlp")
        wait_for(lambda: set(versions().values()) == {"1.0.0"}, what="fleet back on 1.0.0")
    finally:
        stop.set()
        t.join()
        for agent, _dev in devices.values():
            agent.stop()
        fleet_view.close()
        srv.stop()
    assert failures == []
    actions = [e["action"] for e in reg.audit.entries()]
    assert actions.count("rollout.stopped") == 2
    assert "rollout.promote" in actions and "rollout.rollback" in actions
    assert reg.audit.verify().entries == len(actions)
    auto = [e for e in reg.audit.entries() if e["action"] == "rollout.stopped"
            and e["details"]["automatic"]]
    assert len(auto) == 1 and auto[0]["details"]["version"] == "1.2.0"


def test_agent_process_follows_a_retained_assignment(tmp_path: Path, digits_package: Path,
                                                     mosquitto: Any) -> None:
    import subprocess
    import sys

    from edgefleet.device.wire.updates import device_topic

    reg = make_registry(tmp_path / "registry")
    reg.push(package_version(digits_package, tmp_path / "p" / "1.0.0", "1.0.0"))
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts).start()
    root = tmp_path / "root.json"
    root.write_bytes(reg.repo.root_bytes(1))
    view = FleetView("127.0.0.1", mosquitto.port)
    agent = subprocess.Popen(
        [str(Path(sys.executable).parent / "edgefleet-agent"), "update", "run", "--device",
         "pi-01", "--group", "lab", "--state", str(tmp_path / "dev"), "--repo", srv.url,
         "--root", str(root), "--broker", f"127.0.0.1:{mosquitto.port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        view.publish(device_topic("pi-01"), json.dumps(
            {"model": "digits-mlp", "version": "1.0.0"}).encode())
        wait_for(lambda: view.states.get("pi-01", {}).get("version") == "1.0.0",
                 what="agent state on 1.0.0")
        assert view.states["pi-01"]["groups"] == ["lab"]
        view.publish(device_topic("pi-01"), json.dumps(
            {"model": "digits-mlp", "version": "7.0.0"}).encode())
        wait_for(lambda: any(e.get("event") == "rejected" and e.get("reason") == "not_signed"
                             for e in view.events), what="refusal of an unsigned target")
        view.publish(device_topic("pi-01"), b"{not json")
        wait_for(lambda: any(e.get("event") == "assignment_invalid" for e in view.events),
                 what="refusal of a malformed assignment")
        assert agent.poll() is None  # the daemon is still running
        assert view.states["pi-01"]["version"] == "1.0.0"
    finally:
        agent.terminate()
        assert agent.wait(30) == 0, agent.stderr.read() if agent.stderr else ""
        view.close()
        srv.stop()
