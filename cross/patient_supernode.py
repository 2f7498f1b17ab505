#!/opt/edgefleet/venv/bin/python3
"""flower-supernode with a longer task-claim window, for emulated devices.

A SuperNode gives the ``flwr-clientapp`` it starts HEARTBEAT_DEFAULT_INTERVAL (30 s) to
come up and claim its task, then expects a heartbeat within 2 x 30 s. Under QEMU on a
busy CI machine, importing Flower alone can take longer than that: the task token
expires, the ClientApp's reply is refused ("task-token authentication failed") and the
round loses the node. Only the token windows of the SuperNode's state change here (the
module globals are read at call time); node heartbeats to the SuperLink and the
ClientApp's own heartbeat interval stay Flower's. A real Raspberry Pi does not need this.
"""

import os
import sys

import flwr.supercore.corestate.in_memory_corestate as in_memory
import flwr.supercore.corestate.sql_corestate as sql
from flwr.supernode.cli import flower_supernode

WINDOW_S = int(os.environ.get("EDGEFLEET_TASK_WINDOW_S", "300"))

for module in (in_memory, sql):
    module.HEARTBEAT_DEFAULT_INTERVAL = WINDOW_S

if __name__ == "__main__":
    sys.exit(flower_supernode())
