"""The production ClientApp on the agent's sample store: trains and evaluates on its own
split, and declines (counted as a decline, not a failure) when too few samples are stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from edgefleet.device.data.store import SampleStore, held_out, load_key, new_key
from edgefleet.device.fl import client as fl_client
from edgefleet.device.runtime.mlp import MLP
from edgefleet.device.wire.federated import ARRAYS, CONFIG, DECLINED_FEW_SAMPLES, is_decline
from edgefleet.server.fl.inprocess import InProcessGrid
from edgefleet.server.fl.settings import run_settings


def _msg(kind: str) -> Message:
    s = run_settings({"dp": "off", "local-steps": 2})
    model = MLP.init((64, 16, 10), seed=0)
    cfg = s.train_config() if kind == "train" else s.eval_config()
    return Message(content=RecordDict({ARRAYS: ArrayRecord(model.params),
                                       CONFIG: ConfigRecord(cfg)}),
                   dst_node_id=1000, message_type=kind)


def _store(tmp_path: Path, n: int, key: bytes | None = None) -> Path:
    rng = np.random.default_rng(n)
    with SampleStore(tmp_path / "samples.db", key=key) as st:
        if n:
            st.add_many([(rng.normal(size=64).astype(np.float32), int(rng.integers(10)))
                         for _ in range(n)], "serial", "digits@1")
    return tmp_path / "samples.db"


#: A device whose policy admits this test's non-private training and (noised) evaluation.
POLICY = {"privacy-min-mode": "off", "privacy-evaluation": "noised"}


def _reply(tmp_path: Path, node: dict[str, object], kind: str) -> Message:
    grid = InProcessGrid(fl_client.app, 1,
                         lambda i: {"state-dir": str(tmp_path), **POLICY, **node})
    return next(iter(grid.send_and_receive([_msg(kind)])))


def test_trains_and_evaluates_on_the_stores_split(tmp_path: Path) -> None:
    key_file = new_key(tmp_path / "keys" / "sample-store.key")
    path = _store(tmp_path, 60, load_key(key_file))
    node = {"sample-store": str(path), "sample-key": str(key_file), "min-samples": 20}
    with SampleStore(path, key=load_key(key_file)) as st:
        test = int(held_out(st.samples().ids).sum())
    train = _reply(tmp_path, node, "train")
    assert not train.has_error(), train.error.reason
    assert train.content.metric_records["metrics"]["num-examples"] == 60 - test
    ev = _reply(tmp_path, node, "evaluate")
    assert not ev.has_error(), ev.error.reason
    assert ev.content.metric_records["metrics"]["num-examples"] == test


def test_too_few_samples_is_a_decline_with_its_own_code(tmp_path: Path) -> None:
    for n in (0, 5):
        node = {"sample-store": str(_store(tmp_path / str(n), n)), "min-samples": 20}
        for kind in ("train", "evaluate"):
            reply = _reply(tmp_path / str(n), node, kind)
            assert reply.has_error() and reply.error.code == DECLINED_FEW_SAMPLES
            assert f"few samples: {n} stored, min-samples is 20" in (reply.error.reason or "")
    assert is_decline(DECLINED_FEW_SAMPLES)
    missing = _reply(tmp_path, {"sample-store": str(tmp_path / "nope.db")}, "train")
    assert missing.error.code == DECLINED_FEW_SAMPLES
    assert not (tmp_path / "nope.db").exists()  # a reader never creates a store
