"""The device's Flower ClientApp: DP training on private data, under the device's own policy.

A SuperNode starts it (``flower-supernode --node-config ...``); its data never leaves
the device. :func:`make_client_app` builds the app around a *data loader*: the
production app (:data:`app`) reads the labelled samples the agent stored (its sample
store, node-config ``sample-store``, split by sample id: :mod:`edgefleet.device.fl.store_data`;
or a provisioned ``data="samples.npz"`` with arrays ``x`` and ``y``) and nothing else; the
simulated devices of the demo, tests and benchmarks use
``edgefleet.models.sim.fl_app:app``, whose loader cuts a Dirichlet share of a built-in
task. A fixed 20 % of the local data is held out for federated evaluation.

The device decides its privacy (:mod:`edgefleet.device.privacy.policy`, node-config
``privacy-*`` keys): the round config says what the server *asks*; a request outside
the policy is declined (``DECLINED_POLICY``), never weakened to fit.

``dp = "sample"``: DP-SGD (:mod:`edgefleet.device.fl.dp_sgd`) with the noise calibrated
so the whole run spends the requested ε, every round recorded in the device's privacy
ledger before the update is sent. A device whose ledger would pass its budget declines
(``DECLINED_BUDGET``); one whose ledger is missing or rolled back declines
(``DECLINED_LEDGER``). ``dp = "client"`` (only if the policy allows it): plain local
SGD, update clipped on the device by Flower's ``fixedclipping_mod``, noise added once on
the server. ``dp = "off"`` only if the policy says ``off``.

Randomness: DP noise and Poisson sampling draw from OS entropy
(``np.random.default_rng()``); the round config's ``seed`` is ignored. Only the
node-config key ``insecure-reproducible-noise-seed`` (benchmarks and tests; an
enrolled agent refuses it) makes them reproducible.

What leaves the device: the noised model, the number of local examples and the DP
parameters and ε it accounted. No training loss or other statistic of the training
records. Evaluation on the held-out records is governed by ``privacy-evaluation``:
``off`` (the default: declined) or ``noised`` (accuracy and loss released through the
Gaussian mechanism and recorded in the ledger). Only records the loader marks public
(:attr:`LocalData.public`: the simulated devices' shares of a public task) are evaluated
exactly; samples a node stored (``sample-store``, ``data``) are private whatever app runs
on them.

Flower runs every message in a fresh process, so what a message would recompute is
kept in the node's state folder (with the privacy ledger), e.g. the calibrated σ
(:func:`~edgefleet.device.privacy.accounting.noise_for_epsilon_cached`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from pydantic import Field, model_validator

from edgefleet.device.core.config import StrictModel, load_config
from edgefleet.device.core.errors import ConfigError, EdgefleetError
from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.fl.dp_sgd import DpSgdConfig, train_dp_sgd
from edgefleet.device.fl.store_data import TooFewSamples
from edgefleet.device.privacy.accounting import DpEvent, noise_for_epsilon_cached
from edgefleet.device.privacy.ledger import (
    LEDGER_FILE,
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    RunBudgetExceeded,
)
from edgefleet.device.privacy.policy import INSECURE_SEED_KEY, PolicyViolation, PrivacyPolicy
from edgefleet.device.wire.federated import (
    ARRAYS,
    CONFIG,
    DECLINED_BUDGET,
    DECLINED_FEW_SAMPLES,
    DECLINED_LEDGER,
    DECLINED_POLICY,
    HEAD_BACKBONE,
    METRICS,
    REJECTED_INPUT,
    from_arrays,
    round_request,
    to_arrays,
)

__all__ = ["DataLoader", "LocalData", "NodeSettings", "app", "make_client_app", "node_settings",
           "stored_samples"]

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
HOLDOUT = 0.2
#: A noised evaluation clips each example's cross-entropy to this (its loss sum then
#: changes by at most this much when one record is added or removed).
EVAL_LOSS_CLIP = 10.0


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
    # The device's privacy policy (edgefleet.device.privacy.policy), flattened.
    privacy_min_mode: Literal["sample", "client", "off"] = "sample"
    privacy_budget: float = Field(10.0, gt=0)
    privacy_delta: float = Field(1e-5, gt=0, lt=1)
    sample_store: str = Field("", description="The agent's sample store (set by the agent)")
    sample_key: str = Field("", description="Key file of an encrypted sample store")
    model_package: str = Field("", description="The package this node serves (a folder, or "
                               "the updater's state folder with slots.json): its backbone "
                               "makes the inputs when the server trains an imported "
                               "model's head")
    min_samples: int = Field(20, ge=2, description="Fewer stored samples: decline")
    privacy_max_run_epsilon: float = Field(5.0, gt=0)
    privacy_max_sampling_rate: float = Field(1.0, gt=0, le=1)
    privacy_min_noise_multiplier: float = Field(0.5, gt=0)
    privacy_evaluation: Literal["off", "noised"] = "off"
    privacy_eval_noise_multiplier: float = Field(20.0, gt=0)
    privacy_ledger_required: bool = Field(
        False, description="The ledger was created at enrollment: missing files are refused")
    insecure_reproducible_noise_seed: int = Field(
        -1, description="INSECURE, benchmarks/tests only: seed DP noise and sampling so "
                        "a run can be repeated bit for bit (anyone knowing it can subtract "
                        "the noise). -1: OS entropy. An enrolled agent refuses it.")

    @model_validator(mode="after")
    def _policy_valid(self) -> NodeSettings:
        self.policy  # noqa: B018 - validates the cross-field rules
        return self

    @property
    def policy(self) -> PrivacyPolicy:
        """The device's privacy policy from its ``privacy-*`` keys."""
        return PrivacyPolicy.model_validate({
            name.removeprefix("privacy_"): getattr(self, name)
            for name in type(self).model_fields
            if name.startswith("privacy_") and name != "privacy_ledger_required"})


