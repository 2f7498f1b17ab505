"""The local sample store: labelled model inputs collected on the device, for its training.

One SQLite file (WAL, owner-only ``0600`` in a ``0700`` folder) with one row per sample:
the model input as the manifest's input spec describes it (float32, flattened), the
class index, where the label came from (:data:`SOURCES`), when, and the ``name@version``
of the model that saw the input. With a key (32 bytes, made at enrollment) the input is
sealed per row with ChaCha20-Poly1305, the row's metadata bound as associated data, so
a copied file reveals only what telemetry already reports (counts per source and class).

Bounded by count, bytes and age: adding past a bound deletes the oldest rows, counted as
``data_evicted``. A write is one transaction, so a crash leaves the store as it was
before or after it. :meth:`SampleStore.wipe` deletes every row with ``secure_delete``,
vacuums and truncates the WAL.

:func:`held_out` is the one deterministic train / held-out split (by row id), used by the
ClientApp and by ``edgefleet-agent data eval`` alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import ConfigError, EdgefleetError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.sqlite import connect, migrate

__all__ = ["HOLDOUT", "KEY_BYTES", "SOURCES", "SampleStore", "StoreLimits", "StoredSamples",
           "held_out", "load_key", "new_key"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: Where a label came from: the local API, a serial label frame, the cloud scorer's
#: answer to an escalated sample, a provisioned file.
SOURCES = ("api", "serial", "scorer", "import")
#: Share of the stored samples held out for evaluation.
HOLDOUT = 0.2
KEY_BYTES = 32
_NONCE = 12

MIGRATIONS = [[
    """CREATE TABLE IF NOT EXISTS samples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts DOUBLE PRECISION NOT NULL,
        label INTEGER NOT NULL,
        source TEXT NOT NULL,
        model TEXT NOT NULL,
        n_features INTEGER NOT NULL,
        sealed INTEGER NOT NULL,
        payload BLOB NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS samples_ts ON samples (ts)",
]]


@dataclass(frozen=True)
class StoreLimits:
    """Bounds of the store; the oldest samples go first."""

    max_samples: int = 10_000
    max_bytes: int = 32 << 20
    max_age_s: float | None = None


@dataclass(frozen=True)
class StoredSamples:
    """Every stored sample, in id order."""

    ids: npt.NDArray[np.int64]
    x: F32
    y: I64
    sources: list[str]
    #: ``name@version`` of the model that answered each input when it was labelled.
    models: list[str] = field(default_factory=list)

    def split(self, seed: int = 0) -> tuple[F32, I64, F32, I64]:
        """(x_train, y_train, x_test, y_test) by :func:`held_out`."""
        test = held_out(self.ids, seed)
        return self.x[~test], self.y[~test], self.x[test], self.y[test]


def held_out(ids: Iterable[int] | npt.NDArray[np.int64], seed: int = 0) -> npt.NDArray[np.bool_]:
    """Which rows are held out: a hash of (seed, row id), so a sample stays on its side
    as the store grows and shrinks, and every reader splits the same way."""
    out = []
    for i in ids:
        h = hashlib.blake2b(f"{seed}:{int(i)}".encode(), digest_size=2).digest()
        out.append(int.from_bytes(h, "big") < HOLDOUT * 65536)
    return np.asarray(out, dtype=bool)


def new_key(path: Path) -> Path:
    """Write a fresh random store key (``0600``); replaces an old one."""
    from edgefleet.device.core.durable import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, os.urandom(KEY_BYTES), mode=0o600)
    return path


def load_key(path: Path) -> bytes:
    """Read a store key, refusing one of the wrong size or readable by others."""
    try:
        st = path.stat()
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the sample-store key: {exc}", path=str(path)) from None
    if st.st_mode & 0o077:
        raise ConfigError("the sample-store key is readable by group or others (chmod 600)",
                          path=str(path))
    if len(key) != KEY_BYTES:
        raise ConfigError(f"the sample-store key has {len(key)} bytes, not {KEY_BYTES}",
                          path=str(path))
    return key


