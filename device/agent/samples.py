"""The agent's side of the sample store: opening it as ``[data]`` says, wiping it.

The store is wiped when the device stops being the enrolled device it was: on
re-enrollment (``edgefleet-agent enroll``, before the new bundle's key replaces the old
one), on revocation (the broker refuses credentials it accepted before: see
:class:`RevocationWatch`), and on the operator's ``edgefleet-agent data wipe``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edgefleet.device.agent.settings import STORE_KEY, AgentConfig
from edgefleet.device.core.durable import atomic_write_bytes
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.data.store import SampleStore, StoreLimits, load_key

__all__ = ["RevocationWatch", "open_store", "store_limits", "wipe_state_store"]

log = logging.getLogger(__name__)

#: Marker (in the state folder) that the broker accepted this enrollment's credentials.
ACCEPTED_MARKER = ".broker-accepted"


def store_limits(cfg: AgentConfig) -> StoreLimits:
    """The ``[data]`` bounds."""
    d = cfg.data
    return StoreLimits(max_samples=d.max_samples, max_bytes=d.max_bytes,
                       max_age_s=d.max_age_days * 86400 if d.max_age_days else None)


def store_key(cfg: AgentConfig) -> bytes | None:
    """The enrollment's store key when ``[data] encrypt`` is on and the key exists."""
    if cfg.data.encrypt and cfg.store_key_path.is_file():
        return load_key(cfg.store_key_path)
    return None


def open_store(cfg: AgentConfig, metrics: Metrics | None = None) -> SampleStore:
    """The device's sample store, created owner-only if missing."""
    return SampleStore(cfg.store_path, limits=store_limits(cfg), key=store_key(cfg),
                       metrics=metrics)


def wipe_state_store(state_dir: Path, store: Path | None = None) -> int:
    """Wipe the store of a state folder (before a re-enrollment); returns rows deleted."""
    path = store or state_dir / "data" / "samples.db"
    n = 0
    if path.is_file():
        with SampleStore(path) as st:
            n = st.wipe()
    (state_dir / ACCEPTED_MARKER).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / "keys" / STORE_KEY).unlink()
    return n


class RevocationWatch:
    """Wipes the store once the broker refuses credentials it accepted before.

    Revocation removes the device's broker account; a revoked device learns it at its
    next connection, which the broker refuses as unauthorized. The first accepted
    connection of an enrollment is recorded on disk, so a device that was never let in
    (a typo in the broker address, a bundle for another fleet) never wipes anything.
    """

    def __init__(self, cfg: AgentConfig, store: SampleStore, metrics: Metrics | None = None,
                 prefix: str = "telemetry", refusals: int = 3) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics if metrics is not None else default_metrics()
        self.prefix = prefix
        self.refusals = refusals
        self.marker = cfg.state_dir / ACCEPTED_MARKER
        self.wiped = False

    def check(self) -> bool:
        """Call now and then; returns True when it wiped the store."""
        if self.wiped:
            return False
        if self.metrics.counter(f"{self.prefix}_connects") and not self.marker.exists():
            atomic_write_bytes(self.marker, b"accepted\n")
        refused = self.metrics.counter(f"{self.prefix}_connect_refused_auth")
        if refused < self.refusals or not self.marker.exists():
            return False
        n = self.store.wipe()
        self.marker.unlink(missing_ok=True)
        self.wiped = True
        self.metrics.inc("data_wiped_revoked")
        log.warning("the broker refuses this device's credentials: revoked; sample store "
                    "wiped (%d samples)", n)
        return True
