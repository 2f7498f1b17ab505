"""``edgefleet``: the fleet operator's command line.

Each command group lives in its own module and registers itself on :data:`app`;
heavy libraries are imported inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgefleet.device.core.cli_support import root_app, run_app

__all__ = ["app", "main"]

app = root_app(
    "edgefleet",
    (
        "Operate an edgefleet: build and quantize models, run federated training, "
        "sign and roll out updates, and watch the fleet's telemetry.\n\n"
        "Start with: edgefleet models build --task digits --out out/digits"
    ),
    "Operate an edgefleet.",
)


def _register() -> None:
    """Attach every command group; their modules import heavy libraries lazily."""
    from edgefleet.server.cli import (
        audit_cmd,
        certs_cmd,
        dashboard_cmd,
        demo_cmd,
        devices_cmd,
        explain_cmd,
        fleet_cmd,
        ingest_cmd,
        keys_cmd,
        loadgen_cmd,
        metrics_cmd,
        models_cmd,
        predict_cmd,
        privacy_cmd,
        registry_cmd,
        retrain_cmd,
        rollout_cmd,
        scorer_cmd,
        server_cmd,
        telemetry_cmd,
        train_cmd,
    )

    groups = {
        "models": models_cmd.app, "certs": certs_cmd.app, "scorer": scorer_cmd.app,
        "fleet": fleet_cmd.app, "ingest": ingest_cmd.app, "telemetry": telemetry_cmd.app,
        "devices": devices_cmd.app, "keys": keys_cmd.app, "registry": registry_cmd.app,
        "audit": audit_cmd.app, "retrain": retrain_cmd.retrain_app,
        "approvals": retrain_cmd.approvals_app, "privacy": privacy_cmd.app,
        "server": server_cmd.app, "metrics": metrics_cmd.app, "dashboard": dashboard_cmd.app,
    }
    for name, group in groups.items():
        app.add_typer(group, name=name)
    commands: dict[str, Callable[..., Any]] = {
        "demo": demo_cmd.demo, "train": train_cmd.train, "predict": predict_cmd.predict,
        "explain": explain_cmd.explain, "alerts": fleet_cmd.alerts, "report": fleet_cmd.report,
        "loadgen": loadgen_cmd.loadgen,
    }
    for name, fn in commands.items():
        app.command(name)(fn)
    fleet_cmd.app.command("init")(devices_cmd.fleet_init)
    rollout_cmd.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    run_app(app)
