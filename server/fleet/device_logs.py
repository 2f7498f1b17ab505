"""The operator side of remote logs: ask one device, read its chunks (``devices logs``).

Topics and payloads are :mod:`edgefleet.device.wire.logs`; the broker account is the
fleet's ``operator`` role, the only one the ACL lets publish a log request. Every chunk is
untrusted device input: read with the guarded reader, bound to the topic's device, and
kept only when it carries this request's id. A refused chunk is counted in
:attr:`LogClient.rejected` (by reason) and never printed. ``follow`` renews its lease at
half its length, so the device stops streaming soon after this process goes away.
"""

from __future__ import annotations

import logging
import queue
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink
from edgefleet.device.wire.logs import (
    LogLine,
    LogProtocolError,
    LogRequest,
    decode_response,
    request_topic,
    response_topic,
)

__all__ = ["DeviceLogsError", "LogClient", "printable"]

log = logging.getLogger(__name__)

#: C0 and C1 control characters except tab and newline: device text may carry terminal
#: escapes (a CLI's screen) or invisible characters (a web page's).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters replaced by ``?`` (device text is hostile)."""
    return _CONTROL.sub("?", text)


class DeviceLogsError(EdgefleetError):
    """The device refused, or did not answer in time (``reason`` is stable)."""

    exit_code = 69

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class LogClient:
    """One operator connection asking one device for its logs."""

    def __init__(self, mqtt: MqttConfig, device: str, *, metrics: Metrics | None = None) -> None:
        self.device = device
        self.metrics = metrics or Metrics()
        self.rejected: Counter[str] = Counter()
        self._chunks: queue.Queue[bytes] = queue.Queue(maxsize=1000)
        self._subscribed = threading.Event()
        self.link = MqttLink(mqtt, f"logs-cli-{secrets.token_hex(4)}", prefix="logs_cli",
                             metrics=self.metrics, on_connected=self._connected,
                             on_message=self._message)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.link.run, args=(self._stop,),
                                        name="logs-cli", daemon=True)

    def _connected(self, client: Any) -> None:
        client.on_subscribe = lambda *_a: self._subscribed.set()
        client.subscribe(response_topic(self.device), qos=1)

    def _message(self, _client: Any, _ud: Any, msg: Any) -> None:
        if msg.topic != response_topic(self.device):
            self.rejected["foreign_topic"] += 1
            return
        try:
            self._chunks.put_nowait(bytes(msg.payload))
        except queue.Full:
            self.rejected["overflow"] += 1

    def __enter__(self) -> LogClient:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _wait_ready(self, timeout: float) -> None:
        if not self._subscribed.wait(timeout):
            raise DeviceLogsError(f"no connection to the broker at {self.link.cfg.host}:"
                                  f"{self.link.cfg.port} within {timeout:.0f} s",
                                  reason="broker_unreachable")

    def _publish(self, req: LogRequest) -> None:
        client = self.link.client
        if client is None or not self.link.connected:
            raise DeviceLogsError("lost the broker connection", reason="broker_unreachable")
        client.publish(request_topic(self.device), req.encode(), qos=1)

    def _next(self, request_id: str, deadline: float) -> Any:
        """The next chunk of ``request_id`` (None at the deadline); others are counted."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                payload = self._chunks.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            try:
                chunk = decode_response(payload, self.device)
            except LogProtocolError as exc:
                self.rejected[exc.reason] += 1
                log.warning("log response refused (%s): %s", exc.reason, exc)
                continue
            if chunk.id != request_id:
                self.rejected["other_request"] += 1
                continue
            if chunk.error is not None and chunk.error != "lease_expired":
                raise DeviceLogsError(f"{self.device} refused: {chunk.message}",
                                      reason=chunk.error)
            return chunk

    def fetch(self, *, lines: int = 200, since_s: float | None = None, level: str = "DEBUG",
              timeout: float = 10.0) -> list[LogLine]:
        """The device's recent lines (oldest first), at most ``lines`` whatever the device
        sends (chunks that never end would otherwise fill memory until the timeout)."""
        self._wait_ready(timeout)
        req = LogRequest(id=secrets.token_hex(8), op="fetch", lines=lines, since_s=since_s,
                         level=level)
        self._publish(req)
        out: list[LogLine] = []
        deadline = time.monotonic() + timeout
        while True:
            chunk = self._next(req.id, deadline)
            if chunk is None:
                raise DeviceLogsError(f"{self.device} did not answer within {timeout:.0f} s "
                                      "(offline, or logs disabled)", reason="timeout")
            out += chunk.lines
            if len(out) > lines:  # more than asked: a device never sends that many
                self.rejected["too_many_lines"] += 1
                return out[:lines]
            if chunk.final or len(out) == lines:
                return out

    def follow(self, *, lines: int = 50, since_s: float | None = None, level: str = "DEBUG",
               lease_s: float = 20.0, timeout: float = 10.0,
               until: Callable[[], bool] = lambda: False) -> Iterator[LogLine]:
        """The recent lines, then new ones as they come, until ``until()`` is true (checked
        at least every half second) or the device stops acknowledging renewals."""
        self._wait_ready(timeout)
        req = LogRequest(id=secrets.token_hex(8), op="follow", lines=lines, since_s=since_s,
                         level=level, lease_s=lease_s)
        self._publish(req)
        renew_at = time.monotonic() + lease_s / 2
        last_heard = time.monotonic()
        try:
            while not until():
                now = time.monotonic()
                if now >= renew_at:
                    renew_at = now + lease_s / 2
                    self._publish(LogRequest(id=req.id, op="renew", lease_s=lease_s))
                chunk = self._next(req.id, min(renew_at, now + 0.5))
                if chunk is None:
                    if time.monotonic() - last_heard > lease_s + timeout:
                        raise DeviceLogsError(f"{self.device} stopped answering",
                                              reason="timeout")
                    continue
                last_heard = time.monotonic()
                yield from chunk.lines
                if chunk.final:  # the lease ended on the device: renewals were lost
                    raise DeviceLogsError(f"{self.device} ended the follow "
                                          f"({chunk.error or 'final'})", reason="lease_expired")
        finally:
            if self.link.connected and self.link.client is not None:
                self.link.client.publish(request_topic(self.device),
                                         LogRequest(id=req.id, op="stop").encode(), qos=1)
