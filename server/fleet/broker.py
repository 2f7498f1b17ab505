"""Run a real mosquitto broker as a child process on a loopback port.

The demo and the tests start their own broker (Debian's ``mosquitto``) with a generated
config: a listener on 127.0.0.1, optional password file and ACL, optional persistence.
The system-wide broker of the Debian package is never used.

Every generated config carries bounds (:func:`limit_lines`), sized from the protocols'
own maxima in ``device/wire``: no edgefleet message is larger than the biggest payload
a protocol allows (a scoring request) plus its topic and properties, so mosquitto drops
the connection of a client sending a larger packet before buffering it. Each client's
queue of undelivered QoS 1 messages is capped in messages and in bytes, so a subscriber
that stops reading (or a device flooding one) costs the broker bounded memory.
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
from edgefleet.device.wire import scoring, telemetry, updates

__all__ = [
    "MAX_PACKET_BYTES",
    "MAX_QUEUED_BYTES",
    "MAX_QUEUED_MESSAGES",
    "BrokerConfig",
    "MosquittoBroker",
    "find_mosquitto",
    "free_port",
    "limit_lines",
]

#: The largest payload any edgefleet MQTT protocol allows (device/wire/*).
MAX_PROTOCOL_PAYLOAD = max(telemetry.MAX_PAYLOAD_BYTES, scoring.MAX_REQUEST_BYTES,
                           scoring.MAX_REPLY_BYTES, updates.MAX_ASSIGNMENT_BYTES)
#: Room for the rest of a PUBLISH: fixed header (5), topic (2 + ≤ 256: our longest is
#: ``edgefleet/v1/score/response/<64-char device>``), packet id (2) and MQTT 5 properties
#: (response topic, correlation data, user properties: ≤ 3.5 KiB).
PACKET_OVERHEAD = 4096
#: mosquitto's ``max_packet_size``: a client sending anything larger is disconnected.
MAX_PACKET_BYTES = MAX_PROTOCOL_PAYLOAD + PACKET_OVERHEAD
#: Undelivered QoS 1/2 messages mosquitto keeps per client (an ingest that is down for a
#: while: 100k telemetry reports).
MAX_QUEUED_MESSAGES = 100_000
#: ... and their bytes: 1024 messages of the largest size any protocol allows (~260 MiB),
#: whichever limit comes first. A queue of ordinary ~1 KiB reports hits the count first.
MAX_QUEUED_BYTES = 1024 * MAX_PACKET_BYTES
#: QoS 1/2 messages in flight to one client (mosquitto's default; an MQTT 5 client's
#: Receive Maximum lowers it), and their bytes at the largest packet size.
MAX_INFLIGHT_MESSAGES = 20
MAX_INFLIGHT_BYTES = MAX_INFLIGHT_MESSAGES * MAX_PACKET_BYTES


def limit_lines(max_packet_size: int = MAX_PACKET_BYTES,
                max_queued_messages: int = MAX_QUEUED_MESSAGES,
                max_queued_bytes: int = MAX_QUEUED_BYTES) -> list[str]:
    """The bounds every edgefleet broker runs with, as ``mosquitto.conf`` lines.

    For a broker the operator runs, these are the lines to add to its config.
    """
    return [
        f"max_packet_size {max_packet_size}",
        f"max_queued_messages {max_queued_messages}",
        f"max_queued_bytes {max_queued_bytes}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_inflight_bytes {MAX_INFLIGHT_BYTES}",
    ]


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
    #: Bounds (see :func:`limit_lines`); the defaults come from the protocols' maxima.
    max_packet_size: int = MAX_PACKET_BYTES
    max_queued_messages: int = MAX_QUEUED_MESSAGES
    max_queued_bytes: int = MAX_QUEUED_BYTES
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
            *limit_lines(c.max_packet_size, c.max_queued_messages, c.max_queued_bytes),
        ]
        if c.password_file:
            lines.append(f"password_file {c.password_file}")
        if c.acl_file:
            lines.append(f"acl_file {c.acl_file}")
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
