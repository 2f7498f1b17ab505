"""Signed per-device assignments end to end: real mosquitto, a registry on loopback HTTP.

Whoever can publish on a device's assignment topic (a compromised broker, a leaked
service credential; here a plain MQTT client) tries every trick: a captured older
assignment (replayed), one signed with another key (forged), one that expired, another
device's assignment, an unsigned v1 message, a director-signed one whose sha256 is not
TUF's, and a downgrade without the rollback flag. Each is refused with its own reason,
counter and event while the device keeps serving the version it had. Then the director's
signed rollback is accepted (``downgrade_accepted``, audit entry with its actor), and a
rotated director key reaches the devices through the key link in their next assignment.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefleet.device.runtime.manifest import MANIFEST_NAME
from edgefleet.device.wire import updates as wire
from edgefleet.server.fleet import director_key
from edgefleet.server.registry.http import RegistryServer
from edgefleet.server.rollout.controller import RolloutController
from edgefleet.server.rollout.fleet_view import FleetView
from tests.support.telemetry import raw_client
from tests.support.updates import make_registry, package_version, start_agent, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]


def test_forged_replayed_expired_wrong_device_unsigned_and_downgrade_are_refused(
        tmp_path: Path, digits_package: Path, mosquitto: Any) -> None:
    reg = make_registry(tmp_path / "registry")
    for v in ("1.0.0", "1.1.0"):
        reg.push(package_version(digits_package, tmp_path / "p" / v, v))
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts).start()
    view = FleetView("127.0.0.1", mosquitto.port)
    ctl = RolloutController(reg, view, view)
    devices = {d: start_agent(d, tmp_path / d, reg, srv.url, mosquitto.port)
               for d in ("pi-1", "pi-2")}
    a1, pi1 = devices["pi-1"]
    captured: dict[str, list[bytes]] = {"pi-1": [], "pi-2": []}
    lock = threading.Lock()

    def capture(_c: Any, _u: Any, msg: Any) -> None:
        with lock:
            if msg.payload:
                captured[msg.topic.rsplit("/", 1)[-1]].append(bytes(msg.payload))

    spy = raw_client(mosquitto.port, "attacker")
    spy.on_message = capture
    spy.subscribe(wire.device_topic("+"), qos=1)
    sample = np.asarray(json.loads((digits_package / MANIFEST_NAME).read_text())
                        ["golden"][0]["input"], dtype=np.float32)

    def version(d: str) -> str | None:
        serving = devices[d][1].serving
        return serving.active.manifest.version if serving.active else None

    def refused(reason: str) -> bool:
        return any(e.get("device") == "pi-1" and e.get("event") in ("assignment_refused",
                                                                      "rejected")
                   and e.get("reason") == reason for e in view.events)

    def attack(payload: bytes, reason: str, counter: str) -> None:
        spy.publish(wire.device_topic("pi-1"), payload, qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: refused(reason), what=f"refusal {reason}")
        assert pi1.metrics.counter(counter) == 1, (reason, pi1.metrics.snapshot())
        assert version("pi-1") == "1.1.0"  # still serving what it served
        assert pi1.serving.predict(sample) is not None

    key = director_key.load(reg.keys)
    sha = {v: reg.require("digits-mlp", v).sha256 for v in ("1.0.0", "1.1.0")}

    def signed(v: str, *, device: str = "pi-1", seq: int | None = None,
               expires: float | None = None, sha256: str | None = None,
               rollback: bool = False, k: ed25519.Ed25519PrivateKey | None = None) -> bytes:
        a = wire.Assignment("digits-mlp", v, rollout="evil", rollback=rollback,
                            sha256=sha256 or sha[v])
        floor = view.assign_seq(device) or 0
        return wire.sign_assignment(a, device=device, seq=seq or floor + 100,
                                    expires=int(expires or time.time() + 3600),
                                    key=k or key.private)

    try:
        wait_for(lambda: len(view.fleet(0.0)) == 2, what="device states")
        ctl.start("digits-mlp", "1.0.0", fleet={}, everyone=True)
        wait_for(lambda: {version(d) for d in devices} == {"1.0.0"}, what="fleet on 1.0.0")
        canary = ctl.start("digits-mlp", "1.1.0", fleet=view.fleet(0.0), devices=["pi-1"])
        wait_for(lambda: version("pi-1") == "1.1.0", what="pi-1 on 1.1.0")
        wait_for(lambda: view.assign_seq("pi-1") == 2, what="pi-1 reports seq 2")
        with lock:
            old, other = captured["pi-1"][0], captured["pi-2"][0]
        assert json.loads(old)["signed"]["version"] == "1.0.0"

        attack(old, "replayed", "update_assignment_refused_replayed")
        attack(signed("1.0.0", k=ed25519.Ed25519PrivateKey.generate(), rollback=True),
               "bad_signature", "update_assignment_refused_bad_signature")
        attack(signed("1.0.0", expires=time.time() - 5, rollback=True), "expired",
               "update_assignment_refused_expired")
        attack(other, "wrong_device", "update_assignment_refused_wrong_device")
        attack(wire.Assignment("digits-mlp", "1.0.0").encode(), "unsigned_assignment",
               "update_assignment_refused_unsigned_assignment")
        attack(signed("1.0.0", sha256=sha["1.1.0"], rollback=True), "hash_mismatch",
               "update_rejected_hash_mismatch")
        attack(signed("1.0.0"), "downgrade_refused", "update_rejected_downgrade_refused")
        assert pi1.metrics.counter("update_activated") == 2  # 1.0.0, then 1.1.0: no more

        # The director's own rollback (the operator stops the canary) is a signed
        # downgrade: accepted, reported, and the audit log says who asked.
        # The director signs above the seq the device last reported: wait for the report of
        # the seq it holds now (the attacks took 102, and 202 if the view lagged behind).
        wait_for(lambda: view.assign_seq("pi-1") == a1.director.seq >= 100,
                 what="the seq reported")
        ctl.rollback("digits-mlp", actor="alice")
        wait_for(lambda: version("pi-1") == "1.0.0", what="pi-1 rolled back to 1.0.0")
        wait_for(lambda: any(e.get("event") == "downgrade_accepted"
                             and e.get("device") == "pi-1" for e in view.events),
                 what="the downgrade reported")
        assert ctl.get(canary.id).status == "stopped"
        back = [e for e in reg.audit.entries() if e["action"] == "rollout.rollback"]
        assert back[-1]["actor"] == "alice" and back[-1]["details"]["rollback"] is True

        # Rotation: the next assignments carry the link, devices move to the new key,
        # and the old key signs nothing they take any more. A running controller (a
        # guard) picks the new key up by itself.
        new = director_key.rotate(reg.keys)  # the same controller signs with the new key
        ctl.start("digits-mlp", "1.1.0", fleet=view.fleet(0.0), everyone=True)
        wait_for(lambda: {version(d) for d in devices} == {"1.1.0"}, what="fleet on 1.1.0")
        wait_for(lambda: all(view.states.get(d, {}).get("director_key") == new.keyid
                             for d in devices), what="devices on the new director key")
        spy.publish(wire.device_topic("pi-1"), signed("1.1.0", k=key.private), qos=1,
                    retain=True).wait_for_publish(5)
        wait_for(lambda: pi1.metrics.counter("update_assignment_refused_bad_signature") == 2,
                 what="the retired key refused")
        assert version("pi-1") == "1.1.0"
    finally:
        for agent, _dev in devices.values():
            agent.stop()
        spy.loop_stop()
        spy.disconnect()
        view.close()
        ctl.close()
        srv.stop()
    assert reg.audit.verify().entries == len(reg.audit.entries())
