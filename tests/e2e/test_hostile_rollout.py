"""A hostile device against ``edgefleet rollout guard`` (issue 15), with real processes.

mosquitto, ``edgefleet ingest run`` and guard processes. Hostile devices leave retained
update states the view must refuse (nesting deep enough for RecursionError in a naive
parser, bytes that are not UTF-8, NaN, a state claiming another device) and send events
claiming that the *healthy* canary device rolled back. The guard is restarted twice, and
each new guard gets every retained hostile state again: it counts them and keeps
working. The unhealthy canary is still stopped; the healthy one is never stopped by the
forged events.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.wire.updates import event_topic, state_topic
from tests.conftest import run_cli
from tests.e2e.test_rollout_guard import (
    FakeDevice,
    _guard,
    _passes,
    _status,
    _stop,
    guard_bench,
)
from tests.support.hostile import RECURSION_DEPTH
from tests.support.updates import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(300)]

#: Retained hostile states: (device, payload, the reason the view refuses it with).
HOSTILE_STATES = [
    ("pi-evil1", b'{"device": "pi-evil1", "version": ' + b"[" * RECURSION_DEPTH
     + b"]" * RECURSION_DEPTH + b"}", "too_deep"),
    ("pi-evil2", b'\xff\xfe{"version": "1.0.0"', "bad_utf8"),
    ("pi-evil3", b'{"version": "1.0.0", "health": {"inferences": NaN}}', "non_finite"),
    ("pi-evil4", b'{"device": "pi-good", "version": "9.9.9"}', "device_mismatch"),
]
RETAINED = {"too_deep": 1, "bad_utf8": 1, "non_finite": 1, "device_mismatch": 1}


def _last_rejected(tmp: Path, name: str) -> dict[str, int]:
    passes = _passes(tmp, name)
    return dict(passes[-1].get("rejected", {})) if passes else {}


def test_guard_survives_hostile_devices_and_still_decides(tmp_path: Path,
                                                          digits_package: Path,
                                                          mosquitto: Any) -> None:
    with guard_bench(tmp_path, digits_package, mosquitto) as (registry, reg, db, env, _ingest,
                                                               client, guards):
        for device, payload, _ in HOSTILE_STATES:
            client.publish(state_topic(device), payload, qos=1, retain=True).wait_for_publish(10)
        bad, good = FakeDevice(client, "pi-bad", "b0b0b0b0"), FakeDevice(client, "pi-good",
                                                                         "c0c0c0c0")
        for dev in (bad, good):
            dev.state("1.0.0")
            dev.report(db, "1.0.0", 1000, 10)
        res = run_cli("rollout", "digits-mlp@1.2.0", "--devices", "pi-bad", "--json", env=env)
        assert res.returncode == 0, res.stderr
        rid_bad = json.loads(res.stdout)["id"]
        res = run_cli("rollout", "digits-mlp@1.1.0", "--devices", "pi-good", "--json", env=env)
        assert res.returncode == 0, res.stderr
        rid_good = json.loads(res.stdout)["id"]
        bad.state("1.2.0")
        good.state("1.1.0")

        # Started, then restarted twice: each guard meets every retained hostile state.
        args = ("--interval", "0.3", "--min-inferences", "20")
        for name in ("g1", "g2", "g3"):
            g = _guard(tmp_path, name, env, *args)
            guards.append(g)
            wait_for(lambda n=name: len(_passes(tmp_path, n)) >= 2, what=f"passes of {name}")
            assert _last_rejected(tmp_path, name) == RETAINED, _passes(tmp_path, name)[-1]
            assert g.poll() is None
            if name != "g3":
                assert _stop(g) == 0
        g3 = guards[-1]

        # Forged events: pi-evil1 says pi-good rolled back (its own topic, another device).
        now = time.time()
        for i in range(3):
            forged = {"device": "pi-good", "event": "rolled_back", "ts": now + i,
                      "target": "digits-mlp/1.1.0.tar"}
            client.publish(event_topic("pi-evil1"), json.dumps(forged), qos=1).wait_for_publish(10)
        client.publish(event_topic("pi-evil1"), b"[" * RECURSION_DEPTH, qos=1).wait_for_publish(10)
        wait_for(lambda: _last_rejected(tmp_path, "g3").get("device_mismatch") == 4
                 and _last_rejected(tmp_path, "g3").get("too_deep") == 2,
                 what="the forged events counted")

        bad.report(db, "1.2.0", 1040, 27)  # 40 inferences since the rollout, 17 fallbacks
        good.report(db, "1.1.0", 1100, 12)  # 100 inferences, 2 fallbacks: healthy
        wait_for(lambda: _status(registry, rid_bad) == "stopped", what="the automatic stop")
        n3 = len(_passes(tmp_path, "g3"))
        wait_for(lambda: len(_passes(tmp_path, "g3")) > n3 + 2, what="more passes")
        last = _passes(tmp_path, "g3")[-1]
        assert [c["id"] for c in last["checked"]] == [rid_good]
        assert last["checked"][0]["status"] == "running"
        assert last["checked"][0]["devices"]["pi-good"]["inferences"] == 100
        assert g3.poll() is None
        assert _stop(g3) == 0
    assert _status(registry, rid_good) == "running"
    stops = [e for e in reg.audit.entries() if e["action"] == "rollout.stopped"]
    assert [s["details"]["rollout"] for s in stops] == [rid_bad]
