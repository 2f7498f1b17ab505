"""Real Flower deployments on this machine, and submitting and following a run on any SuperLink.

:class:`EmbeddedFederation` starts a real ``flower-superlink`` and N real
``flower-supernode`` processes on free loopback ports (TLS and SuperNode
authentication on by default: a CA, a server certificate and one registered key per
node are generated in its work folder) and stops every one of them on exit, also on
Ctrl-C. :func:`submit_run` and :func:`follow_run` work the same against a remote
SuperLink: they drive the ``flwr`` CLI with a generated Flower configuration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.device.core.errors import UsageError
from edgefleet.device.core.process import Child, ChildExited, ProcessGroup, log_tail, wait_port
from edgefleet.device.wire.app_trust import SIGNATURE_KEY
from edgefleet.server.fl.settings import RunSettings
from edgefleet.server.fl.store import FlStore, RoundRow, RunRow
from edgefleet.server.fleet.app_signing import AppSigningKey, build_fab, load_or_create
from edgefleet.server.fleet.pki import CertPaths, init_certs
from edgefleet.server.fleet.superlink import BIN, CONN, FlRunError, SuperLinkConn, flower_env

__all__ = ["EmbeddedFederation", "follow_run", "submit_run"]

log = logging.getLogger(__name__)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: Child, what: str, timeout: float = 60) -> None:
    try:
        if wait_port(proc, port, timeout=timeout):
            return
    except ChildExited:
        raise FlRunError(f"{what} exited with code {proc.returncode} during start-up") from None
    raise FlRunError(f"{what} did not listen on port {port} within {timeout:.0f} s")


#: The ClientApp of simulated devices (built-in task shares unless ``data`` is set).
SIMULATED_CLIENTAPP = "edgefleet.models.sim.fl_app:app"


def write_flower_app(folder: Path, clientapp: str = SIMULATED_CLIENTAPP) -> Path:
    """The Flower app (a ``pyproject.toml``) naming our ServerApp and ``clientapp``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, value in RunSettings.model_validate({}).flower_config().items():
        lines.append(f"{key} = {json.dumps(value)}")
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "edgefleet-fl"\nversion = "1.0.0"\n'
        'description = "edgefleet federated training with differential privacy"\n'
        'license = "Apache-2.0"\ndependencies = ["flwr>=1.41"]\n\n'
        '[tool.flwr.app]\npublisher = "edgefleet"\n\n[tool.flwr.app.components]\n'
        'serverapp = "edgefleet.server.fl.server_app:app"\n'
        f'clientapp = "{clientapp}"\n\n[tool.flwr.app.config]\n'
        + "\n".join(lines) + f'\n{SIGNATURE_KEY} = ""\n')
    return folder


def submit_run(conn: SuperLinkConn, settings: RunSettings, work: Path,
               clientapp: str = SIMULATED_CLIENTAPP,
               signing_key: AppSigningKey | None = None) -> str:
    """Start a run with these settings (``flwr run``); returns Flower's run id.

    With ``signing_key`` the exact FAB ``flwr run`` sends is signed and the record rides
    in the run config (:mod:`edgefleet.device.wire.app_trust`); SuperNodes that trust
    only the fleet's key refuse the run otherwise.
    """
    app_dir = write_flower_app(work / "app", clientapp)
    cfg = work / f"run-{settings.tag}.toml"
    values = dict(settings.flower_config())
    if signing_key is not None:
        values[SIGNATURE_KEY] = signing_key.sign(build_fab(app_dir)).encode()
    cfg.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
    res = conn.flwr("run", str(app_dir), CONN, "--format", "json", "--run-config", str(cfg))
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        out = {}
    if res.returncode or not out.get("run-id"):
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise FlRunError(f"flwr run failed: {msg[-1] if msg else res.returncode}")
    return str(out["run-id"])


def flower_status(conn: SuperLinkConn, run_id: str) -> str:
    """Flower's own view of a run (``finished:completed``, ``running``, ...)."""
    res = conn.flwr("ls", "--run-id", run_id, CONN, "--format", "json", timeout=60)
    with contextlib.suppress(ValueError, KeyError, IndexError):
        return str(json.loads(res.stdout)["runs"][0]["status"])
    return "unknown"


def follow_run(store: FlStore, tag: str, conn: SuperLinkConn, run_id: str,
               on_round: Callable[[RoundRow], None] | None = None,
               timeout: float = 3600) -> RunRow:
    """Poll the database until the run finishes, calling ``on_round`` for each new round."""
    seen = -1
    deadline = time.monotonic() + timeout
    last_flower_check = time.monotonic()
    while time.monotonic() < deadline:
        for row in store.rounds(tag):
            if row.round > seen:
                seen = row.round
                if on_round:
                    on_round(row)
        run = store.run(tag)
        if run is not None and run.status != "running":
            if run.status == "failed":
                raise FlRunError(f"run {tag} failed in the ServerApp: {run.error}")
            return run
        if time.monotonic() - last_flower_check > 15:
            last_flower_check = time.monotonic()
            status = flower_status(conn, run_id)
            if status.startswith("finished:") and status != "finished:completed":
                raise FlRunError(f"run {tag} (Flower run {run_id}) ended as {status}; "
                                 "see the SuperLink log")
        time.sleep(0.5)
    raise FlRunError(f"run {tag} did not finish within {timeout:.0f} s")


