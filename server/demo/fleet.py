"""``make demo`` / ``edgefleet demo``: a whole fleet on this machine, then a report.

Every part is the real one, started as its own process with the operator's commands:
mosquitto (with the generated password file and ACL), the TUF registry server, the
telemetry ingest, the cloud scorer, the rollout guard and a Flower SuperLink; then N
enrolled device agents, each fed by ``edgefleet-sensor-sim`` through its own
pseudo-terminal and running its own SuperNode. Each device sees its own shifted data and
collects labelled samples the ways a deployment would: LABEL frames from its sensor
(the simulator knows the truth), an application labelling answers through the local API,
and the scorer's confident answers. The demo trains a model federatedly with
differential privacy on what each device collected, measures each device's accuracy on
its own held-out samples before and after, signs and rolls the model out (canary, then
promote), streams inferences with the cloud fallback, stops everything and reports from
the fleet store. Ctrl-C at any point stops every process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.device.agent import local_api
from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.metrics import Histogram
from edgefleet.device.core.process import ProcessGroup
from edgefleet.models.sim.fl_app import export_partition
from edgefleet.server.demo.arm import (
    PATIENT_SUPERNODE,
    EmulatedDevices,
    arm_variant,
)
from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker, free_port

__all__ = ["Demo", "DemoError", "DemoOptions", "fresh_workdir", "run_demo", "running"]

BIN = Path(sys.executable).parent


class DemoError(EdgefleetError):
    """A step of the demo failed; the message names the step and the log to read."""

    exit_code = 70


@dataclass(frozen=True)
class DemoOptions:
    """What ``edgefleet demo`` can be told."""

    devices: int = 5
    rounds: int = 3
    task: str = "digits"
    epsilon: float = 8.0
    rate: float = 20.0
    stream_s: float = 20.0
    workdir: Path = Path("demo-out")
    #: The last N agents run in emulated arm64 devices (cross/, root; docs/arm64.md).
    arm_devices: int = 0
    #: After the rollout, assign a version whose archive was corrupted after signing.
    tampered_update: bool = False
    #: Each device's sensor sees a somewhat different, shifted field (:func:`device_shift`).
    device_shifts: bool = True
    #: Device i's ``--shift`` is ``shifts[i % len]`` instead of :func:`device_shift`'s.
    shifts: tuple[str, ...] = ()
    #: Agents run SuperNodes and the SuperLink runs (federated training on the fleet).
    federated: bool = True
    #: The cloud scorer and the rollout guard run; agents escalate to the scorer.
    cloud: bool = True

    def shift(self, i: int) -> str:
        """Device ``i``'s ``--shift`` ("" when every device sees the training field)."""
        if not self.device_shifts:
            return ""
        return self.shifts[i % len(self.shifts)] if self.shifts else device_shift(self.task, i)

    @property
    def formats(self) -> str:
        """Package formats: emulated devices also run the TFLite variant."""
        return "all" if self.arm_devices else "onnx"

    @property
    def slow_factor(self) -> float:
        """How much longer waits get when some devices are emulated."""
        return 4.0 if self.arm_devices else 1.0


@dataclass
class DemoState:
    """What the steps hand to each other and to the report."""

    work: Path
    broker: MosquittoBroker | None = None
    registry_url: str = ""
    superlink: Any = None
    device_pkg: Path | None = None
    cloud_pkg: Path | None = None
    fl_pkg: Path | None = None
    devices: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    rollout: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    arm: dict[str, Any] = field(default_factory=dict)
    tampered: dict[str, Any] = field(default_factory=dict)
    #: Per device: samples per source, held-out accuracy before and after training.
    device_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


Say = Callable[[str], None]


def _cli(*args: str, program: str = "edgefleet", timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, **(env or {})})


def _cli_json(step: str, *args: str, **kw: Any) -> Any:
    """Run an operator command that prints one JSON object; fail the step on an error."""
    res = _cli(*args, "--json", **kw)
    if res.returncode:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise DemoError(f"{step}: `edgefleet {' '.join(args)}` failed: "
                        f"{lines[-1] if lines else res.returncode}")
    try:
        return json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        raise DemoError(f"{step}: no JSON from `edgefleet {' '.join(args)}`") from None


