"""What rollouts are made of: the stored row, a device's health, and the collaborator
protocols, shared by the controller, the fleet view, the health sources and the guard."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from edgefleet.server.fleet.keys import KeyRing

__all__ = ["Counts", "FleetDirectory", "HealthRates", "HealthSource", "Publisher", "Rollout",
           "RolloutRegistry", "json_number", "json_object"]


def json_object(value: Any) -> dict[str, Any]:
    """A JSON object from a device's message, {} when it is anything else."""
    return value if isinstance(value, dict) else {}


def json_number(value: Any) -> float:
    """A finite number from a device's JSON, 0 when missing, not a number, NaN or
    infinite (never raises; ``int()`` of the result never overflows)."""
    try:
        v = float(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return v if math.isfinite(v) else 0.0


@dataclass(frozen=True)
class HealthRates:
    """A device's counts for the model it runs, since that model was activated."""

    version: str | None
    inferences: int = 0
    errors: int = 0
    degraded: int = 0
    fallback: int = 0
    rolled_back: bool = False
    #: The target of the device's last refused update (from its retained state), if any.
    refused: str | None = None
    #: False when the source knows the version but has no counts (a state without health).
    measured: bool = True

    def bad_rate(self) -> float:
        """(errors + degraded + fallback) / inferences."""
        return (self.errors + self.degraded + self.fallback) / max(self.inferences, 1)


@dataclass(frozen=True)
class Counts:
    """A device's cumulative store counters within one agent boot."""

    boot: str | None
    inferences: int = 0
    errors: int = 0
    degraded: int = 0
    fallback: int = 0

    @staticmethod
    def from_body(boot: str | None, body: dict[str, Any]) -> Counts:
        """From a telemetry ``metrics`` body (the stored ``last_metrics`` or a message)."""
        counters = json_object(body.get("counters"))
        return Counts(boot, int(json_number(body.get("inferences"))),
                      int(json_number(counters.get("inference_errors"))),
                      int(json_number(body.get("degraded"))),
                      int(json_number(body.get("fallback"))))


@dataclass
class Rollout:
    """One row of the ``rollouts`` table."""

    id: str
    model: str
    version: str
    mode: str  # canary | group | fleet
    devices: list[str]
    baseline: dict[str, str | None]
    group: str | None
    shadow: bool
    threshold: float
    status: str  # running | stopped | promoted | rolled_back
    reason: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return dict(self.__dict__)


class HealthSource(Protocol):
    """Where the controller learns how a device is doing."""

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """The device's rates (rollbacks after ``since``, rates for ``rollout``) or None."""


class Publisher(Protocol):
    """Publishes a retained assignment (an empty payload clears it)."""

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish with QoS 1."""


@runtime_checkable
class FleetDirectory(Protocol):
    """Who is in the fleet (from their update states), for per-device assignments."""

    def fleet(self, settle_s: float = 1.0) -> dict[str, str | None]:
        """Known devices and the version each runs."""

    def assign_seq(self, device: str) -> int | None:
        """The last director seq ``device`` reports having taken (None: unknown)."""

    def members(self, group: str) -> list[str]:
        """Known devices of ``group``."""

    def models(self) -> dict[str, str | None]:
        """Known devices and the model each runs (None: none yet)."""

    def highest(self, device: str, model: str) -> str | None:
        """The highest version of ``model`` the device reports having seen."""


class _Version(Protocol):
    @property
    def yanked(self) -> bool: ...

    @property
    def sha256(self) -> str: ...


class _Audit(Protocol):
    def append(self, action: str, *, actor: str | None = None,
               **details: Any) -> dict[str, Any]: ...


class RolloutRegistry(Protocol):
    """What rollouts need of the registry: its home, its versions and its audit log."""

    @property
    def home(self) -> Path: ...

    @property
    def audit(self) -> _Audit: ...

    @property
    def keys(self) -> KeyRing: ...

    def require(self, name: str, version: str) -> _Version: ...
