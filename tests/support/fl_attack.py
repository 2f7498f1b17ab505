"""A malicious device, for tests and benchmarks of robust aggregation ONLY.

This module lives under ``tests/`` and is not part of the installed package, so no
production configuration can switch it on: a deployed SuperNode cannot import it. It is
the simulated devices' ClientApp (``edgefleet.models.sim.fl_app``) plus a mod: a node
started with node-config ``attack="scale"|"signflip"`` and ``attack-factor`` trains
honestly and then sends a poisoned update instead: ``scale`` multiplies its update
(local − global) by the factor, ``signflip`` sends it negated and multiplied. Nodes
without ``attack`` behave exactly like the simulated app's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from edgefleet.device.core.errors import ConfigError
from edgefleet.device.fl.client import make_client_app
from edgefleet.device.wire.federated import ARRAYS, from_arrays, to_arrays
from edgefleet.models.sim.fl_app import builtin_share

__all__ = ["APP_REF", "ATTACKS", "Attack", "app", "attack_mod", "poison_update"]

log = logging.getLogger(__name__)

Attack = Literal["", "scale", "signflip"]
ATTACKS: tuple[str, ...] = ("scale", "signflip")
#: How a Flower app bundle names this ClientApp (needs the checkout on PYTHONPATH).
APP_REF = "tests.support.fl_attack:app"
_KEYS = ("attack", "attack-factor")


def poison_update(global_params: Sequence[npt.NDArray[np.floating]],
                  local_params: Sequence[npt.NDArray[np.floating]], attack: str,
                  factor: float) -> list[npt.NDArray[np.float32]]:
    """``global + factor·update`` (scale) or ``global − factor·update`` (signflip)."""
    if attack not in ATTACKS:
        return [np.asarray(p, dtype=np.float32) for p in local_params]
    sign = -1.0 if attack == "signflip" else 1.0
    log.warning("TEST/BENCHMARK ATTACK: sending a %s update (factor %g)", attack, factor)
    return [np.asarray(g + sign * factor * (p - g), dtype=np.float32)
            for g, p in zip(global_params, local_params, strict=True)]


def attack_settings(node_config: dict[str, object]) -> tuple[str, float]:
    """The node's attack and factor (``("", 1.0)`` for an honest node); unknown ones refused."""
    attack = str(node_config.get("attack", ""))
    factor = float(str(node_config.get("attack-factor", 10.0)))
    if attack and attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r} (one of {', '.join(ATTACKS)})")
    if not factor > 0:
        raise ConfigError(f"attack-factor must be positive, got {factor}")
    return attack, factor


def attack_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Hide the attack keys from the honest app, then poison its train reply."""
    cfg = dict(ctxt.node_config)
    attack, factor = attack_settings(cfg)
    honest = Context(run_id=ctxt.run_id, node_id=ctxt.node_id,
                     node_config={k: v for k, v in cfg.items() if k not in _KEYS},
                     state=ctxt.state, run_config=ctxt.run_config, series_id=ctxt.series_id)
    reply = call_next(msg, honest)
    if not attack or msg.metadata.message_type != "train" or reply.has_error():
        return reply
    start = from_arrays(msg.content.array_records[ARRAYS].to_numpy_ndarrays())
    local = from_arrays(reply.content.array_records[ARRAYS].to_numpy_ndarrays())
    reply.content.array_records[ARRAYS] = ArrayRecord(
        to_arrays(poison_update(start, local, attack, factor)))
    return reply


app = make_client_app(builtin_share, mods=[attack_mod])
