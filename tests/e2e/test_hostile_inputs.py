"""One hostile device never hurts the others (issue 15), against real processes.

Telemetry, through mosquitto (password file and per-device ACL) and ``edgefleet ingest
run`` as a process: good devices publish through their real spools while one enrolled
device sends every hostile class on its own topics (and a forged message on a victim's
topic, which the broker ACL drops). Every good message is stored exactly once; every
hostile one is acknowledged, counted by reason and quarantined; the ingest never drops
a batch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.support.hostile import telemetry_scenario

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(240)]


def test_hostile_telemetry_never_hurts_other_devices(tmp_path: Path) -> None:
    rounds = 3
    res = telemetry_scenario(tmp_path, good_devices=3, per_device=200, rounds=rounds,
                             process=True)  # edgefleet ingest run
    # every good message from the others: stored, 0 lost, 0 duplicated
    for dev, n in res.good_sent.items():
        assert res.good_stored[dev] == list(range(1, n + 1)), dev
        assert res.good_rows[dev]["rows"] == res.good_rows[dev]["distinct"] == n
    # every hostile message: counted by its reason...
    want = Counter(reason for _, reason in res.hostile_classes for _ in range(rounds))
    assert res.rejects == dict(want), res.rejects
    assert res.ingest_rejected == res.hostile_sent == sum(want.values())
    # ...and quarantined with its device, topic, reason and first bytes
    q = res.quarantined
    assert len(q) == res.hostile_sent
    assert {r["device"] for r in q} == {"evil"}
    assert {r["topic"] for r in q} == {"edgefleet/v1/evil/event"}
    assert Counter(r["reason"] for r in q) == want
    assert all(r["prefix"].startswith('{"v": 1') and r["size"] > 0 for r in q)
    assert max(r["size"] for r in q) > 64 * 1024  # the huge one is recorded by its size
    # the forged message on the victim's topic never arrived (the ACL), none was stored
    assert res.victim_rows_with_forged_seq == 0
    # the hostile device is not locked out: its one valid message is stored
    assert res.evil_rows == 1
    # no batch was dropped or retried because of a hostile message
    assert res.ingest_loop_errors == 0
