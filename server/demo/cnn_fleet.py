"""The CNN demo's fleet part: the imported CNN, then its DP-fine-tuned head, on real agents.

Runs the default demo's machinery (:class:`.fleet.Demo`: the same processes, started the
same way) without the SuperLink, the cloud scorer and the rollout guard (the head was
fine-tuned in-process; the CNN has no cloud model): broker, registry, ingest and one
agent per camera, each fed by ``edgefleet-sensor-sim --task digits`` through its own
pty with that camera's field shift (64 pixels 0..16 per frame, which the package's
input spec reads as the 8x8x1 image). It rolls the imported version out fleet-wide,
streams, canaries the fine-tuned version on one agent, promotes it and streams again.

Accuracy on the streamed frames: the simulators send ground truth (``LABEL`` frames)
for 60 % of their frames, and each agent stores those frames with the ``name@version``
that answered them. After the agents stop, each stored frame is answered again by
the package of the version that served it (the agent runs the same package and default
variant, so its answers are these; tests/e2e/test_byom_fleet_e2e.py checks that) and
compared with its label. Both versions are also measured on all of a device's labelled
frames: the same frames, so the comparison does not depend on which frames came when.
The measuring runs on the device (``edgefleet-agent data eval --all --source serial
--answered-by NAME@VERSION``): only numbers leave it, as in the default demo.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.device.runtime.manifest import load_package
from edgefleet.models.sim.shift import Shift
from edgefleet.server.demo.fleet import Demo, DemoOptions, Say, _agent_json, running

__all__ = ["MAX_AGENTS", "serve_on_fleet"]

#: Agents on the fleet part (a couple: it shows serving and rollout, not scale).
MAX_AGENTS = 3
#: The canary's error+degraded+fallback bar: the CNN answers everything locally.
THRESHOLD = 0.2


def serve_on_fleet(work: Path, imported: Path, tuned: Path, shifts: Sequence[Shift], *,
                   rate: float, stream_s: float, say: Say) -> dict[str, Any]:
    """Serve ``imported`` then ``tuned`` on one agent per shift; the report's fleet part.

    ``stream_s`` is split between the two versions (half after each rollout)."""
    before, after = load_package(imported), load_package(tuned)
    opts = DemoOptions(devices=len(shifts), task="digits", rate=rate, stream_s=stream_s,
                       workdir=work, federated=False, cloud=False,
                       shifts=tuple("" if s.identity else s.describe() for s in shifts))
    with running(Demo(opts, say)) as demo:
        demo.s.device_pkg = imported
        with demo.step("fleet: starting broker, registry and ingest"):
            keys = demo.start_registry()
            demo.start_broker(keys)
            demo.start_ingest()
        with demo.step(f"fleet: enrolling and starting {len(shifts)} agents "
                       "(sensors with the shifted cameras)"):
            demo.start_devices()
        ref = f"{before.name}@{before.version}"
        with demo.step(f"fleet: {ref} fleet-wide, streaming {stream_s / 2:.0f} s"):
            demo.assign_fleet(ref)
            time.sleep(stream_s / 2)
        with demo.step(f"fleet: {after.name}@{after.version} canary on one agent, "
                       "then promote"):
            demo.canary_promote(tuned, THRESHOLD, share="20%")  # one of up to 3 agents
        with demo.step(f"fleet: streaming {stream_s / 2:.0f} s, stopping the agents"):
            time.sleep(stream_s / 2)
            demo.stop_devices()
        with demo.step("fleet: each agent's accuracy on its labelled frames"):
            return _report(demo, {before.version: imported, after.version: tuned},
                           before.name, before.version, after.version)


def _report(demo: Demo, packages: dict[str, Path], name: str, v_before: str,
            v_after: str) -> dict[str, Any]:
    """Per agent: versions served, inferences, accuracy on its labelled frames."""
    st = demo._store()
    try:
        telemetry = {d["device"]: d for d in st.devices()}
    finally:
        st.close()
    rows = []
    for i, device in enumerate(demo.s.devices):
        cfg = str(demo._configs[device])
        stats = _agent_json(f"{device}'s samples", "data", "stats", "-c", cfg)
        row: dict[str, Any] = {
            "device": device, "shift": demo.opts.shift(i),
            # The versions that answered its labelled frames, in the order they served.
            "served": [m.rpartition("@")[2] for m in stats.get("by_model", {})],
            "model": "{model_name}@{model_version}".format(**telemetry[device]),
            "inferences": int(telemetry[device]["n_inferences"] or 0)}
        for key, version in (("before", v_before), ("after", v_after)):
            got = _agent_json("accuracy", "data", "eval", str(packages[version]), "-c", cfg,
                              "--all", "--source", "serial", "--answered-by",
                              f"{name}@{version}")
            row[f"labelled_{key}"], row[f"accuracy_{key}"] = got["samples"], got["accuracy"]
            same = _agent_json("accuracy", "data", "eval", str(packages[version]), "-c", cfg,
                               "--all", "--source", "serial")
            row["same_frames"], row[f"same_frames_{key}"] = same["samples"], same["accuracy"]
        rows.append(row)
    return {
        "agents": len(rows), "versions": [v_before, v_after],
        "measure": "the sensors' LABEL frames (ground truth for 60 % of the frames), each "
                   "answered by the package of the version that served it",
        "inferences": sum(r["inferences"] for r in rows),
        "rollout": demo.s.rollout, "per_agent": rows,
        # Pooled over the frames each version answered (different frames: the canary
        # answered more of them with the new version) and over the same frames.
        "accuracy_before": _pooled(rows, "accuracy_before", "labelled_before"),
        "accuracy_after": _pooled(rows, "accuracy_after", "labelled_after"),
        "same_frames_before": _pooled(rows, "same_frames_before", "same_frames"),
        "same_frames_after": _pooled(rows, "same_frames_after", "same_frames"),
        "workdir": str(demo.s.work), "timings_s": demo.s.timings}


def _pooled(rows: list[dict[str, Any]], key: str, count: str) -> float | None:
    """``key`` averaged over the agents, weighted by ``count``."""
    got = [(r[key], r[count]) for r in rows if r[key] is not None]
    n = sum(c for _, c in got)
    return float(sum(a * c for a, c in got) / n) if n else None
