"""One guarded JSON reader for every byte string that arrives from the network.

``json.loads`` on untrusted bytes has three failure modes a consumer rarely expects:
nesting deep enough to raise ``RecursionError`` (the C scanner recurses per level),
``NaN``/``Infinity`` (and ``1e999``, which becomes ``inf``) that later poison arithmetic,
sorting and SQL, and sheer size (a 60 KB list of numbers is cheap to send, expensive to
materialise). :func:`loads_guarded` checks what it can *before* parsing (size, nesting
depth by a linear scan without recursion) and the rest while or right after parsing
(non-finite numbers, number of keys, list lengths), and raises one typed error,
:class:`JsonRejected`, whose ``reason`` is a short stable code for counters:

``too_large``, ``bad_utf8``, ``malformed``, ``too_deep``, ``too_many_keys``,
``list_too_long``, ``non_finite``, ``number_too_large``, ``string_too_long``.

:func:`check_timestamp` is the shared clock rule: finite, not negative, not further in
the future than ``max_future_s`` and not older than ``max_age_s`` relative to the time
the message was received.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from edgefleet.device.core.errors import EdgefleetError

__all__ = ["DEFAULT", "REASONS", "JsonLimits", "JsonRejected", "check_timestamp",
           "loads_guarded", "within_limits_unparsed"]

REASONS: Final = ("too_large", "bad_utf8", "malformed", "too_deep", "too_many_keys",
                  "list_too_long", "non_finite", "number_too_large", "string_too_long",
                  "clock_skew")


class JsonRejected(EdgefleetError):
    """Untrusted JSON refused before (or instead of) reaching its consumer.

    ``reason`` is one of :data:`REASONS`; the message says what was wrong in words.
    """

    exit_code = 65

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class JsonLimits:
    """What one message may contain. Every limit is checked; none is optional."""

    #: Largest document in bytes (checked first, before decoding).
    max_bytes: int = 64 * 1024
    #: Deepest nesting of arrays and objects (the top-level value is depth 1).
    max_depth: int = 32
    #: Keys over all objects of the document.
    max_keys: int = 4096
    #: Items of any one array.
    max_list: int = 16384
    #: Characters of any one string (keys included).
    max_string: int = 16384
    #: Digits of an integer (beyond this it is a denial-of-service, not a number).
    max_int_digits: int = 20


DEFAULT: Final = JsonLimits()

# A JSON string token (escapes included) or one bracket: strings are skipped whole so a
# bracket inside a string never counts. The unrolled form does not backtrack.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


#: For :func:`_fits_unwalked`: every byte mapped to what matters about numbers.
_NUMBER_SHAPE = bytes(0x30 if chr(b).isdigit() and b < 0x80 else 0x65 if b in b"eE"
                      else 0x2B if b == 0x2B else 0x20 for b in range(256))


def _check_depth(data: bytes, max_depth: int) -> None:
    """Reject nesting deeper than ``max_depth`` with one linear pass and no recursion.

    Unbalanced or unterminated input may be over-counted; that only turns a
    ``malformed`` document into ``too_deep``, never lets a deep one through.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return  # fewer brackets than the limit, wherever they are (C-speed fast path)
    depth = 0
    for m in _TOKENS.finditer(data):
        c = data[m.start()]
        if c in _OPEN:
            depth += 1
            if depth > max_depth:
                raise JsonRejected(f"nesting deeper than {max_depth} levels", reason="too_deep")
        elif c != 0x22:  # a closing bracket (a string token starts with '"')
            depth = max(0, depth - 1)


def _reject_constant(name: str) -> Any:
    raise JsonRejected(f"non-finite number {name}", reason="non_finite")


def _walk(doc: Any, limits: JsonLimits) -> None:
    """Count keys and check lists, strings and numbers with an explicit stack (no
    recursion): one pass over the parsed document instead of a Python callback per
    number inside the parser."""
    keys = 0
    int_limit = 10 ** limits.max_int_digits
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):  # 1e999 parses to inf
                raise JsonRejected(f"number {node} is not finite", reason="non_finite")
        elif isinstance(node, int) and not isinstance(node, bool):
            if abs(node) >= int_limit:
                raise JsonRejected(f"an integer of more than {limits.max_int_digits} digits",
                                   reason="number_too_large")
        elif isinstance(node, dict):
            keys += len(node)
            if keys > limits.max_keys:
                raise JsonRejected(f"more than {limits.max_keys} keys",
                                   reason="too_many_keys")
            for k, v in node.items():
                if len(k) > limits.max_string:
                    raise JsonRejected(f"a key longer than {limits.max_string} characters",
                                       reason="string_too_long")
                stack.append(v)
        elif isinstance(node, list):
            if len(node) > limits.max_list:
                raise JsonRejected(f"a list of {len(node)} items (limit {limits.max_list})",
                                   reason="list_too_long")
            stack.extend(node)
        elif isinstance(node, str) and len(node) > limits.max_string:
            raise JsonRejected(f"a string of {len(node)} characters (limit "
                               f"{limits.max_string})", reason="string_too_long")


