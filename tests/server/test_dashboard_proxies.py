"""The dashboard behind a reverse proxy: ``X-Forwarded-For`` believed only from trusted
proxies (right-most untrusted address), for the sign-in limit and the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from edgefleet.device.core.errors import ConfigError, UsageError
from edgefleet.server.cli.dashboard_cmd import trusted_proxies
from edgefleet.server.dashboard.app import create_app
from edgefleet.server.dashboard.proxies import (
    MAX_FORWARDED_BYTES,
    MAX_FORWARDED_HOPS,
    TrustedProxies,
)
from edgefleet.server.fleet.audit import AuditLog
from edgefleet.server.fleet.home import FleetHome
from tests.server.test_dashboard import PASSWORD, Fleet

PROXY = ("127.0.0.1", 40000)


def _client(fleet: Fleet, proxies: list[str], peer: tuple[str, int] = PROXY) -> TestClient:
    fleet.cfg.trusted_proxies = TrustedProxies(proxies)
    return TestClient(create_app(fleet.cfg, fleet.metrics), client=peer,
                      follow_redirects=False)


def _login(client: TestClient, forwarded: str | None, password: str = PASSWORD) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    r = client.post("/login", data={"user": "alice", "password": password, "next": "/"},
                    headers=headers)
    return r.status_code


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.store.close()


def test_forwarded_clients_behind_a_trusted_proxy_are_limited_separately(
        fleet: Fleet) -> None:
    client = _client(fleet, ["127.0.0.1", "10.0.0.0/8", "::1"])
    for _ in range(5):
        assert _login(client, "203.0.113.7", "wrong password!") == 401
    assert _login(client, "203.0.113.7") == 429
    # Another user behind the same proxy still signs in.
    assert _login(client, "198.51.100.9") == 303
    # The blocked client cannot escape by writing a header of its own: nginx appends the
    # address it saw, and that right-most one is read.
    assert _login(client, "198.51.100.9, 203.0.113.7") == 429
    # A chain of trusted proxies is skipped (IPv6 and a network too).
    assert _login(client, "203.0.113.7, 10.1.2.3, ::1") == 429
    assert fleet.metrics.counter("dashboard_refused_rate_limited") == 3


@pytest.mark.parametrize("proxies", [[], ["10.0.0.1", "127.0.0.1"]])
def test_spoofed_header_from_an_untrusted_peer_is_ignored(fleet: Fleet,
                                                          proxies: list[str]) -> None:
    # No trusted proxies (the default), or a list that does not name this peer: each
    # failure counts against the peer, whatever its header claims.
    client = _client(fleet, proxies, peer=("192.0.2.50", 40000))
    for i in range(5):
        assert _login(client, f"198.51.100.{i}", "wrong password!") == 401
    assert _login(client, "198.51.100.99") == 429
    assert fleet.metrics.counter("dashboard_forwarded_ignored_untrusted_peer") == 6


@pytest.mark.parametrize(("header", "reason"), [
    ("not-an-address", "bad_address"),
    ("203.0.113.7, garbage", "bad_address"),
    ("203.0.113.7:5555", "bad_address"),
    ("", "bad_address"),
    (", ".join(["203.0.113.7"] * 80), "too_long"),
    (",".join(["1.2.3.4"] * (MAX_FORWARDED_HOPS + 1)), "too_many"),
])
def test_malformed_or_oversized_header_falls_back_to_the_peer(
        fleet: Fleet, header: str, reason: str) -> None:
    assert len(header) <= MAX_FORWARDED_BYTES or reason == "too_long"
    client = _client(fleet, ["127.0.0.1"])
    for _ in range(5):
        assert _login(client, header, "wrong password!") == 401
    assert fleet.metrics.counter(f"dashboard_forwarded_ignored_{reason}") == 5
    # Those failures counted against the proxy's own address ...
    assert _login(client, None) == 429
    # ... not against a well-formed forwarded client.
    assert _login(client, "198.51.100.9") == 303


def test_audit_entry_records_the_forwarded_client(fleet: Fleet) -> None:
    client = _client(fleet, ["127.0.0.1"])
    fwd = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    assert client.post("/login", data={"user": "alice", "password": PASSWORD, "next": "/"},
                       headers=fwd).status_code == 303
    fleet.client = client
    r = client.post("/alerts/ack", data={"csrf": fleet.csrf(), "device": "pi-01",
                                         "kind": "drift"}, headers=fwd)
    assert r.status_code == 303, r.text
    log = AuditLog(fleet.registry / "audit.jsonl")
    last = log.entries()[-1]
    assert last["action"] == "alert.ack" and last["actor"] == "dashboard:alice"
    assert last["details"]["client"] == "203.0.113.7"
    log.verify()
    # Without a proxy the peer address is recorded.
    direct = _client(fleet, [], peer=("192.0.2.8", 1234))
    direct.cookies = client.cookies
    fleet.client = direct
    r = direct.post("/approvals", data={"csrf": fleet.csrf(), "request": fleet.request_id,
                                        "decision": "approve"}, headers=fwd)
    assert r.status_code == 303, r.text
    last = log.entries()[-1]
    assert last["action"] == "retrain.approved" and last["details"]["client"] == "192.0.2.8"
    log.verify()


def test_trusted_proxies_walk() -> None:
    tp = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert tp.client("127.0.0.1", []).host == "127.0.0.1"
    assert tp.client("::ffff:127.0.0.1", ["203.0.113.7"]).host == "203.0.113.7"
    assert tp.client("::1", ["2001:db8::5"]).host == "2001:db8::5"
    # Several header lines are one list, in order.
    assert tp.client("127.0.0.1", ["203.0.113.7", "10.0.0.2"]).host == "203.0.113.7"
    # Only proxies in the chain: the furthest one.
    assert tp.client("127.0.0.1", ["10.0.0.3, 10.0.0.2"]).host == "10.0.0.3"
    assert tp.client("127.0.0.1", ["x" * 2000]).ignored == "too_long"
    assert not TrustedProxies() and tp
    with pytest.raises(UsageError, match="not an IP address"):
        TrustedProxies(["nginx.local"])


def test_home_setting_and_flag(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(
        '[server]\ndashboard_trusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n')
    fh = FleetHome(tmp_path)
    assert trusted_proxies(None, fh).trusted("10.9.9.9")
    assert trusted_proxies(None, None).networks == ()
    flag = trusted_proxies(["::1"], fh)  # the flag replaces the home's list
    assert flag.trusted("::1") and not flag.trusted("127.0.0.1")
    (tmp_path / "fleet.toml").write_text('[server]\ndashboard_trusted_proxies = ["nope"]\n')
    with pytest.raises(ConfigError, match="nope"):
        FleetHome(tmp_path)


def test_serve_refuses_a_trusted_proxy_that_is_no_address(tmp_path: Path) -> None:
    from edgefleet.server.dashboard.auth import Users
    from edgefleet.server.telemetry.store import open_store
    from tests.conftest import run_cli

    open_store(tmp_path / "fleet.db").close()
    Users(tmp_path / "dash").add("alice", PASSWORD)
    res = run_cli("dashboard", "serve", "--db", str(tmp_path / "fleet.db"), "--state",
                  str(tmp_path / "dash"), "--registry", str(tmp_path / "reg"),
                  "--trusted-proxy", "nginx.local")
    assert res.returncode != 0 and "not an IP address" in res.stdout + res.stderr
