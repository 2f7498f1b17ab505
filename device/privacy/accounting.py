"""Privacy accounting of sample-level DP-SGD (shared by the device and the server's planning).

Mechanism (Abadi et al. 2016, as in Opacus/TF-Privacy): every step draws a batch by
**Poisson sampling** (each local example joins independently with probability ``q``),
clips each example's gradient to L2 norm ``C``, sums, adds ``N(0, (σ·C)²)`` to every
coordinate and divides by the *expected* batch size ``q·n`` (a data-independent
denominator, so the sensitivity of the released mean is exactly ``C / (q·n)``).

Accounting matches that sampling: ``steps`` self-composed
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` under the add/remove-one neighbouring
relation. The same event is what the privacy ledger composes across rounds and runs, so
nothing is accounted twice or missed.

Two accountants evaluate it (``accountant=``; the default is :data:`DEFAULT_ACCOUNTANT`):

* ``"pld"``: dp-accounting's privacy-loss-distribution accountant with its *pessimistic*
  estimate (every privacy-loss value rounded up to a multiple of
  :data:`PLD_DISCRETIZATION`, truncated tail mass counted as infinite loss), so the ε it
  prints is an upper bound on the true ε of the mechanism, and a tight one (within about
  1 % at this discretization). The default.
* ``"rdp"``: dp-accounting's Rényi accountant, a looser upper bound (9-13 % above the
  PLD figure at the settings in docs/benchmarks.md); kept for comparison and for callers
  that must not import SciPy.

``tests/device/test_accountants.py`` cross-checks both against an independent numerical
privacy-loss computation on a grid of (q, σ, steps): PLD ≤ RDP, and neither below it.

Flower starts a fresh ClientApp process for every message, so two costs recur per
message unless kept elsewhere: importing dp-accounting (its package ``__init__`` pulls
in the PLD accountant and calibration, i.e. ``scipy.signal``/``stats``/``optimize``,
which the RDP accountant never uses; the PLD accountant needs them, about 0.8 s
on an x86 core) and calibrating σ. :func:`_dpa` imports only the submodule
asked for, and :func:`noise_for_epsilon_cached` keeps σ in the device's state folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.durable import atomic_write_json, read_json
from edgefleet.device.core.errors import UsageError

__all__ = [
    "DEFAULT_ACCOUNTANT",
    "Accountant",
    "DpEvent",
    "epsilon_for",
    "noise_for_epsilon",
    "noise_for_epsilon_cached",
]

F32 = npt.NDArray[np.float32]
Params = list[npt.NDArray[np.floating]]
log = logging.getLogger(__name__)

Accountant = Literal["rdp", "pld"]
#: The accountant every ε and σ uses unless told otherwise (device ledger, server
#: planning, reports): the PLD accountant, cross-checked in tests/device/test_accountants.py.
DEFAULT_ACCOUNTANT: Accountant = "pld"
#: Width of the PLD accountant's privacy-loss grid. Its pessimistic estimate rounds every
#: loss up to this grid, so a coarser grid only makes ε larger; 1e-3 is within 0.001 of
#: dp-accounting's default 1e-4 on the test grid at a tenth of the time (40-70 ms).
PLD_DISCRETIZATION = 1e-3

#: Bump when :func:`noise_for_epsilon` changes (bracket, tolerance, rounding): cached σ
#: values are keyed on it and on dp-accounting's version.
CALIBRATION_VERSION = 1
SIGMA_CACHE = "dp-sigma-cache.json"
_SIGMA_CACHE_SCHEMA = 1
_SIGMA_CACHE_MAX = 256
_dpa_lock = threading.RLock()


class _DeferredPackage(types.ModuleType):
    """``dp_accounting`` whose own ``__init__`` runs only when a name it defines is used.

    Its submodules import normally (they are found through ``__path__``), so the RDP
    accountant loads without the PLD accountant and mechanism calibration (~0.6 s of
    SciPy per process). Any other attribute, e.g. ``dp_accounting.DpEvent`` from code
    that imports the package itself, first completes the real ``__init__``.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
            return importlib.import_module(f"{self.__name__}.{name}")
        with _dpa_lock:
            if type(self) is _DeferredPackage:
                assert self.__spec__ is not None and self.__spec__.loader is not None
                self.__class__ = types.ModuleType  # type: ignore[assignment]
                try:
                    self.__spec__.loader.exec_module(self)
                except BaseException:
                    self.__class__ = _DeferredPackage
                    raise
        return getattr(self, name)


