"""The production ClientApp: stored samples only, no attack, and the device's privacy policy.

The round config is what a (possibly curious) server asks; these tests call the ClientApp
the way its SuperNode does and check that nothing the server sends weakens the device's
protection: DP off, client-level DP, a seed, ε/δ/q/σ outside the policy, a lie about the
number of rounds, evaluation on held-out records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from edgefleet.device.core.errors import ConfigError
from edgefleet.device.fl import client as fl_client
from edgefleet.device.privacy.ledger import PrivacyLedger
from edgefleet.device.runtime.mlp import MLP
from edgefleet.device.wire.federated import (
    ARRAYS,
    CONFIG,
    DECLINED_LEDGER,
    DECLINED_POLICY,
    METRICS,
    REJECTED_INPUT,
    is_decline,
)
from edgefleet.models.sim.fl_app import app as sim_app
from edgefleet.server.fl.inprocess import InProcessGrid
from edgefleet.server.fl.settings import run_settings

MODEL = MLP.init((64, 16, 10), seed=0)


def _msg(kind: str = "train", **overrides: Any) -> Message:
    s = run_settings({"dp": "sample", "local-steps": 2, "num-rounds": 3, "epsilon": 3.0})
    cfg = {**s.train_config(), "server-round": 1, **overrides}
    return Message(content=RecordDict({ARRAYS: ArrayRecord(MODEL.params),
                                       CONFIG: ConfigRecord(cfg)}),
                   dst_node_id=1000, message_type=kind)


def _device(tmp_path: Path, n: int = 200, **node: Any) -> InProcessGrid:
    if not (tmp_path / "samples.npz").exists():
        rng = np.random.default_rng(1)
        np.savez(tmp_path / "samples.npz", x=rng.normal(size=(n, 64)).astype(np.float32),
                 y=rng.integers(0, 10, size=n))
    return InProcessGrid(fl_client.app, 1, lambda i: {
        "state-dir": str(tmp_path), "data": str(tmp_path / "samples.npz"), **node})


def _ask(grid: InProcessGrid, msg: Message) -> Message:
    return next(iter(grid.send_and_receive([msg])))


def _update(reply: Message) -> list[np.ndarray]:
    assert not reply.has_error(), reply.error.reason
    return list(reply.content.array_records[ARRAYS].to_numpy_ndarrays())


def test_without_stored_samples_the_device_declines_instead_of_using_public_data(
        tmp_path: Path) -> None:
    grid = InProcessGrid(fl_client.app, 1, lambda i: {"state-dir": str(tmp_path)})
    reply = _ask(grid, _msg())
    assert reply.has_error()
    assert reply.error.code == REJECTED_INPUT
    assert "no local samples" in (reply.error.reason or "")


def test_with_stored_samples_the_device_trains_and_releases_no_training_statistic(
        tmp_path: Path) -> None:
    reply = _ask(_device(tmp_path, n=40), _msg())
    _update(reply)
    metrics = reply.content.metric_records[METRICS]
    assert metrics["num-examples"] == 32  # 80 % of 40
    # The update and the DP parameters it was made with; no loss of the private records.
    assert set(metrics) == {"num-examples", "dp-weight", "q", "steps", "sigma", "epsilon",
                            "epsilon-total", "budget"}


@pytest.mark.parametrize("key", ["attack", "attack-factor"])
def test_no_node_config_switches_on_an_attack(key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("-", "_")):
        fl_client.node_settings({key: "scale" if key == "attack" else 10})


@pytest.mark.parametrize(("ask", "node", "why"), [
    ({"dp": "off"}, {}, "dp='off' asked"),
    ({"dp": "client"}, {}, "dp='client' asked"),
    ({"dp": "off"}, {"privacy-min-mode": "client"}, "dp='off' asked"),
    ({"target-epsilon": 8.0}, {}, "per-run maximum"),
    ({"delta": 1e-3}, {}, "δ=0.001 asked"),
    ({"batch-size": 150}, {"privacy-max-sampling-rate": 0.5}, "sampling rate"),
    ({"target-epsilon": 5.0, "num-rounds": 1, "local-steps": 1},
     {"privacy-min-noise-multiplier": 1.0}, "noise multiplier"),
])
def test_a_request_outside_the_policy_is_declined_and_nothing_is_recorded(
        tmp_path: Path, ask: dict[str, Any], node: dict[str, Any], why: str) -> None:
    reply = _ask(_device(tmp_path, **node), _msg(**ask))
    assert reply.has_error() and reply.error.code == DECLINED_POLICY
    assert is_decline(reply.error.code)
    assert why in (reply.error.reason or "")
    assert not reply.content.array_records if reply.has_content() else True
    assert not PrivacyLedger(tmp_path / "privacy-ledger.json", 10.0).entries


def test_the_policy_may_allow_weaker_modes(tmp_path: Path) -> None:
    grid = _device(tmp_path, **{"privacy-min-mode": "off"})
    _update(_ask(grid, _msg(dp="off")))
    assert not PrivacyLedger(tmp_path / "privacy-ledger.json", 10.0).entries


def test_a_stricter_request_is_accepted(tmp_path: Path) -> None:
    reply = _ask(_device(tmp_path), _msg(**{"target-epsilon": 1.0, "delta": 1e-7}))
    _update(reply)
    assert reply.content.metric_records[METRICS]["epsilon"] <= 1.0


def test_the_run_limit_holds_when_the_server_lies_about_the_number_of_rounds(
        tmp_path: Path) -> None:
    grid = _device(tmp_path)
    lie = {"target-epsilon": 4.5, "num-rounds": 1}  # then asks for round after round
    replies = [_ask(grid, _msg(**lie, **{"server-round": r})) for r in range(1, 6)]
    trained = [r for r in replies if not r.has_error()]
    assert 1 <= len(trained) < 5
    assert all(r.error.code == DECLINED_POLICY for r in replies[len(trained):])
    assert "per-run maximum" in (replies[-1].error.reason or "")
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json", 10.0)
    assert len(ledger.entries) == len(trained)
    assert ledger.run_spent("1") <= 5.0


def test_the_server_seed_does_not_reach_the_noise(tmp_path: Path) -> None:
    grid = _device(tmp_path)
    a = _update(_ask(grid, _msg(seed=7, **{"target-epsilon": 1.0})))
    b = _update(_ask(grid, _msg(seed=7, **{"target-epsilon": 1.0})))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_only_the_insecure_node_flag_makes_noise_reproducible(tmp_path: Path) -> None:
    grid = _device(tmp_path, **{"insecure-reproducible-noise-seed": 5})
    a = _update(_ask(grid, _msg(**{"target-epsilon": 1.0})))
    b = _update(_ask(grid, _msg(**{"target-epsilon": 1.0})))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_enrolled_device_without_its_ledger_declines(tmp_path: Path) -> None:
    reply = _ask(_device(tmp_path, **{"privacy-ledger-required": True}), _msg())
    assert reply.has_error() and reply.error.code == DECLINED_LEDGER
    assert "missing" in (reply.error.reason or "")
    PrivacyLedger.initialize(tmp_path / "privacy-ledger.json")  # what enrollment does
    _update(_ask(_device(tmp_path, **{"privacy-ledger-required": True}), _msg()))


def test_evaluation_on_held_out_records_is_off_by_default(tmp_path: Path) -> None:
    reply = _ask(_device(tmp_path), _msg("evaluate"))
    assert reply.has_error() and reply.error.code == DECLINED_POLICY
    assert "evaluation" in (reply.error.reason or "")


def test_noised_evaluation_is_accounted(tmp_path: Path) -> None:
    grid = _device(tmp_path, **{"privacy-evaluation": "noised",
                                "privacy-eval-noise-multiplier": 30.0})
    accs = []
    for r in (1, 2):
        reply = _ask(grid, _msg("evaluate", **{"server-round": r}))
        assert not reply.has_error(), reply.error.reason
        m = reply.content.metric_records[METRICS]
        assert 0.0 <= m["eval-accuracy"] <= 1.0 and m["eval-loss"] >= 0.0
        assert m["eval-sigma"] == 30.0
        accs.append(m["eval-accuracy"])
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json", 10.0)
    assert [(e.kind, e.q, e.sigma, e.steps) for e in ledger.entries] == [
        ("evaluate", 1.0, 30.0, 1)] * 2
    assert 0 < ledger.spent() < 1.0


@pytest.mark.parametrize("server_round", ["many", -2])
def test_a_malformed_evaluation_round_is_rejected_and_nothing_is_recorded(
        tmp_path: Path, server_round: object) -> None:
    """The round number labels the ledger entry: read with the training round's rules."""
    grid = _device(tmp_path, **{"privacy-evaluation": "noised"})
    reply = _ask(grid, _msg("evaluate", **{"server-round": server_round}))
    assert reply.has_error() and reply.error.code == REJECTED_INPUT, reply.error
    assert "server-round" in (reply.error.reason or "")
    assert not (tmp_path / "privacy-ledger.json").exists() or not PrivacyLedger(
        tmp_path / "privacy-ledger.json", 10.0).entries


