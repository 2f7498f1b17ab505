"""Fleet home, bundles and their installation (no broker, no SuperLink: those are in
test_fleet_acl.py and tests/e2e/test_enroll_revoke.py)."""

from __future__ import annotations

import io
import stat
import tarfile
import tomllib
from pathlib import Path

import pytest

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.device.core.config import dump_toml
from edgefleet.device.core.errors import ConfigError, UsageError
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.server.fleet.app_signing import fleet_key
from edgefleet.server.fleet.broker_acl import verify_password
from edgefleet.server.fleet.enrollment import enroll_device, register_pending, revoke_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.pki import init_certs


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    certs = init_certs(tmp_path / "certs")
    root = tmp_path / "root.json"
    root.write_text('{"signed": {}}')
    return FleetHome.create(tmp_path / "home", broker_port=18830,
                            superlink="127.0.0.1:9092", superlink_ca=certs.ca,
                            metadata_url="http://127.0.0.1:9/metadata/",
                            targets_url="http://127.0.0.1:9/targets/", trusted_root=root)


def test_home_layout_and_modes(home: FleetHome) -> None:
    assert _mode(home.root) == 0o700
    for sub in ("services", "broker", "nodes", "bundles"):
        assert _mode(home.root / sub) == 0o700
    files = home.broker_files()
    assert _mode(files.password_file) == 0o600 and _mode(files.acl_file) == 0o600
    creds = home.service_credentials("scorer")
    assert creds == home.service_credentials("scorer")  # stable across calls
    line = next(x for x in files.password_file.read_text().splitlines()
                if x.startswith("scorer:"))
    assert verify_password(creds.password, line.split(":", 1)[1])
    assert FleetHome(home.root).settings == home.settings
    with pytest.raises(UsageError, match="already holds a fleet"):
        FleetHome.create(home.root)


def test_missing_home_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fleet init"):
        FleetHome(tmp_path / "nowhere")


def test_settings_refuse_superlink_without_ca(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="superlink_ca"):
        FleetHome.create(tmp_path / "h", superlink="127.0.0.1:9092")


