"""The device's Flower ClientApp: DP training on private data, and federated evaluation.

A SuperNode starts it (``flower-supernode --node-config ...``); its data never leaves
the device. :func:`make_client_app` builds the app around a *data loader*: the
production app (:data:`app`) reads the labelled samples the agent stored (its sample
store, node-config ``sample-store``, split by sample id: :mod:`edgefleet.device.fl.store_data`;
or a provisioned ``data="samples.npz"`` with arrays ``x`` and ``y``) and nothing else; the
simulated devices of the demo, tests and benchmarks use
``edgefleet.models.sim.fl_app:app``, whose loader cuts a Dirichlet share of a built-in
task. A fixed 20 % of the local data is held out for federated evaluation.

Flower runs every message in a fresh process, so what a message would recompute is
kept in the node's state folder (with the privacy ledger), e.g. the calibrated σ
(:func:`~edgefleet.device.privacy.accounting.noise_for_epsilon_cached`).

``dp = "sample"``: DP-SGD (:mod:`edgefleet.device.fl.dp_sgd`) with the noise calibrated
so the whole run spends the requested ε, and every round recorded in the device's privacy
ledger before the update is sent. A device whose ledger would pass its budget declines.
``dp = "client"``: plain local SGD, update clipped on the device by Flower's
``fixedclipping_mod``, noise added once on the server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from pydantic import Field

from edgefleet.device.core.config import StrictModel, load_config
from edgefleet.device.core.errors import ConfigError, EdgefleetError
from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.fl.dp_sgd import DpSgdConfig, train_dp_sgd
from edgefleet.device.fl.store_data import TooFewSamples
from edgefleet.device.privacy.accounting import noise_for_epsilon_cached
from edgefleet.device.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger
from edgefleet.device.wire.federated import (
    ARRAYS,
    CONFIG,
    DECLINED_BUDGET,
    DECLINED_FEW_SAMPLES,
    METRICS,
    REJECTED_INPUT,
    from_arrays,
    to_arrays,
)

__all__ = ["DataLoader", "LocalData", "NodeSettings", "app", "make_client_app", "node_settings",
           "stored_samples"]

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
HOLDOUT = 0.2


class NodeSettings(StrictModel):
    """``--node-config`` of a SuperNode (keys use ``-``; unknown keys are errors)."""

    task: str = "digits"
    partition_id: int = Field(0, ge=0)
    num_partitions: int = Field(1, ge=1)
    alpha: float = Field(0.5, gt=0)
    partition_seed: int = 0
    data: str = ""
    state_dir: str = Field("", description="Folder of the privacy ledger and caches "
                                           "(default: FLWR_HOME)")
    privacy_budget: float = Field(10.0, gt=0)
    privacy_delta: float = Field(1e-5, gt=0, lt=1)
    sample_store: str = Field("", description="The agent's sample store (set by the agent)")
    sample_key: str = Field("", description="Key file of an encrypted sample store")
    min_samples: int = Field(20, ge=2, description="Fewer stored samples: decline")


class LocalData:
    """The device's normalized-later training share and its held-out evaluation share."""

    def __init__(self, x: F32, y: I64, seed: int = 0) -> None:
        order = np.random.default_rng(seed).permutation(len(y))
        k = round(len(y) * HOLDOUT)
        self.x_test, self.y_test = x[order[:k]], y[order[:k]]
        self.x_train, self.y_train = x[order[k:]], y[order[k:]]

    @classmethod
    def from_split(cls, x_train: F32, y_train: I64, x_test: F32, y_test: I64) -> LocalData:
        """Data already split (the sample store's split by sample id)."""
        data = cls.__new__(cls)
        data.x_train, data.y_train, data.x_test, data.y_test = x_train, y_train, x_test, y_test
        return data


def node_settings(node_config: dict[str, Any]) -> NodeSettings:
    """Validate the SuperNode's ``--node-config`` once, naming a bad key."""
    return load_config(NodeSettings, overrides={k.replace("-", "_"): v
                                                for k, v in node_config.items()})


