"""Poisoning-robust aggregation and per-device quality, with the real strategy and ClientApp.

One of five devices sends poisoned updates (the ``attack`` node-config, a test
facility). Trimmed mean and median keep the final accuracy within 2 points of the
clean FedAvg run; FedAvg does not. Shares are IID-like (Dirichlet α = 100): with
skewed shares, dropping a device's contribution costs accuracy by itself
(docs/bench/robust.md shows both).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from edgefleet.device.core.errors import ConfigError
from edgefleet.server.fl.robust import bound_update, bound_updates, device_spread
from edgefleet.server.fl.settings import build_strategy, run_settings
from tests.support.fl_attack import attack_settings, poison_update
from tests.support.robust import ATTACKER, DEVICES, run_inprocess


def test_bound_update_clips_only_long_updates() -> None:
    g = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]
    far = [np.full((2, 2), 3.0, np.float32), np.full(2, 4.0, np.float32)]  # norm sqrt(36+32)
    out, norm = bound_update(g, far, 2.0)
    assert norm == pytest.approx(np.sqrt(68.0))
    assert float(np.sqrt(sum(np.sum(o.astype(np.float64) ** 2) for o in out))) == \
        pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(out[0] / out[0].max(), 1.0)  # direction kept
    near = [np.full((2, 2), 0.1, np.float32), np.full(2, 0.1, np.float32)]
    same, _ = bound_update(g, near, 2.0)
    for a, b in zip(same, near, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bound_updates_rewrites_replies_and_skips_mismatched_shapes() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as a SuperExec
    g = ArrayRecord([np.zeros(3, np.float32), np.zeros(1, np.float32)])
    good = Message(RecordDict({"arrays": ArrayRecord([np.full(3, 10.0, np.float32),
                                                      np.zeros(1, np.float32)]),
                               "metrics": MetricRecord({"num-examples": 1})}),
                   dst_node_id=1, message_type="train")
    odd = Message(RecordDict({"arrays": ArrayRecord([np.ones(4, np.float32)])}),
                  dst_node_id=1, message_type="train")
    out, norms = bound_updates(g, [good, odd], 1.0)
    assert len(out) == 2 and norms == [pytest.approx(np.sqrt(300.0))]
    clipped = out[0].content.array_records["arrays"].to_numpy_ndarrays()
    assert float(np.linalg.norm(clipped[0])) == pytest.approx(1.0, rel=1e-6)
    assert out[1].content.array_records["arrays"].to_numpy_ndarrays()[0].shape == (4,)


def test_poison_update_and_device_spread() -> None:
    g, p = [np.ones(2, np.float32)], [np.full(2, 2.0, np.float32)]
    np.testing.assert_allclose(poison_update(g, p, "scale", 5.0)[0], 6.0)
    np.testing.assert_allclose(poison_update(g, p, "signflip", 5.0)[0], -4.0)
    np.testing.assert_allclose(poison_update(g, p, "", 5.0)[0], 2.0)
    spread = device_spread({7: 0.9, 3: 0.5, 11: 0.7})
    assert spread is not None
    assert (spread["min"], spread["median"], spread["max"], spread["worst"]) == (0.5, 0.7, 0.9, 3)
    assert spread["per_node"] == {"3": 0.5, "7": 0.9, "11": 0.7}
    assert device_spread({}) is None


def test_unknown_attack_and_client_dp_with_median_are_refused() -> None:
    with pytest.raises(ConfigError):
        attack_settings({"attack": "backdoor"})
    from edgefleet.device.core.errors import UsageError

    with pytest.raises(UsageError, match="FedAvg aggregation"):
        build_strategy(run_settings({"dp": "client", "strategy": "median"}))


@pytest.mark.slow
@pytest.mark.parametrize(("attack", "factor"), [("scale", 50.0), ("signflip", 10.0)])
def test_one_poisoning_device_of_five(attack: str, factor: float) -> None:
    clean = run_inprocess("fedavg").accuracy
    assert clean > 0.93
    fedavg = run_inprocess("fedavg", attack, factor).accuracy
    assert fedavg < clean - 0.02, f"FedAvg under {attack}: {fedavg:.4f} vs clean {clean:.4f}"
    for strategy in ("trimmed", "median"):
        robust = run_inprocess(strategy, attack, factor).accuracy
        assert robust >= clean - 0.02, f"{strategy} under {attack}: {robust:.4f} vs {clean:.4f}"


@pytest.mark.slow
def test_norm_bound_counts_and_blunts_a_scaled_update() -> None:
    clean = run_inprocess("fedavg", rounds=8).accuracy
    bounded = run_inprocess("fedavg", "scale", 50.0, norm_bound=3.0, rounds=8)
    unbounded = run_inprocess("fedavg", "scale", 50.0, rounds=8).accuracy
    assert unbounded < clean - 0.02
    assert bounded.accuracy >= clean - 0.02
    assert all(st["bounded"] >= 1 for st in bounded.strategy.stats.values())


@pytest.mark.slow
def test_federated_evaluation_is_kept_per_device() -> None:
    run = run_inprocess("fedavg", "signflip", 10.0, rounds=3)
    last = run.strategy.device_eval[3]
    assert len(last) == DEVICES
    spread = device_spread({n: a for n, (a, _) in last.items()})
    assert spread is not None
    accs = sorted(a for a, _ in last.values())
    assert spread["min"] == accs[0] and spread["max"] == accs[-1]
    assert spread["median"] == accs[DEVICES // 2]
    assert last[spread["worst"]][0] == accs[0]
    assert all(n > 0 for _, n in last.values())
    assert ATTACKER < DEVICES
