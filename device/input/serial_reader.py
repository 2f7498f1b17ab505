"""Read sensor frames from a serial port that may come and go (USB unplug, sensor reboot).

The reader opens the port through ``serial.serial_for_url``, so it works on real ttys,
pseudo-terminals and pyserial URLs (``socket://``, ``loop://``, ``spy://``). When the port
disappears it closes it, drops the partial frame and reopens it with full-jitter backoff
(:class:`~edgefleet.device.core.retry.Backoff`) until it is back; nothing here raises on bad
bytes: a frame the decoder cannot vouch for (bad CRC, wrong length, partial values) is a
counted reject, never an exception. Counters: the decoder's (``serial_frames_ok``,
``serial_bad_payload`` ...), plus ``serial_reconnects``, ``serial_disconnects``,
``serial_open_failures`` and ``serial_handler_errors``. A failing handler is logged with
its traceback once per exception type, then only counted: a sensor sending the same bad
frame 100 times a second must not fill the log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from edgefleet.device.core.errors import MissingExtraError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.retry import Backoff
from edgefleet.device.wire.frames import DEFAULT_MAX_PAYLOAD, Frame, FrameDecoder

__all__ = ["DEFAULT_BAUDRATE", "SerialReader", "open_port"]

log = logging.getLogger(__name__)

DEFAULT_BAUDRATE = 921_600
#: Reads return after this long without data, so ``stop()`` is honoured promptly.
READ_TIMEOUT_S = 0.05
MAX_READ = 65_536


def open_port(url: str, *, baudrate: int = DEFAULT_BAUDRATE,
              timeout: float | None = READ_TIMEOUT_S) -> Any:
    """A pyserial port for a device path or URL (raw 8N1, no flow control)."""
    try:
        import serial
    except ImportError:
        raise MissingExtraError("serial input", "device", "pyserial") from None
    return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout,
                                 write_timeout=None, exclusive=None)


def _port_errors() -> tuple[type[BaseException], ...]:
    import serial

    return (serial.SerialException, OSError, ValueError)


class SerialReader:
    """Decodes frames from ``url`` and hands each to ``on_frame``, in a thread of its own.

    Example::

        reader = SerialReader("/dev/ttyUSB0", on_frame=queue.put)
        reader.start()
        ...
        reader.stop()
    """

    def __init__(self, url: str, on_frame: Callable[[Frame], None], *,
                 baudrate: int = DEFAULT_BAUDRATE, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 metrics: Metrics | None = None, backoff: Backoff | None = None) -> None:
        self.url = url
        self.on_frame = on_frame
        self.baudrate = baudrate
        self.metrics = metrics if metrics is not None else default_metrics()
        self.decoder = FrameDecoder(max_payload=max_payload, metrics=self.metrics)
        self.backoff = backoff if backoff is not None else Backoff(base=0.1, cap=5.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self._logged: set[type[BaseException]] = set()

    def start(self) -> SerialReader:
        """Run :meth:`run` in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"serial {self.url}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Open, read, and on any port error close and reopen with backoff, until stopped."""
        errors = _port_errors()
        ever_connected = False
        while not self._stop.is_set():
            try:
                port = open_port(self.url, baudrate=self.baudrate)
            except errors as exc:
                self.metrics.inc("serial_open_failures")
                delay = self.backoff.next_delay()
                log.debug("cannot open %s (%s); retrying in %.2f s", self.url, exc, delay)
                self._stop.wait(delay)
                continue
            if ever_connected:
                self.metrics.inc("serial_reconnects")
                log.info("serial port %s is back", self.url)
            ever_connected = True
            self.backoff.reset()
            self.connected.set()
            self.metrics.set("serial_connected", 1)
            try:
                self._pump(port)
            except errors as exc:
                self.metrics.inc("serial_disconnects")
                log.warning("serial port %s lost: %s", self.url, exc)
            finally:
                self.connected.clear()
                self.metrics.set("serial_connected", 0)
                self.decoder.reset()
                with contextlib.suppress(*errors):
                    port.close()
            if not self._stop.is_set():
                self._stop.wait(self.backoff.next_delay())

    def _pump(self, port: Any) -> None:
        feed, deliver = self.decoder.feed, self._deliver
        while not self._stop.is_set():
            data = port.read(min(max(port.in_waiting, 1), MAX_READ))
            if data:
                for frame in feed(data):
                    deliver(frame)

    def _deliver(self, frame: Frame) -> None:
        try:
            self.on_frame(frame)
        except Exception as exc:  # a handler bug must not stop the sensor input
            self.metrics.inc("serial_handler_errors")
            if type(exc) in self._logged:
                log.debug("frame handler failed on sensor %d seq %d: %r", frame.sensor_id,
                          frame.seq, exc)
                return
            if len(self._logged) < 64:
                self._logged.add(type(exc))
            log.exception("frame handler failed on sensor %d seq %d (further %s are only "
                          "counted in serial_handler_errors)", frame.sensor_id, frame.seq,
                          type(exc).__name__)
