"""The ServerApp: FedAvg (or FedProx/FedAdam/trimmed mean/median) with DP, a package at the end.

The SuperLink starts this in its own process for every run; everything it needs comes
from the run config (``flwr run -c``), and everything it produces goes to the server's
SQLite database (:class:`~edgefleet.server.fl.store.FlStore`) and the model package.

What is public (the server holds it; no device does): the task's calibration split,
used for input normalization, temperature calibration and optional pretraining, and
the test split used for server-side evaluation. Devices hold only shares of the
training split.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.app.typing import MetricRecordValues
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from edgefleet.device.wire.federated import DECLINE_REASONS, is_decline
from edgefleet.server.fl.robust import bound_updates, device_spread
from edgefleet.server.fl.settings import (
    RunSettings,
    build_strategy,
    public_parts,
    run_settings,
)
from edgefleet.server.fl.store import FlStore, RoundRow, declines_by_reason

__all__ = ["FleetStrategy", "app"]

log = logging.getLogger(__name__)


def _number(rec: MetricRecord, key: str, default: int | None = None) -> int | float:
    """The numeric metric ``key`` of a record (``default`` when absent, if given; absent
    without one is a KeyError); a list where a number belongs is a clear ValueError."""
    value: MetricRecordValues = rec[key] if default is None or key in rec else default
    if not isinstance(value, int | float):
        raise ValueError(f"metric {key!r} is not a number: {value!r}")
    return value


class FleetStrategy(Strategy):
    """Wraps a Flower strategy: declined nodes are set aside, each round's facts are kept.

    A device over its privacy budget, outside its privacy policy or with a ledger it
    cannot trust replies with a decline; passing it on would make Flower's DP wrappers
    skip the whole round ("errors are not allowed"), so declines never reach the inner
    strategy and are counted instead, by reason (``budget``, ``policy``, ``ledger``).
    """

    def __init__(self, inner: Strategy, s: RunSettings) -> None:
        self.inner = inner
        self.s = s
        self.sampled: dict[int, int] = {}
        self.stats: dict[int, dict[str, Any]] = {}
        self.device_eps: dict[int, float] = {}
        self.device_events: dict[int, list[dict[str, float]]] = {}
        #: Federated evaluation per round: ``{round: {node: (accuracy, examples)}}``.
        self.device_eval: dict[int, dict[int, tuple[float, int]]] = {}
        self.bytes_down = 0
        self.round_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Inner sampling, plus the DP/training settings every device needs."""
        for key, value in self.s.train_config().items():
            config[key] = value
        msgs = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = len(msgs)
        self.round_arrays = arrays
        self.bytes_down = arrays.count_bytes()
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop declines, count failures, remember each device's ε, then aggregate."""
        ok: list[Message] = []
        declined = failed = 0
        reasons: dict[str, int] = {}
        for msg in replies:
            if msg.has_error():
                if is_decline(msg.error.code):
                    declined += 1
                    why = DECLINE_REASONS[msg.error.code]
                    reasons[why] = reasons.get(why, 0) + 1
                    log.info("node %d declined (%s): %s", msg.metadata.src_node_id, why,
                             msg.error.reason)
                else:
                    failed += 1
                    log.warning("node %d failed: %s", msg.metadata.src_node_id, msg.error.reason)
            else:
                ok.append(msg)
        missing = self.sampled.get(server_round, 0) - declined - failed - len(ok)
        up = [sum(r.count_bytes() for r in m.content.array_records.values()) for m in ok]
        for m in ok:
            metrics = next(iter(m.content.metric_records.values()), None)
            if metrics is not None and "epsilon" in metrics:
                node = m.metadata.src_node_id
                self.device_eps[node] = max(self.device_eps.get(node, 0.0),
                                            float(_number(metrics, "epsilon")))
                self.device_events.setdefault(node, []).append(
                    {k: float(_number(metrics, k)) for k in ("q", "sigma", "steps")})
        self.stats[server_round] = {
            "nodes": len(ok), "declined": declined, "declines": reasons,
            "failed": failed + max(missing, 0),
            "bytes_up": int(sum(up) / len(up)) if up else None}
        if not ok:
            return None, None
        if self.s.norm_bound > 0 and self.round_arrays is not None:
            ok, norms = bound_updates(self.round_arrays, ok, self.s.norm_bound)
            self.stats[server_round]["bounded"] = sum(n > self.s.norm_bound for n in norms)
            self.stats[server_round]["update_norms"] = norms
            log.info("round %d: update norms %s, %d bounded to %g", server_round,
                     [round(n, 3) for n in norms], self.stats[server_round]["bounded"],
                     self.s.norm_bound)
        return self.inner.aggregate_train(server_round, ok)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation needs the same normalization as training."""
        for key, value in self.s.eval_config().items():
            config[key] = value
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Weighted mean of the devices' held-out metrics (declines and errors left out).

        Each device's own accuracy is kept too, so a run reports its worst device.
        """
        ok = [m for m in replies if not m.has_error()]
        per_node: dict[int, tuple[float, int]] = {}
        for m in ok:
            rec = next(iter(m.content.metric_records.values()), None)
            if rec is not None and "eval-accuracy" in rec:
                per_node[m.metadata.src_node_id] = (
                    float(_number(rec, "eval-accuracy")),
                    int(_number(rec, "num-examples", 0)))
        self.device_eval[server_round] = per_node
        res = self.inner.aggregate_evaluate(server_round, ok) if ok else None
        if res is not None and "eval-accuracy" in res:
            self.stats.setdefault(server_round, {})["fed_accuracy"] = float(
                _number(res, "eval-accuracy"))
        return res

    def epsilon(self) -> float | None:
        """ε of this run so far: the worst device (sample DP) or the server accountant's."""
        if self.s.dp == "off":
            return None
        if self.s.dp == "client":
            spent = getattr(self.inner, "privacy_spent", lambda: None)()
            return float(spent.epsilon) if spent is not None and spent.num_releases else 0.0
        return max(self.device_eps.values(), default=0.0)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds, store metrics each round, package the global model."""
    s = run_settings(dict(context.run_config))
    store = FlStore(Path(s.db))
    store.start_run(s.tag, str(context.run_id), s.model_dump())
    try:
        _run(grid, context, s, store)
    except BaseException as exc:
        store.finish_run(s.tag, None, error=f"{type(exc).__name__}: {exc}")
        log.error("run %s failed: %s", s.tag, traceback.format_exc())
        raise


def _temperature(model: Any, s: RunSettings, norm: Any) -> float:
    """The package's temperature, fitted on the part of the public split that no
    pretraining saw (see :func:`~edgefleet.server.fl.settings.public_parts`)."""
    from edgefleet.models.core.calibration import fit_temperature
    from edgefleet.models.core.tasks import get_task

    split = get_task(s.task).split()
    _, hold = public_parts(split.y_calib)
    return fit_temperature(model.forward(s.normalized(split.x_calib[hold], norm)),
                           split.y_calib[hold])


def _run(grid: Grid, context: Context, s: RunSettings, store: FlStore) -> None:
    from edgefleet.device.runtime.mlp import MLP
    from edgefleet.models.build.pipeline import package_model

    job = None
    if s.package:  # fine-tune an imported model's head (server/fl/head.py)
        from edgefleet.server.fl.head import HeadJob

        job = HeadJob.open(s.package)
        initial, xt, yt = job.initial, job.x_eval, job.y_eval
    else:
        task, norm, initial = s.initial_model()
        split = task.split()
        xt, yt = s.normalized(split.x_test, norm), split.y_test
    strategy = FleetStrategy(build_strategy(s), s)
    clock = {"t": time.monotonic()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = MLP.from_params(arrays.to_numpy_ndarrays())
        acc, loss = model.accuracy(xt, yt), model.loss(xt, yt)
        st = strategy.stats.get(server_round, {})
        now = time.monotonic()
        store.add_round(s.tag, RoundRow(
            round=server_round, accuracy=acc, loss=loss, nodes=st.get("nodes", 0),
            declined=st.get("declined", 0), failed=st.get("failed", 0),
            declines=st.get("declines") if server_round else None,
            epsilon=strategy.epsilon() if server_round else (None if s.dp == "off" else 0.0),
            fed_accuracy=st.get("fed_accuracy"),
            seconds=now - clock["t"] if server_round else None,
            bytes_down=strategy.bytes_down if server_round else None,
            bytes_up=st.get("bytes_up")))
        if strategy.device_eval.get(server_round):
            store.add_device_evals(s.tag, server_round, strategy.device_eval[server_round])
        clock["t"] = now
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial.params),
                            num_rounds=s.num_rounds, timeout=s.round_timeout,
                            evaluate_fn=evaluate)
    final_arrays = result.arrays if len(result.arrays) else ArrayRecord(initial.params)
    final_model = MLP.from_params(final_arrays.to_numpy_ndarrays())
    eps = strategy.epsilon()
    rounds = store.rounds(s.tag)
    last_eval = strategy.device_eval.get(s.num_rounds, {})
    nodes = sorted(strategy.device_events)
    lineage = {
        "source": "federated", "flower_run_id": str(context.run_id), "run": s.tag,
        "rounds": s.num_rounds, "strategy": s.strategy, "node_count": max(
            (r.nodes for r in rounds), default=0),
        "dp": {"mode": s.dp, "epsilon": eps, "delta": s.delta if s.dp != "off" else None,
               "target_epsilon": s.epsilon if s.dp != "off" else None,
               "clip": s.clip if s.dp == "sample" else s.update_clip,
               "sampling": s.sampling_description(),
               "accountant": "RDP (dp-accounting)" if s.dp != "off" else None},
        "robust": {"norm_bound": s.norm_bound or None,
                   "trim_beta": s.trim_beta if s.strategy == "trimmed" else None},
    }
    package = None
    if s.out and job is not None:
        lineage["head"] = {"package": job.manifest.name, "version": job.manifest.version}
        package = str(job.package(final_model, Path(s.out), lineage))
    elif s.out:
        package = str(package_model(task, final_model, norm, Path(s.out), formats=s.formats,
                                    name=f"{task.name}-fl", lineage=lineage,
                                    temperature=_temperature(final_model, s, norm)).path)
    store.finish_run(s.tag, {
        "accuracy": rounds[-1].accuracy if rounds else None, "epsilon": eps,
        "delta": s.delta if s.dp != "off" else None, "package": package,
        "declines": declines_by_reason(rounds),
        "devices": [{"node": n, "epsilon": strategy.device_eps.get(n),
                     "accuracy": last_eval[n][0] if n in last_eval else None,
                     "events": strategy.device_events[n]} for n in nodes],
        "device_accuracy": device_spread({n: a for n, (a, _) in last_eval.items()}),
        "lineage": lineage})