@dataclass
class EmbeddedFederation:
    """A SuperLink and ``devices`` SuperNodes on loopback, owned by this object."""

    work: Path
    devices: int = 5
    secure: bool = True
    node_config: Callable[[int], dict[str, Any]] | None = None
    procs: ProcessGroup = field(init=False)
    port: int = 0
    certs: CertPaths | None = None
    #: Secure mode: the key runs must be signed with (the fleet's, or one made in
    #: ``work``); every SuperNode trusts only it. ``trust_apps=False`` starts plain
    #: SuperNodes that run any app (Flower's default).
    app_key: AppSigningKey | None = None
    trust_apps: bool = True

    def __post_init__(self) -> None:
        self.procs = ProcessGroup(self.work)

    def __enter__(self) -> EmbeddedFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def conn(self) -> SuperLinkConn:
        """The ``flwr`` CLI's way to this SuperLink."""
        return SuperLinkConn(f"127.0.0.1:{self.port}", self.work / "cli",
                             self.certs.ca if self.certs and self.secure else None)

    def start(self) -> None:
        """Certificates and keys, the SuperLink, node registration, then the SuperNodes."""
        self.work.mkdir(parents=True, exist_ok=True)
        if self.secure and self.certs is None:
            self.certs = init_certs(self.work / "certs", nodes=self.devices)
        if self.secure and self.trust_apps and self.app_key is None:
            self.app_key = load_or_create(self.work / "app-signing")
        self.start_superlink()
        if self.secure:
            for i in range(self.devices):
                self.register(i)
        for i in range(self.devices):
            self.start_node(i)

    def _spawn(self, name: str, args: list[str], home: Path) -> Child:
        home.mkdir(parents=True, exist_ok=True)
        return self.procs.start(name, args, env=flower_env(home), cwd=self.work)

    def start_superlink(self) -> None:
        """Start (or restart) the SuperLink; its state lives in ``superlink.db``."""
        self.port = self.port or free_port()
        args = [str(BIN / "flower-superlink"), "--port", str(self.port),
                "--database", str(self.work / "superlink.db"),
                "--disable-runtime-dependency-installation"]
        if self.secure and self.certs:
            args += ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile",
                     str(self.certs.server_cert), "--ssl-keyfile", str(self.certs.server_key),
                     "--enable-supernode-auth"]
        else:
            args.append("--insecure")
        proc = self._spawn("superlink", args, self.work / "superlink-home")
        _wait_port(self.port, proc, "flower-superlink")

    def register(self, i: int) -> None:
        """Register node ``i``'s public key (``flwr supernode register``)."""
        assert self.certs is not None
        res = self.conn.flwr("supernode", "register", str(self.certs.public_key(i)), CONN,
                             "--format", "json")
        if res.returncode:
            raise FlRunError(f"registering node {i} failed: {(res.stderr or res.stdout)[-300:]}")

    def node_args(self, i: int, key: Path | None = None) -> list[str]:
        """The ``flower-supernode`` command line of device ``i``."""
        cfg = {"partition-id": i, "num-partitions": self.devices,
               "state-dir": str(self.work / f"node-{i}"),
               **(self.node_config(i) if self.node_config else {})}
        node_cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", node_cfg]
        if self.secure and self.certs:
            args += ["--root-certificates", str(self.certs.ca), "--auth-supernode-private-key",
                     str(key or self.certs.node_keys[i])]
        if self.secure and self.trust_apps and self.app_key is not None:
            trust = self.work / "app-trust.yaml"
            trust.write_text(self.app_key.trusted_entities())
            args = [sys.executable, "-m", "edgefleet.device.fl.supernode", *args[1:],
                    "--trusted-entities", str(trust)]
        else:
            args.append("--insecure")
        return args

    def start_node(self, i: int, key: Path | None = None) -> Child:
        """Start SuperNode ``i`` (again, after a kill: it rejoins with the same key)."""
        return self._spawn(f"node-{i}", self.node_args(i, key), self.work / f"node-{i}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process group (``superlink`` or ``node-<i>``) and reap it."""
        p = self.procs.pop(name)
        if p is not None:
            p.stop(10, sig)

    def stop(self) -> None:
        """Stop SuperNodes first, then the SuperLink (SIGTERM, SIGKILL after 10 s)."""
        names = sorted(self.procs.children, key=lambda n: n == "superlink")
        for name in names:
            self.kill(name, signal.SIGTERM)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a process's log, for error messages and failing tests."""
        return log_tail(self.work / f"{name}.log", lines)


def remove_tree(path: Path) -> None:
    """Delete a work folder (keys included) when it is not wanted afterwards."""
    if path.exists() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


def check_settings(s: RunSettings) -> None:
    """Refuse settings that cannot work before any process starts."""
    if s.min_nodes > s.num_nodes:
        raise UsageError(f"--min-nodes {s.min_nodes} exceeds --devices {s.num_nodes}")
    if s.package:
        from edgefleet.server.fl.head import head_package

        head_package(s.package)
