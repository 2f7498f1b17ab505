"""Dashboard users, signed sessions, CSRF tokens and the login rate limit.

Passwords are stored as the broker's PBKDF2 hashes (``broker_acl.hash_password``) in
``<state>/users.json`` (0600); the session-signing secret is random, made at first start
and kept in ``<state>/secret`` (0600), so restarting the dashboard keeps sessions and a
copied checkout never holds one. A session cookie is ``user.expiry.nonce.mac``; the CSRF
token of a form is a MAC of the session's nonce, so it is only valid inside that session.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from edgefleet.device.core.durable import atomic_write_json, read_json
from edgefleet.device.core.errors import UsageError
from edgefleet.server.fleet.broker_acl import hash_password, verify_password

__all__ = ["USER_PATTERN", "LoginLimiter", "Session", "SessionSigner", "Users",
           "load_secret"]

USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
#: Passwords longer than this are refused before hashing (PBKDF2 cost is per byte).
MAX_PASSWORD = 256
MIN_PASSWORD = 8
#: A hash of a password nobody has, checked for unknown users so their answer takes as
#: long as a known user's (no user enumeration by timing).
_DUMMY = hash_password(secrets.token_urlsafe(16))


def _check_user(name: str) -> str:
    if not re.fullmatch(USER_PATTERN, name):
        raise UsageError(f"{name!r} is not a valid user name (letters, digits, '.', '_', "
                         "'-'; at most 32)")
    return name


class Users:
    """``users.json``: ``{name: "$7$..."}``; written atomically, owner-only."""

    def __init__(self, state: Path) -> None:
        self.path = Path(state) / "users.json"

    def _load(self) -> dict[str, str]:
        data = read_json(self.path) or {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def names(self) -> list[str]:
        """Every user, sorted."""
        return sorted(self._load())

    def add(self, name: str, password: str, *, replace: bool = False) -> None:
        """Store ``name``'s password hash; an existing user only with ``replace``."""
        _check_user(name)
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise UsageError(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        users = self._load()
        if name in users and not replace:
            raise UsageError(f"user {name!r} exists (pass --replace to set a new password)")
        users[name] = hash_password(password)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self.path, users)

    def remove(self, name: str) -> bool:
        """Delete a user; False when there was none."""
        users = self._load()
        if users.pop(name, None) is None:
            return False
        atomic_write_json(self.path, users)
        return True

    def check(self, name: str, password: str) -> bool:
        """True when the password is ``name``'s (one hash either way: constant work)."""
        if len(password) > MAX_PASSWORD or len(name) > 64:
            return False
        encoded = self._load().get(name)
        ok = verify_password(password, encoded or _DUMMY)
        return ok and encoded is not None


def load_secret(state: Path) -> bytes:
    """``<state>/secret``: 32 random bytes made at first use, owner-only."""
    path = Path(state) / "secret"
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path.read_bytes()


@dataclass(frozen=True)
class Session:
    """A verified session: who, until when, and the nonce its CSRF tokens are bound to."""

    user: str
    expires: int
    nonce: str


class SessionSigner:
    """HMAC-SHA256 sessions and CSRF tokens under one secret."""

    def __init__(self, secret: bytes, ttl: float = 12 * 3600) -> None:
        self._key = hashlib.sha256(b"edgefleet-dashboard-session" + secret).digest()
        self._csrf = hashlib.sha256(b"edgefleet-dashboard-csrf" + secret).digest()
        self.ttl = ttl

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, user: str, now: float | None = None) -> str:
        """A new cookie value for ``user``."""
        expires = int((now if now is not None else time.time()) + self.ttl)
        body = f"{_check_user(user)}.{expires}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac(body)}"

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session of a cookie value, or None (forged, malformed, expired)."""
        if not cookie or len(cookie) > 256:
            return None
        parts = cookie.split(".")
        if len(parts) < 4:
            return None
        body, mac = ".".join(parts[:-1]), parts[-1]
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        user, expires, nonce = ".".join(parts[:-3]), parts[-3], parts[-2]
        if not expires.isdigit() or int(expires) < (now if now is not None else time.time()):
            return None
        return Session(user, int(expires), nonce)

    def csrf(self, session: Session) -> str:
        """The CSRF token of every form in ``session``."""
        return hmac.new(self._csrf, session.nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        """Whether a submitted token belongs to ``session`` (constant time)."""
        return bool(token) and hmac.compare_digest(self.csrf(session), str(token))


class LoginLimiter:
    """At most ``attempts`` failed logins per client in ``window`` seconds.

    Bounded memory: at most ``clients`` addresses are tracked (the oldest forgotten).
    """

    def __init__(self, attempts: int = 5, window: float = 300.0, clients: int = 10_000) -> None:
        self.attempts, self.window, self.clients = attempts, window, clients
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        q = self._fails.get(client) or deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def blocked(self, client: str, now: float | None = None) -> bool:
        """Whether ``client`` must wait before trying again."""
        t = now if now is not None else time.monotonic()
        with self._lock:
            return len(self._recent(client, t)) >= self.attempts

    def failed(self, client: str, now: float | None = None) -> None:
        """Count one failed attempt of ``client``."""
        t = now if now is not None else time.monotonic()
        with self._lock:
            q = self._recent(client, t)
            q.append(t)
            self._fails[client] = q
            while len(self._fails) > self.clients:
                self._fails.pop(next(iter(self._fails)))

    def succeeded(self, client: str) -> None:
        """Forget ``client``'s failures."""
        with self._lock:
            self._fails.pop(client, None)

