"""A federated run's settings (the Flower run config) and the strategy they select.

One validated model (:class:`RunSettings`) is the single source for the ServerApp, the
``edgefleet train`` command that fills the run config, and the generated Flower app's
``[tool.flwr.app.config]`` defaults, so a key cannot exist in one place only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from edgefleet.device.core.config import StrictModel, load_config
from edgefleet.device.core.errors import UsageError

__all__ = ["TEMPERATURE_FRACTION", "RunSettings", "build_strategy", "public_parts", "run_settings"]

#: Share of the public calibration split kept out of pretraining, for the temperature: a
#: temperature fitted on the data the model was just trained on sharpens it (T about 0.2 on
#: digits) until almost every confidence is 1.0, which also blinds confidence drift.
TEMPERATURE_FRACTION = 0.4


def public_parts(y_calib: npt.NDArray[np.integer]) -> tuple[npt.NDArray[np.intp],
                                                          npt.NDArray[np.intp]]:
    """(pretraining, temperature) indices of the calibration split; fixed for every run,
    so a continued run's temperature part was never trained on by its parents either."""
    from edgefleet.models.core.tasks import stratified_split

    return stratified_split(y_calib, TEMPERATURE_FRACTION, seed=20261204)


class RunSettings(StrictModel):
    """Everything a run is told; keys appear with ``-`` in the Flower run config."""

    tag: str = "run"
    task: str = "digits"
    num_rounds: int = Field(3, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam", "trimmed", "median"] = "fedavg"
    trim_beta: float = Field(0.2, ge=0, lt=0.5,
                             description="trimmed: share cut from each tail per coordinate")
    norm_bound: float = Field(0.0, ge=0, description="L2 bound on each device's update "
                              "before aggregation (0: off)")
    fraction: float = Field(1.0, gt=0, le=1)
    min_nodes: int = Field(2, ge=1)
    num_nodes: int = Field(2, ge=1, description="devices expected (client-level DP sample size)")
    dp: Literal["sample", "client", "off"] = "sample"
    epsilon: float = Field(3.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    clip: float = Field(1.0, gt=0, description="per-example gradient clip (sample-level DP)")
    update_clip: float = Field(1.0, gt=0, description="model-update clip (client-level DP)")
    local_steps: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    proximal_mu: float = Field(0.01, ge=0)
    round_timeout: float = Field(120.0, gt=0)
    seed: int = -1
    hidden: str = "64"
    pretrain_epochs: int = Field(0, ge=0)
    initial_params: str = Field("", description="params.npz of the model this run continues "
                                                "(its weights start the run; no pretraining)")
    package: str = Field("", description="an imported model's package (with its source/ "
                         "data, docs/bring-your-own-model.md): the run fine-tunes its head "
                         "on the devices' backbone embeddings instead of a task's MLP")
    db: str = "fl.db"
    out: str = ""
    formats: Literal["onnx", "tflite", "all"] = "onnx"

    def flower_config(self) -> dict[str, Any]:
        """The run config as Flower sees it (``-`` in keys)."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    def hidden_sizes(self) -> tuple[int, ...]:
        """Hidden layer sizes from ``"64"`` or ``"128,64"``."""
        try:
            return tuple(int(h) for h in self.hidden.split(",") if h.strip())
        except ValueError:
            raise UsageError(f"hidden must be comma-separated integers, not {self.hidden!r}") \
                from None

    def sampling_description(self) -> str:
        """How records (sample DP) or devices (client DP) are sampled, as accounted."""
        if self.dp == "sample":
            return (f"Poisson sampling of local records, q = {self.batch_size}/n per device, "
                    f"{self.local_steps} steps per round")
        if self.dp == "client":
            return "all sampled devices every round, accounted without amplification"
        return "none"

    def client_sigma(self) -> float:
        """Noise multiplier of the client-level Gaussian release for the target ε."""
        from edgefleet.device.privacy.accounting import noise_for_epsilon

        # Flower's client-level DP wrapper accounts with its RDP accountant: calibrate alike.
        return noise_for_epsilon(self.epsilon, self.delta, 1.0, self.num_rounds, "rdp")

    def train_config(self) -> dict[str, Any]:
        """What each device needs to train (and account) a round.

        No seed: a device's DP noise and sampling come from its own OS entropy, whatever
        the server sends (``seed`` only fixes the server's model initialization). Checked
        by the devices' own reader (:func:`~edgefleet.device.wire.federated.round_request`),
        so a run cannot start with a config every device would reject.
        """
        from edgefleet.device.wire.federated import round_request

        cfg: dict[str, Any] = {
            "dp": self.dp, "target-epsilon": self.epsilon, "delta": self.delta,
            "num-rounds": self.num_rounds, "local-steps": self.local_steps,
            "batch-size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
            "clip": self.clip}
        try:
            round_request(cfg)
        except ValueError as exc:
            raise UsageError(f"the run's {exc}") from None
        return {**cfg, **self.eval_config()}

    def eval_config(self) -> dict[str, Any]:
        """The public input normalization (computed once from the public split); for a
        head run, the backbone the devices' embeddings must come from."""
        if self.package:
            from edgefleet.device.runtime.manifest import load_package
            from edgefleet.device.wire.federated import HEAD_BACKBONE

            m = load_package(Path(self.package).expanduser())
            if m.head is None or m.head.backbone is None:
                raise UsageError(f"{self.package}: the package has no trainable head")
            return {HEAD_BACKBONE: m.files[m.head.backbone].sha256}
        from edgefleet.models.core.tasks import get_task
        from edgefleet.models.core.train import fit_normalization

        norm = fit_normalization(get_task(self.task).split().x_calib)
        return {"norm-mean": [float(v) for v in norm.mean],
                "norm-std": [float(v) for v in norm.std]}

    def initial_model(self) -> tuple[Any, Any, Any]:
        """(task, normalization, initial MLP), optionally pretrained on the public split."""
        from edgefleet.device.runtime.mlp import MLP
        from edgefleet.models.core.tasks import get_task
        from edgefleet.models.core.train import (
            TrainConfig,
            apply_normalization,
            fit_normalization,
            train_sgd,
        )

        task = get_task(self.task)
        split = task.split()
        norm = fit_normalization(split.x_calib)
        if self.initial_params:
            return task, norm, self._continued(task)
        model = MLP.init((task.n_features, *self.hidden_sizes(), task.n_classes),
                         seed=max(self.seed, 0))
        if self.pretrain_epochs:
            pre, _ = public_parts(split.y_calib)
            train_sgd(model, apply_normalization(split.x_calib[pre], norm), split.y_calib[pre],
                      TrainConfig(epochs=self.pretrain_epochs, seed=max(self.seed, 0)))
        return task, norm, model

    def _continued(self, task: Any) -> Any:
        """The parent model (``initial_params``), checked against the task's shapes."""
        from edgefleet.device.runtime.mlp import MLP, load_params

        try:
            model = MLP.from_params(load_params(Path(self.initial_params)))
        except (OSError, KeyError, ValueError) as exc:
            raise UsageError(f"cannot start from {self.initial_params}: {exc}") from None
        if (model.sizes[0], model.sizes[-1]) != (task.n_features, task.n_classes):
            raise UsageError(f"{self.initial_params} is a {model.sizes} model, not one for "
                             f"{task.name} ({task.n_features} features, {task.n_classes} "
                             "classes)")
        return model

    @staticmethod
    def normalized(x: npt.NDArray[np.floating], norm: Any) -> npt.NDArray[np.float32]:
        """Inputs normalized exactly as the devices do."""
        from edgefleet.models.core.train import apply_normalization

        return apply_normalization(x, norm)


def run_settings(run_config: dict[str, Any]) -> RunSettings:
    """Validate a Flower run config (``-`` keys) into :class:`RunSettings`."""
    return load_config(RunSettings, overrides={k.replace("-", "_"): v
                                               for k, v in run_config.items()
                                               if k != "app-signature"})  # app_trust


def build_strategy(s: RunSettings) -> Any:
    """Flower's FedAvg/FedProx/FedAdam/FedTrimmedAvg/FedMedian, DP-wrapped if asked.

    Norm bounding is not here: :class:`~edgefleet.server.fl.server_app.FleetStrategy`
    applies it to every reply before this strategy sees them.
    """
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

    weight_key = "dp-weight" if s.dp == "client" else "num-examples"
    common: dict[str, Any] = dict(
        fraction_train=s.fraction, fraction_evaluate=s.fraction, min_train_nodes=s.min_nodes,
        min_evaluate_nodes=s.min_nodes, min_available_nodes=s.min_nodes,
        weighted_by_key=weight_key)
    inner: Any
    if s.strategy == "fedprox":
        inner = FedProx(**common, proximal_mu=s.proximal_mu)
    elif s.strategy == "fedadam":
        inner = FedAdam(**common)
    elif s.strategy == "trimmed":
        inner = FedTrimmedAvg(**common, beta=s.trim_beta)
    elif s.strategy == "median":
        inner = FedMedian(**common)
    else:
        inner = FedAvg(**common)
    if s.dp != "client":
        return inner
    if s.strategy not in ("fedavg", "fedprox"):
        raise UsageError("client-level DP accounting needs FedAvg aggregation: use --strategy "
                         "fedavg or fedprox with --dp client")
    from flwr.serverapp import (
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    sampled = max(int(s.num_nodes * s.fraction), s.min_nodes)
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=s.delta, population_size=s.num_nodes,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return DifferentialPrivacyClientSideFixedClipping(
        inner, noise_multiplier=s.client_sigma(), clipping_norm=s.update_clip,
        num_sampled_clients=sampled, accountant=accountant)