def test_bundle_contents_and_modes(home: FleetHome, tmp_path: Path) -> None:
    b = enroll_device(home, "pi-07", "line-2", out=tmp_path / "b")
    assert _mode(b) == 0o700
    names = sorted(p.name for p in b.iterdir())
    assert names == ["agent.toml", "app-trust.yaml", "mqtt.password", "node.key", "root.json",
                     "superlink-ca.pem"]
    assert all(_mode(b / n) == 0o600 for n in names)
    password = (b / "mqtt.password").read_text().strip()
    assert len(password) >= 24 and password not in (b / "agent.toml").read_text()
    tpl = tomllib.loads((b / "agent.toml").read_text())
    assert tpl["device_id"] == "pi-07" and tpl["group"] == "line-2"
    assert tpl["mqtt"]["username"] == "pi-07" and tpl["mqtt"]["port"] == 18830
    assert tpl["fl"]["insecure"] is False and tpl["updates"]["enabled"] is True
    assert tpl["fl"]["trusted_app_keys"] == "app-trust.yaml"
    key = fleet_key(home.root)  # made by fleet init; the bundle trusts exactly it
    assert (b / "app-trust.yaml").read_text() == key.trusted_entities()
    assert _mode(home.root / "app-signing" / "app.key") == 0o600
    row = home.devices.get("pi-07")
    assert row is not None and row.fl_state == "pending"
    assert verify_password(password, row.mqtt_hash)
    assert (home.root / "nodes" / "pi-07.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert "user pi-07\ntopic read edgefleet/v1/update/assign/group/line-2" in \
        home.broker_files().acl_file.read_text()


@pytest.mark.parametrize("name", ["score", "update", "ingest", "operator", "a/b", "+", "",
                                  "dev1\n"])
def test_bad_or_reserved_names_refused(home: FleetHome, name: str) -> None:
    with pytest.raises(UsageError):
        enroll_device(home, name)


def test_duplicate_refused_and_reenroll_after_revoke(home: FleetHome, tmp_path: Path) -> None:
    enroll_device(home, "d1", out=tmp_path / "a")
    with pytest.raises(UsageError, match="already enrolled"):
        enroll_device(home, "d1", out=tmp_path / "b")
    with pytest.raises(UsageError, match="refusing to overwrite"):
        enroll_device(home, "d2", out=tmp_path / "a")
    assert home.devices.get("d2") is None
    revoke_device(home, "d1")
    assert "d1:" not in home.broker_files().password_file.read_text()
    b = enroll_device(home, "d1", out=tmp_path / "c")
    row = home.devices.get("d1")
    assert row is not None and row.active
    assert verify_password((b / "mqtt.password").read_text().strip(), row.mqtt_hash)


def test_revoke_without_superlink_leaves_unregister_pending(home: FleetHome,
                                                             tmp_path: Path) -> None:
    enroll_device(home, "d1", out=tmp_path / "a")
    home.devices.set_fl("d1", "registered", 2**63 + 5)  # uint64 ids survive the table
    revoke_device(home, "d1")
    row = home.devices.get("d1")
    assert row is not None and row.fl_state == "unregister_pending" and row.node_id == 2**63 + 5
    enroll_device(home, "d2", out=tmp_path / "b")
    revoke_device(home, "d2")  # pending: the SuperLink never knew it
    assert (home.devices.get("d2") or row).fl_state == "unregistered"
    with pytest.raises(UsageError, match="unknown device"):
        revoke_device(home, "nobody")


def test_register_pending_failure_is_clear(home: FleetHome, tmp_path: Path) -> None:
    from edgefleet.server.fleet.superlink import FlRunError, SuperLinkConn

    enroll_device(home, "d1", out=tmp_path / "a")
    dead = SuperLinkConn("127.0.0.1:1", tmp_path / "flwr", home.settings.superlink_ca)
    with pytest.raises(FlRunError, match="registering d1"):
        register_pending(home, dead)
    assert (home.devices.get("d1") or pytest.fail()).fl_state == "pending"


def test_install_tarball(home: FleetHome, tmp_path: Path) -> None:
    b = enroll_device(home, "d1", out=tmp_path / "d1.tar.gz")
    assert _mode(b) == 0o600
    state = tmp_path / "state"
    cfg = install_bundle(b, state, overrides={"input": {"serial": "/dev/ttyUSB0"}})
    assert cfg == state / "agent.toml" and _mode(cfg) == 0o600
    assert _mode(state) == 0o700 and _mode(state / "keys") == 0o700
    data = tomllib.loads(cfg.read_text())
    assert data["state_dir"] == str(state.resolve())
    assert data["fl"]["auth_private_key"] == str(state.resolve() / "keys" / "node.key")
    assert data["fl"]["trusted_app_keys"] == str(state.resolve() / "keys" / "app-trust.yaml")
    assert data["input"]["serial"] == "/dev/ttyUSB0"
    assert MqttConfig.model_validate(data["mqtt"]).secret() == \
        (state / "keys" / "mqtt.password").read_text().strip()


def test_enrollment_writes_the_privacy_policy_and_creates_the_ledger(
        home: FleetHome, tmp_path: Path) -> None:
    from edgefleet.device.agent.settings import load_agent_config
    from edgefleet.device.privacy.ledger import PrivacyLedger, hwm_path
    from edgefleet.device.privacy.policy import PrivacyPolicy

    b = enroll_device(home, "d1", out=tmp_path / "d1")
    state = tmp_path / "state"
    cfg = load_agent_config(install_bundle(b, state))
    assert cfg.fl.privacy == PrivacyPolicy()  # written out in full, with the defaults
    assert tomllib.loads((b / "agent.toml").read_text())["fl"]["privacy"]["min_mode"] == "sample"
    ledger = cfg.fl_state_dir / "privacy-ledger.json"
    assert ledger.exists() and hwm_path(ledger).exists()
    PrivacyLedger(ledger, 10.0, create=False)  # what the SuperNode opens: exists, empty
    from edgefleet.device.fl.client import node_settings

    # The keys the agent passes to its SuperNode are the ClientApp's node config.
    node = node_settings({**cfg.fl.privacy.node_config(), "privacy-ledger-required": True})
    assert node.policy == cfg.fl.privacy and node.privacy_ledger_required
    tighter = install_bundle(b, tmp_path / "s2", overrides={"fl": {"privacy": {
        "max_run_epsilon": 1.0, "evaluation": "noised"}}})
    assert load_agent_config(tighter).fl.privacy.max_run_epsilon == 1.0


@pytest.mark.parametrize(("node_config", "why"), [
    ({"insecure-reproducible-noise-seed": 1}, "insecure-reproducible-noise-seed"),
    ({"privacy-budget": 1000.0}, r"\[fl.privacy\]"),
])
def test_enrolled_agent_refuses_insecure_noise_and_policy_outside_its_section(
        home: FleetHome, tmp_path: Path, node_config: dict[str, object], why: str) -> None:
    b = enroll_device(home, "d1", out=tmp_path / "d1")
    with pytest.raises(ConfigError, match=why):
        install_bundle(b, tmp_path / "state", overrides={"fl": {"node_config": node_config}})
    assert not (tmp_path / "state").exists()


def test_install_refuses_config_that_cannot_run(tmp_path: Path) -> None:
    bare = FleetHome.create(tmp_path / "h", broker_port=18831)  # no registry, no model
    b = enroll_device(bare, "d1", out=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"model\.package"):
        install_bundle(b, tmp_path / "state")
    assert not (tmp_path / "state").exists()  # nothing written
    cfg = install_bundle(b, tmp_path / "state", overrides={"model": {"package": "/opt/m"}})
    assert tomllib.loads(cfg.read_text())["model"]["package"] == "/opt/m"


def _tar(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def test_hostile_archives_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unexpected member"):
        install_bundle(_tar(tmp_path / "l.tar.gz", {}, link="d/agent.toml"), tmp_path / "s")
    # Path components are dropped: '../../x' lands inside the temp folder as 'x'.
    evil = _tar(tmp_path / "e.tar.gz", {"../../evil": b"x"})
    with pytest.raises(UsageError, match=r"no agent\.toml"):
        install_bundle(evil, tmp_path / "s")
    assert not (tmp_path / "evil").exists()
    with pytest.raises(UsageError, match="not a readable bundle"):
        (tmp_path / "junk.tar.gz").write_bytes(b"not gzip")
        install_bundle(tmp_path / "junk.tar.gz", tmp_path / "s")
    tpl = dump_toml({"device_id": "d", "mqtt": {"password_file": "../../etc/shadow"}})
    with pytest.raises(ConfigError, match="does not hold"):
        install_bundle(_tar(tmp_path / "p.tar.gz", {"b/agent.toml": tpl.encode()}),
                       tmp_path / "s")


def test_password_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the MQTT password"):
        MqttConfig(password_file=tmp_path / "missing").secret()
    assert MqttConfig(password="x", password_file=tmp_path / "missing").secret() == "x"


def test_dump_toml_round_trip() -> None:
    data = {"a": 1, "b": 'q"uote\\', "f": 0.5, "t": True, "l": [1, 2],
            "sec": {"x": "y", "node_config": {"partition-id": 3, "task": "digits"}}}
    assert tomllib.loads(dump_toml({**data, "gone": None})) == data
