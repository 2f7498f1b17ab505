"""Apply one model assignment: TUF fetch, package checks, sandboxed trial, A/B swap, health.

The order is the point: no parser sees bytes TUF has not verified (length and sha256
from signed metadata); no runtime in the daemon loads a model that has not survived a
trial load in a limited subprocess; the active slot is never written; the pointer flips
only to a fully written, fsynced slot; and the new model stays on probation until a
health check (golden inputs, latency bound, error-free probe inferences) commits it.
Every refusal is an :class:`UpdateRejected`/``PackageError``/``ModelRejected`` with an
event and a counter, and the daemon keeps serving what it served.

Encrypted packages (optional, :mod:`~edgefleet.device.runtime.envelope`): TUF verifies
the ciphertext, then the slot store decrypts it straight into the staging slot. The
device holds the fleet key from enrollment; ``require_encryption`` refuses plaintext.

Power may fail anywhere; the steps named :data:`FAULT_STEPS` are where the power-loss
test cuts the process. Only code in the same process can arm that (the test's launcher,
``tests/support/crash_at.py``, sets :data:`checkpoint_hook`): no configuration, argument
or environment variable of a deployed device can.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefleet.device.core.errors import (
    DecryptFailed,
    EdgefleetError,
    ModelError,
    ModelRejected,
    TargetNotSigned,
    UpdateRejected,
)
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.inference.serving import ServingModel
from edgefleet.device.runtime.envelope import FleetKey, is_encrypted
from edgefleet.device.runtime.manifest import read_manifest
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.updates.sandbox import TrialLimits, trial_load
from edgefleet.device.updates.slots import SlotStore
from edgefleet.device.updates.tuf_client import TufClient
from edgefleet.device.wire.updates import Assignment, version_key

__all__ = ["FAULT_STEPS", "EventSink", "HealthPolicy", "Updater"]

log = logging.getLogger(__name__)

FAULT_STEPS = ("begin", "refreshed", "downloaded", "staged", "slot_forgotten", "slot_written",
               "trialed", "activated", "swapped", "committed")


#: Called at every step of :data:`FAULT_STEPS`; None in production.
checkpoint_hook: Callable[[str], None] | None = None


def fault(step: str) -> None:
    """A point where the power-loss test may cut this process (a no-op unless it armed one)."""
    if checkpoint_hook is not None:
        checkpoint_hook(step)


def _no_events(kind: str, **data: Any) -> None:
    return None


class EventSink(Protocol):
    """Where update events go (MQTT, the telemetry reporter, a list in tests)."""

    def __call__(self, kind: str, **data: Any) -> None: ...


@dataclass(frozen=True)
class HealthPolicy:
    """What a newly activated model must show before it is committed."""

    probe_inferences: int = 50
    max_errors: int = 0
    max_p95_latency_ms: float = 250.0
    trial_limits: TrialLimits = field(default_factory=TrialLimits)


class Updater:
    """Owns the slots and the serving model of one device."""

    def __init__(self, state_dir: Path, tuf: TufClient, serving: ServingModel, *,
                 variant: str | None = None, health: HealthPolicy | None = None,
                 events: EventSink | None = None, metrics: Metrics | None = None,
                 fleet_key: FleetKey | None = None, require_encryption: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self.tuf = tuf
        self.serving = serving
        self.slots = SlotStore(self.state_dir)
        self.variant = variant
        self.health = health or HealthPolicy()
        self.metrics = metrics if metrics is not None else default_metrics()
        #: Where events go; the MQTT agent replaces it with its publisher.
        self.events: EventSink = events or _no_events
        self.downloads = self.state_dir / "downloads"
        self.downloads.mkdir(exist_ok=True)
        #: Decrypts packages encrypted for the fleet (None: only plaintext ones install).
        self.fleet_key = fleet_key
        self.require_encryption = require_encryption
        serving.on_error_burst = self._error_burst

    # --- start-up --------------------------------------------------------------------
    def start(self) -> Predictor | None:
        """Recover the slots after a (re)start and serve the active model, verified."""
        for p in self.downloads.iterdir():  # partial downloads of a killed run
            p.unlink(missing_ok=True)
        rec = self.slots.recover()
        if rec.event:
            self.event(rec.event, slot=rec.slot, version=rec.info.version if rec.info else None)
        if rec.slot is None or rec.info is None:
            return None
        model = self._load(rec.slot)
        self.serving.swap(model, watch=False)
        return model

    def _load(self, slot: str) -> Predictor:
        return Predictor.load(self.slots.path(slot), variant=self.variant, threads=1,
                              metrics=self.metrics)

    def event(self, kind: str, **data: Any) -> None:
        """Count and publish one update event."""
        self.metrics.inc(f"update_{kind}")
        log.info("update event %s %s", kind, data)
        try:
            self.events(kind, **data)
        except Exception:  # an event sink must never break an update
            log.exception("update event sink failed")

    # --- one assignment --------------------------------------------------------------
    def apply(self, a: Assignment) -> str:
        """Bring the device to assignment ``a``; returns ``current``, ``activated`` or ``shadow``.

        Raises the refusal (after emitting ``rejected``) when the update is refused.
        """
        _slot, info = self.slots.active()
        if (info is not None and info.target == a.target
                and (a.sha256 is None or a.sha256 == info.sha256)):
            # Already running it. A shadow of the active version would only compare the
            # model with itself (and download it again into the other slot): nothing to do.
            self.serving.set_shadow(None)
            return "current"
        try:
            return self._apply(a)
        except (ModelError, OSError) as exc:
            self._report_resets()
            reason = getattr(exc, "reason", None) or (
                "trial_failed" if isinstance(exc, ModelRejected) else
                "package_invalid" if isinstance(exc, ModelError) else "io_error")
            self.metrics.inc(f"update_rejected_{reason}")
            self.event("rejected", target=a.target, reason=reason, error=str(exc),
                       rollout=a.rollout)
            raise
        finally:
            self._report_resets()

    def _report_resets(self) -> None:
        """Publish each floor reset a key rotation caused (TUF 5.3.11): the operators
        must learn of a rotation the devices followed, whoever rotated."""
        for r in self.tuf.take_resets():
            self.event("floors_reset", root_version=r.root_version, rotated=list(r.rotated),
                       reset=list(r.reset))

    def _apply(self, a: Assignment) -> str:
        fault("begin")
        tinfo = self.tuf.refresh(a.target)
        if tinfo is None:
            raise TargetNotSigned("the signed targets metadata does not list it", target=a.target)
        fault("refreshed")
        sha = str(tinfo.hashes.get("sha256", ""))
        custom = tinfo.custom if isinstance(tinfo.custom, dict) else {}
        if (custom.get("model"), custom.get("version")) != (a.model, a.version):
            raise UpdateRejected("signed target is another model or version",
                                 reason="assignment_mismatch", target=a.target)
        if a.sha256 is not None and a.sha256 != sha:
            raise UpdateRejected(f"the director names sha256 {a.sha256[:12]}..., TUF signs "
                                 f"{sha[:12]}...", reason="hash_mismatch", target=a.target)
        self._check_downgrade(a)
        self.tuf.highest.saw_model(a.model, a.version)
        if sha in self.slots.rejected():
            raise UpdateRejected("this archive already failed on this device",
                                 reason="previously_rejected", target=a.target)
        self._check_encryption(custom.get("encryption"), a.target)
        slot = self._staged_slot(a, sha)
        try:
            trial_load(self.slots.path(slot), [self._variant(slot)], self.health.trial_limits)
        except ModelRejected:
            self.slots.reject(sha, a.target, "trial_failed")
            raise
        fault("trialed")
        if a.shadow:
            self.serving.set_shadow(self._load(slot))
            self.event("shadow_started", target=a.target, rollout=a.rollout)
            return "shadow"
        return self._activate(slot, a, sha)

    def _check_downgrade(self, a: Assignment) -> None:
        """A version below the highest seen only when the (signed) assignment says rollback."""
        highest = self.tuf.highest.models.get(a.model)
        if highest is None or version_key(a.version) >= version_key(highest):
            return
        if not a.rollback:
            raise UpdateRejected(f"{a.version} is below {highest}, the highest this device "
                                 "has seen, and the assignment is not a signed rollback",
                                 reason="downgrade_refused", target=a.target)
        log.warning("downgrade of %s from %s to %s (rollout %s)", a.model, highest, a.version,
                    a.rollout)
        self.event("downgrade_accepted", target=a.target, version=a.version,
                   from_version=highest, rollout=a.rollout)

    def _variant(self, slot: str) -> str:
        return self.variant or read_manifest(self.slots.path(slot)).default_variant

    def _staged_slot(self, a: Assignment, sha: str) -> str:
        """The inactive slot holding the target: reused if already there, else downloaded."""
        inactive = self.slots.inactive()
        held = self.slots.info(inactive)
        if held is not None and held.sha256 == sha and self.slots.slot_ok(inactive):
            return inactive
        archive = self.downloads / f"{sha}.tar"
        try:
            self.tuf.fetch(a.target, archive)
            fault("downloaded")
            encrypted = is_encrypted(archive)
            self._check_encryption({} if encrypted else None, a.target)
            try:
                slot, _manifest = self.slots.stage(
                    archive, a.model, a.version, a.target, sha, fault=fault,
                    key=self.fleet_key if encrypted else None)
            except DecryptFailed:
                self.slots.reject(sha, a.target, "decrypt_failed")
                raise
        finally:
            archive.unlink(missing_ok=True)
        return slot

    def _check_encryption(self, encryption: Any, target: str) -> None:
        """Refuse early what this device cannot or may not install.

        ``encryption`` is the signed target's ``custom.encryption`` (before downloading)
        or ``{}`` for a file that turned out encrypted (after), None for plaintext.
        """
        if encryption is None:
            if self.require_encryption:
                raise UpdateRejected("this device accepts only encrypted packages "
                                     "([updates] require_encryption)",
                                     reason="encryption_required", target=target)
            return
        if self.fleet_key is None:
            raise UpdateRejected("the package is encrypted and this device has no fleet key "
                                 "([updates] fleet_key)", reason="no_fleet_key", target=target)
        ids = encryption.get("key_ids") if isinstance(encryption, dict) else None
        mine = self.fleet_key.public.key_id
        if isinstance(ids, list) and mine not in ids:
            raise UpdateRejected(f"encrypted for fleet key {', '.join(map(str, ids))}, this "
                                 f"device holds {mine}", reason="wrong_fleet_key", target=target)

    def _activate(self, slot: str, a: Assignment, sha: str) -> str:
        self.slots.activate(slot)
        fault("activated")
        try:
            model = self._load(slot)
            self._health_check(model)
        except EdgefleetError as exc:
            self.slots.reject(sha, a.target, "health_check")
            self._rollback(f"health check failed: {exc}", a, reload=False)
            raise ModelRejected(f"health check failed: {exc}") from None
        self.serving.swap(model)
        self.serving.set_shadow(None)
        fault("swapped")
        self.slots.commit()
        fault("committed")
        self.event("activated", target=a.target, version=a.version, rollout=a.rollout)
        return "activated"

    def _health_check(self, model: Predictor) -> None:
        """Golden inputs ran in ``Predictor.load``; here: latency and error-free probes."""
        m = model.manifest
        rows = [g.input for g in m.golden] or [[0.0] * int(np.prod(m.input.shape))]
        lat, errors = [], 0
        for i in range(self.health.probe_inferences):
            x = np.asarray(rows[i % len(rows)], dtype=np.float32).reshape(m.input.shape)
            t0 = time.perf_counter()
            try:
                pred = model.predict(x)
                if not np.isfinite(pred.confidence):
                    errors += 1
            except EdgefleetError:
                errors += 1
            lat.append((time.perf_counter() - t0) * 1e3)
        if errors > self.health.max_errors:
            raise ModelRejected(f"{errors} of {len(lat)} probe inferences failed")
        p95 = float(np.percentile(lat, 95)) if lat else 0.0
        if p95 > self.health.max_p95_latency_ms:
            raise ModelRejected(f"p95 latency {p95:.1f} ms > {self.health.max_p95_latency_ms} ms")

    def _rollback(self, why: str, a: Assignment | None, *, reload: bool = True) -> None:
        prev = self.slots.rollback()
        if prev is not None and reload:
            self.serving.swap(self._load(prev), watch=False)
        self.event("rolled_back", reason=why, to_slot=prev,
                   target=a.target if a else None, rollout=a.rollout if a else None)

    def _error_burst(self, why: str) -> None:
        """Called by :class:`ServingModel` when a new model errs in its first inferences."""
        _slot, info = self.slots.active()
        if info is not None:
            self.slots.reject(info.sha256, info.target, "error_burst")
        self._rollback(why, None)

    def stop_shadow(self) -> None:
        """Stop running a shadow candidate."""
        self.serving.set_shadow(None)

