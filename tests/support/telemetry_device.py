"""A device process for the SIGKILL test: spools ``--count`` events, printing progress.

``python -m tests.support.telemetry_device --port P --spool F --device D --count N``
prints ``spooled <seq> <boot>`` after each committed append (so the test knows what
is durable), then waits until the spool is drained and prints ``drained``.
"""

from __future__ import annotations

import argparse
import sys
import time

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.spool import Spool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spool", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--every", type=float, default=0.0005)
    args = ap.parse_args()
    pub = TelemetryPublisher(args.device, MqttConfig(port=args.port, backoff_base=0.05,
                                                     backoff_cap=0.5),
                             Spool(args.spool), metrics=Metrics()).start()
    for i in range(args.count):
        seq = pub.publish("event", {"kind": "tick", "i": i})
        sys.stdout.write(f"spooled {seq} {pub.boot_id}\n")
        sys.stdout.flush()
        time.sleep(args.every)
    pub.drain(120)
    sys.stdout.write("drained\n")
    sys.stdout.flush()
    pub.stop()


if __name__ == "__main__":
    main()
