"""What the ServerApp and the device's ClientApp agree on: config keys, reply codes, arrays.

Kept in one small module so the two sides cannot drift: a device that refuses a round
for privacy reasons replies with a Flower ``Error`` whose code says why
(:data:`DECLINED_BUDGET`, :data:`DECLINED_POLICY`, :data:`DECLINED_LEDGER`); the server
counts each as a declined node (by :data:`DECLINE_REASONS`), not a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ARRAYS",
    "CONFIG",
    "DECLINED_BUDGET",
    "DECLINED_FEW_SAMPLES",
    "DECLINED_LEDGER",
    "DECLINED_POLICY",
    "DECLINE_REASONS",
    "DP_MODES",
    "HEAD_BACKBONE",
    "METRICS",
    "REJECTED_INPUT",
    "RoundRequest",
    "from_arrays",
    "is_decline",
    "round_request",
    "to_arrays",
]

#: Round config key of a head fine-tuning run: the sha256 of the backbone whose
#: embeddings the head takes. A device trains only if its active package has that
#: backbone (docs/bring-your-own-model.md); otherwise it rejects the round.
HEAD_BACKBONE = "head-backbone"

#: Record names inside each message (Flower's strategies default to these).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

#: ``Error.code`` of a device that refuses to train because of its privacy budget.
DECLINED_BUDGET = 4101
#: ``Error.code`` of a device that refuses a malformed global model or task config.
REJECTED_INPUT = 4102
#: ``Error.code`` of a device whose own privacy policy forbids what the server asked
#: (DP off, client-level DP, ε, δ, sampling rate or noise outside the policy,
#: evaluation on its held-out records).
DECLINED_POLICY = 4103
#: ``Error.code`` of a device whose privacy ledger is missing, unreadable or rolled back.
DECLINED_LEDGER = 4104
#: ``Error.code`` of a device with fewer stored samples than its ``min-samples``.
DECLINED_FEW_SAMPLES = 4105

#: Each decline code and the name the server counts it under.
DECLINE_REASONS: dict[int, str] = {DECLINED_BUDGET: "budget", DECLINED_POLICY: "policy",
                                   DECLINED_LEDGER: "ledger", DECLINED_FEW_SAMPLES: "few_samples"}

DP_MODES = ("sample", "client", "off")


def is_decline(code: int) -> bool:
    """True for replies the server counts as a declined node, not a failed one."""
    return code in DECLINE_REASONS


def to_arrays(params: Sequence[npt.NDArray[np.floating]]) -> list[npt.NDArray[np.float32]]:
    """The MLP's ``[W1, b1, ...]`` as contiguous float32 arrays for an ``ArrayRecord``."""
    return [np.ascontiguousarray(p, dtype=np.float32) for p in params]


def from_arrays(arrays: Sequence[npt.NDArray[np.generic]], sizes: Sequence[int] | None = None
                ) -> list[npt.NDArray[np.float32]]:
    """Validate a received global model: float, finite, shapes chaining as an MLP.

    Raises ``ValueError`` naming the problem; ``sizes`` pins the expected layer sizes.
    """
    out: list[npt.NDArray[np.float32]] = []
    for i, a in enumerate(arrays):
        arr = np.asarray(a)
        if arr.dtype.kind != "f":
            raise ValueError(f"array {i} has dtype {arr.dtype}, expected float")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"array {i} holds NaN or Inf")
        out.append(arr.astype(np.float32))
    if len(out) < 2 or len(out) % 2:
        raise ValueError(f"expected [W1, b1, ...], got {len(out)} arrays")
    got = [out[0].shape[0] if out[0].ndim == 2 else -1]
    for w, b in zip(out[::2], out[1::2], strict=True):
        if w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[0] != got[-1]:
            raise ValueError(f"inconsistent layer shapes {w.shape} / {b.shape}")
        got.append(w.shape[1])
    if sizes is not None and tuple(got) != tuple(sizes):
        raise ValueError(f"layer sizes {tuple(got)} differ from expected {tuple(sizes)}")
    return out


class RoundRequest(BaseModel):
    """What the server asks of one training round, validated before any of it is used:
    finite numbers in range, or the round is rejected as malformed. (Whether the device
    accepts what is asked is its privacy policy's decision, checked after this.)"""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    dp: str = "sample"
    target_epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    num_rounds: int | None = Field(None, ge=1, le=1_000_000)
    local_steps: int = Field(20, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1)
    clip: float = Field(1.0, gt=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    proximal_mu: float = Field(0.0, ge=0)
    server_round: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sample_dp_is_planned(self) -> RoundRequest:
        if self.dp == "sample" and None in (self.target_epsilon, self.delta, self.num_rounds):
            raise ValueError("sample-level DP needs target-epsilon, delta and num-rounds")
        return self


def round_request(cfg: dict[str, Any]) -> RoundRequest:
    """The round config as a :class:`RoundRequest` (``ValueError`` naming the bad key)."""
    try:
        return RoundRequest.model_validate(cfg)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        raise ValueError(f"round config {where}: {first.get('msg', 'invalid')}") from None
