"""One convention: commands find endpoints, credentials and stores in the fleet home;
flags override; a missing store or registry is an error, never a new empty one; the
registry lists what an operator needs; FL results become the next version of their base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgefleet.device.runtime.manifest import read_manifest
from edgefleet.server.cli.home_opts import mqtt_for, registry_path, store_target
from edgefleet.server.cli.train_cmd import _as_next_version, _base
from edgefleet.server.fleet.home import FleetHome
from tests.conftest import run_cli


def test_services_read_the_home_and_flags_override(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    home = FleetHome.create(tmp_path / "h", server={"broker_local_port": 2884})
    monkeypatch.delenv("EDGEFLEET_MQTT_PASSWORD", raising=False)
    monkeypatch.delenv("EDGEFLEET_MQTT_USERNAME", raising=False)
    cfg = mqtt_for("ingest", home.root)
    assert (cfg.host, cfg.port, cfg.username) == ("127.0.0.1", 2884, "ingest")
    assert cfg.password is None and cfg.password_file == home.root / "services/ingest.password"
    assert cfg.secret() == home.service_credentials("ingest").password
    over = mqtt_for("scorer", home.root, broker="mqtt.example.org:8883",
                    broker_ca=tmp_path / "ca.pem")
    assert (over.host, over.port, over.username, over.ca_file) == (
        "mqtt.example.org", 8883, "scorer", tmp_path / "ca.pem")
    monkeypatch.setenv("EDGEFLEET_MQTT_PASSWORD", "from-env")
    assert mqtt_for("operator", home.root).secret() == "from-env"
    # stores: the home's, unless told otherwise; an explicit missing one is an error
    assert store_target(None, home.root, must_exist=False) == str(home.root / "fleet.db")
    assert registry_path(None, home.root) == home.root / "registry"
    with pytest.raises(Exception, match="no fleet store"):
        store_target(str(tmp_path / "typo.db"), home.root)


def test_missing_registry_and_store_are_errors(tmp_path: Path) -> None:
    home = FleetHome.create(tmp_path / "h")
    env = {"EDGEFLEET_HOME": str(home.root)}
    wrong = tmp_path / "no-such-registry"
    res = run_cli("rollout", "guard", "--once", "--json", "--registry", str(wrong), env=env)
    assert res.returncode == 64 and "no model registry" in res.stderr, res.stderr
    assert not wrong.exists()
    res = run_cli("fleet", "ls", env=env)
    assert res.returncode == 64 and str(home.root / "fleet.db") in res.stderr
    res = run_cli("alerts", "--db", str(tmp_path / "typo.db"), env=env)
    assert res.returncode == 64 and "typo.db" in res.stderr


def test_help_texts_keep_bracketed_words() -> None:
    out = run_cli("ingest", "run", "--help", env={"COLUMNS": "200"}).stdout
    assert "[ingest] table" in out
    out = run_cli("enroll", "--help", program="edgefleet-agent", env={"COLUMNS": "200"}).stdout
    assert "[default: <state-dir>/agent.toml]" in out


@pytest.mark.slow
def test_registry_ls_fl_next_version_and_tau_warning(tmp_path: Path,
                                                     digits_package: Path) -> None:
    env = {"EDGEFLEET_HOME": str(tmp_path / "h")}
    assert run_cli("keys", "init", env=env).returncode == 0
    pushed = run_cli("registry", "push", str(digits_package), "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "never ask the cloud scorer" in pushed.stderr  # plain `models build`: no τ
    base = json.loads(pushed.stdout)
    # an FL run's package becomes the next version of the model it started from
    fl = tmp_path / "fl-pkg"
    shutil.copytree(digits_package, fl)
    name, version, params = _base(base["name"], None, tmp_path / "h", "digits", tmp_path / "w")
    assert (name, version) == (base["name"], base["version"])
    assert params.name == "params.npz" and params.is_file()  # the run starts from these
    _as_next_version(fl, (name, version))
    m = read_manifest(fl)
    major, minor = (int(x) for x in base["version"].split(".")[:2])
    assert (m.name, m.version) == (base["name"], f"{major}.{minor + 1}.0")
    assert m.lineage["parent"] == f"{base['name']}@{base['version']}"
    res = run_cli("registry", "push", str(fl), env=env)
    assert res.returncode == 0, res.stderr
    table = run_cli("registry", "ls", env=env).stdout
    assert f"{base['name']}@{base['version']}" in table, table  # the parent column
    assert " - " not in table.split("\n", 3)[-1].split(base["version"])[1][:12]  # accuracy
    row = next(line for line in table.splitlines() if f"{major}.{minor + 1}.0" in line)
    assert "0.9" in row
    ro = run_cli("rollout", f"{m.name}@{m.version}", "--devices", "pi-01",
                 "--broker", "127.0.0.1:9", env=env, timeout=60)
    assert "never ask the cloud scorer" in ro.stderr


def test_retraining_runs_as_the_next_version_of_its_base(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet.server.retrain import actions
    from edgefleet.server.retrain.policy import RetrainPolicy

    calls: list[list[str]] = []

    def fake(step: str, args: list[str], timeout: float) -> dict[str, object]:
        calls.append(args)
        return {"package": str(tmp_path / "pkg"), "final": {"accuracy": 0.9}}

    monkeypatch.setattr(actions, "_json_cli", fake)
    run = actions.TrainCommand(tmp_path / "work", 2, registry=tmp_path / "reg")
    run("lab", RetrainPolicy(superlink="127.0.0.1:9092", base_model="digits-mlp"))
    args = calls[0]
    assert args[args.index("--base") + 1] == "digits-mlp"
    assert args[args.index("--registry") + 1] == str(tmp_path / "reg")
