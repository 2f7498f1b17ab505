"""Hostile inputs: one enrolled device sends every hostile class while good devices keep
publishing, through a real mosquitto (password file and per-device ACL) and the ingest.
Writes docs/bench/hostile.md: messages tried, refused (by reason), others delivered.

    .venv/bin/python scripts/bench_hostile.py [--devices 5] [--messages 1000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support.hostile
from bench_common import md_table, write_section

from tests.support.hostile import telemetry_scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=5, help="good devices")
    ap.add_argument("--messages", type=int, default=1000, help="messages per good device")
    ap.add_argument("--rounds", type=int, default=20, help="times each hostile class is sent")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = telemetry_scenario(Path(tmp), good_devices=args.devices,
                                 per_device=args.messages, rounds=args.rounds,
                                 process=True)
    sent = sum(res.good_sent.values())
    stored = sum(len(set(s)) for s in res.good_stored.values())
    rows = sum(r["rows"] for r in res.good_rows.values())
    lost = sum(len(set(range(1, n + 1)) - set(res.good_stored[d]))
               for d, n in res.good_sent.items())
    quarantined = Counter(r["reason"] for r in res.quarantined)
    classes: dict[str, list[str]] = {}
    for cls, reason in res.hostile_classes:
        classes.setdefault(reason, []).append(cls)
    by_reason = [["; ".join(cs), reason, args.rounds * len(cs), res.rejects.get(reason, 0),
                  quarantined.get(reason, 0)] for reason, cs in classes.items()]
    summary = md_table(
        ["", "messages"],
        [["good messages sent (all devices)", sent],
         ["good messages stored (distinct)", stored],
         ["good rows stored (duplicates would count twice)", rows],
         ["good messages lost", lost],
         ["hostile messages tried", res.hostile_sent],
         ["hostile messages refused (counted)", sum(res.rejects.values())],
         ["hostile messages quarantined", len(res.quarantined)],
         ["forged messages on a victim's topic (dropped by the broker ACL)",
          res.forged_on_victim_topic],
         ["forged messages stored", res.victim_rows_with_forged_seq],
         ["batches dropped and retried (ingest loop errors)", res.ingest_loop_errors]])
    body = (f"{args.devices} good devices each publish {args.messages} events through their "
            f"real spool and publisher while one enrolled device sends each hostile class "
            f"{args.rounds} times on its own topics (and a forged message on a victim's "
            f"topic each round), against mosquitto with the fleet's password file and ACL "
            f"and `edgefleet ingest run` as a process. {res.seconds:.1f} s wall clock.\n\n"
            + summary + "\n\nBy reason (`scripts/bench_hostile.py`, the same scenario as "
            "`tests/e2e/test_hostile_inputs.py`):\n\n"
            + md_table(["hostile classes", "reason", "sent", "refused", "quarantined"],
                       by_reason))
    path = write_section("hostile", "Hostile inputs: one device never hurts the others", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