def _dpa(submodule: str) -> Any:
    """``dp_accounting.<submodule>``, without running the package's heavy ``__init__``."""
    with _dpa_lock:
        if "dp_accounting" not in sys.modules:
            spec = importlib.util.find_spec("dp_accounting")
            if spec is None or spec.loader is None:
                raise ModuleNotFoundError("No module named 'dp_accounting'", name="dp_accounting")
            pkg = importlib.util.module_from_spec(spec)
            pkg.__class__ = _DeferredPackage
            sys.modules["dp_accounting"] = pkg
    return importlib.import_module(f"dp_accounting.{submodule}")


@dataclass(frozen=True)
class DpEvent:
    """``steps`` Poisson-sampled Gaussian steps at rate ``q`` and noise multiplier ``sigma``."""

    q: float
    sigma: float
    steps: int

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 1.0:
            raise UsageError(f"sampling rate q must be in (0, 1], got {self.q}")
        if not (self.sigma > 0.0 and math.isfinite(self.sigma)):
            raise UsageError(f"noise multiplier must be positive, got {self.sigma}")
        if self.steps < 0:
            raise UsageError(f"steps must be >= 0, got {self.steps}")

    def to_accounting(self) -> Any:
        """The dp-accounting event this mechanism is (import kept local: optional extra)."""
        ev = _dpa("dp_event")
        return ev.SelfComposedDpEvent(
            ev.PoissonSampledDpEvent(self.q, ev.GaussianDpEvent(self.sigma)), self.steps)


def _check_accountant(accountant: str) -> Accountant:
    if accountant not in get_args(Accountant):
        raise UsageError(f"accountant must be one of {get_args(Accountant)}, got {accountant!r}")
    return accountant  # type: ignore[return-value]


def make_accountant(accountant: Accountant = DEFAULT_ACCOUNTANT) -> Any:
    """A fresh dp-accounting accountant (add/remove-one neighbours) of this kind."""
    if _check_accountant(accountant) == "pld":
        return _dpa("pld.pld_privacy_accountant").PLDAccountant(
            value_discretization_interval=PLD_DISCRETIZATION)
    return _dpa("rdp.rdp_privacy_accountant").RdpAccountant()


def epsilon_for(events: Sequence[DpEvent], delta: float,
                accountant: Accountant = DEFAULT_ACCOUNTANT) -> float:
    """ε at ``delta`` of all ``events`` composed, from ``accountant`` (an upper bound).

    Events with the same ``(q, sigma)`` are merged into one with their steps summed
    first: both accountants compose self-composition exactly like a sequence (RDP adds,
    PLD convolves), so the result is the same, and a ledger that grows by one round at a
    time costs one accountant evaluation per distinct mechanism.
    """
    merged: dict[tuple[float, float], int] = {}
    for ev in events:
        merged[(ev.q, ev.sigma)] = merged.get((ev.q, ev.sigma), 0) + ev.steps
    return _epsilon_cached(tuple(DpEvent(q, s, n) for (q, s), n in sorted(merged.items())),
                           delta, _check_accountant(accountant))


@lru_cache(maxsize=4096)
def _epsilon_cached(events: tuple[DpEvent, ...], delta: float, accountant: Accountant) -> float:
    if not 0.0 < delta < 1.0:
        raise UsageError(f"delta must be in (0, 1), got {delta}")
    if not any(ev.steps for ev in events):
        return 0.0
    acc = make_accountant(accountant)
    for ev in events:
        if ev.steps:
            acc.compose(ev.to_accounting())
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=1024)
def noise_for_epsilon(target_epsilon: float, delta: float, q: float, steps: int,
                      accountant: Accountant = DEFAULT_ACCOUNTANT) -> float:
    """Smallest σ whose ``steps`` Poisson steps at rate ``q`` stay within ``target_epsilon``.

    Calibrated with ``accountant`` (the one the ledger then uses); rounded up to 4
    decimals so the ε actually spent never exceeds the target.
    """
    if target_epsilon <= 0:
        raise UsageError(f"--epsilon must be positive, got {target_epsilon}")
    accountant = _check_accountant(accountant)
    if accountant == "pld":
        sigma = _pld_sigma(target_epsilon, delta, q, steps)
    else:
        cal = _dpa("mechanism_calibration")
        sigma = float(cal.calibrate_dp_mechanism(
            _dpa("rdp.rdp_privacy_accountant").RdpAccountant,
            lambda s: DpEvent(q, float(s), steps).to_accounting(),
            target_epsilon, delta,
            bracket_interval=cal.ExplicitBracketInterval(0.05, 500.0),
            tol=1e-5,
        ))
    sigma = math.ceil(sigma * 1e4) / 1e4
    while epsilon_for([DpEvent(q, sigma, steps)], delta, accountant) > target_epsilon:
        sigma += 1e-4
    return sigma