def _private_file(path: Path) -> None:
    """Create ``path`` (and its folder) owner-only before SQLite opens it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    path.chmod(0o600)


class SampleStore:
    """The device's labelled samples (see the module docstring). Thread-safe."""

    def __init__(self, path: Path, *, limits: StoreLimits | None = None,
                 key: bytes | None = None, metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self.limits = limits or StoreLimits()
        self.metrics = metrics if metrics is not None else default_metrics()
        self._aead: Any = None
        if key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

            self._aead = ChaCha20Poly1305(key)
        _private_file(self.path)
        self._lock = threading.Lock()
        self._db = connect(self.path, wal=True, autocommit=True, check_same_thread=False)
        self._db.execute("PRAGMA secure_delete=ON")
        migrate(self._db, MIGRATIONS, what="the sample store has schema")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.path}{suffix}").chmod(0o600)

    # -- writing ------------------------------------------------------------------------
    @staticmethod
    def _aad(ts: float, label: int, source: str, model: str, n: int) -> bytes:
        return struct.pack(">dqI", ts, label, n) + f"{source}\x00{model}".encode()

    def _seal(self, x: F32, ts: float, label: int, source: str, model: str) -> bytes:
        raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
        if self._aead is None:
            return raw
        nonce = os.urandom(_NONCE)
        return nonce + bytes(self._aead.encrypt(nonce, raw, self._aad(ts, label, source, model,
                                                                       x.size)))

    def _open(self, payload: bytes, sealed: int, ts: float, label: int, source: str,
              model: str, n: int) -> F32:
        if sealed:
            if self._aead is None:
                raise EdgefleetError(f"{self.path}: the sample store is encrypted and no key "
                                     "was given")
            from cryptography.exceptions import InvalidTag

            try:
                payload = self._aead.decrypt(payload[:_NONCE], payload[_NONCE:],
                                             self._aad(ts, label, source, model, n))
            except InvalidTag:
                raise EdgefleetError(f"{self.path}: a stored sample does not decrypt with "
                                     "this key (tampered, or the key changed)") from None
        return np.frombuffer(payload, dtype="<f4").astype(np.float32)

    def add(self, x: F32, label: int, source: str, model: str, ts: float | None = None) -> int:
        """Store one sample; returns its id. ``x`` is the validated model input."""
        return self.add_many([(x, label)], source, model, ts)[0]

    def add_many(self, rows: Iterable[tuple[F32, int]], source: str, model: str,
                 ts: float | None = None) -> list[int]:
        """Store several samples in one transaction; returns their ids."""
        if source not in SOURCES:
            raise ValueError(f"unknown label source {source!r}")
        now = time.time() if ts is None else ts
        prepared = []
        for x, label in rows:
            flat = np.asarray(x, dtype=np.float32).ravel()
            prepared.append((now, int(label), source, model, flat.size,
                             int(self._aead is not None),
                             self._seal(flat, now, int(label), source, model)))
        ids: list[int] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in prepared:
                    cur = self._db.execute("INSERT INTO samples (ts, label, source, model, "
                                           "n_features, sealed, payload) VALUES "
                                           "(?, ?, ?, ?, ?, ?, ?)", row)
                    ids.append(int(cur.lastrowid or 0))
                evicted = self._enforce(now)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        self.metrics.inc(f"data_stored_{source}", len(ids))
        if evicted:
            self.metrics.inc("data_evicted", evicted)
        return ids

    def _enforce(self, now: float) -> int:
        """Delete the oldest rows past the bounds; returns how many went."""
        lim, gone = self.limits, 0
        if lim.max_age_s is not None:
            gone += self._db.execute("DELETE FROM samples WHERE ts < ?",
                                     (now - lim.max_age_s,)).rowcount
        n, nbytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) "
                                     "FROM samples").fetchone()
        if n > lim.max_samples:
            gone += self._db.execute("DELETE FROM samples WHERE id IN (SELECT id FROM samples "
                                     "ORDER BY id LIMIT ?)", (n - lim.max_samples,)).rowcount
        if nbytes > lim.max_bytes:
            over = nbytes - lim.max_bytes
            for (sid, size) in list(self._db.execute(
                    "SELECT id, LENGTH(payload) FROM samples ORDER BY id")):
                if over <= 0:
                    break
                self._db.execute("DELETE FROM samples WHERE id = ?", (sid,))
                over -= size
                gone += 1
        return int(gone)

    def wipe(self) -> int:
        """Delete every sample (overwritten on disk, file vacuumed); returns how many."""
        with self._lock:
            n = self._db.execute("DELETE FROM samples").rowcount
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.metrics.inc("data_wiped")
        return int(n)

    # -- reading ------------------------------------------------------------------------
    def count(self) -> int:
        """How many samples are stored."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def stats(self, by_model: bool = False) -> dict[str, Any]:
        """Counts per source and per class, bytes, oldest and newest time: never contents.
        ``by_model`` adds counts per answering model (`data stats`; the telemetry loop,
        which calls this every report, does not send them, so it does not scan for them)."""
        with self._lock:
            rows = self._db.execute("SELECT source, label, COUNT(*) FROM samples "
                                    "GROUP BY source, label").fetchall()
            models = self._db.execute("SELECT model, COUNT(*) FROM samples GROUP BY model "
                                      "ORDER BY MIN(id)").fetchall() if by_model else []
            nbytes, oldest, newest = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0), MIN(ts), MAX(ts) "
                "FROM samples").fetchone()
        by_source: dict[str, int] = {}
        by_class: dict[str, int] = {}
        for source, label, n in rows:
            by_source[source] = by_source.get(source, 0) + int(n)
            by_class[str(label)] = by_class.get(str(label), 0) + int(n)
        return {"total": sum(by_source.values()), "bytes": int(nbytes),
                "by_source": by_source, "by_class": by_class,
                **({"by_model": {str(m): int(n) for m, n in models}} if by_model else {}),
                "oldest": oldest, "newest": newest, "encrypted": self._aead is not None}

    def _rows(self) -> Iterator[tuple[Any, ...]]:
        with self._lock:
            rows = self._db.execute("SELECT id, ts, label, source, model, n_features, sealed, "
                                    "payload FROM samples ORDER BY id").fetchall()
        yield from rows

    def samples(self) -> StoredSamples:
        """Every sample, decrypted (all rows must have the same number of features)."""
        ids, xs, ys, sources, models = [], [], [], [], []
        for sid, ts, label, source, model, n, sealed, payload in self._rows():
            xs.append(self._open(payload, sealed, ts, label, source, model, n))
            ids.append(sid)
            ys.append(label)
            sources.append(source)
            models.append(model)
        widths = {len(x) for x in xs}
        if len(widths) > 1:
            raise EdgefleetError(f"{self.path}: stored samples have different sizes "
                                 f"{sorted(widths)}: the model input changed; wipe the "
                                 "store (edgefleet-agent data wipe)")
        x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, 0), np.float32)
        return StoredSamples(np.asarray(ids, dtype=np.int64), x,
                             np.asarray(ys, dtype=np.int64), sources, models)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
