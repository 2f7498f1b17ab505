"""The agent's recent log records, bounded and redacted, for remote ``devices logs``.

A :class:`LogRing` is a :class:`logging.Handler` on the root logger: it keeps the last
records (at most ``max_records`` and ``max_bytes``, oldest dropped) in memory, so asking
for logs never reads the disk and a chatty process cannot grow memory. Each message is
redacted when it is captured (:func:`redact`): passwords, keys, tokens and PEM blocks never
sit in the ring, so they cannot leave the device. Literal secrets the agent knows (its MQTT
password) are redacted again when lines are sent (:meth:`LogRing.select`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edgefleet.device.wire.logs import LEVELS, MAX_LINE_CHARS, LogLine

__all__ = ["REDACTED", "LogRing", "Record", "TokenBucket", "redact", "redact_literals"]

REDACTED = "[REDACTED]"
#: A message is redacted on at most this many characters (then cut to MAX_LINE_CHARS).
_SCAN_CHARS = 16 * 1024
_KEYWORDS = (r"pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|access[_-]?key"
             r"|private[_-]?key|client[_-]?secret|credentials?|auth")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # PEM blocks (keys, certificates): the whole block; a block cut off by truncation too.
    (re.compile(r"-----BEGIN [A-Z0-9 ]{1,40}-----.*?(?:-----END [A-Z0-9 ]{1,40}-----|\Z)",
                re.DOTALL), f"-----{REDACTED} PEM-----"),
    # Authorization headers and bearer tokens.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {REDACTED}"),
    # user:password@ in URLs.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]+):[^\s@/]+@"), rf"\1:{REDACTED}@"),
    # key=value, key: value, "key": "value" for secret-looking keys.
    (re.compile(rf"(?i)([\"']?\b[\w.-]*(?:{_KEYWORDS})[\w.-]*[\"']?\s*[=:]\s*)"
                r"(\"[^\"]*\"|'[^']*'|[^\s,;&}\]]+)"), rf"\1{REDACTED}"),
    # Well-known token shapes: JWTs, AWS access keys, GitHub tokens.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), REDACTED),
)


def redact(text: str) -> str:
    """``text`` with secret-looking parts replaced by ``[REDACTED]`` (see docs/operations.md
    "Device logs" for the list). Runs on the first 16 KiB; longer messages are cut there."""
    text = text[:_SCAN_CHARS]
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_literals(text: str, secrets: Iterable[str]) -> str:
    """``text`` without any of ``secrets`` (values shorter than 6 characters are skipped:
    they would redact ordinary words)."""
    for s in secrets:
        if len(s) >= 6 and s in text:
            text = text.replace(s, REDACTED)
    return text


@dataclass(frozen=True)
class Record:
    """One captured record: a sequence number (for follow), wall time, level, text."""

    seq: int
    ts: float
    levelno: int
    level: str
    logger: str
    msg: str

    @property
    def size(self) -> int:
        """Approximate bytes held."""
        return len(self.msg) + len(self.logger) + 64


class LogRing(logging.Handler):
    """Keeps the last records in memory (bounded by count and bytes), redacted."""

    def __init__(self, max_records: int = 2000, max_bytes: int = 1 << 20,
                 level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.max_records, self.max_bytes = max_records, max_bytes
        self._records: deque[Record] = deque()
        self._bytes = 0
        self._seq = 0
        self._ring_lock = threading.Lock()
        self._fmt = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        """Capture one record (never raises: a logging failure must not stop its caller)."""
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + self._fmt.formatException(record.exc_info)
            level = record.levelname if record.levelname in LEVELS else "INFO"
            text = redact(msg)[:MAX_LINE_CHARS]
            with self._ring_lock:
                self._seq += 1
                rec = Record(self._seq, record.created, record.levelno, level,
                             record.name[:128], text)
                self._records.append(rec)
                self._bytes += rec.size
                while self._records and (len(self._records) > self.max_records
                                         or self._bytes > self.max_bytes):
                    self._bytes -= self._records.popleft().size
        except Exception:  # pragma: no cover - logging's own convention
            self.handleError(record)

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest record captured so far."""
        with self._ring_lock:
            return self._seq

    def __len__(self) -> int:
        with self._ring_lock:
            return len(self._records)

    def select(self, *, after_seq: int = 0, since_s: float | None = None,
               level: str = "DEBUG", limit: int | None = None,
               secrets: Iterable[str] = ()) -> tuple[list[LogLine], int, bool]:
        """Records newer than ``after_seq`` (and than ``since_s`` seconds ago) at ``level``
        or above, the newest ``limit`` of them: ``(lines, last seq seen, truncated)``."""
        floor = logging.getLevelName(level)
        cutoff = time.time() - since_s if since_s is not None else None
        with self._ring_lock:
            last = self._seq
            picked = [r for r in self._records if r.seq > after_seq and r.levelno >= floor
                      and (cutoff is None or r.ts >= cutoff)]
        truncated = limit is not None and len(picked) > limit
        if limit is not None:
            picked = picked[-limit:] if limit > 0 else []
        known = [s for s in secrets if s]
        lines = [LogLine(r.ts, r.level, r.logger, redact_literals(r.msg, known))
                 for r in picked]
        return lines, last, truncated

    def install(self, logger: logging.Logger | None = None) -> LogRing:
        """Attach to ``logger`` (the root logger by default); records below the logger's
        own level are not seen, as for any handler."""
        (logger or logging.getLogger()).addHandler(self)
        return self


class TokenBucket:
    """At most ``rate`` events a second on average, ``burst`` at once (monotonic clock)."""

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