def _pld_sigma(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """Smallest σ (to 2e-4) whose PLD ε meets the target: a doubling bracket from σ = 1,
    then bisection.

    Starting at 1 and moving geometrically keeps every evaluation at a moderate σ (a
    privacy-loss distribution at σ ≈ 0.05, where a generic bracket would start, takes
    tens of seconds to build); the result is checked again by the caller.
    """
    def ok(sigma: float) -> bool:
        return epsilon_for([DpEvent(q, sigma, steps)], delta, "pld") <= target_epsilon

    hi = 1.0
    while not ok(hi):
        hi *= 2.0
        if hi > 1e4:
            raise UsageError(f"no noise multiplier reaches ε={target_epsilon} at δ={delta}")
    lo = hi / 2.0
    while ok(lo):
        hi, lo = lo, lo / 2.0
        if lo < 0.05:
            return hi
    while hi - lo > 2e-4:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def _sigma_key(target_epsilon: float, delta: float, q: float, steps: int,
               accountant: Accountant = DEFAULT_ACCOUNTANT) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version_tag = f"dp-accounting {version('dp-accounting')}"
    except PackageNotFoundError:  # pragma: no cover - calibration would fail anyway
        version_tag = "dp-accounting ?"
    return (f"eps={float(target_epsilon)!r} delta={float(delta)!r} q={float(q)!r} "
            f"steps={int(steps)} {version_tag} {accountant} calibration v{CALIBRATION_VERSION}"
            + (f" grid={PLD_DISCRETIZATION!r}" if accountant == "pld" else ""))


def _entry_digest(key: str, sigma: float) -> str:
    return hashlib.sha256(f"{key}\0{sigma!r}".encode()).hexdigest()


def _read_sigma_cache(path: Path) -> dict[str, float]:
    """Entries of a σ cache file whose checksum holds; anything unreadable is skipped."""
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("schema") != _SIGMA_CACHE_SCHEMA:
        if path.exists():
            log.warning("σ cache %s unreadable; recalibrating", path)
        return {}
    out: dict[str, float] = {}
    for e in doc.get("entries", []) if isinstance(doc.get("entries"), list) else []:
        if not isinstance(e, dict):
            continue
        key, sigma, digest = e.get("key"), e.get("sigma"), e.get("sha256")
        if (isinstance(key, str) and isinstance(sigma, float) and math.isfinite(sigma)
                and sigma > 0 and digest == _entry_digest(key, sigma)):
            out[key] = sigma
    return out


def noise_for_epsilon_cached(state_dir: Path, target_epsilon: float, delta: float, q: float,
                             steps: int, accountant: Accountant = DEFAULT_ACCOUNTANT) -> float:
    """:func:`noise_for_epsilon`, kept across processes in ``state_dir``/dp-sigma-cache.json.

    Keyed on (ε, δ, q, steps, dp-accounting version, accountant, calibration version). A cached σ is
    used only if its entry's checksum holds and it still meets ``target_epsilon`` (one
    accountant evaluation), so a damaged cache can never make the device spend more; a
    missing, corrupted or truncated file is recalibrated and rewritten, never an error.
    """
    path = state_dir / SIGMA_CACHE
    key = _sigma_key(target_epsilon, delta, q, steps, accountant)
    entries = _read_sigma_cache(path)
    cached = entries.get(key)
    if cached is not None and epsilon_for([DpEvent(q, cached, steps)], delta,
                                          accountant) <= target_epsilon:
        return cached
    sigma = noise_for_epsilon(target_epsilon, delta, q, steps, accountant)
    entries.pop(key, None)
    entries[key] = sigma
    keep = list(entries.items())[-_SIGMA_CACHE_MAX:]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"schema": _SIGMA_CACHE_SCHEMA, "entries": [
            {"key": k, "sigma": v, "sha256": _entry_digest(k, v)} for k, v in keep]})
    except OSError as exc:  # a read-only state folder costs time, not correctness
        log.warning("cannot write σ cache %s: %s", path, exc)
    return sigma
