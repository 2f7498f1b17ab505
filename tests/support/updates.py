"""Test support for signed model updates: a registry on loopback HTTP and a device beside it."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.inference.serving import ServingModel
from edgefleet.device.runtime.manifest import MANIFEST_NAME, file_sha256
from edgefleet.device.updates.installer import HealthPolicy, Updater
from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig
from edgefleet.device.wire.updates import Assignment
from edgefleet.server.fleet import director_key
from edgefleet.server.fleet.keys import ROLES, KeyRing
from edgefleet.server.registry.http import RegistryHandler, RegistryServer
from edgefleet.server.registry.repository import Registry
from edgefleet.server.registry.tuf_repo import Expiry, TufRepo

#: The version a fast-forward attacker pushes a role to.
HUGE = 10**6


def make_registry(home: Path, expiry: Expiry | None = None) -> Registry:
    """A registry with fresh keys (the TUF roles' and the director's) and an initialized
    TUF repository."""
    keys = KeyRing(home / "keys")
    for role in ROLES:
        keys.generate(role)
    director_key.ensure(keys)
    reg = Registry(home, keys, expiry)
    reg.init_repo()
    return reg


def fast_forward(repo: TufRepo, role: str, version: int = HUGE) -> None:
    """What an attacker holding ``role``'s key (and reaching the online signing) pushes:
    ``role`` signed at ``version``, and what must be re-signed above it to be served."""
    md = repo.open(role)
    md.signed.version = version - 1  # close() adds one
    repo.close(role, md)
    if role == "targets":
        repo.publish()
    elif role == "snapshot":
        repo.do_timestamp(force=True)


def rehash(pkg: Path) -> None:
    """Recompute every file's size and sha256 in the manifest (what a signer would do)."""
    m = json.loads((pkg / MANIFEST_NAME).read_text())
    for rel in m["files"]:
        m["files"][rel] = {"sha256": file_sha256(pkg / rel), "size": (pkg / rel).stat().st_size}
    (pkg / MANIFEST_NAME).write_text(json.dumps(m, indent=2))


def package_version(src: Path, dest: Path, version: str,
                    edit: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    """A copy of package ``src`` as ``version``; ``edit(manifest, folder)`` may change it."""
    shutil.copytree(src, dest)
    m = json.loads((dest / MANIFEST_NAME).read_text())
    m["version"] = version
    if edit:
        edit(m, dest)
    (dest / MANIFEST_NAME).write_text(json.dumps(m, indent=2))
    rehash(dest)
    return dest


def perturb_int8_weights(path: Path, rel_sigma: float, seed: int = 0) -> None:
    """Gaussian noise of ``rel_sigma`` × each int8 weight tensor's spread, in place: what
    a model trained a little differently (or a wrong checkpoint) looks like."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.dtype == np.int8 and w.ndim > 1:
            noisy = np.round(w + rng.normal(0.0, rel_sigma * float(w.std()), w.shape))
            t.CopyFrom(numpy_helper.from_array(noisy.clip(-127, 127).astype(np.int8), t.name))
    onnx.save(model, str(path))


def assert_perturbed_int8_refused(src: Path, dest: Path, rel_sigma: float = 0.10) -> Path:
    """A copy of package ``src`` at ``dest`` whose int8 ONNX weights carry
    :func:`perturb_int8_weights` noise, re-hashed as a signer would: its golden check
    must refuse it. Returns the copy."""
    from edgefleet.device.core.errors import ModelRejected
    from edgefleet.device.runtime.predictor import Predictor

    shutil.copytree(src, dest)
    perturb_int8_weights(dest / "model_int8.onnx", rel_sigma)
    rehash(dest)
    with pytest.raises(ModelRejected, match="onnx-int8: golden inputs give different outputs"):
        Predictor.load(dest, variant="onnx-int8", threads=1)
    return dest


def flip_bytes(path: Path, offset_from_end: int = 64, count: int = 8) -> None:
    """Corrupt a model file in place (weights sit near the end of these small graphs)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) - offset_from_end)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


class Mode:
    """What a :class:`FaultyHandler` does to matching responses (set by the test)."""

    def __init__(self) -> None:
        self.match: str | None = None  # substring of the URL path
        self.kind = "pass"  # pass | truncate | extra | drip | replace
        self.body: bytes = b""


