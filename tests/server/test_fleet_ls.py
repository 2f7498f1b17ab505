"""`edgefleet fleet ls` at fleet size: a limited table with a footer, --all, filters, sort,
and --json complete by default (scripts rely on it). The CLI runs as a real process on a
store filled through the store's own write API."""

from __future__ import annotations

import json
import time

import pytest

from edgefleet.server.cli.fleet_cmd import LS_LIMIT, RICH_ROWS
from edgefleet.server.telemetry.rows import select_rows
from edgefleet.server.telemetry.store import open_store
from tests.conftest import run_cli

N = RICH_ROWS + 20  # past the rich table's size, so --all draws plain text
NOW = time.time()


def _name(d: int) -> str:
    return f"pi-{d:04d}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """N devices: every 3rd runs digits-mlp@1.0.0, the rest @1.1.0; every 4th is online;
    the higher the number the more recently heard of."""
    db = tmp_path_factory.mktemp("fleet") / "fleet.db"
    store = open_store(str(db))
    with store.transaction() as st:
        st.touch_devices([(_name(d), NOW - 3600 + d, 10, 0) for d in range(N)])
        st.update_metrics_many([(_name(d), NOW - 3600 + d,
                                 {"n_inferences": 1000, "n_fallback": d % 7,
                                  "model_name": "digits-mlp",
                                  "model_version": "1.0.0" if d % 3 == 0 else "1.1.0"},
                                 {"inferences": 1000}) for d in range(N)])
    for d in range(0, N, 4):
        store.set_status(_name(d), True, NOW, "b" * 16)
    store.close()
    return {"EDGEFLEET_DB": str(db), "COLUMNS": "120"}


def _ls(env: dict[str, str], *args: str) -> str:
    res = run_cli("fleet", "ls", *args, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _listed(out: str) -> list[str]:
    return [w for line in out.splitlines() for w in line.split()[:1] if w.startswith("pi-")]


def test_json_lists_every_device_by_default(env: dict[str, str]) -> None:
    doc = json.loads(_ls(env, "--json"))
    assert doc["total"] == N
    assert [r["device"] for r in doc["devices"]] == [_name(d) for d in range(N)]
    limited = json.loads(_ls(env, "--json", "--limit", "5"))
    assert limited["total"] == N and len(limited["devices"]) == 5


def test_the_table_stops_at_the_limit_and_says_how_many_more(env: dict[str, str]) -> None:
    out = _ls(env)
    assert _listed(out) == [_name(d) for d in range(LS_LIMIT)]
    assert f"{LS_LIMIT} of {N} devices" in out
    assert f"… {N - LS_LIMIT} more, use --limit N or --all" in out
    out = _ls(env, "--limit", "7")
    assert _listed(out) == [_name(d) for d in range(7)] and f"{N - 7} more" in out


def test_all_draws_every_device_as_plain_aligned_text(env: dict[str, str]) -> None:
    out = _ls(env, "--all")
    assert _listed(out) == [_name(d) for d in range(N)]
    assert f"{N} devices" in out and "more, use" not in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("device"))
    row = next(line for line in lines if line.startswith(_name(1) + " "))
    # Aligned: the model column starts at the same offset in the header and in a row.
    assert row.index("digits-mlp@") == header.index("model")
    assert "[" not in out  # no markup leaked into plain text


def test_filters_and_sort(env: dict[str, str]) -> None:
    online = _listed(_ls(env, "--status", "online", "--all"))
    assert online == [_name(d) for d in range(0, N, 4)]
    offline = json.loads(_ls(env, "--status", "offline", "--json"))
    assert offline["total"] == N - len(online)
    assert all(not r["online"] for r in offline["devices"])
    old = json.loads(_ls(env, "--model", "digits-mlp@1.0.0", "--json"))["devices"]
    assert [r["device"] for r in old] == [_name(d) for d in range(0, N, 3)]
    anyv = json.loads(_ls(env, "--model", "digits-mlp", "--json"))
    assert anyv["total"] == N
    assert json.loads(_ls(env, "--model", "other", "--json"))["total"] == 0
    newest = _listed(_ls(env, "--sort", "last_seen", "--limit", "3"))
    assert newest == [_name(N - 1), _name(N - 2), _name(N - 3)]


@pytest.mark.parametrize(("args", "message"), [
    (("--status", "asleep"), "--status 'asleep': expected one of online, offline"),
    (("--sort", "ram"), "--sort 'ram': expected one of device, last_seen"),
    (("--all", "--limit", "3"), "--all and --limit: choose one"),
])
def test_bad_options_are_usage_errors(env: dict[str, str], args: tuple[str, ...],
                                      message: str) -> None:
    res = run_cli("fleet", "ls", *args, env=env)
    assert res.returncode == 64 and message in res.stderr
    assert "Traceback" not in res.stderr


def _row(device: str, online: bool, seen: float | None, name: str | None,
         version: str | None) -> dict[str, object]:
    return {"device": device, "online": online, "last_seen": seen, "model_name": name,
            "model_version": version}


def test_select_rows_matches_bare_versions_and_puts_never_seen_last() -> None:
    rows = [_row("c", False, None, None, "2.0"), _row("a", True, 5.0, "m", "1.0"),
            _row("b", False, 9.0, "m", "2.0")]
    assert [r["device"] for r in select_rows(rows)] == ["a", "b", "c"]
    assert [r["device"] for r in select_rows(rows, sort="last_seen")] == ["b", "a", "c"]
    assert [r["device"] for r in select_rows(rows, model="2.0")] == ["c"]
    assert [r["device"] for r in select_rows(rows, model="m@2.0")] == ["b"]
    assert [r["device"] for r in select_rows(rows, status="offline")] == ["b", "c"]
    with pytest.raises(ValueError, match="status"):
        select_rows(rows, status="x")
