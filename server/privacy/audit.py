"""One-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023) of sample-level DP.

``m`` canary records (:mod:`edgefleet.models.sim.canary`) are each planted, with
probability 1/2, into the training data of one simulated device, and one federated run
trains through the real ServerApp strategy and the real ClientApp (in-process grid:
same messages, mods, DP-SGD and ledger, no transport). The auditor is the server: it
sees what device 0 sends, here its model after the last round, and the (public) model
the run started from. It scores every canary by how much training raised the
log-probability of the canary's label, guesses "included"
for the ``k`` highest scores and "excluded" for the ``k`` lowest, and counts correct
guesses. Everything the device releases is covered by its accounted ε, so any such
score is a fair attack.

If the device's training is (ε, δ)-DP, the number of correct guesses among ``r`` is at
most Binomial(r, e^ε / (1 + e^ε)) plus a δ term (their Theorem, with the p-value of
their Algorithm: ``P[Bin ≥ v] + 2·m·δ·α``). The empirical ε is the largest ε this rejects
at the given confidence: a *lower bound* on the true ε of what was run, to be read next
to the accounted ε (an upper bound). The guess counts tried are fixed in advance
(:data:`GUESS_FRACTIONS`) and the confidence is Bonferroni-split over them, so picking
the best one is part of the guarantee.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["AuditResult", "epsilon_lower_bound", "run_audit"]

#: Fractions of the canaries guessed (half "in", half "out"), fixed before looking.
GUESS_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v correct of r guesses] for an (ε, δ)-DP algorithm (Steinke et al., Alg. 1)."""
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))
    if delta <= 0 or v == 0:
        return min(1.0, beta)
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], ..., P[Bin = 0]
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float) -> float:
    """Largest ε rejected at level ``p`` given ``v`` correct of ``r`` guesses (0 if none)."""
    if not 0 <= v <= r <= m or not 0 < p < 1:
        raise ValueError(f"need 0 <= v <= r <= m and 0 < p < 1, got {v}, {r}, {m}, {p}")
    if r == 0 or _p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while _p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def guesses(scores: npt.NDArray[np.floating], included: npt.NDArray[np.bool_],
            k: int) -> tuple[int, int]:
    """(guesses, correct) when the ``k`` top scores are called in and the ``k`` bottom out."""
    order = np.argsort(scores, kind="stable")
    k = min(k, len(scores) // 2)
    correct = int(np.sum(included[order[len(order) - k:]]) + np.sum(~included[order[:k]]))
    return 2 * k, correct


@dataclass(frozen=True)
class AuditResult:
    """One audit: the accounted ε (upper bound) next to the empirical one (lower bound)."""

    task: str
    dp: str
    target_epsilon: float | None
    accounted_epsilon: float | None
    accountant: str
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    empirical_epsilon: float
    confidence: float
    rounds: int
    devices: int
    accuracy: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_audit(task: str = "digits", dp: str = "sample", epsilon: float = 3.0,
              delta: float = 1e-5, canaries: int = 200, devices: int = 3, rounds: int = 5,
              local_steps: int = 40, batch_size: int = 32, lr: float = 0.2, clip: float = 1.0,
              confidence: float = 0.95, seed: int = 0) -> AuditResult:
    """Plant canaries in device 0, train one federated run, and audit it."""
    from flwr.app import ArrayRecord, Context, Message

    from edgefleet.device.privacy.accounting import DEFAULT_ACCOUNTANT
    from edgefleet.device.runtime.mlp import MLP
    from edgefleet.device.wire.federated import ARRAYS, from_arrays
    from edgefleet.models.sim.canary import canary_app, make_canaries
    from edgefleet.server.fl.inprocess import InProcessGrid
    from edgefleet.server.fl.server_app import FleetStrategy
    from edgefleet.server.fl.settings import build_strategy, run_settings

    if canaries < 10:
        raise ValueError("an audit needs at least 10 canaries")
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    can = make_canaries(task, canaries, rng)
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-audit-") as work:
            s = run_settings({"task": task, "num-rounds": rounds, "dp": dp,
                              "epsilon": epsilon, "delta": delta, "min-nodes": devices,
                              "num-nodes": devices, "local-steps": local_steps,
                              "batch-size": batch_size, "lr": lr, "clip": clip,
                              "db": f"{work}/fl.db"})
            budget = max(10.0, 2.0 * epsilon)

            def node(i: int) -> dict[str, Any]:
                # Simulated devices whose policy admits exactly what is being audited.
                return {"task": task, "partition-id": i, "num-partitions": devices,
                        "state-dir": f"{work}/n{i}", "privacy-budget": budget,
                        "privacy-delta": delta, "privacy-min-mode": dp,
                        "privacy-max-run-epsilon": budget,
                        "privacy-min-noise-multiplier": 0.01}

            strategy = FleetStrategy(build_strategy(s), s)
            task_obj, norm, model = s.initial_model()
            app = canary_app(can, target=0)
            seen: dict[str, Any] = {}

            def observed(msg: Message, ctx: Context) -> Message:
                """The ClientApp, with the server's view of device 0 kept."""
                reply = app(msg, ctx)
                if (ctx.node_id == 1000 and msg.metadata.message_type == "train"
                        and reply.has_content() and ARRAYS in reply.content.array_records):
                    seen.setdefault("sent", msg.content.array_records[ARRAYS].to_numpy_ndarrays())
                    seen["got"] = reply.content.array_records[ARRAYS].to_numpy_ndarrays()
                return reply

            grid = InProcessGrid(observed, devices, node)
            res = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.params),
                                 num_rounds=rounds)
            final = MLP.from_params(res.arrays.to_numpy_ndarrays())
            split = task_obj.split()
            accuracy = final.accuracy(s.normalized(split.x_test, norm), split.y_test)
            if "got" not in seen:
                raise RuntimeError("device 0 never trained: nothing to audit")
            xc = s.normalized(can.x, norm)
            scores = (_log_prob_of_label(MLP.from_params(from_arrays(seen["got"])), xc, can.y)
                      - _log_prob_of_label(MLP.from_params(from_arrays(seen["sent"])), xc,
                                           can.y))
            accounted = strategy.device_eps.get(1000) if dp == "sample" else None
    finally:
        logging.disable(logging.NOTSET)
    p = (1.0 - confidence) / len(GUESS_FRACTIONS)
    best = (0.0, 0, 0)
    for frac in GUESS_FRACTIONS:
        r, v = guesses(scores, can.included, max(1, round(frac * canaries / 2)))
        eps_lb = epsilon_lower_bound(canaries, r, v, delta, p)
        if eps_lb > best[0] or best[1] == 0:
            best = (eps_lb, r, v)
    return AuditResult(
        task=task, dp=dp, target_epsilon=epsilon if dp == "sample" else None,
        accounted_epsilon=None if accounted is None else float(accounted),
        accountant=DEFAULT_ACCOUNTANT, delta=delta, canaries=canaries,
        included=int(can.included.sum()), guesses=best[1], correct=best[2],
        empirical_epsilon=best[0], confidence=confidence, rounds=rounds, devices=devices,
        accuracy=float(accuracy), seconds=time.monotonic() - t0)


def _log_prob_of_label(model: Any, x: npt.NDArray[np.float32],
                       y: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    logits = np.asarray(model.forward(x), dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    out: npt.NDArray[np.float64] = logp[np.arange(len(y)), y]
    return out