def loads_guarded(data: bytes | bytearray | memoryview, limits: JsonLimits = DEFAULT) -> Any:
    """Parse untrusted JSON within ``limits``; raises :class:`JsonRejected`, nothing else.

    Example::

        try:
            doc = loads_guarded(msg.payload, JsonLimits(max_bytes=4096, max_depth=8))
        except JsonRejected as exc:
            metrics.inc(f"rejected_{exc.reason}")
    """
    raw = bytes(data)
    if len(raw) > limits.max_bytes:
        raise JsonRejected(f"{len(raw)} bytes exceeds {limits.max_bytes}", reason="too_large")
    _check_depth(raw, limits.max_depth)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRejected(f"not UTF-8: {exc.reason} at byte {exc.start}",
                           reason="bad_utf8") from None

    try:  # integers past Python's 4300-digit cap raise ValueError: parsing stays linear
        doc = json.loads(text, parse_constant=_reject_constant)
    except JsonRejected:
        raise
    except json.JSONDecodeError as exc:
        raise JsonRejected(f"not JSON: {exc.msg} at {exc.pos}", reason="malformed") from None
    except RecursionError:  # pragma: no cover - the depth scan runs first
        raise JsonRejected("nesting too deep", reason="too_deep") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise JsonRejected(f"not JSON: {exc}"[:200], reason="malformed") from None
    if not _fits_unwalked(raw, limits):
        _walk(doc, limits)
    return doc


def _fits_unwalked(raw: bytes, limits: JsonLimits) -> bool:
    """Whether ``raw`` cannot break a limit :func:`_walk` checks, judged from its bytes
    at C speed: a key takes 4 bytes or more, a list item 2, a string character 1; only a
    run of more than ``max_int_digits`` digits or a 3-digit exponent can make an integer
    too long or a float infinite. Most telemetry skips the walk this way."""
    if len(raw) > min(4 * limits.max_keys, 2 * limits.max_list, limits.max_string):
        return False
    shape = raw.translate(_NUMBER_SHAPE)  # digits -> 0, e/E -> e, + kept, the rest blank
    return (b"0" * (limits.max_int_digits + 1) not in shape
            and b"e000" not in shape and b"e+000" not in shape)


#: A number with a positive exponent of 3 digits or more, as JSON spells one: after a
#: mantissa digit, up to where a number ends (a negative one parses to 0.0). With no run
#: of ``max_int_digits`` + 1 digits either, no number in the document can parse to
#: infinity (that needs a 3-digit exponent or a mantissa of 210 digits or more). Unlike
#: the bytes shape of :func:`_fits_unwalked`, a hex string such as a boot id
#: (``...3e123...``) does not match.
_BIG_EXPONENT = re.compile(rb"[0-9][eE]\+?[0-9]{3,}(?:[\s,\]}]|\Z)")


def within_limits_unparsed(data: bytes, limits: JsonLimits = DEFAULT) -> bool:
    """Whether ``data`` provably keeps every limit of :func:`loads_guarded`, judged from
    its bytes at C speed without parsing: size, nesting depth, keys, lists, strings,
    integer digits, no ``NaN``/``Infinity`` and no number so large it parses to infinity.

    True lets a consumer hand the bytes straight to a strict parser (pydantic's
    ``model_validate_json``) instead of :func:`loads_guarded` plus a model; False only
    means "not proven": take :func:`loads_guarded`, which names the reason. Whether the
    bytes are JSON at all is for the parser to say."""
    if len(data) > min(limits.max_bytes, 4 * limits.max_keys, 2 * limits.max_list,
                       limits.max_string):
        return False
    try:
        _check_depth(data, limits.max_depth)
    except JsonRejected:
        return False
    if b"NaN" in data or b"Infinity" in data:
        return False
    shape = data.translate(_NUMBER_SHAPE)  # digits -> 0, e/E -> e, + kept, the rest blank
    if b"0" * (limits.max_int_digits + 1) in shape:
        return False
    return not ((b"e000" in shape or b"e+000" in shape) and _BIG_EXPONENT.search(data))


def check_timestamp(ts: Any, received: float, *, max_future_s: float = 300.0,
                    max_age_s: float | None = None) -> float:
    """``ts`` as a float if it is a finite, non-negative time within the allowed skew of
    ``received`` (seconds since the epoch); raises :class:`JsonRejected` otherwise.

    ``max_age_s`` None allows any age (a device's spool may hold reports from months
    offline); the future bound is always checked, so one device cannot freeze its row
    with a timestamp far ahead of every later report.
    """
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise JsonRejected(f"timestamp {str(ts)[:40]!r} is not a number", reason="clock_skew")
    v = float(ts)
    if not math.isfinite(v) or v < 0:
        raise JsonRejected(f"timestamp {v} is not a valid time", reason="non_finite"
                           if not math.isfinite(v) else "clock_skew")
    if v > received + max_future_s:
        raise JsonRejected(f"timestamp {v:.0f} is {v - received:.0f} s ahead of the receive "
                           f"time (limit {max_future_s:.0f} s)", reason="clock_skew")
    if max_age_s is not None and v < received - max_age_s:
        raise JsonRejected(f"timestamp {v:.0f} is {received - v:.0f} s old (limit "
                           f"{max_age_s:.0f} s)", reason="clock_skew")
    return v
