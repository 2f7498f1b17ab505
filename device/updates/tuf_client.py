"""The device's TUF client: python-tuf's ngclient plus a persisted anti-rollback floor.

ngclient does the TUF client workflow (root rotation, timestamp -> snapshot -> targets,
signature thresholds, expiry, version and length checks). Around it we add what a
device needs: every failure becomes one :class:`UpdateRejected` subclass with a stable
``reason``; a fetcher that counts bytes per URL (so a short download is told apart
from a tampered one) and gives up on slow servers; and the highest metadata versions
ever seen, kept in our own fsynced state file, so wiping the TUF cache does not let an
older, still-unexpired repository state back in.

Those floors follow the TUF specification's fast-forward attack recovery (client
workflow 5.3.11): a floor is only as good as the key that raised it, so when a newly
trusted root rotates a role's keys (keyids or threshold changed), the floors that key
raised are dropped, persisted before the refresh goes on; see :data:`RESETS`. Each
reset is also kept for :meth:`TufClient.take_resets`, so the updater reports it
(event ``floors_reset``, counter ``update_floors_reset``).

Over ``https://`` the fetcher verifies the registry's certificate (TLS 1.2 or newer)
against ``ca_file`` (the fleet CA) or, without one, the system's trust store; a
certificate that does not verify becomes :class:`TlsRejected` with the URL and the
OpenSSL reason. With ``client_cert``/``client_key`` (the device's enrollment
certificate) it also proves who it is to a registry that requires mutual TLS; a
registry that refuses it (no certificate, another CA's, revoked) becomes
:class:`ClientCertRejected`.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tuf
import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient._internal.proxy import ProxyEnvironment
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from edgefleet.device.core.durable import atomic_write_json, fsync_dir, read_json
from edgefleet.device.core.errors import (
    ClientCertRejected,
    ConfigError,
    DownloadTooLarge,
    DownloadTruncated,
    MetadataExpired,
    MixAndMatchRejected,
    RollbackRejected,
    SignatureRejected,
    SlowRetrieval,
    TargetMismatch,
    TargetNotSigned,
    TlsRejected,
    UpdateRejected,
    UpdateUnavailable,
)

__all__ = ["RESETS", "FloorsReset", "HighestSeen", "TufClient", "TufClientConfig",
           "client_tls_context", "rotated_roles"]

log = logging.getLogger(__name__)

_ROLES = ("root", "timestamp", "snapshot", "targets")

#: Which floors a key rotation resets. TUF spec 5.3.11 (fast-forward attack recovery):
#: "If the timestamp and / or snapshot keys have been rotated, then delete the trusted
#: timestamp and snapshot metadata files", so either rotation resets both. Targets has
#: no such step: its version is pinned by the trusted snapshot's ``meta`` (5.5.5), which
#: only a snapshot (or timestamp) rotation clears; our own targets floor is reset when
#: the targets keys rotate (the floor an old key raised says nothing about a new key's
#: versions). A targets fast-forward therefore needs the targets and snapshot keys
#: rotated; ``edgefleet keys rotate targets --recover-fast-forward`` does both. Root's
#: floor never resets (every root is signed by its predecessor).
RESETS: dict[str, tuple[str, ...]] = {
    "timestamp": ("timestamp", "snapshot"),
    "snapshot": ("timestamp", "snapshot"),
    "targets": ("targets",),
}
#: The metadata whose cached copy 5.3.11 deletes along with its floor.
_CACHED_RESET = ("timestamp", "snapshot")


def _role_keys(root: Root) -> dict[str, dict[str, Any]]:
    """Each rotatable role's signing keys and threshold, as stored in our state file."""
    return {role: {"keyids": sorted(root.roles[role].keyids),
                   "threshold": int(root.roles[role].threshold)} for role in RESETS}


def rotated_roles(before: dict[str, Any], after: Root) -> set[str]:
    """Roles whose keyids or threshold differ between ``before`` and root ``after``."""
    now = _role_keys(after)
    return {role for role in RESETS if before.get(role) != now[role]}


@dataclass(frozen=True)
class FloorsReset:
    """One rotation the device followed: a fleet must see it, not only a log line (a
    reset nobody asked for means someone rotated keys the operators do not know of)."""

    root_version: int
    #: Roles whose keys (or threshold) the new root changed.
    rotated: tuple[str, ...]
    #: Floors dropped because of it (:data:`RESETS`).
    reset: tuple[str, ...]


