"""One MQTT 5 connection, driven step by step by its owner's thread, reconnecting with Backoff.

paho's own reconnect has no jitter and its session state (in-flight messages) lives only
in memory; a fleet coming back after a broker restart must not reconnect in lockstep, and
the telemetry spool, not paho, owns durability. So each connection attempt builds a fresh
paho client (no stale in-flight state), a failed attempt waits ``Backoff.next_delay()``,
and every paho callback is wrapped so an exception is logged and counted instead of
escaping the network loop (paho re-raises by default).

Owners that run the link on a thread of their own use :meth:`MqttLink.thread_alive` (or
:class:`LinkThread`) to notice a network thread that died anyway and start a new one:
a link whose thread is gone reports itself not connected rather than silently deaf.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.errors import ConfigError, MissingExtraError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.retry import Backoff

__all__ = ["LinkThread", "MqttConfig", "MqttLink", "Will"]

#: Never swallowed by a callback guard: the interpreter is shutting down or asked to stop.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)

log = logging.getLogger(__name__)


class MqttConfig(StrictModel):
    """Where the broker is and how to authenticate (password, or client cert over TLS)."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    #: A 0600 file holding the password (what enrollment installs; beats a secret in TOML).
    password_file: Path | None = None
    #: CA bundle that signed the broker's certificate; setting it turns TLS on.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    #: Seconds to wait for CONNACK before the attempt counts as failed.
    connect_timeout: float = Field(default=10.0, gt=0)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_cap: float = Field(default=30.0, gt=0)

    def secret(self) -> str | None:
        """The password: ``password``, else the first line of ``password_file`` (read at
        each connect, so a rotated file takes effect on the next reconnect)."""
        if self.password is not None or self.password_file is None:
            return self.password
        try:
            return self.password_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read the MQTT password: {exc.strerror}",
                              path=str(self.password_file)) from None


