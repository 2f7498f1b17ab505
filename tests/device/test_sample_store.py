"""The local sample store and the label intake, on real SQLite files."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.core.errors import EdgefleetError, InputError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.data.labels import AnswerMemory, LabelIntake, LabelRefused
from edgefleet.device.data.store import SampleStore, StoreLimits, held_out, load_key, new_key


def _x(v: float, n: int = 4) -> np.ndarray:
    return np.full(n, v, dtype=np.float32)


def test_rows_round_trip_with_owner_only_files(tmp_path: Path) -> None:
    path = tmp_path / "data" / "samples.db"
    with SampleStore(path, metrics=Metrics()) as st:
        ids = st.add_many([(_x(1), 0), (_x(2), 1), (_x(3), 1)], "api", "m@1")
        st.add(_x(4), 2, "serial", "m@2")
        got = st.samples()
        assert got.ids.tolist() == [*ids, ids[-1] + 1]
        assert got.y.tolist() == [0, 1, 1, 2] and got.x[:, 0].tolist() == [1, 2, 3, 4]
        assert got.models == ["m@1", "m@1", "m@1", "m@2"]  # which model answered each
        s = st.stats(by_model=True)
        assert s["by_source"] == {"api": 3, "serial": 1}
        assert s["by_model"] == {"m@1": 3, "m@2": 1} and list(s["by_model"]) == ["m@1", "m@2"]
        assert "by_model" not in st.stats()  # the telemetry loop's call does not scan for it
        assert s["by_class"] == {"0": 1, "1": 2, "2": 1} and s["total"] == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_bounds_evict_the_oldest(tmp_path: Path) -> None:
    m = Metrics()
    with SampleStore(tmp_path / "s.db", limits=StoreLimits(max_samples=5, max_bytes=1 << 20,
                                                           max_age_s=100), metrics=m) as st:
        st.add(_x(0), 0, "api", "m", ts=1.0)  # too old once the next arrive
        for i in range(8):
            st.add(_x(i + 1), 0, "api", "m", ts=1000.0 + i)
        assert st.samples().x[:, 0].tolist() == [4, 5, 6, 7, 8]
        assert m.counter("data_evicted") == 4
    with SampleStore(tmp_path / "b.db", limits=StoreLimits(max_bytes=16 * 3), metrics=m) as st:
        for i in range(5):
            st.add(_x(i), 0, "api", "m")
        assert st.count() == 3


def test_encrypted_rows_need_the_key(tmp_path: Path) -> None:
    key = load_key(new_key(tmp_path / "keys" / "samples.key"))
    with SampleStore(tmp_path / "s.db", key=key) as st:
        st.add(_x(0.123456), 3, "import", "m@1")
        assert st.samples().x[0, 0] == np.float32(0.123456)
    raw = (tmp_path / "s.db").read_bytes()
    assert np.float32(0.123456).tobytes() not in raw
    with SampleStore(tmp_path / "s.db") as st, pytest.raises(EdgefleetError, match="encrypted"):
        st.samples()
    other = load_key(new_key(tmp_path / "other.key"))
    with SampleStore(tmp_path / "s.db", key=other) as st, \
            pytest.raises(EdgefleetError, match="decrypt"):
        st.samples()
    (tmp_path / "other.key").chmod(0o644)
    with pytest.raises(EdgefleetError, match="readable"):
        load_key(tmp_path / "other.key")


def test_wipe_leaves_nothing(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "s.db") as st:
        st.add_many([(_x(7.77), 1)] * 50, "api", "m")
        assert st.wipe() == 50
        assert st.count() == 0
    assert np.float32(7.77).tobytes() not in (tmp_path / "s.db").read_bytes()


def test_split_is_deterministic_and_stable() -> None:
    ids = np.arange(1, 2001)
    a = held_out(ids)
    assert a.tolist() == held_out(ids).tolist()
    assert held_out(ids[100:]).tolist() == a[100:].tolist()  # a row keeps its side
    assert 0.15 < a.mean() < 0.25


class _Model:
    labels = ("a", "b", "c")

    def validate(self, x: Any) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
        if arr.shape[1] != 4:
            raise InputError(f"shape {arr.shape}", reason="shape")
        if not np.all(np.isfinite(arr)):
            raise InputError("nan", reason="nonfinite")
        return arr


def _intake(tmp_path: Path, m: Metrics, enabled: set[str] | None = None) -> LabelIntake:
    model = _Model()
    return LabelIntake(SampleStore(tmp_path / "s.db", metrics=m), model.validate,
                       lambda: list(model.labels), lambda: "m@1",
                       enabled={"api", "serial"} if enabled is None else enabled,
                       memory=AnswerMemory(8), metrics=m)


def test_bad_labels_are_refused_counted_and_not_stored(tmp_path: Path) -> None:
    m = Metrics()
    intake = _intake(tmp_path, m)
    aid = intake.memory.remember(_x(1), "m@1", frame=(1, 5))
    out = intake.label_many([
        {"answer": aid, "class": "b"},                 # stored
        {"input": [1, 2, 3, 4], "class": 2},           # stored
        {"input": [1, 2, 3, 4], "class": 3},           # unknown class
        {"input": [1, 2, 3, 4], "class": "zebra"},     # unknown class
        {"input": [1, 2, 3, 4], "class": True},        # unknown class
        {"answer": "nope-1", "class": 0},              # unknown answer
        {"input": [1, 2, 3], "class": 0},              # wrong shape
        {"input": [1, float("nan"), 3, 4], "class": 0},  # NaN
        {"class": 0},                                  # neither
    ], "api")
    assert out["stored"] == 2
    assert [r["reason"] for r in out["refused"]] == [
        "unknown_class", "unknown_class", "unknown_class", "unknown_answer", "bad_input",
        "not_finite", "bad_request"]
    assert intake.store.count() == 2
    assert m.counter("data_labels_refused_unknown_class") == 3
    assert m.counter("data_labels_refused_not_finite") == 1
    assert intake.label_frame(1, 5, 0) > 0
    with pytest.raises(LabelRefused) as e:
        intake.label_frame(1, 6, 0)
    assert e.value.reason == "unknown_answer"
    intake_off = _intake(tmp_path / "off", m, enabled={"serial"})
    with pytest.raises(LabelRefused) as e:
        intake_off.label_input([1, 2, 3, 4], 0, "api")
    assert e.value.reason == "source_disabled"
    assert intake_off.store.count() == 0
