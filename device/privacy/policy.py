"""The device's privacy policy: what it accepts, whatever the server asks.

Sample-level DP protects a device's records from the server that receives its updates,
so the server cannot be the one deciding whether, and how much, protection exists. The
policy is the device's (the agent's ``[fl.privacy]`` section, written at enrollment,
passed to the SuperNode as ``privacy-*`` node-config keys); a round config can only be
*stricter*. A request outside it is declined with
:data:`~edgefleet.device.wire.federated.DECLINED_POLICY`:

- a DP mode weaker than ``min_mode`` (``sample`` > ``client`` > ``off``);
- a δ above the device's ``delta`` (the ledger accounts at the device's δ);
- a run target ε above ``max_run_epsilon``, or a round that would take the run's own
  ε (as the ledger composes it) above it, whatever the server claims;
- a sampling rate above ``max_sampling_rate`` or a noise multiplier below
  ``min_noise_multiplier`` (both are accounted anyway; these are floors a device sets
  so a miscalibrated or hostile plan cannot approach the bound's weak corner);
- federated evaluation on its held-out records while ``evaluation = "off"``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.errors import EdgefleetError

__all__ = ["INSECURE_SEED_KEY", "MODE_RANK", "PolicyViolation", "PrivacyPolicy"]

#: The node-config key that seeds DP noise and sampling: benchmarks and tests only (the
#: name says why); an enrolled agent refuses a configuration that sets it.
INSECURE_SEED_KEY = "insecure-reproducible-noise-seed"

#: How much a DP mode protects the device's records (higher is more).
MODE_RANK = {"off": 0, "client": 1, "sample": 2}


class PolicyViolation(EdgefleetError):
    """The server asked for something the device's privacy policy does not allow."""

    exit_code = 77


class PrivacyPolicy(StrictModel):
    """What a device accepts; the server's round config can only be stricter."""

    min_mode: Literal["sample", "client", "off"] = Field(
        default="sample", description="Weakest DP mode accepted: sample (DP-SGD on the "
                                      "device), client (trusts the server's noise), off.")
    budget: float = Field(default=10.0, gt=0,
                          description="Lifetime ε of the device over all runs.")
    delta: float = Field(default=1e-5, gt=0, lt=1,
                         description="δ of every guarantee; larger δ requests are declined.")
    max_run_epsilon: float = Field(default=5.0, gt=0,
                                   description="Most ε one run may spend (the lifetime "
                                               "budget caps it too).")
    max_sampling_rate: float = Field(default=1.0, gt=0, le=1,
                                     description="Largest Poisson sampling rate q accepted.")
    min_noise_multiplier: float = Field(default=0.5, gt=0,
                                        description="Smallest noise multiplier σ accepted.")
    evaluation: Literal["off", "noised"] = Field(
        default="off", description="Federated evaluation on held-out records: off, or "
                                   "accuracy and loss released with Gaussian noise and "
                                   "accounted in the ledger.")
    eval_noise_multiplier: float = Field(
        default=20.0, gt=0, description="σ of a noised evaluation (L2 sensitivity of the "
                                        "released counts scaled to 1).")

    def node_config(self) -> dict[str, Any]:
        """The policy as SuperNode ``--node-config`` keys (``privacy-*``)."""
        return {f"privacy-{k.replace('_', '-')}": v for k, v in self.model_dump().items()}

    def check_request(self, mode: str, target_epsilon: float, delta: float) -> None:
        """A round config's mode, target ε and δ against the policy."""
        if mode not in MODE_RANK:
            raise ValueError(f"unknown dp mode {mode!r}")
        if MODE_RANK[mode] < MODE_RANK[self.min_mode]:
            raise PolicyViolation(f"privacy policy: dp={mode!r} asked, this device requires "
                                  f"at least {self.min_mode!r}")
        if mode == "off":
            return
        if delta > self.delta:
            raise PolicyViolation(f"privacy policy: δ={delta:g} asked, this device accepts "
                                  f"at most δ={self.delta:g}")
        if target_epsilon > self.max_run_epsilon:
            raise PolicyViolation(f"privacy policy: run target ε={target_epsilon:g} above "
                                  f"this device's per-run maximum ε={self.max_run_epsilon:g}")

    def check_mechanism(self, q: float, sigma: float) -> None:
        """The DP-SGD sampling rate and noise multiplier a round would use."""
        if q > self.max_sampling_rate:
            raise PolicyViolation(f"privacy policy: sampling rate q={q:.4f} above this "
                                  f"device's maximum {self.max_sampling_rate:g}")
        if sigma < self.min_noise_multiplier:
            raise PolicyViolation(f"privacy policy: noise multiplier σ={sigma:.4f} below "
                                  f"this device's minimum {self.min_noise_multiplier:g}")