class FaultyHandler(RegistryHandler):
    """A registry that misbehaves the way attackers and bad networks do."""

    mode: Mode

    def send_file(self, fh: BinaryIO, size: int) -> None:
        mode = self.mode
        if mode.match is None or mode.match not in self.path or mode.kind == "pass":
            super().send_file(fh, size)
            return
        self._misbehave(fh.read())

    def _misbehave(self, data: bytes) -> None:
        mode = self.mode
        if mode.kind == "replace":
            super().send_body(mode.body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if mode.kind == "truncate":
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif mode.kind == "extra":
            body = data + b"\0" * (len(data) + 4096)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif mode.kind == "drip":
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(min(len(data), 5)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(1.0)
            except OSError:
                pass
            self.close_connection = True


def faulty_server(reg: Registry) -> tuple[RegistryServer, Mode]:
    """A loopback registry server whose responses a test can corrupt."""
    mode = Mode()
    handler = type("Handler", (FaultyHandler,), {"mode": mode})
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts, handler=handler).start()
    return srv, mode


@dataclass
class Device:
    """A device's updater pointed at a registry URL, with events recorded."""

    state: Path
    updater: Updater
    serving: ServingModel
    metrics: Metrics
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def make_device(state: Path, reg: Registry, url: str, *, socket_timeout_s: float = 5.0,
                health: HealthPolicy | None = None, ca_file: Path | None = None) -> Device:
    """A device provisioned with the registry's root v1 (``ca_file``: the registry's CA)."""
    metrics = Metrics()
    cfg = TufClientConfig(f"{url}/metadata/", f"{url}/targets/",
                          socket_timeout_s=socket_timeout_s, ca_file=ca_file)
    tuf = TufClient(state, cfg, reg.repo.root_bytes(1))
    serving = ServingModel(metrics)
    events: list[tuple[str, dict[str, Any]]] = []
    upd = Updater(state, tuf, serving, health=health or HealthPolicy(probe_inferences=10),
                  events=lambda kind, **d: events.append((kind, d)), metrics=metrics)
    upd.start()
    return Device(state, upd, serving, metrics, events)


class Traffic:
    """Calls ``serving.predict`` in a loop on a thread and counts failures."""

    def __init__(self, serving: ServingModel, sample: Any) -> None:
        self.serving, self.sample = serving, sample
        self.ok = self.failed = 0
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.serving.predict(self.sample)
                self.ok += 1
                if self.serving.active is not None:
                    self.versions.add(self.serving.active.manifest.version)
            except Exception:
                self.failed += 1
            time.sleep(0.002)

    def __enter__(self) -> Traffic:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def assign(version: str, model: str = "digits-mlp", shadow: bool = False,
           rollback: bool = False) -> Assignment:
    """An assignment of ``model@version`` (``rollback``: one below the highest seen)."""
    return Assignment(model, version, shadow=shadow, rollback=rollback)


def golden_input(package: Path) -> np.ndarray:
    """The first golden sample of a package: a valid input for any version of it."""
    m = json.loads((package / MANIFEST_NAME).read_text())
    return np.asarray(m["golden"][0]["input"], dtype=np.float32)


def assert_refused(dev: Device, sample: np.ndarray, version: str,
                   exc_type: type[Exception], reason: str) -> Exception:
    """Apply ``version`` under live traffic and assert it is refused with ``reason``
    (exception, ``rejected`` event, one more ``update_rejected_<reason>``) while 1.0.0
    answers every request and stays active, with nothing left downloaded or staged."""
    slot, _ = dev.updater.slots.active()
    assert slot is not None
    manifest = dev.updater.slots.path(slot) / MANIFEST_NAME
    before, counted = file_sha256(manifest), dev.metrics.counter(f"update_rejected_{reason}")
    with Traffic(dev.serving, sample) as traffic, pytest.raises(exc_type) as info:
        dev.updater.apply(assign(version))
    assert getattr(info.value, "reason", reason) == reason, info.value  # if it has one
    assert traffic.failed == 0 and traffic.ok > 0 and traffic.versions == {"1.0.0"}
    assert dev.updater.slots.active()[0] == slot and file_sha256(manifest) == before
    _slot, active = dev.updater.slots.active()
    assert active is not None and active.version == "1.0.0"
    assert dev.serving.active is not None and dev.serving.active.manifest.version == "1.0.0"
    kind, data = dev.events[-1]
    assert kind == "rejected" and data["reason"] == reason, dev.events[-1]
    assert dev.metrics.counter(f"update_rejected_{reason}") == counted + 1
    assert not any(dev.updater.downloads.iterdir()), "partial download left behind"
    assert not any(p.name.startswith(".staging") for p in dev.updater.slots.slots_dir.iterdir())
    return info.value


def start_agent(device_id: str, state: Path, reg: Registry, url: str, broker_port: int,
                groups: tuple[str, ...] = (), director: bool = True) -> tuple[Any, Device]:
    """A device following rollouts over MQTT (in this process, on its own threads), pinned
    to the registry's director key as enrollment would pin it (``director=False``: a
    device enrolled before directors, which follows unsigned assignments)."""
    from edgefleet.device.core.mqtt_link import MqttConfig
    from edgefleet.device.updates.director import DirectorTrust, load_public_key
    from edgefleet.device.updates.listener import UpdateAgent

    dev = make_device(state, reg, url)
    trust = (DirectorTrust(state, device_id,
                           load_public_key(director_key.public_file(reg.keys.keys_dir)))
             if director else None)
    agent = UpdateAgent(device_id, dev.updater, MqttConfig(port=broker_port), groups=groups,
                        metrics=dev.metrics, state_interval=0.3, director=trust)
    return agent.start(), dev


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
