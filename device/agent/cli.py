"""``edgefleet-agent``: the daemon that runs on each device."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.core.cli_support import root_app, run_app

__all__ = ["app", "main"]

app = root_app(
    "edgefleet-agent",
    (
        "The edgefleet device agent: serves int8 models on sensor input, falls back to the "
        "cloud scorer when unsure, trains privately, reports telemetry, applies signed updates."
    ),
    "The edgefleet device agent.",
)


def _register() -> None:
    from edgefleet.device.agent import data_cli
    from edgefleet.device.updates import cli as update_cmd

    app.add_typer(update_cmd.app, name="update")
    app.add_typer(data_cli.app, name="data")


_register()


@app.command()
def run(
    config: list[Path] = typer.Option(..., "--config", "-c",
                                      help="agent.toml (repeat to layer files)."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING..."),
) -> None:
    """Run the agent until SIGTERM/SIGINT: serve, fall back, report, update, train.

    Example: edgefleet-agent run --config /etc/edgefleet/agent.toml
    """
    import logging

    from edgefleet.device.agent.daemon import Agent
    from edgefleet.device.agent.settings import load_agent_config

    cfg = load_agent_config(*config)
    logging.getLogger().setLevel(log_level.upper())
    raise typer.Exit(Agent(cfg).run())


@app.command()
def doctor(
    config: list[Path] = typer.Option(..., "--config", "-c", help="agent.toml."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check model, keys, broker, serial port, clock and disk; non-zero exit on a failure."""
    from rich.table import Table

    from edgefleet.device.agent.doctor import run_checks
    from edgefleet.device.agent.settings import load_agent_config
    from edgefleet.device.core.cli_support import console, print_json

    checks = run_checks(load_agent_config(*config))
    failed = [c.name for c in checks if not c.ok]
    if json_out:
        print_json({"ok": not failed, "checks": [c.__dict__ for c in checks]})
    else:
        table = Table("check", "result", "detail", title="edgefleet-agent doctor")
        for c in checks:
            table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
        console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def enroll(
    bundle: Path = typer.Argument(..., help="Bundle from `edgefleet devices enroll` "
                                            "(folder or .tar.gz)."),
    state_dir: Path = typer.Option(Path("/var/lib/edgefleet"), "--state-dir",
                                   help="Where keys, spool and slots live."),
    config_out: Path | None = typer.Option(None, "--config-out",
                                           help="agent.toml to write [default: "
                                                "<state-dir>/agent.toml]."),
    model: Path | None = typer.Option(None, "--model", help="Bootstrap model package "
                                      "(needed when the fleet has no update registry)."),
    serial: str | None = typer.Option(None, "--serial", help="Sensor serial port."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Install an enrollment bundle with safe file modes and write agent.toml.

    Example: sudo edgefleet-agent enroll pi-07.tar.gz --state-dir /var/lib/edgefleet
    --config-out /etc/edgefleet/agent.toml --serial /dev/ttyUSB0
    """
    from edgefleet.device.agent.enroll import install_bundle
    from edgefleet.device.core.cli_support import console, print_json

    overrides: dict[str, dict[str, str]] = {}
    if model is not None:
        overrides["model"] = {"package": str(model.resolve())}
    if serial is not None:
        overrides["input"] = {"serial": serial}
    cfg = install_bundle(bundle, state_dir, config_out=config_out, overrides=overrides)
    if json_out:
        print_json({"config": str(cfg), "state_dir": str(state_dir.resolve())})
        return
    console.print(f"[green]installed[/] {cfg}; check with: edgefleet-agent doctor -c {cfg}")


def main() -> None:
    """Console-script entry point."""
    run_app(app)