def _agent_json(step: str, *args: str) -> Any:
    """An ``edgefleet-agent`` command that prints one JSON object."""
    res = _cli(*args, "--json", program="edgefleet-agent", timeout=120)
    if res.returncode:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise DemoError(f"{step}: `edgefleet-agent {' '.join(args)}` failed: "
                        f"{lines[-1] if lines else res.returncode}")
    return json.loads(res.stdout[res.stdout.index("{"):])


#: How each simulated device's field differs (device i uses entry i mod 5).
_SHIFTS = {"digits": ["", "intensity=0.8,noise=1", "intensity=1.2", "noise=2",
                      "intensity=0.9,noise=0.5"],
           "vibration": ["", "speed=1.1", "gain=1.2", "speed=0.92", "speed=1.05,gain=0.9"]}


def device_shift(task: str, i: int) -> str:
    """The ``--shift`` of device ``i``'s sensor: every device sees somewhat different data."""
    table = _SHIFTS.get(task, [""])
    return table[i % len(table)]


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


class Demo:
    """Runs the steps in order; :meth:`close` always stops every process."""

    def __init__(self, opts: DemoOptions, say: Say) -> None:
        self.opts = opts
        self.say = say
        self.s = DemoState(work=fresh_workdir(opts.workdir))
        self.procs = ProcessGroup(self.s.work / "logs")
        self.fed: Any = None
        self._sockets: Path | None = None
        self._configs: dict[str, Path] = {}
        self._api: dict[str, Path] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step and announce it."""
        self.say(name)
        t0 = time.monotonic()
        yield
        self.s.timings[name] = round(time.monotonic() - t0, 1)

    # -- 1. models ----------------------------------------------------------------------
    def build_models(self) -> None:
        """The bootstrap device model, the heavier cloud model, and τ between them."""
        w, task = self.s.work / "models", self.opts.task
        self.s.device_pkg, self.s.cloud_pkg = w / "device", w / "cloud"
        _cli_json("build device model", "models", "build", "--task", task, "--format",
                  self.opts.formats, "--out", str(self.s.device_pkg))
        _cli_json("build cloud model", "models", "build", "--task", task, "--profile", "cloud",
                  "--format", "onnx", "--out", str(self.s.cloud_pkg))
        _cli_json("choose τ", "models", "cascade", str(self.s.device_pkg), str(self.s.cloud_pkg))

    # -- 2. services --------------------------------------------------------------------
    def start_services(self) -> None:
        """Fleet home, broker with ACL, registry, ingest, scorer, rollout guard, SuperLink."""
        keys = self.start_registry()
        self.start_broker(keys)
        self.start_ingest()
        if self.opts.cloud:
            self.start_cloud()

    def start_registry(self) -> dict[str, Any]:
        """Registry keys, the bootstrap model signed in, ``registry serve``; the keys."""
        reg = self.s.work / "registry"
        keys: dict[str, Any] = _cli_json("registry keys", "keys", "init", "--registry", str(reg))
        _cli_json("register bootstrap model", "registry", "push", str(self.s.device_pkg),
                  "--registry", str(reg))
        port = free_port()
        self.procs.start("registry", [str(BIN / "edgefleet"), "registry", "serve", "--registry",
                                      str(reg), "--port", str(port)])
        self.s.registry_url = f"http://127.0.0.1:{port}"
        return keys

    def start_broker(self, keys: dict[str, Any]) -> None:
        """The fleet home (with the SuperLink when federated) and mosquitto with its ACL."""
        from edgefleet.server.fleet import home as fleet_home

        w = self.s.work
        fl: dict[str, Any] = {}
        if self.opts.federated:
            from edgefleet.server.fl.runner import EmbeddedFederation

            self.fed = EmbeddedFederation(w / "fl", devices=0, secure=True)
            self.fed.start()
            self.s.superlink = self.fed.conn
            fl = {"superlink": f"127.0.0.1:{self.fed.port}", "superlink_ca": self.fed.certs.ca}
        self.home = fleet_home.FleetHome.create(
            w / "fleet", broker_host="127.0.0.1", broker_port=free_port(),
            metadata_url=f"{self.s.registry_url}/metadata/",
            targets_url=f"{self.s.registry_url}/targets/",
            trusted_root=Path(keys["root"]), server={"registry": w / "registry"}, **fl)
        files = self.home.broker_files()
        self.s.broker = MosquittoBroker(w / "broker", BrokerConfig(
            port=self.home.settings.broker_port, allow_anonymous=False,
            password_file=files.password_file, acl_file=files.acl_file,
            extra=["user root"] if os.geteuid() == 0 else [])).start()

    def start_ingest(self) -> None:
        """The telemetry ingest into ``fleet.db`` (the report reads the fleet from there)."""
        assert self.s.broker is not None
        w = self.s.work
        ingest = self.home.service_credentials("ingest")
        self.procs.start("ingest", [str(BIN / "edgefleet"), "ingest", "run", "--host",
                                    "127.0.0.1", "--port", str(self.s.broker.port),
                                    "--username", ingest.username, "--db",
                                    str(w / "fleet.db")],
                         env={"EDGEFLEET_MQTT_PASSWORD": ingest.password})
        _wait((w / "fleet.db").exists, 30, "the ingest service")

    def start_cloud(self) -> None:
        """The cloud scorer and the rollout guard."""
        assert self.s.broker is not None
        bport = self.s.broker.port
        scorer = self.home.service_credentials("scorer")
        self.procs.start("scorer", [str(BIN / "edgefleet"), "scorer", "run", "--package",
                                    str(self.s.cloud_pkg), "--broker", f"127.0.0.1:{bport}",
                                    "--username", scorer.username, "--password-env",
                                    "SCORER_PASSWORD", "--threads", "1"],
                         env={"SCORER_PASSWORD": scorer.password})
        # Canaries stop on bad health even after `rollout --watch` has returned.
        op = self.home.service_credentials("operator")
        self.procs.start("rollout-guard", [str(BIN / "edgefleet"), "rollout", "guard",
                                           "--registry", str(self.s.work / "registry"),
                                           "--broker", f"127.0.0.1:{bport}", "--db",
                                           str(self.s.work / "fleet.db"), "--interval", "2"],
                         env={"EDGEFLEET_MQTT_USERNAME": op.username,
                              "EDGEFLEET_MQTT_PASSWORD": op.password,
                              "EDGEFLEET_LOG": "INFO"})

    # -- 3. devices ---------------------------------------------------------------------
    def start_devices(self) -> None:
        """Enroll N devices, install their bundles, start a simulator and an agent each."""
        from edgefleet.device.agent.enroll import install_bundle
        from edgefleet.server.fleet.enrollment import enroll_device

        n = self.opts.devices
        first_arm = n - self.opts.arm_devices
        arm = self._emulated() if self.opts.arm_devices else None
        for i in range(n):
            name = f"dev-{i + 1:02d}"
            ddir = self.s.work / "devices" / name
            extra: dict[str, Any] = {"model": {}, "fl": {}}
            if arm is not None and i >= first_arm:
                samples = export_partition(self.opts.task, i, n, ddir / "samples.npz")
                extra = {"model": {"variant": arm_variant(i - first_arm)},
                         "fl": {"supernode": str(PATIENT_SUPERNODE)},
                         "node_config": {"data": str(samples)}}
            bundle = enroll_device(self.home, name, group="demo", out=ddir / "bundle",
                                   superlink=self.s.superlink, broker=self.s.broker)
            sensor = ddir / "sensor"
            if len(os.fsencode(ddir / "state" / "agent.sock")) > 100:  # AF_UNIX limit: 107
                extra["api"] = {"socket": str(self._socket_dir() / f"{name}.sock")}
            cloud = self.opts.cloud
            cfg = install_bundle(bundle, ddir / "state", config_out=ddir / "agent.toml",
                                 overrides={
                                     "model": {"package": str(self.s.device_pkg), "threads": 1,
                                               **extra["model"]},
                                     "input": {"serial": str(sensor)},
                                     **({"api": extra["api"]} if "api" in extra else {}),
                                     "telemetry": {"interval_s": 1.0},
                                     "data": {"label_sources": ["api", "serial", "import",
                                                                *(["scorer"] if cloud else [])],
                                              "cloud_labels": cloud,
                                              "cloud_min_confidence": 0.9},
                                     "fl": self._fl_section(i, extra)})
            self._configs[name] = cfg
            self._api[name] = Path(extra["api"]["socket"]) if "api" in extra else \
                ddir / "state" / "agent.sock"
            self.procs.start(f"sim-{name}", [
                str(BIN / "edgefleet-sensor-sim"), "--task", self.opts.task, "--create-pty",
                str(sensor), "--rate", str(self.opts.rate), "--seed", str(i),
                "--shift", self.opts.shift(i), "--label-every", "5",
                "--label-share", "0.6", "--truth", str(ddir / "truth.csv")])
            _wait(sensor.exists, 30, f"{name}'s sensor pty")
            if arm is not None and i >= first_arm:
                # uname first: two overlays must never share the device's disk at once.
                self.s.arm["devices"][name] = {"variant": arm_variant(i - first_arm),
                                               "machine": arm.machine(name)}
                self.procs.start(f"agent-{name}", arm.agent_argv(name, cfg))
            else:
                self.procs.start(f"agent-{name}", [str(BIN / "edgefleet-agent"), "run",
                                                   "--config", str(cfg)])
            self.s.devices.append(name)
        _wait(lambda: self._agents_alive() and self._online() >= n,
              120 * self.opts.slow_factor, f"{n} devices online")

    def _fl_section(self, i: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Device ``i``'s ``[fl]``: a SuperNode with the demo's privacy policy, or off."""
        if not self.opts.federated:
            return {"enabled": False}
        return {"runtime_port": free_port(), "node_config": {
            "task": self.opts.task, "partition-id": i, "num-partitions": self.opts.devices,
            **extra.get("node_config", {})},
            # Each device's own policy admits the demo's run: its ε (DP-SGD plus noised
            # evaluations, each accounted) and the σ that ε calibrates to on stores of
            # ~1,500 samples (q ≈ 0.02).
            "privacy": {"budget": max(50.0, self.opts.epsilon),
                        "max_run_epsilon": self.opts.epsilon + 2,
                        "min_noise_multiplier": 0.2, "evaluation": "noised"},
            **extra["fl"]}

    def _socket_dir(self) -> Path:
        """A short folder for the agents' Unix sockets when the work folder is deep."""
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="efd-"))
        return self._sockets

    def _agents_alive(self) -> bool:
        """True while every agent runs; a dead one fails the demo at once, with its log."""
        for name in self.s.devices:
            if not self.procs.alive(f"agent-{name}"):
                tail = self.procs.tail(f"agent-{name}", 5)
                raise DemoError(f"agent {name} exited during start-up; its log ends:\n{tail}")
        return True

    def _emulated(self) -> EmulatedDevices:
        """The arm64 rootfs, built or reused (cross/build_rootfs.sh)."""
        arm = EmulatedDevices(self.s.work)
        t0 = time.monotonic()
        self.s.arm = {"rootfs": str(arm.prepare()), "devices": {}}
        self.s.arm["rootfs_s"] = round(time.monotonic() - t0, 1)
        return arm

    def _store(self) -> Any:
        from edgefleet.server.telemetry.store import Store

        return Store(self.s.work / "fleet.db")

    def _online(self) -> int:
        st = self._store()
        try:
            return sum(1 for d in st.devices() if d["online"] and d["n_inferences"])
        finally:
            st.close()

    # -- 3b. labelled samples on each device ------------------------------------------
    def collect_labels(self, api_labels: int = 40, min_samples: int = 100) -> None:
        """An application on each device asks for answers and labels them later by answer
        id (one batch of delayed ground truth); meanwhile the sensors' LABEL frames and
        the scorer's answers fill the stores. Waits until every store has ``min_samples``."""
        from edgefleet.models.sim.sensor_sim import samples
        from edgefleet.models.sim.shift import Shift

        local = [d for d in self.s.devices if d not in self.s.arm.get("devices", {})]
        for i, name in enumerate(self.s.devices):
            if name not in local:
                continue
            shift = Shift.parse(self.opts.shift(i), self.opts.task)
            stream = samples(self.opts.task, 1000 + i, "features", shift)
            rows, truth = [], []
            for _ in range(api_labels):
                ptype, data, label = next(stream)
                dtype = "<u1" if ptype == 1 else "<f4"
                rows.append(np.frombuffer(data, dtype=dtype).astype(float).tolist())
                truth.append(label)
            answers = local_api.request(self._api[name], {"id": "app", "input": rows}, 30.0)
            if "predictions" not in answers:
                raise DemoError(f"{name}: the local API did not answer: {answers}")
            labels = [{"answer": a["id"], "class": c}
                      for a, c in zip(answers["predictions"], truth, strict=True)]
            got = local_api.request(self._api[name], {"id": "truth", "label": labels}, 30.0)
            if got.get("labels", {}).get("stored") != api_labels:
                raise DemoError(f"{name}: labels through the local API were refused: {got}")
        _wait(lambda: all(self._data_stats(d)["total"] >= min_samples for d in local),
              120 * self.opts.slow_factor, f"{min_samples} labelled samples on each device")

    def _data_stats(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = _agent_json(f"{name}'s samples", "data", "stats", "-c",
                                          str(self._configs[name]))
        return out

    def device_accuracy(self) -> None:
        """Each device's own held-out samples: accuracy of the bootstrap model and of the
        federated one (``edgefleet-agent data eval``, on the device: only numbers leave)."""
        assert self.s.fl_pkg is not None and self.s.device_pkg is not None
        for name in self.s.devices:
            if name in self.s.arm.get("devices", {}):
                continue
            cfg = str(self._configs[name])
            stats = self._data_stats(name)
            before = _agent_json("evaluate", "data", "eval", str(self.s.device_pkg), "-c", cfg)
            after = _agent_json("evaluate", "data", "eval", str(self.s.fl_pkg), "-c", cfg)
            self.s.device_data[name] = {
                "samples": stats["total"], "by_source": stats["by_source"],
                "held_out": after["held_out"], "accuracy_before": before["accuracy"],
                "accuracy_after": after["accuracy"]}

    # -- 4. federated training ----------------------------------------------------------
    def train(self) -> None:
        """R rounds of DP federated training on the agents' SuperNodes."""
        assert self.fed is not None
        # Emulated SuperNodes join late and train slowly: wait for every node, longer.
        min_nodes = self.opts.devices if self.opts.arm_devices else max(2, self.opts.devices - 1)
        out = _cli_json(
            "federated training", "train", "--task", self.opts.task, "--rounds",
            str(self.opts.rounds), "--dp", "sample", "--epsilon", str(self.opts.epsilon),
            "--devices", str(self.opts.devices), "--min-nodes", str(min_nodes),
            "--round-timeout", str(120 * self.opts.slow_factor),
            "--superlink", f"127.0.0.1:{self.fed.port}", "--root-certificates",
            str(self.fed.certs.ca), "--home", str(self.home.root),
            "--format", self.opts.formats, "--pretrain-epochs", "20",
            "--out", str(self.s.work / "models" / "fl"), "--work-dir",
            str(self.s.work / "fl-run"), timeout=900 * self.opts.slow_factor)
        self.s.training = out
        self.s.fl_pkg = Path(out["package"])

    # -- 5. sign and roll out -----------------------------------------------------------
    def rollout(self) -> None:
        """τ for the new model, sign it into the registry, canary, then promote."""
        assert self.s.fl_pkg is not None
        cascade = _cli_json("choose τ", "models", "cascade", str(self.s.fl_pkg),
                            str(self.s.cloud_pkg))
        self.canary_promote(self.s.fl_pkg, self._canary_bar(float(cascade["tau"]), cascade))

    def _canary_bar(self, tau: float, cascade: dict[str, Any]) -> float:
        """The canary's error+degraded+fallback bar. Asking the cloud is this model's
        design: at τ it sends 1 - local_share of the test split there, and more from a
        device whose sensor is shifted (the canary may land on any device). The bar is the
        largest designed share over the devices' own fields, plus a margin for a slow
        scorer and for the binomial noise of the guard's first 20 inferences (2 σ)."""
        from edgefleet.device.runtime.predictor import Predictor
        from edgefleet.models.core.cascade import score_samples
        from edgefleet.models.sim.shift import Shift, shifted_dataset

        assert self.s.fl_pkg is not None and self.s.cloud_pkg is not None
        designed = [1.0 - float(cascade.get("test", {}).get("local_share", 1.0))]
        device = Predictor.load(self.s.fl_pkg, threads=1)
        cloud = Predictor.load(self.s.cloud_pkg, threads=1)
        for shift in {self.opts.shift(i) for i in range(len(self.s.devices))}:
            x, y = shifted_dataset(self.opts.task, Shift.parse(shift, self.opts.task), 400,
                                   seed=7)
            designed.append(1.0 - score_samples(device, cloud, x, y).evaluate(tau).local_share)
        p = max(designed)
        return round(min(0.8, p + 0.1 + 2 * float(np.sqrt(p * (1 - p) / 20))), 2)

    def _operator(self) -> tuple[dict[str, str], str, str]:
        """(env with the operator's MQTT account, broker HOST:PORT, registry folder)."""
        assert self.s.broker is not None
        op = self.home.service_credentials("operator")
        env = {"EDGEFLEET_MQTT_USERNAME": op.username, "EDGEFLEET_MQTT_PASSWORD": op.password}
        return env, f"127.0.0.1:{self.s.broker.port}", str(self.s.work / "registry")

    def canary_promote(self, package: Path, threshold: float, share: str = "20%") -> None:
        """Sign ``package`` in, canary it on ``share`` of the fleet (watched, auto-stop
        past ``threshold``), then promote it and wait for every device to run it."""
        env, broker, reg = self._operator()
        pushed = _cli_json("sign new model", "registry", "push", str(package),
                           "--registry", reg)
        ref = f"{pushed['name']}@{pushed['version']}"
        canary = _cli_json("canary", "rollout", ref, "--canary", share, "--watch", "8",
                           "--threshold", str(threshold), "--registry", reg, "--broker",
                           broker, env=env)
        self.s.rollout.append({"event": "canary", **canary})
        if canary.get("status") not in ("stopped", "rolled_back"):
            # What each device runs once the canary is on it (the rest: the old version).
            n = len(canary.get("devices") or [])
            _wait(lambda: self._on_version(pushed["version"], pushed["name"]) >= n,
                  60 * self.opts.slow_factor, f"the canary on {ref}")
            self.s.rollout[-1]["serving"] = self.serving()
            promoted = _cli_json("promote", "promote", pushed["name"], "--registry", reg,
                                 "--broker", broker, env=env)
            self.s.rollout.append({"event": "promote", **promoted})
            _wait(lambda: self._on_version(pushed["version"], pushed["name"]) >= len(
                self.s.devices), 120 * self.opts.slow_factor, f"every device on {ref}")

    def assign_fleet(self, ref: str) -> None:
        """``rollout REF --fleet`` and wait until every device reports it."""
        env, broker, reg = self._operator()
        out = _cli_json("fleet-wide rollout", "rollout", ref, "--fleet", "--registry", reg,
                        "--broker", broker, env=env)
        self.s.rollout.append({"event": "fleet", **out})
        name, _, version = ref.partition("@")
        _wait(lambda: self._on_version(version, name) >= len(self.s.devices),
              120 * self.opts.slow_factor, f"every device on {ref}")
        self.s.rollout[-1]["serving"] = self.serving()

    def serving(self) -> dict[str, str]:
        """``name@version`` each device's last telemetry reports."""
        st = self._store()
        try:
            return {d["device"]: f"{d['model_name']}@{d['model_version']}"
                    for d in st.devices()}
        finally:
            st.close()

    def tamper(self) -> None:
        """Sign one more version, corrupt its stored archive, assign it to the fleet and
        wait until every device has refused it (its telemetry counts the refusal)."""
        from edgefleet.models.sim.tamper import corrupt_artifact, tampered_copy

        assert self.s.fl_pkg is not None and self.s.broker is not None
        reg = self.s.work / "registry"
        version = tampered_copy(self.s.fl_pkg, self.s.work / "models" / "tampered")
        pushed = _cli_json("sign the next version", "registry", "push",
                           str(self.s.work / "models" / "tampered"), "--registry", str(reg))
        corrupt_artifact(reg, pushed["sha256"])
        ref = f"{pushed['name']}@{version}"
        op = self.home.service_credentials("operator")
        env = {"EDGEFLEET_MQTT_USERNAME": op.username, "EDGEFLEET_MQTT_PASSWORD": op.password}
        out = _cli_json("assign the tampered version", "rollout", ref, "--fleet", "--registry",
                        str(reg), "--broker", f"127.0.0.1:{self.s.broker.port}", env=env)
        self.s.tampered = {"ref": ref, "rollout": out.get("id"), "refused_by": []}
        _wait(lambda: len(self._refused()) >= len(self.s.devices),
              60 * self.opts.slow_factor, f"every device refusing {ref}")
        self.s.tampered["refused_by"] = self._refused()

    def _refused(self) -> list[str]:
        """Devices whose last telemetry counts a refused (hash mismatch) update."""
        st = self._store()
        try:
            rows = [st.device(d["device"]) for d in st.devices()]
        finally:
            st.close()
        return sorted(r["device"] for r in rows if r and r["last_metrics"] and int(
            r["last_metrics"].get("counters", {}).get("update_rejected_hash_mismatch", 0)))

    def _on_version(self, version: str, name: str) -> int:
        st = self._store()
        try:
            return sum(1 for d in st.devices()
                       if d["model_version"] == version and d["model_name"] == name)
        finally:
            st.close()

    # -- 6. stream and stop -------------------------------------------------------------
    def stream_and_stop(self) -> None:
        """Let inferences stream, then stop simulators and agents (agents flush their spools)."""
        time.sleep(self.opts.stream_s)
        self.stop_devices()

    def stop_devices(self) -> None:
        """Stop simulators, then agents (they flush their spools); ingest commits the tail."""
        sims = [f"sim-{d}" for d in self.s.devices]
        self.procs.stop_many(sims, 10, signal.SIGINT)
        time.sleep(1.5)  # the last frames through the agents, the last reports out
        codes = self.procs.stop_many([f"agent-{d}" for d in self.s.devices], 20)
        bad = {k: v for k, v in codes.items() if v != 0}
        if bad:
            raise DemoError(f"agents did not stop cleanly: {bad}")
        time.sleep(2.0)  # ingest commits the tail

    def close(self) -> None:
        """Stop every process this demo started."""
        self.procs.stop_all(10)
        if self.fed is not None:
            self.fed.stop()
        if self.s.broker is not None:
            self.s.broker.stop()
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)