class Will:
    """A last-will message (topic, payload, retained, QoS 1)."""

    def __init__(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.topic, self.payload, self.retain = topic, payload, retain


Callback = Callable[..., None]


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:  # pragma: no cover - the device extra brings it
        raise MissingExtraError("MQTT telemetry", "device", "paho-mqtt") from None
    return mqtt


class MqttLink:
    """A reconnecting MQTT 5 client; call :meth:`step` in a loop from one thread."""

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        *,
        prefix: str,
        metrics: Metrics | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        will: Will | None = None,
        manual_ack: bool = False,
        on_connected: Callback | None = None,
        on_message: Callback | None = None,
        on_publish: Callback | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.prefix = prefix
        self.metrics = metrics or default_metrics()
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.will = will
        self.manual_ack = manual_ack
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_publish = on_publish
        self.backoff = backoff or Backoff(base=cfg.backoff_base, cap=cfg.backoff_cap)
        self.client: Any = None
        self.connected = False
        self._pending_since: float | None = None
        self._next_attempt = 0.0
        #: Bumped on every (re)connect so owners can forget per-connection state.
        self.generation = 0

    # -- callbacks (wrapped) ----------------------------------------------------------
    def _guard(self, name: str, fn: Callback) -> Callback:
        def wrapper(*args: Any) -> None:
            try:
                fn(*args)
            except _FATAL:
                raise
            except BaseException:  # RecursionError, MemoryError, ...: the loop goes on
                log.exception("%s: %s callback failed", self.prefix, name)
                self.metrics.inc(f"{self.prefix}_callback_errors")
        return wrapper

    def _connect_cb(self, client: Any, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if client is not self.client:
            return
        if rc.is_failure:
            log.warning("%s: broker refused connection: %s", self.prefix, rc)
            self.metrics.inc(f"{self.prefix}_connect_refused")
            if getattr(rc, "value", rc) in (134, 135):  # bad credentials / not authorized
                self.metrics.inc(f"{self.prefix}_connect_refused_auth")
            self._drop("refused")
            return
        self.connected = True
        self._pending_since = None
        self.generation += 1
        self.backoff.reset()
        self.metrics.inc(f"{self.prefix}_connects")
        if self._on_connected:
            self._on_connected(client)

    def _disconnect_cb(self, client: Any, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if client is self.client and self.connected:
            log.info("%s: disconnected: %s", self.prefix, rc)
            self.metrics.inc(f"{self.prefix}_disconnects")
            self._drop("disconnected")

    # -- connection management ----------------------------------------------------------
    def _new_client(self) -> Any:
        mqtt = _paho()
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5, manual_ack=self.manual_ack,
                        reconnect_on_failure=False)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, self.cfg.secret())
        if self.cfg.ca_file:
            c.tls_set(ca_certs=str(self.cfg.ca_file),
                      certfile=str(self.cfg.cert_file) if self.cfg.cert_file else None,
                      keyfile=str(self.cfg.key_file) if self.cfg.key_file else None,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.will:
            c.will_set(self.will.topic, self.will.payload, qos=1, retain=self.will.retain)
        c.on_connect = self._guard("connect", self._connect_cb)
        c.on_disconnect = self._guard("disconnect", self._disconnect_cb)
        if self._on_message:
            c.on_message = self._guard("message", self._on_message)
        if self._on_publish:
            c.on_publish = self._guard("publish", self._on_publish)
        return c

    def _drop(self, why: str) -> None:
        """Forget the current client and schedule the next attempt after a jittered delay."""
        old, self.client = self.client, None
        self.connected = False
        self._pending_since = None
        delay = self.backoff.next_delay()
        self._next_attempt = time.monotonic() + delay
        log.debug("%s: %s, next attempt in %.2f s", self.prefix, why, delay)
        if old is not None:
            try:
                old.disconnect()
            except Exception:  # the socket is usually gone already
                log.debug("%s: disconnect after %s failed", self.prefix, why, exc_info=True)

    def _attempt(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.client = self._new_client()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.session_expiry:
            props.SessionExpiryInterval = self.session_expiry
        try:
            self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                clean_start=self.clean_start, properties=props)
        except (OSError, ssl.SSLError) as exc:
            log.info("%s: cannot connect to %s:%s: %s", self.prefix, self.cfg.host,
                     self.cfg.port, exc)
            self.metrics.inc(f"{self.prefix}_connect_errors")
            self._drop("connect failed")
            return
        self._pending_since = time.monotonic()

    def step(self, timeout: float = 0.05) -> None:
        """Do one slice of network work (or wait for the next connection attempt)."""
        now = time.monotonic()
        if self.client is None:
            if now < self._next_attempt:
                time.sleep(min(timeout, self._next_attempt - now))
                return
            self._attempt()
            if self.client is None:
                return
        if (self._pending_since is not None
                and now - self._pending_since > self.cfg.connect_timeout):
            self.metrics.inc(f"{self.prefix}_connect_errors")
            self._drop("no CONNACK")
            return
        rc = self.client.loop(timeout)
        if rc != 0 and self.client is not None:
            self.metrics.inc(f"{self.prefix}_disconnects")
            self._drop(f"network loop: {rc}")

    def run(self, stop: threading.Event, timeout: float = 0.05) -> None:
        """:meth:`step` until ``stop`` is set, then :meth:`close`: the body of a network
        thread for owners that have nothing else to do on it. A failing step is logged and
        counted, never the end of the thread."""
        try:
            while not stop.is_set():
                if not self.safe_step(timeout):
                    stop.wait(0.1)
        finally:
            self.close()

    def safe_step(self, timeout: float = 0.05) -> bool:
        """:meth:`step` that never ends its loop: a failure is logged and counted
        (``<prefix>_loop_errors``) and the connection dropped, so the next step reconnects.
        False when the step failed."""
        try:
            self.step(timeout)
        except _FATAL:
            raise
        except BaseException:
            log.exception("%s: network step failed", self.prefix)
            self.metrics.inc(f"{self.prefix}_loop_errors")
            if self.client is not None:
                self._drop("step failed")
            return False
        return True

    def close(self) -> None:
        """Disconnect cleanly (the broker does not send the will)."""
        if self.client is not None:
            try:
                self.client.disconnect()
                self.client.loop(0.1)
            except Exception:
                log.debug("%s: close failed", self.prefix, exc_info=True)
        self.client = None
        self.connected = False


class LinkThread:
    """A link's network thread that is started again if it ever dies.

    :meth:`ensure` (called from the owner's own loop or before each use) notices a dead
    thread, counts ``<prefix>_thread_restarts``, drops the old connection and starts a
    new thread, which reconnects and (through ``on_connected``) subscribes again.
    """

    def __init__(self, link: MqttLink, name: str, stop: threading.Event | None = None) -> None:
        self.link, self.name = link, name
        self.stop = stop or threading.Event()
        self.restarts = 0
        self._thread: threading.Thread | None = None

    def start(self) -> LinkThread:
        """Start the thread (no-op while it runs)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self.link.run, args=(self.stop,),
                                            name=self.name, daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the network thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def ensure(self) -> bool:
        """Restart a dead thread (unless stopping); True if it had died."""
        if self.alive or self.stop.is_set():
            return False
        self.restarts += 1
        self.link.metrics.inc(f"{self.link.prefix}_thread_restarts")
        log.warning("%s: network thread died; starting a new one", self.link.prefix)
        self.link.close()
        self.start()
        return True

    def join(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it."""
        self.stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