class LocalData:
    """The device's normalized-later training share and its held-out evaluation share.

    ``public``: the records are shares of a public task (a simulation), so evaluation on
    them is released exactly; a device's own records are private (the default), and its
    ``privacy-evaluation`` governs what evaluation releases.
    """

    def __init__(self, x: F32, y: I64, seed: int = 0, *, public: bool = False) -> None:
        order = np.random.default_rng(seed).permutation(len(y))
        k = round(len(y) * HOLDOUT)
        self.x_test, self.y_test = x[order[:k]], y[order[:k]]
        self.x_train, self.y_train = x[order[k:]], y[order[k:]]
        self.public = public
        #: Sample ids (the store's), which key the embedding cache; None: not from a store.
        self.ids_train: I64 | None = None
        self.ids_test: I64 | None = None

    @classmethod
    def from_split(cls, x_train: F32, y_train: I64, x_test: F32, y_test: I64, *,
                   public: bool = False) -> LocalData:
        """Data already split (the sample store's split by sample id)."""
        data = cls.__new__(cls)
        data.x_train, data.y_train, data.x_test, data.y_test = x_train, y_train, x_test, y_test
        data.public = public
        data.ids_train = data.ids_test = None
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
        from edgefleet.device.fl.store_data import store_split_ids

        ids_tr, x_tr, y_tr, ids_te, x_te, y_te = store_split_ids(
            s.sample_store, s.sample_key, s.min_samples, s.partition_seed)
        data = LocalData.from_split(x_tr, y_tr, x_te, y_te)
        data.ids_train, data.ids_test = ids_tr, ids_te
        return data
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
    return PrivacyLedger(state_dir(s) / LEDGER_FILE, s.privacy_budget, s.privacy_delta,
                         create=not s.privacy_ledger_required)


def _normalize(x: F32, cfg: Any) -> F32:
    mean = np.asarray(cfg["norm-mean"], dtype=np.float32)
    std = np.asarray(cfg["norm-std"], dtype=np.float32)
    if mean.shape != (x.shape[1],) or std.shape != mean.shape or np.any(std <= 0):
        raise ValueError(f"normalization for {mean.shape} features, data has {x.shape[1]}")
    out: F32 = ((x - mean) / std).astype(np.float32)
    return out