DataLoader = Callable[[NodeSettings], LocalData]


def stored_samples(s: NodeSettings) -> LocalData:
    """The labelled samples the agent stored (node-config ``sample-store``, or a provisioned
    ``data`` file): a device's only data."""
    if s.sample_store:
        from edgefleet.device.fl.store_data import store_split

        return LocalData.from_split(*store_split(s.sample_store, s.sample_key, s.min_samples,
                                                 s.partition_seed))
    if not s.data:
        raise ConfigError("no local samples: node-config 'data' names none")
    return _stored_samples(s.data, s.partition_seed)


@cache
def _stored_samples(path: str, seed: int) -> LocalData:
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as f:
            x, y = np.asarray(f["x"], dtype=np.float32), np.asarray(f["y"], dtype=np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot read local samples: {exc}", path=path) from None
    if x.ndim != 2 or len(x) != len(y) or len(y) < 2:
        raise ConfigError(f"samples need x (n, features) and y (n,), got {x.shape}/{y.shape}",
                          path=path)
    return LocalData(x, y, seed=seed)


def state_dir(s: NodeSettings) -> Path:
    """The node's state folder: privacy ledger and σ cache (and a simulation's share cache)."""
    return Path(s.state_dir or os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()


def _ledger(s: NodeSettings) -> PrivacyLedger:
    return PrivacyLedger(state_dir(s) / "privacy-ledger.json", s.privacy_budget,
                         s.privacy_delta)


def _normalize(x: F32, cfg: Any) -> F32:
    mean = np.asarray(cfg["norm-mean"], dtype=np.float32)
    std = np.asarray(cfg["norm-std"], dtype=np.float32)
    if mean.shape != (x.shape[1],) or std.shape != mean.shape or np.any(std <= 0):
        raise ValueError(f"normalization for {mean.shape} features, data has {x.shape[1]}")
    out: F32 = ((x - mean) / std).astype(np.float32)
    return out


def _rng(cfg: Any, s: NodeSettings, server_round: int) -> np.random.Generator:
    seed = int(cfg.get("seed", -1))
    if seed < 0:  # fresh OS entropy: DP noise must not be predictable
        return np.random.default_rng()
    return np.random.default_rng([seed, s.partition_id, server_round])


def _reject(msg: Message, code: int, reason: str) -> Message:
    log.warning("declining %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _train(load: DataLoader, msg: Message, context: Context) -> Message:
    from edgefleet.device.runtime.mlp import MLP

    metrics = default_metrics()
    try:
        s = node_settings(dict(context.node_config))
        data = load(s)
        cfg: dict[str, Any] = dict(msg.content.config_records[CONFIG])
        model = MLP.from_params(from_arrays(msg.content.array_records[ARRAYS].to_numpy_ndarrays()))
        x = _normalize(data.x_train, cfg)
        if len(data.y_train) == 0:
            raise ValueError("no local training samples")
    except TooFewSamples as exc:
        return _reject(msg, DECLINED_FEW_SAMPLES, str(exc))
    except (EdgefleetError, ValueError, KeyError) as exc:
        metrics.inc("fl.rejected_input")
        return _reject(msg, REJECTED_INPUT, f"rejected: {exc}")
    mode = str(cfg.get("dp", "sample"))
    mu = float(cfg.get("proximal-mu", 0.0))
    start = [p.copy() for p in model.params]
    anchor = start if mu else None
    server_round = int(cfg.get("server-round", 0))
    rng = _rng(cfg, s, server_round)
    n = len(data.y_train)
    q = min(1.0, float(cfg.get("batch-size", 32)) / n)
    steps = int(cfg.get("local-steps", 20))
    reply: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": n, "dp-weight": 1, "q": q, "steps": steps}
    loss_before = model.loss(x, data.y_train)
    if mode == "sample":
        delta = float(cfg["delta"])
        planned = int(cfg["num-rounds"]) * steps
        sigma = noise_for_epsilon_cached(state_dir(s), float(cfg["target-epsilon"]), delta, q,
                                         planned)
        dp = DpSgdConfig(clip=float(cfg.get("clip", 1.0)), sigma=sigma, q=q, steps=steps,
                         lr=float(cfg.get("lr", 0.1)), momentum=float(cfg.get("momentum", 0.0)))
        try:
            ledger = _ledger(s)
            run_id = str(context.run_id)
            total = ledger.record(run_id, server_round, dp.event)
        except PrivacyBudgetExceeded as exc:
            return _reject(msg, DECLINED_BUDGET, str(exc))
        except EdgefleetError as exc:  # unreadable ledger: refuse, never reset the budget
            return _reject(msg, DECLINED_BUDGET, str(exc))
        train_dp_sgd(model, x, data.y_train, dp, rng, anchor=anchor, mu=mu)
        reply.update(sigma=sigma, epsilon=ledger.run_spent(run_id, delta), **{
            "epsilon-total": total, "budget": ledger.budget})
    else:
        cfg_plain = DpSgdConfig(q=q, steps=steps, lr=float(cfg.get("lr", 0.1)),
                                momentum=float(cfg.get("momentum", 0.0)))
        _train_plain(model, x, data.y_train, cfg_plain, rng, anchor, mu)
    reply["train-loss"] = float(loss_before)
    metrics.inc("fl.rounds_trained")
    content = RecordDict({ARRAYS: ArrayRecord(to_arrays(model.params)),
                          METRICS: MetricRecord(reply)})
    return Message(content=content, reply_to=msg)


def _train_plain(model: Any, x: F32, y: I64, cfg: DpSgdConfig, rng: np.random.Generator,
                 anchor: list[Any] | None, mu: float) -> None:
    """Non-private local SGD with the same batch size and step count (fair comparison)."""
    batch = max(1, round(cfg.q * len(y)))
    velocity = [np.zeros_like(p) for p in model.params]
    for _ in range(cfg.steps):
        idx = rng.choice(len(y), size=min(batch, len(y)), replace=False)
        _, grads = model.loss_and_grad(x[idx], y[idx])
        for i, (p, g, v) in enumerate(zip(model.params, grads, velocity, strict=True)):
            if mu and anchor is not None:
                g = g + mu * (p - anchor[i])
            v *= cfg.momentum
            v -= cfg.lr * g
            p += v


def _evaluate(load: DataLoader, msg: Message, context: Context) -> Message:
    from edgefleet.device.runtime.mlp import MLP

    try:
        s = node_settings(dict(context.node_config))
        data = load(s)
        cfg: dict[str, Any] = dict(msg.content.config_records[CONFIG])
        model = MLP.from_params(from_arrays(msg.content.array_records[ARRAYS].to_numpy_ndarrays()))
        x = _normalize(data.x_test, cfg)
    except TooFewSamples as exc:
        return _reject(msg, DECLINED_FEW_SAMPLES, str(exc))
    except (EdgefleetError, ValueError, KeyError) as exc:
        default_metrics().inc("fl.rejected_input")
        return _reject(msg, REJECTED_INPUT, f"rejected: {exc}")
    m = MetricRecord({"num-examples": len(data.y_test), "dp-weight": 1,
                      "eval-loss": model.loss(x, data.y_test),
                      "eval-accuracy": model.accuracy(x, data.y_test)})
    return Message(content=RecordDict({METRICS: m}), reply_to=msg)


def clipping_when_client_dp(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod``, active only when the server runs client-level DP."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    cfgs = msg.content.config_records
    if msg.metadata.message_type == "train" and any(KEY_CLIPPING_NORM in c for c in cfgs.values()):
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client_app(load: DataLoader = stored_samples, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp training and evaluating on what ``load`` returns for a node."""
    client = ClientApp(mods=[clipping_when_client_dp, *mods])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(load, msg, context)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _evaluate(load, msg, context)

    return client


#: What a deployed SuperNode runs: training only on the samples the agent stored.
app = make_client_app()