@dataclass(frozen=True)
class TufClientConfig:
    """Where the repository is and how patient the client is with it."""

    metadata_url: str
    targets_url: str
    #: Longest silence between two received bytes before the download is abandoned.
    socket_timeout_s: float = 30.0
    #: After this long, a download slower than ``min_bytes_per_s`` is abandoned.
    grace_s: float = 10.0
    min_bytes_per_s: float = 1024.0
    timestamp_max_bytes: int = 16384
    targets_max_bytes: int = 5_000_000
    #: PEM CA bundle that must have signed the registry's HTTPS certificate (None: the
    #: system's trust store). Only used for ``https://`` URLs.
    ca_file: Path | None = None
    #: The device's certificate (PEM) and key, shown to a registry requiring mutual TLS.
    client_cert: Path | None = None
    client_key: Path | None = None


def client_tls_context(ca_file: Path | None, client_cert: Path | None = None,
                       client_key: Path | None = None) -> ssl.SSLContext:
    """Verify server certificates and host names, TLS 1.2 or newer, against ``ca_file``;
    present ``client_cert`` (with ``client_key``) when the server asks for one."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the registry CA bundle: {exc}",
                          path=str(ca_file)) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        try:
            ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the device's client certificate or key: {exc}",
                              path=str(client_cert)) from None
    return ctx


class _TlsFailure(tuf_exc.DownloadError):
    """The TLS handshake with the repository failed (certificate did not verify)."""


class _ClientCertFailure(_TlsFailure):
    """The repository ended the handshake with an alert: it refused our certificate."""


def _tls_reason(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind a urllib3 error, if a TLS failure caused it."""
    seen: BaseException | None = exc
    for _ in range(8):  # MaxRetryError -> SSLError, sometimes one wrapper more; no cycles
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        nxt = getattr(seen, "reason", None)
        if not isinstance(nxt, BaseException):  # urllib3's SSLError(ssl.SSLError) on a read
            nxt = seen.__cause__ or seen.__context__ or next(
                (a for a in seen.args if isinstance(a, BaseException)), None)
        seen = nxt
    return None


