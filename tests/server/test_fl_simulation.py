"""The simulation's pieces without Ray: each virtual device's node config, the ClientApp
wrapper that applies it (and travels to Ray actors by pickling), Ray's arguments."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edgefleet.device.core.errors import UsageError
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.simulation import (
    VirtualDevices,
    VirtualNodes,
    ray_init_args,
    run_simulation,
)

#: A ClientApp that answers with the node config it was called with.
echo_app = ClientApp()


@echo_app.train()
def _echo(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"seen": ConfigRecord(dict(context.node_config))}), reply_to=msg)


NODES = VirtualNodes(root="/fleet", shares=4, task="vibration",
                     common={"privacy-budget": 10.0},
                     per_device={5: {"privacy-budget": 1.0}})


def test_each_virtual_device_gets_its_own_state_folder_and_a_share() -> None:
    configs = [NODES.config(i) for i in range(10)]
    assert len({c["state-dir"] for c in configs}) == 10
    assert configs[6]["state-dir"] == "/fleet/node-6"
    assert [c["partition-id"] for c in configs] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert {c["num-partitions"] for c in configs} == {4}
    assert {c["task"] for c in configs} == {"vibration"}
    assert configs[5]["privacy-budget"] == 1.0 and configs[4]["privacy-budget"] == 10.0


def test_the_wrapper_gives_the_clientapp_the_devices_node_config_after_pickling() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps messages with the process's task identity (as InProcessGrid does).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    app = pickle.loads(pickle.dumps(VirtualDevices(NODES, f"{__name__}:echo_app")))
    # What Flower's simulation gives a virtual node: its index and the node count only.
    flower_ctx = Context(run_id=1, node_id=77, node_config={"partition-id": 6,
                                                            "num-partitions": 10},
                         state=RecordDict(), run_config={"num-rounds": 3})
    msg = Message(RecordDict(), dst_node_id=77, message_type="train")
    reply = app(msg, flower_ctx)
    assert dict(reply.content.config_records["seen"]) == NODES.config(6)
    assert flower_ctx.node_config == {"partition-id": 6, "num-partitions": 10}


def test_ray_cpus_size_a_local_ray_not_a_cluster() -> None:
    assert ray_init_args(2)["num_cpus"] == 2
    assert ray_init_args(0, "10.0.0.5:6379")["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in ray_init_args(0, "10.0.0.5:6379")
    with pytest.raises(UsageError, match="cluster"):
        ray_init_args(2, "10.0.0.5:6379")


def test_a_sample_larger_than_the_fleet_is_refused_before_ray_starts() -> None:
    s = run_settings({"min-nodes": 5, "num-nodes": 2})
    with pytest.raises(UsageError, match="exceeds --simulate 2"):
        run_simulation(s, 2, NODES)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_flower_simulation_is_imported_without_tensorflow() -> None:
    code = ("import sys; from edgefleet.server.fl.simulation import _import_flower_simulation;"
            "_import_flower_simulation(); import flwr.simulation.ray_transport.utils as u;"
            "print(u.TF is None, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["True", "False"]
