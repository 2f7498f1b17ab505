"""Resident memory of ``edgefleet-agent run`` with an int8 model and every service on.

The device is set up the way ``make demo`` does it: a fleet home, a real mosquitto with
the fleet's password/ACL files, a TUF registry being served, a SuperLink with TLS and
node authentication; the device is enrolled and its bundle installed. The agent then
serves ``edgefleet-sensor-sim`` frames from a pty, publishes telemetry, keeps the local
API socket and the fallback connection open, listens for updates and supervises
``flower-supernode`` (its own process, reported separately). ONNX Runtime int8 and
LiteRT int8 are measured side by side in one run. Writes docs/bench/agent_memory.md.

Run: .venv/bin/python scripts/bench_agent_memory.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.server.fl.runner import EmbeddedFederation
from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker, free_port
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.superlink import BIN

TARGET_MB = 150
VARIANTS = ("onnx-int8", "tflite-int8")


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) from /proc/<pid>/status and Pss from smaps_rollup."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1])
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids + [g for k in kids for g in _children(k)]


def _cmd(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    first = Path(args[0].decode()).name
    return Path(args[1].decode()).name if first.startswith("python") and len(args) > 1 \
        else first


def _top_mappings(pid: int, n: int = 6) -> list[tuple[str, int]]:
    """Largest resident mappings by file (anonymous memory as '[anon]')."""
    rss: Counter[str] = Counter()
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            path = head[5] if len(head) > 5 else ""
            name = Path(path).name if path.startswith("/") else (path or "[anon]")
        elif line.startswith("Rss:"):
            rss[name] += int(head[1])
    return rss.most_common(n)


class _Metrics:
    """The device's telemetry as the ingest account sees it."""

    def __init__(self, port: int, user: str, password: str, device: str) -> None:
        self.last: dict[str, Any] = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(f"edgefleet/v1/{device}/metrics", qos=1)
        self.c.loop_start()
        self.lock = threading.Lock()

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.last = json.loads(msg.payload)["body"]

    def inferences(self) -> int:
        with self.lock:
            return int(self.last.get("inferences", 0))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def measure(home: FleetHome, broker: MosquittoBroker, fed: EmbeddedFederation, pkg: Path,
            variant: str, work: Path, seconds: float) -> dict[str, Any]:
    """Enroll, install and run one agent; sample its memory for ``seconds``."""
    name = f"mem-{variant}"
    ddir = work / name
    bundle = enroll_device(home, name, "bench", out=ddir / "bundle", superlink=fed.conn,
                           broker=broker)
    sensor = ddir / "sensor"
    cfg = install_bundle(bundle, ddir / "state", config_out=ddir / "agent.toml", overrides={
        "model": {"package": str(pkg), "variant": variant, "threads": 1},
        "input": {"serial": str(sensor)}, "telemetry": {"interval_s": 1.0},
        "fallback": {"mode": "features"},
        "fl": {"node_config": {"task": "digits", "partition-id": 0, "num-partitions": 1}}})
    sim = subprocess.Popen([str(BIN / "edgefleet-sensor-sim"), "--task", "digits",
                            "--create-pty", str(sensor), "--rate", "50", "--seed", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ingest = home.service_credentials("ingest")
    seen = _Metrics(broker.port, ingest.username, ingest.password, name)
    agent = None
    try:
        _wait(sensor.exists, 30, "the simulator's pty")
        agent = subprocess.Popen([str(BIN / "edgefleet-agent"), "run", "--config", str(cfg)],
                                 stdout=(ddir / "agent.log").open("wb"),
                                 stderr=subprocess.STDOUT)
        _wait(lambda: seen.inferences() > 100, 120, f"{name} serving frames")
        _wait(lambda: any(_cmd(k) == "flower-supernode" for k in _children(agent.pid)), 60,
              "flower-supernode")
        start_inf = seen.inferences()
        peak: dict[str, int] = {}
        kids: dict[str, dict[str, int]] = {}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            st = _status(agent.pid)
            peak = {k: max(v, peak.get(k, 0)) for k, v in st.items()}
            for k in _children(agent.pid):
                try:
                    kids[_cmd(k)] = _status(k)
                except OSError:
                    continue
            time.sleep(0.5)
        final = _status(agent.pid)
        top = _top_mappings(agent.pid)
        served = seen.inferences() - start_inf
        return {"variant": variant, "rss_kb": final["VmRSS"], "hwm_kb": peak["VmHWM"],
                "pss_kb": final["Pss"], "children": kids, "top": top,
                "fps": served / seconds,
                "total_pss_kb": final["Pss"] + sum(k["Pss"] for k in kids.values())}
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
        sim.send_signal(signal.SIGINT)
        sim.wait(10)
        seen.close()


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="Sampling time per variant.")
    args = ap.parse_args()
    from edgefleet.models.build.pipeline import BuildOptions, build_package

    with tempfile.TemporaryDirectory(prefix="edgefleet-mem-") as tmp:
        work = Path(tmp)
        pkg = work / "digits"
        build_package(BuildOptions(task="digits", out=pkg, formats="all", seed=0))
        reg = work / "registry"
        keys = json.loads(subprocess.run([str(BIN / "edgefleet"), "keys", "init", "--registry",
                                          str(reg), "--json"], capture_output=True, text=True,
                                         check=True).stdout)
        rport = free_port()
        registry = subprocess.Popen([str(BIN / "edgefleet"), "registry", "serve", "--registry",
                                     str(reg), "--port", str(rport)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fed = EmbeddedFederation(work / "fl", devices=0, secure=True)
        broker = None
        try:
            fed.start()
            assert fed.certs is not None
            home = FleetHome.create(
                work / "fleet", broker_port=free_port(), superlink=f"127.0.0.1:{fed.port}",
                superlink_ca=fed.certs.ca, metadata_url=f"http://127.0.0.1:{rport}/metadata/",
                targets_url=f"http://127.0.0.1:{rport}/targets/", trusted_root=keys["root"])
            files = home.broker_files()
            broker = MosquittoBroker(work / "broker", BrokerConfig(
                port=home.settings.broker_port, allow_anonymous=False,
                password_file=files.password_file, acl_file=files.acl_file,
                extra=["user root"] if os.geteuid() == 0 else [])).start()
            results = [measure(home, broker, fed, pkg, v, work, args.seconds) for v in VARIANTS]
        finally:
            if broker is not None:
                broker.kill()
            fed.stop()
            registry.terminate()
            registry.wait(10)
    rows = []
    for r in results:
        kids = ", ".join(f"{k} {_mb(v['VmRSS'])} / {_mb(v['Pss'])}"
                         for k, v in sorted(r["children"].items()))
        ok = "yes" if r["rss_kb"] / 1024 <= TARGET_MB else "**no**"
        rows.append([r["variant"], _mb(r["rss_kb"]), _mb(r["hwm_kb"]), _mb(r["pss_kb"]),
                     f"{r['rss_kb'] / results[0]['rss_kb']:.2f}", ok, f"{r['fps']:.0f}",
                     kids or "-", _mb(r["total_pss_kb"])])
    tops = "\n".join(f"- {r['variant']}: " + ", ".join(f"{n} {_mb(kb)}" for n, kb in r["top"])
                     for r in results)
    body = (
        "`edgefleet-agent run` as enrolled by the fleet (TLS SuperLink with node auth, "
        "broker ACL, TUF updates enabled), fed by `edgefleet-sensor-sim` through a pty at "
        f"50 frames/s, telemetry every 1 s, local API and cloud-fallback connection open; "
        f"sampled every 0.5 s for {args.seconds:g} s after 100 inferences. Target: "
        f"agent VmRSS ≤ {TARGET_MB} MB. `flower-supernode` is the agent's child process, "
        "reported separately (its own children too: the SuperNode starts "
        "`flower-superexec`, which starts `flwr-clientapp` only during a run). PSS splits "
        "shared pages between processes, so the PSS column adds up to what the device "
        "spends; that sum is what the systemd unit's MemoryMax must cover.\n\n"
        + md_table(["variant", "VmRSS MB", "VmHWM MB", "PSS MB", "RSS ratio",
                    f"≤ {TARGET_MB} MB", "frames/s served",
                    "children (VmRSS / PSS MB)", "agent + children PSS MB"], rows)
        + f"\n\nThe agent itself stays at {_mb(max(r['rss_kb'] for r in results))} MB "
        f"resident or less; Flower's idle SuperNode and SuperExec add "
        f"{_mb(results[0]['total_pss_kb'] - results[0]['pss_kb'])} MB PSS between runs "
        "(separate Python interpreters running Flower: not ours to trim), "
        "and a ClientApp process joins them during a training round. The agent imports "
        "no TensorFlow, ONNX or Flower; its largest parts are the runtime library and "
        "Python's heap."
        + "\n\nLargest resident mappings of the agent (MB):\n\n" + tops
        + "\n\nCommand: `.venv/bin/python scripts/bench_agent_memory.py`\n")
    path = write_section("agent_memory", "Agent memory", body)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