def test_the_simulated_app_evaluates_its_public_share_exactly(tmp_path: Path) -> None:
    grid = InProcessGrid(sim_app, 1, lambda i: {"state-dir": str(tmp_path)})
    cfg = {**run_settings({}).eval_config(), "server-round": 1}
    msg = Message(content=RecordDict({ARRAYS: ArrayRecord(MODEL.params),
                                      CONFIG: ConfigRecord(cfg)}),
                  dst_node_id=1000, message_type="evaluate")
    a, b = (_ask(grid, msg).content.metric_records[METRICS]["eval-accuracy"] for _ in "ab")
    assert a == b


@pytest.mark.parametrize(("key", "value"), [
    ("batch-size", float("nan")), ("batch-size", -5), ("local-steps", -1),
    ("local-steps", "many"), ("clip", float("inf")), ("num-rounds", 0), ("lr", 0.0),
    ("momentum", 1.5), ("server-round", -2), ("delta", 2.0),
])
def test_a_malformed_round_config_is_rejected_not_raised(tmp_path: Path, key: str,
                                                         value: object) -> None:
    """A hostile server's numbers are refused before any of them reaches training."""
    from edgefleet.device.wire.federated import round_request

    cfg = {"dp": "sample", "target-epsilon": 3.0, "delta": 1e-5, "num-rounds": 2, key: value}
    with pytest.raises(ValueError, match=key):
        round_request(cfg)
    ok = round_request({"dp": "sample", "target-epsilon": 3.0, "delta": 1e-5,
                        "num-rounds": 2, "norm-mean": [0.0]})  # other keys are ignored
    assert ok.local_steps == 20 and ok.batch_size == 32


def test_the_server_cannot_start_a_run_every_device_would_reject() -> None:
    """Both ends read the round config with the same function (device/wire/federated)."""
    from edgefleet.device.core.errors import UsageError

    with pytest.raises(UsageError, match="local-steps"):
        run_settings({"local-steps": 2_000_000}).train_config()
    assert run_settings({"local-steps": 1_000_000}).train_config()["local-steps"] == 1_000_000
