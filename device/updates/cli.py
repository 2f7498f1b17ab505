"""``edgefleet-agent update``: apply signed model updates, show the slots, follow rollouts."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError

if TYPE_CHECKING:
    from edgefleet.device.updates.installer import Updater

__all__ = ["app"]

app = typer.Typer(help="Signed model updates (TUF) with A/B slots and automatic rollback.",
                  no_args_is_help=True)

STATE = typer.Option(..., "--state", help="The device's update state folder (slots, TUF cache).")
REPO = typer.Option(..., "--repo", help="Registry base URL, e.g. http://127.0.0.1:8470")
ROOT = typer.Option(..., "--root", help="The trusted root.json this device was provisioned with.")
CA_FILE = typer.Option(None, "--ca-file", help="CA that signed the registry's HTTPS "
                                               "certificate (default: the system's CAs).")
FLEET_KEY = typer.Option(None, "--fleet-key", help="The fleet's package-encryption key "
                                                   "(decrypts encrypted packages).")
REQUIRE_ENC = typer.Option(False, "--require-encryption",
                           help="Refuse packages not encrypted for --fleet-key.")


def _updater(state: Path, repo: str, root: Path, variant: str | None,
             timeout: float, ca_file: Path | None = None, fleet_key: Path | None = None,
             require_encryption: bool = False) -> Updater:
    from edgefleet.device.inference.serving import ServingModel
    from edgefleet.device.runtime.envelope import FleetKey
    from edgefleet.device.updates.installer import Updater
    from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig

    try:
        root_bytes = root.read_bytes()
    except OSError as exc:
        raise UsageError(f"{root}: cannot read the trusted root: {exc.strerror}") from None
    repo = repo.rstrip("/")
    cfg = TufClientConfig(f"{repo}/metadata/", f"{repo}/targets/", socket_timeout_s=timeout,
                          ca_file=ca_file)
    serving = ServingModel()
    if require_encryption and fleet_key is None:
        raise UsageError("--require-encryption needs --fleet-key")
    upd = Updater(state, TufClient(state, cfg, root_bytes), serving, variant=variant,
                  fleet_key=FleetKey.load(fleet_key) if fleet_key else None,
                  require_encryption=require_encryption)
    upd.start()
    return upd


@app.command()
def once(
    ref: str = typer.Argument(..., help="MODEL@VERSION to run."),
    state: Path = STATE,
    repo: str = REPO,
    root: Path = ROOT,
    ca_file: Path | None = CA_FILE,
    fleet_key: Path | None = FLEET_KEY,
    require_encryption: bool = REQUIRE_ENC,
    variant: str | None = typer.Option(None, help="Variant to serve (default: the manifest's)."),
    timeout: float = typer.Option(30.0, help="Seconds of silence before a download is dropped."),
    rollback: bool = typer.Option(
        False, "--rollback", help="Allow a version below the highest this device has run: "
        "a deliberate downgrade by whoever runs this command on the device (logged and "
        "counted as downgrade_accepted)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Bring this device to MODEL@VERSION once, then exit.

    A version below the highest seen is refused (downgrade_refused) unless --rollback.

    Example: edgefleet-agent update once digits-mlp@1.1.0 --state /var/lib/edgefleet/update
    --repo http://registry:8470 --root /etc/edgefleet/root.json
    """
    from edgefleet.device.wire.updates import Assignment

    model, _, version = ref.partition("@")
    upd = _updater(state, repo, root, variant, timeout, ca_file, fleet_key, require_encryption)
    outcome = upd.apply(Assignment(model, version, rollback=rollback))
    _slot, info = upd.slots.active()
    if json_out:
        print_json({"outcome": outcome, "version": info.version if info else None})
    else:
        console.print(f"{outcome}: {info.name}@{info.version}" if info else outcome)


@app.command()
def status(
    state: Path = STATE,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Recover the slots as a restart would, verify the active model, and show them.

    Example: edgefleet-agent update status --state /var/lib/edgefleet/update --json
    """
    from edgefleet.device.core.durable import read_json
    from edgefleet.device.runtime.predictor import Predictor
    from edgefleet.device.updates.slots import SlotStore

    slots = SlotStore(state)
    rec = slots.recover()
    verified = None
    if rec.slot is not None:
        verified = Predictor.load(slots.path(rec.slot), threads=1).manifest.version
    out = {
        "active_slot": rec.slot, "version": rec.info.version if rec.info else None,
        "verified_version": verified, "recovery": rec.event,
        "pointer": slots.pointer(), "highest_seen": read_json(state / "highest_seen.json"),
    }
    if json_out:
        print_json(out)
    else:
        console.print(f"slot {rec.slot}: {out['version']} (verified: {verified})"
                      + (f", recovery: {rec.event}" if rec.event else ""))


@app.command()
def run(
    device: str = typer.Option(..., help="This device's id."),
    state: Path = STATE,
    repo: str = REPO,
    root: Path = ROOT,
    ca_file: Path | None = CA_FILE,
    fleet_key: Path | None = FLEET_KEY,
    require_encryption: bool = REQUIRE_ENC,
    broker: str = typer.Option("127.0.0.1:1883", help="MQTT broker host:port."),
    group: list[str] = typer.Option([], help="Groups this device belongs to (repeatable)."),
    variant: str | None = typer.Option(None, help="Variant to serve (default: the manifest's)."),
    director_key: Path | None = typer.Option(
        None, "--director-key", help="The director's public key (director.pub): follow only "
                                     "assignments it signed for this device."),
) -> None:
    """Follow retained rollout assignments until SIGTERM.

    Example: edgefleet-agent update run --device pi-07 --group lab --state ./st
    --repo http://127.0.0.1:8470 --root root.json --broker 127.0.0.1:1883
    --director-key director.pub
    """
    from edgefleet.device.core.mqtt_link import MqttConfig
    from edgefleet.device.updates.director import DirectorTrust, load_public_key
    from edgefleet.device.updates.listener import UpdateAgent

    host, _, port = broker.rpartition(":")
    upd = _updater(state, repo, root, variant, 30.0, ca_file, fleet_key, require_encryption)
    director = (DirectorTrust(state, device, load_public_key(director_key))
                if director_key is not None else None)
    agent = UpdateAgent(device, upd, MqttConfig(host=host or "127.0.0.1", port=int(port)),
                        groups=tuple(group), director=director).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    agent.stop()
