"""Run a real mosquitto broker as a child process on a loopback port.

The demo and the tests start their own broker (Debian's ``mosquitto``) with a generated
config: a listener on 127.0.0.1, optional password file and ACL, optional persistence.
The system-wide broker of the Debian package is never used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.process import Child, ChildExited, wait_port

__all__ = ["BrokerConfig", "MosquittoBroker", "find_mosquitto", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if not found:
        raise EdgefleetError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


@dataclass
class BrokerConfig:
    """What goes into the generated ``mosquitto.conf``."""

    port: int = 0
    host: str = "127.0.0.1"
    allow_anonymous: bool = True
    password_file: Path | None = None
    acl_file: Path | None = None
    persistence: bool = False
    max_packet_size: int = 0
    #: Extra raw lines appended to the config (TLS listener options and the like).
    extra: list[str] = field(default_factory=list)


class MosquittoBroker:
    """A mosquitto child process; ``start``/``stop``/``kill``/``restart`` keep the same port."""

    def __init__(self, workdir: Path, config: BrokerConfig | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config or BrokerConfig()
        if not self.config.port:
            self.config.port = free_port()
        self.proc: Child | None = None

    @property
    def port(self) -> int:
        """The loopback port the broker listens on."""
        return self.config.port

    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return self.config.host

    def _write_config(self) -> Path:
        c = self.config
        lines = [
            f"listener {c.port} {c.host}",
            f"allow_anonymous {'true' if c.allow_anonymous else 'false'}",
            f"persistence {'true' if c.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
        ]
        if c.password_file:
            lines.append(f"password_file {c.password_file}")
        if c.acl_file:
            lines.append(f"acl_file {c.acl_file}")
        if c.max_packet_size:
            lines.append(f"max_packet_size {c.max_packet_size}")
        lines += c.extra
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start the broker and wait until it accepts connections."""
        if self.proc and self.proc.alive():
            return self
        conf = self._write_config()
        log_path = self.workdir / "mosquitto.log"
        self.proc = Child.start("mosquitto", [find_mosquitto(), "-c", str(conf)],
                                log_path=log_path)
        try:
            if wait_port(self.proc, self.port, host=self.host, timeout=timeout):
                return self
        except ChildExited:
            raise EdgefleetError(
                f"mosquitto exited with {self.proc.returncode}; see {log_path}") from None
        self.kill()
        raise EdgefleetError(f"mosquitto did not listen on {self.host}:{self.port}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves persistence on a clean exit), then SIGKILL if needed."""
        if self.proc:
            self.proc.stop(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved."""
        if self.proc:
            self.proc.stop(sig=signal.SIGKILL)
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: re-read password and ACL files (used after enrolling or revoking)."""
        if self.proc:
            self.proc.send(signal.SIGHUP)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