MARKER = ".edgefleet-demo"


def fresh_workdir(path: Path) -> Path:
    """An empty work folder; a previous demo's folder (it has a marker) is replaced."""
    path = path.resolve()
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise DemoError(f"{path} is not empty and not a previous demo's folder: "
                            "choose another --workdir")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("edgefleet demo work folder: safe to delete\n")
    return path


def _merged_quantiles(bodies: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """p50/p99 over the devices' cumulative histograms (same bucket bounds everywhere)."""
    hists = [b[key] for b in bodies if b.get(key)]
    if not hists:
        return {"p50": None, "p99": None}
    h = Histogram(hists[0]["bounds"])
    for other in hists:
        h.counts = [a + b for a, b in zip(h.counts, other["counts"], strict=True)]
        h.total += other["count"]
    return {"p50": h.quantile(0.5), "p99": h.quantile(0.99)}


def build_report(demo: Demo) -> dict[str, Any]:
    """The demo's result as one JSON-able object (the shape ``--json`` prints)."""
    s = demo.s
    st = demo._store()
    try:
        devices = st.devices()
        stats = st.message_stats()
        bodies = [d["last_metrics"] for d in (st.device(x["device"]) for x in devices)
                  if d and d["last_metrics"]]
        seqs = st.query("SELECT device, boot, MAX(seq), COUNT(*) FROM messages "
                        "GROUP BY device, boot")
        dup = sum(int(d["duplicates"] or 0) for d in devices)
        drift_of = {x["device"]: ((st.device(x["device"]) or {}).get("last_metrics") or {}
                                  ).get("drift") for x in devices}
        alerts = st.open_alerts()
        drift_events = sorted({e["device"] for e in st.events(limit=10_000, prefix="alert.drift")})
    finally:
        st.close()
    shifts = {name: demo.opts.shift(i) for i, name in enumerate(s.devices)}
    published = sum(int(r[2]) for r in seqs)
    stored = stats["distinct"]
    pending = _pending_spooled(s)
    # Answers given through the cascade (the model's own health probes after an update
    # are inferences too, but nobody asked for them).
    inf = sum(int(b.get(k, 0)) for b in bodies for k in ("local", "fallback", "degraded"))

    def share(key: str) -> float:
        return sum(int(b.get(key, 0)) for b in bodies) / inf if inf else 0.0

    rounds = [{"round": r["round"], "accuracy": r["accuracy"], "epsilon": r["epsilon"],
               "nodes": r["nodes"], "declines": r.get("declines", {})}
              for r in s.training.get("rounds", [])]
    return {
        "devices": len(s.devices),
        "rounds": rounds,
        "final": s.training.get("final", {}),
        "inferences": inf,
        "local_share": share("local"),
        "fallback_share": share("fallback"),
        "degraded_share": share("degraded"),
        "latency_ms": _merged_quantiles(bodies, "latency_ms"),
        "telemetry": {"published": published, "stored": stored,
                      "lost": max(0, published - stored - pending), "pending": pending,
                      "duplicated": stats["rows"] - stats["distinct"],
                      "duplicates_dropped_at_ingest": dup},
        "rollout": s.rollout,
        "models": {"bootstrap": str(s.device_pkg), "federated": str(s.fl_pkg)},
        "device_data": [{"device": k, **v} for k, v in sorted(s.device_data.items())],
        "per_device": [{"device": d["device"], "model": f"{d['model_name']}@"
                        f"{d['model_version']}", "inferences": d["n_inferences"],
                        "epsilon": d["epsilon"], "shift": shifts.get(d["device"], ""),
                        "drift": drift_of.get(d["device"])} for d in devices],
        # Open alerts at the end, and every device that raised a drift alert at any time.
        "alerts": {"open": alerts, "drift_raised_by": drift_events},
        "timings_s": s.timings,
        "workdir": str(s.work),
        **({"arm": s.arm} if s.arm else {}),
        **({"tampered": s.tampered} if s.tampered else {}),
    }


def _pending_spooled(s: DemoState) -> int:
    """Messages still in device spools (kept on disk for the next start: not lost)."""
    from edgefleet.device.telemetry.spool import spooled_count

    return sum(spooled_count(s.work / "devices" / d / "state" / "telemetry-spool.db")
               for d in s.devices)


def run_demo(opts: DemoOptions, say: Say) -> dict[str, Any]:
    """Run every step; always stop every process; return the report."""
    if opts.devices < 2:
        raise DemoError("the demo needs at least 2 devices")
    if not 0 <= opts.arm_devices <= opts.devices:
        raise DemoError(f"--arm-devices must be between 0 and --devices ({opts.devices})")
    with running(Demo(opts, say)) as demo:
        with demo.step("building the device and cloud models"):
            demo.build_models()
        with demo.step("starting broker, registry, ingest, scorer, guard and SuperLink"):
            demo.start_services()
        with demo.step(f"enrolling and starting {opts.devices} device agents"):
            demo.start_devices()
        with demo.step("collecting labelled samples (serial, local API, scorer)"):
            demo.collect_labels()
        with demo.step(f"federated training: {opts.rounds} rounds with DP"):
            demo.train()
        with demo.step("each device's accuracy on its own held-out samples"):
            demo.device_accuracy()
        with demo.step("signing and rolling out the new model (canary, promote)"):
            demo.rollout()
        if opts.tampered_update:
            with demo.step("assigning a tampered update (every device must refuse it)"):
                demo.tamper()
        with demo.step(f"streaming inferences for {opts.stream_s:.0f} s"):
            demo.stream_and_stop()
        report = build_report(demo)
        report["html_report"] = _html_report(demo)
        return report


@contextmanager
def running(demo: Demo) -> Iterator[Demo]:
    """Run a demo's steps: SIGTERM stops it like Ctrl-C, and every process it started is
    stopped at the end, whatever happened."""
    interrupted = False

    def _interrupt(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield demo
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        if interrupted:
            demo.say("stopping every process")
        demo.close()


def _html_report(demo: Demo) -> str | None:
    out = demo.s.work / "report"
    res = _cli("report", "--db", str(demo.s.work / "fleet.db"), "--out", str(out))
    return str(out / "index.html") if res.returncode == 0 else None


def fmt_share(x: float) -> str:
    """``93.4 %``."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"
