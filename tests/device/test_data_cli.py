"""``edgefleet-agent data``: stats show counts only; export needs its explicit flag and
warns; wipe empties the store."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np

from edgefleet.device.data.store import SampleStore
from tests.conftest import run_cli


def _setup(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    with SampleStore(state / "data" / "samples.db") as st:
        st.add_many([(np.full(4, i, np.float32), i % 3) for i in range(9)], "api", "m@1")
        st.add(np.zeros(4, np.float32), 2, "serial", "m@1")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "d1"\nstate_dir = "{state}"\n[model]\npackage = "/nope"\n')
    return cfg


def test_stats_export_wipe(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    res = run_cli("data", "stats", "-c", str(cfg), "--json", program="edgefleet-agent")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["total"] == 10 and s["by_source"] == {"api": 9, "serial": 1}
    assert s["by_class"] == {"0": 3, "1": 3, "2": 4}
    out = tmp_path / "export.npz"
    res = run_cli("data", "export", "-c", str(cfg), "--out", str(out), program="edgefleet-agent")
    assert res.returncode != 0 and "--i-understand-this-exports-private-data" in res.stderr
    assert not out.exists()
    res = run_cli("data", "export", "-c", str(cfg), "--out", str(out),
                  "--i-understand-this-exports-private-data", program="edgefleet-agent")
    assert res.returncode == 0, res.stderr
    assert "WARNING" in res.stderr and stat.S_IMODE(out.stat().st_mode) == 0o600
    with np.load(out) as f:
        assert f["x"].shape == (10, 4) and f["y"].tolist()[-1] == 2
    res = run_cli("data", "wipe", "-c", str(cfg), "--yes", program="edgefleet-agent")
    assert res.returncode == 0 and "wiped 10" in res.stdout
    res = run_cli("data", "stats", "-c", str(cfg), "--json", program="edgefleet-agent")
    assert json.loads(res.stdout)["total"] == 0


def test_eval_filters_by_source_and_answering_model(tmp_path: Path,
                                                    digits_package: Path) -> None:
    """`data eval --all --source serial --answered-by M@V`: every matching sample (the
    CNN demo's accuracy of the version that served a device's labelled frames)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target
    state = tmp_path / "state"
    with SampleStore(state / "data" / "samples.db") as st:
        st.add_many([(x[i], int(y[i])) for i in range(30)], "serial", "m@1")
        st.add_many([(x[i], int(y[i])) for i in range(30, 50)], "serial", "m@2")
        # wrong labels from another source: counted only when that source is asked for
        st.add_many([(x[i], (int(y[i]) + 1) % 10) for i in range(50, 60)], "api", "m@2")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "d1"\nstate_dir = "{state}"\n[model]\npackage = "/nope"\n')

    def ev(*args: str) -> dict[str, object]:
        res = run_cli("data", "eval", str(digits_package), "-c", str(cfg), "--json", *args,
                      program="edgefleet-agent")
        assert res.returncode == 0, res.stderr
        out: dict[str, object] = json.loads(res.stdout)
        return out

    assert ev("--all", "--source", "serial", "--answered-by", "m@1")["samples"] == 30
    serial = ev("--all", "--source", "serial", "--answered-by", "m@2")
    assert serial["samples"] == 20 and float(str(serial["accuracy"])) > 0.8
    wrong = ev("--all", "--source", "api")
    assert wrong["samples"] == 10 and float(str(wrong["accuracy"])) < 0.2
    assert ev("--all")["samples"] == 60
    held = ev()  # the held-out share, as before
    assert set(held) == {"held_out", "train", "accuracy"} and held["held_out"] < 60
    assert ev("--all", "--answered-by", "m@9") == {"samples": 0, "accuracy": None}
    res = run_cli("data", "eval", str(digits_package), "-c", str(cfg), "--source", "radio",
                  program="edgefleet-agent")
    assert res.returncode != 0 and "--source 'radio'" in res.stderr
