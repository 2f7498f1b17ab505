"""The same ServerApp and ClientApp on Flower's simulation runtime (Ray): thousands of devices.

:class:`~edgefleet.server.fl.runner.EmbeddedFederation` runs one real SuperNode process
per device, which stops at a few dozen on one machine. Flower's simulation runtime
(``flwr[simulation]``) runs *virtual* SuperNodes instead: each message goes to a pool of
Ray actors (``num_cpus`` per actor) that call the ClientApp with that node's context, on
this machine or on a Ray cluster (``address`` in the backend's ``init_args``).

What a SuperNode's ``--node-config`` says about its device, Flower's simulation does not
let us say: every virtual node gets only ``partition-id`` and ``num-partitions``. So
:class:`VirtualDevices` wraps the ClientApp (named by reference, as a Flower app bundle
names it) and gives virtual device *i* the node config a SuperNode of device *i* would
get: its own state folder (privacy ledger, σ and share caches) under ``root``, its
privacy policy, and its data share. The wrapper is built here, by the operator who runs
the simulation; a server's run config never reaches a device's node config.

Ray is started here (:func:`start_ray`) rather than by Flower, for one reason: Flower's
``flwr.simulation.ray_transport.utils`` imports TensorFlow whenever it is installed (to
offer GPU memory growth), which costs each ClientApp actor about 600 MB and 8 s here.
The ClientApp is device code, which never uses TensorFlow, so every Ray worker hides it
(:func:`hide_tensorflow`, a worker setup hook); Flower then uses the running Ray.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edgefleet.device.core.errors import MissingExtraError, UsageError
from edgefleet.server.fl.runner import SIMULATED_CLIENTAPP
from edgefleet.server.fl.settings import RunSettings

__all__ = ["VirtualDevices", "VirtualNodes", "hide_tensorflow", "node_dir", "ray_init_args",
           "run_simulation", "start_ray"]

log = logging.getLogger(__name__)

#: Distinct data shares when not told: a built-in task's training split (digits: 1,222
#: records) cut into more shares leaves most of them empty.
DEFAULT_SHARES = 100


def node_dir(root: str, device: int) -> str:
    """State folder of virtual device ``device`` (its ledger lives there)."""
    return f"{root}/node-{device}"


@dataclass(frozen=True)
class VirtualNodes:
    """The node config of each virtual device: what its SuperNode would be started with.

    Device ``i`` holds Dirichlet share ``i mod shares`` of ``shares`` (devices past
    ``shares`` repeat a share's records, not its ledger) and keeps its state in
    ``<root>/node-<i>``. ``common`` is every device's policy (``privacy-*`` keys);
    ``per_device`` adds keys for single devices.
    """

    root: str
    shares: int
    task: str = "digits"
    common: Mapping[str, Any] = field(default_factory=dict)
    per_device: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def config(self, device: int) -> dict[str, Any]:
        """The node config of device ``device``."""
        return {"task": self.task, "partition-id": device % self.shares,
                "num-partitions": self.shares, "state-dir": node_dir(self.root, device),
                **self.common, **self.per_device.get(device, {})}


@cache
def _load_app(ref: str) -> ClientApp:
    module, _, attr = ref.partition(":")
    app = getattr(importlib.import_module(module), attr)
    if not isinstance(app, ClientApp):
        raise UsageError(f"{ref} is not a Flower ClientApp")
    return app


class VirtualDevices(ClientApp):  # type: ignore[misc]
    """The ClientApp ``app_ref`` with each virtual node's own node config.

    Picklable by value (a reference and plain data), so Ray ships it to actors on any
    machine of a cluster; the ClientApp itself is imported once per actor process.
    """

    def __init__(self, nodes: VirtualNodes, app_ref: str = SIMULATED_CLIENTAPP) -> None:
        super().__init__()
        self.nodes = nodes
        self.app_ref = app_ref

    def __call__(self, message: Message, context: Context) -> Message:
        """Run the ClientApp as virtual device ``partition-id`` (Flower's node index)."""
        device = int(context.node_config["partition-id"])
        node = Context(run_id=context.run_id, node_id=context.node_id,
                       node_config=self.nodes.config(device), state=context.state,
                       run_config=context.run_config)
        reply: Message = _load_app(self.app_ref)(message, node)
        return reply


def server_app(settings: RunSettings) -> ServerApp:
    """Our ServerApp with ``settings`` as its run config (what ``flwr run -c`` would give)."""
    from edgefleet.server.fl import server_app as real

    app = ServerApp()
    config = settings.flower_config()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config = dict(config)
        real.main(grid, context)

    return app


def hide_tensorflow() -> None:
    """Ray worker setup hook: ``import tensorflow`` fails in this process (see the module
    docstring); the ClientApp never imports it."""
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]


def ray_init_args(num_cpus: int = 0, address: str = "") -> dict[str, Any]:
    """``ray.init`` arguments: ``num_cpus`` caps a local Ray (0: all cores); ``address``
    joins a running cluster (``ray start --head``) instead, whose size is then the
    cluster's, not ours."""
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        if num_cpus:
            raise UsageError("--ray-cpus sizes a local Ray; a cluster's size is set by "
                             "its `ray start` commands")
        init["address"] = address
    elif num_cpus:
        init["num_cpus"] = num_cpus
    return init


def start_ray(num_cpus: int = 0, address: str = "") -> None:
    """Start (or join) Ray with TensorFlow hidden from its workers; Flower's backend then
    finds it running. Workers get this process's ``sys.path``, as Flower would give them."""
    import ray

    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": path},
                          "worker_process_setup_hook": f"{__name__}.hide_tensorflow"},
             **ray_init_args(num_cpus, address))


def _import_flower_simulation() -> Any:
    """``flwr.simulation``, imported without loading TensorFlow into this process (unless
    something here already did, e.g. a TFLite export)."""
    hidden = "tensorflow" not in sys.modules
    if hidden:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        import flwr.simulation
    finally:
        if hidden:
            del sys.modules["tensorflow"]
    return flwr.simulation


def run_simulation(settings: RunSettings, devices: int, nodes: VirtualNodes, *,
                   num_cpus: int = 0, address: str = "",
                   app_ref: str = SIMULATED_CLIENTAPP) -> None:
    """Run ``settings`` over ``devices`` virtual devices; rounds land in ``settings.db``.

    Blocks until the ServerApp returns; a ServerApp error is raised (and recorded as the
    run's error by the ServerApp itself).
    """
    if importlib.util.find_spec("ray") is None:  # Flower would exit the process instead
        raise MissingExtraError("--simulate", "simulation", "ray")
    if settings.min_nodes > devices:
        raise UsageError(f"--min-nodes {settings.min_nodes} exceeds --simulate {devices}")
    flower = _import_flower_simulation()
    start_ray(num_cpus, address)
    # One CPU per ClientApp actor: a local Ray with num_cpus=2 runs two devices at a time.
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    try:
        flower.run_simulation(server_app=server_app(settings),
                              client_app=VirtualDevices(nodes, app_ref),
                              num_supernodes=devices, backend_config=backend)
    finally:  # Flower shuts Ray down when its backend started; not when it failed earlier
        import ray

        ray.shutdown()