def _inputs(s: NodeSettings, data: LocalData, cfg: Any, model: Any, *, train: bool) -> F32:
    """The model's inputs: normalized rows, or, when the server trains an imported model's
    head (:data:`HEAD_BACKBONE`), the active package's backbone embeddings of them."""
    x, ids = (data.x_train, data.ids_train) if train else (data.x_test, data.ids_test)
    want = cfg.get(HEAD_BACKBONE)
    if want is None:
        return _normalize(x, cfg)
    from edgefleet.device.fl.head import load_head

    head = load_head(s.model_package, str(want))
    if model.sizes[-1] != len(head.manifest.labels) or (
            head.cut.dim is not None and model.sizes[0] != head.cut.dim):
        raise ValueError(f"a {model.sizes} head does not fit the package's backbone "
                         f"({head.cut.dim} features, {len(head.manifest.labels)} classes)")
    return head.inputs(x, ids, s.sample_store, bool(s.sample_key))


def _rng(s: NodeSettings, server_round: int, purpose: int = 0) -> np.random.Generator:
    """DP noise and sampling: OS entropy. The server's ``seed`` never reaches this."""
    seed = s.insecure_reproducible_noise_seed
    if seed < 0:
        return np.random.default_rng()
    log.warning("INSECURE: DP noise seeded by node-config %s (benchmarks/tests only)",
                INSECURE_SEED_KEY)
    return np.random.default_rng([seed, s.partition_id, server_round, purpose])


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
        req = round_request(cfg)
        model = MLP.from_params(from_arrays(msg.content.array_records[ARRAYS].to_numpy_ndarrays()))
        x = _inputs(s, data, cfg, model, train=True)
        if len(data.y_train) == 0:
            raise ValueError("no local training samples")
    except TooFewSamples as exc:
        return _reject(msg, DECLINED_FEW_SAMPLES, str(exc))
    except (EdgefleetError, ValueError, KeyError) as exc:
        metrics.inc("fl.rejected_input")
        return _reject(msg, REJECTED_INPUT, f"rejected: {exc}")
    mode = req.dp
    try:
        s.policy.check_request(mode, req.target_epsilon or 0.0,
                               s.privacy_delta if req.delta is None else req.delta)
    except PolicyViolation as exc:
        metrics.inc("fl.declined_policy")
        return _reject(msg, DECLINED_POLICY, str(exc))
    except ValueError as exc:  # an unknown mode
        metrics.inc("fl.rejected_input")
        return _reject(msg, REJECTED_INPUT, f"rejected: {exc}")
    mu = req.proximal_mu
    start = [p.copy() for p in model.params]
    anchor = start if mu else None
    server_round = req.server_round
    rng = _rng(s, server_round)
    n = len(data.y_train)
    q = min(1.0, req.batch_size / n)
    steps = req.local_steps
    reply: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": n, "dp-weight": 1, "q": q, "steps": steps}
    if mode == "sample":
        assert req.delta is not None and req.target_epsilon is not None and req.num_rounds
        delta = req.delta
        planned = req.num_rounds * steps
        sigma = noise_for_epsilon_cached(state_dir(s), req.target_epsilon, delta, q, planned)
        dp = DpSgdConfig(clip=req.clip, sigma=sigma, q=q, steps=steps, lr=req.lr,
                         momentum=req.momentum)
        run_id = str(context.run_id)
        try:
            s.policy.check_mechanism(q, sigma)
            ledger = _ledger(s)
            total = ledger.record(run_id, server_round, dp.event,
                                  run_limit=s.privacy_max_run_epsilon)
        except (PolicyViolation, RunBudgetExceeded) as exc:
            metrics.inc("fl.declined_policy")
            return _reject(msg, DECLINED_POLICY, str(exc))
        except PrivacyBudgetExceeded as exc:
            return _reject(msg, DECLINED_BUDGET, str(exc))
        except EdgefleetError as exc:  # missing, unreadable, rolled back: never a reset
            metrics.inc("fl.declined_ledger")
            return _reject(msg, DECLINED_LEDGER, str(exc))
        train_dp_sgd(model, x, data.y_train, dp, rng, anchor=anchor, mu=mu)
        reply.update(sigma=sigma, epsilon=ledger.run_spent(run_id, delta), **{
            "epsilon-total": total, "budget": ledger.budget})
    else:
        cfg_plain = DpSgdConfig(q=q, steps=steps, lr=req.lr, momentum=req.momentum)
        _train_plain(model, x, data.y_train, cfg_plain, rng, anchor, mu)
    # No training loss or other statistic of the training records is in the reply: it
    # would be released exactly, next to the DP update, covered by no ε.
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
        cfg: dict[str, Any] = dict(msg.content.config_records[CONFIG])
        data = load(s)
        if not data.public and s.privacy_evaluation == "off":
            default_metrics().inc("fl.declined_policy")
            return _reject(msg, DECLINED_POLICY, "privacy policy: evaluation on this "
                           "device's held-out records is off")
        # The round labels the ledger entry: the training round's rules, not int(str(..)).
        server_round = round_request({"dp": "off", "server-round": cfg.get("server-round", 0)}
                                     ).server_round
        model = MLP.from_params(from_arrays(msg.content.array_records[ARRAYS].to_numpy_ndarrays()))
        x = _inputs(s, data, cfg, model, train=False)
    except TooFewSamples as exc:
        return _reject(msg, DECLINED_FEW_SAMPLES, str(exc))
    except (EdgefleetError, ValueError, KeyError) as exc:
        default_metrics().inc("fl.rejected_input")
        return _reject(msg, REJECTED_INPUT, f"rejected: {exc}")
    k = len(data.y_test)
    if data.public:
        m = MetricRecord({"num-examples": k, "dp-weight": 1,
                          "eval-loss": model.loss(x, data.y_test),
                          "eval-accuracy": model.accuracy(x, data.y_test)})
        return Message(content=RecordDict({METRICS: m}), reply_to=msg)
    return _evaluate_noised(s, model, x, data.y_test, msg, context, server_round)