class _CountingFetcher(Urllib3Fetcher):
    """Urllib3Fetcher that counts bytes per URL, enforces an average-rate floor and TLS."""

    def __init__(self, config: TufClientConfig) -> None:
        super().__init__(chunk_size=64 * 1024)
        self.socket_timeout = config.socket_timeout_s  # type: ignore[assignment]
        self._cfg = config
        self.received: dict[str, int] = {}
        self.last_url = ""
        # urllib3 verifies https by default (system CAs); our context pins the fleet CA.
        # Same proxy handling as ngclient's, only with our ssl_context for every pool.
        if not isinstance(getattr(self, "_proxy_env", None), ProxyEnvironment):
            raise RuntimeError("python-tuf's Urllib3Fetcher changed: cannot set the TLS CA")
        self._proxy_env = ProxyEnvironment(
            headers={"User-Agent": f"edgefleet python-tuf/{tuf.__version__}"},
            ssl_context=client_tls_context(config.ca_file, config.client_cert,
                                           config.client_key))

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.received[url] = 0
        self.last_url = url
        try:
            chunks = super()._fetch(url)
        except urllib3.exceptions.HTTPError as exc:
            tls = _tls_reason(exc)
            if tls is not None:
                why = getattr(tls, "verify_message", None) or tls.reason or str(tls)
                if "ALERT" in str(tls.reason):  # the server's verdict on us, not ours on it
                    raise _ClientCertFailure(f"{url}: the registry refused the TLS handshake "
                                             f"({why})") from exc
                raise _TlsFailure(f"{url}: TLS handshake failed: {why}") from exc
            # ngclient would say only "Failed to download"; keep urllib3's reason.
            raise tuf_exc.DownloadError(f"{url}: {getattr(exc, 'reason', None) or exc}") from exc
        return self._counted(url, chunks)

    def _counted(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        start = time.monotonic()
        try:
            for chunk in chunks:
                self.received[url] += len(chunk)
                elapsed = time.monotonic() - start
                if (elapsed > self._cfg.grace_s
                        and self.received[url] / elapsed < self._cfg.min_bytes_per_s):
                    raise tuf_exc.SlowRetrievalError(f"{url}: below "
                                                     f"{self._cfg.min_bytes_per_s:g} B/s")
                yield chunk
        except urllib3.exceptions.HTTPError as exc:  # connection cut, short body
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc


class HighestSeen:
    """The highest TUF metadata versions this device has ever trusted (fsynced JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = read_json(path)
        raw = raw if isinstance(raw, dict) else {}
        self.versions: dict[str, int] = {
            k: int(v) for k, v in raw.items() if k in _ROLES and isinstance(v, int)
        }
        models = raw.get("models")
        #: Highest model version each signed target listing has offered (reported).
        self.models: dict[str, str] = (
            {str(k): str(v) for k, v in models.items()} if isinstance(models, dict) else {})
        keys = raw.get("root_keys")
        #: The role keys of the root the floors were raised under (None: not yet known).
        self.root_keys: dict[str, Any] | None = keys if isinstance(keys, dict) else None

    def check(self, versions: dict[str, int]) -> None:
        """Raise :class:`RollbackRejected` if any role is below its floor."""
        for role, v in versions.items():
            floor = self.versions.get(role, 0)
            if v < floor:
                raise RollbackRejected(f"{role} metadata v{v} is older than v{floor} already seen")

    def raise_to(self, versions: dict[str, int]) -> None:
        """Raise the floors to ``versions`` and persist them before returning."""
        merged = {r: max(self.versions.get(r, 0), versions.get(r, 0)) for r in _ROLES}
        if merged != self.versions:
            self.versions = merged
            self._save()

    def adopt_root(self, root: Root, resets: Collection[str] = ()) -> None:
        """Record ``root``'s role keys and drop the ``resets`` floors, in one atomic write."""
        self.versions = {r: v for r, v in self.versions.items() if r not in resets}
        self.root_keys = _role_keys(root)
        self._save()

    def saw_model(self, model: str, version: str) -> None:
        """Remember ``model@version`` if it is the highest seen for that model."""
        def key(v: str) -> tuple[int, ...]:
            return tuple(int(p) for p in v.split(".") if p.isdigit())

        old = self.models.get(model)
        if old is None or key(version) > key(old):
            self.models[model] = version
            self._save()

    def _save(self) -> None:
        state: dict[str, Any] = {**self.versions, "models": self.models}
        if self.root_keys is not None:
            state["root_keys"] = self.root_keys
        atomic_write_json(self.path, state)


def _translate(exc: Exception, *, target: str | None = None) -> UpdateRejected:
    """Map a python-tuf exception to our error with a stable reason."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, _ClientCertFailure) or (
            isinstance(exc, tuf_exc.DownloadHTTPError) and exc.status_code == 403):
        return ClientCertRejected(f"{msg}: the registry requires this device's enrollment "
                                  "certificate ([updates] client_cert/client_key); it has none, "
                                  "one from another CA, or one revoked", target=target)
    if isinstance(exc, _TlsFailure):
        return TlsRejected(f"{msg} (is [updates] ca_file the CA that signed the registry's "
                           "certificate?)", target=target)
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return SignatureRejected(msg, target=target)
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return MetadataExpired(msg, target=target)
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        # "must be >=" and "Expected X version A, got B" with A < B: older than trusted.
        if "must be >=" in msg or "root version" in msg or ".json version" in msg:
            return RollbackRejected(msg, target=target)
        return MixAndMatchRejected(msg, target=target)
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return MixAndMatchRejected(f"metadata does not match its signed hash: {msg}",
                                   target=target)
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return DownloadTooLarge(msg, target=target)
    if isinstance(exc, tuf_exc.SlowRetrievalError):
        return SlowRetrieval(msg or "server too slow", target=target)
    if isinstance(exc, tuf_exc.RepositoryError):
        return UpdateRejected(msg, reason="bad_metadata", target=target)
    return UpdateUnavailable(msg, target=target)


class TufClient:
    """Fetch signed targets into local files; one fresh ngclient refresh per call."""

    def __init__(self, state_dir: Path, config: TufClientConfig, bootstrap_root: bytes) -> None:
        self.metadata_dir = state_dir / "tuf"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._bootstrap = bootstrap_root
        self.highest = HighestSeen(state_dir / "highest_seen.json")
        self.fetcher = _CountingFetcher(config)
        self._resets: list[FloorsReset] = []

    def take_resets(self) -> list[FloorsReset]:
        """Floor resets since the last call (the updater reports each one once)."""
        out, self._resets = self._resets, []
        return out

    def _updater(self) -> Updater:
        cfg = UpdaterConfig(timestamp_max_length=self.config.timestamp_max_bytes,
                            targets_max_length=self.config.targets_max_bytes)
        return Updater(str(self.metadata_dir), self.config.metadata_url,
                       target_base_url=self.config.targets_url, fetcher=self.fetcher,
                       config=cfg, bootstrap=self._bootstrap)

    def _trusted_root(self) -> Root:
        """The root ngclient trusts now (its cache), else the provisioned one."""
        try:
            data = (self.metadata_dir / "root.json").read_bytes()
        except OSError:
            data = self._bootstrap
        root: Root = Metadata[Root].from_bytes(data).signed
        return root

    def _follow_rotation(self, *, drop_cached: bool) -> bool:
        """Reset the floors of roles the trusted root rotated (TUF 5.3.11); True if any.

        The keys the floors were raised under are in our state file, not read from the
        cache before the refresh, so a power cut between ngclient persisting the new
        root and us resetting the floors is caught on the next refresh. Order matters
        for the same reason: with ``drop_cached`` (the refresh failed, perhaps on the
        very metadata the rotation recovers from) the cached timestamp/snapshot are
        deleted first; the floors and the new keys are written last, in one atomic write.
        """
        root = self._trusted_root()
        before = self.highest.root_keys
        if before is None:
            self.highest.adopt_root(root)
            return False
        rotated = rotated_roles(before, root)
        if not rotated:
            return False
        resets = {r for role in rotated for r in RESETS[role]}
        if drop_cached:
            for role in _CACHED_RESET:
                if role in resets:
                    (self.metadata_dir / f"{role}.json").unlink(missing_ok=True)
            fsync_dir(self.metadata_dir)
        self.highest.adopt_root(root, resets)
        self._resets.append(FloorsReset(int(root.version), tuple(sorted(rotated)),
                                        tuple(sorted(resets))))
        log.warning("root v%d rotated the %s keys: the %s floors are reset (TUF 5.3.11 "
                    "fast-forward recovery)", root.version, ", ".join(sorted(rotated)),
                    ", ".join(sorted(resets)))
        return True

    def _trusted_versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for role in _ROLES:
            try:
                md: Metadata[Any] = Metadata.from_bytes(
                    (self.metadata_dir / f"{role}.json").read_bytes())
            except (OSError, ValueError, tuf_exc.RepositoryError):
                continue
            out[role] = int(md.signed.version)
        return out

    def refresh(self, target: str | None = None) -> TargetFile | None:
        """Refresh metadata and look up ``target``; raise on any verification failure."""
        return self._refresh(target)[1]

    def _refresh(self, target: str | None) -> tuple[Updater, TargetFile | None]:
        try:
            if self.highest.root_keys is None:  # first refresh: the floors' root
                self.highest.adopt_root(self._trusted_root())
            updater = self._updater()
            failed: Exception | None = None
            try:
                updater.refresh()
            except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
                failed = exc  # maybe the metadata a new root's rotation recovers from
            if self._follow_rotation(drop_cached=failed is not None) and failed is not None:
                updater = self._updater()  # once more, without the dropped metadata
                updater.refresh()
            elif failed is not None:
                raise failed
            versions = self._trusted_versions()
            self.highest.check(versions)
            self.highest.raise_to(versions)
            return updater, (updater.get_targetinfo(target) if target else None)
        except UpdateRejected:
            raise
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise _translate(exc, target=target) from None
        except OSError as exc:
            raise UpdateUnavailable(f"cannot store metadata: {exc}", target=target) from None

    def fetch(self, target: str, dest: Path) -> TargetFile:
        """Download ``target`` (verified against the signed length and sha256) to ``dest``."""
        updater, info = self._refresh(target)
        if info is None:
            raise TargetNotSigned("the signed targets metadata does not list it", target=target)
        part = dest.with_name(dest.name + ".part")
        try:
            updater.download_target(info, str(part))
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            part.unlink(missing_ok=True)
            raise self._download_error(exc, info, target) from None
        os.replace(part, dest)
        fsync_dir(dest.parent)
        return info

    def _download_error(self, exc: Exception, info: TargetFile, target: str) -> UpdateRejected:
        got = self.fetcher.received.get(self.fetcher.last_url, 0)
        if isinstance(exc, tuf_exc.SlowRetrievalError | tuf_exc.DownloadLengthMismatchError
                      | tuf_exc.DownloadHTTPError | _TlsFailure):
            return _translate(exc, target=target)
        if got < info.length:
            return DownloadTruncated(f"got {got} of {info.length} signed bytes", target=target)
        if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
            return TargetMismatch(f"download does not match its signed sha256 ({exc})",
                                  target=target)
        return _translate(exc, target=target)