def _evaluate_noised(s: NodeSettings, model: Any, x: F32, y: I64, msg: Message,
                     context: Context, server_round: int) -> Message:
    """Accuracy and loss on held-out records through the Gaussian mechanism, accounted.

    Released: the number correct and the sum of per-example cross-entropies clipped to
    :data:`EVAL_LOSS_CLIP` (scaled by it), each with sensitivity 1 when one record is
    added or removed: a 2-vector of L2 sensitivity √2, so each gets noise
    N(0, (σ·√2)²) and the release is one Gaussian mechanism of multiplier σ, recorded
    in the ledger as ``DpEvent(q=1, σ, 1)``. ``num-examples`` (the held-out count) is
    treated as public, as the training count is.
    """
    from edgefleet.device.runtime.mlp import softmax

    sigma = s.privacy_eval_noise_multiplier
    try:
        _ledger(s).record(str(context.run_id), server_round, DpEvent(1.0, sigma, 1),
                          run_limit=s.privacy_max_run_epsilon, kind="evaluate")
    except RunBudgetExceeded as exc:
        default_metrics().inc("fl.declined_policy")
        return _reject(msg, DECLINED_POLICY, str(exc))
    except PrivacyBudgetExceeded as exc:
        return _reject(msg, DECLINED_BUDGET, str(exc))
    except (LedgerError, EdgefleetError) as exc:
        default_metrics().inc("fl.declined_ledger")
        return _reject(msg, DECLINED_LEDGER, str(exc))
    k = len(y)
    probs = softmax(model.forward(x)).astype(np.float64)
    per_example = -np.log(np.maximum(probs[np.arange(k), y], 1e-300))
    correct = float(np.sum(np.argmax(probs, axis=1) == y))
    loss_sum = float(np.sum(np.minimum(per_example, EVAL_LOSS_CLIP))) / EVAL_LOSS_CLIP
    noise = _rng(s, server_round, purpose=1).normal(0.0, sigma * np.sqrt(2.0), size=2)
    denom = max(k, 1)
    m = MetricRecord({
        "num-examples": k, "dp-weight": 1,
        "eval-accuracy": float(np.clip((correct + noise[0]) / denom, 0.0, 1.0)),
        "eval-loss": float(max(0.0, (loss_sum + noise[1]) * EVAL_LOSS_CLIP / denom)),
        "eval-sigma": sigma})
    return Message(content=RecordDict({METRICS: m}), reply_to=msg)


def clipping_when_client_dp(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod``, active only when the server runs client-level DP."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    cfgs = msg.content.config_records
    if msg.metadata.message_type == "train" and any(KEY_CLIPPING_NORM in c for c in cfgs.values()):
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client_app(load: DataLoader = stored_samples, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp training and evaluating on what ``load`` returns for a node (whether
    that is public or the device's own is :attr:`LocalData.public`)."""
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
