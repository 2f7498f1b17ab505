"""``edgefleet keys fleet-key``: the fleet's package-encryption key (X25519)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.server.cli.home_opts import HOME_OPTION

__all__ = ["app"]

app = typer.Typer(help="Package-encryption key of the fleet: init, rotate, finish-rotation, "
                       "show.", no_args_is_help=True)


def _root(home: Path | None) -> Path:
    from edgefleet.server.fleet.home import FleetHome

    return FleetHome(home).root


def _audit(home: Path | None, action: str, **details: str) -> None:
    """Key changes land in the registry's audit log, next to the TUF key rotations."""
    from edgefleet.server.fleet.audit import AuditLog
    from edgefleet.server.fleet.home import FleetHome

    AuditLog(FleetHome(home).registry_path / "audit.jsonl").append(
        f"keys.fleet_key.{action}", **details)


@app.command()
def init(home: Path | None = HOME_OPTION,
         json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Create the key pair in the fleet home; bundles enrolled from now on carry it.

    Devices enrolled before need re-enrollment to decrypt encrypted packages.

    Example: edgefleet keys fleet-key init && edgefleet registry push out/digits --encrypt
    """
    from edgefleet.server.fleet.package_key import create, private_path

    root = _root(home)
    key = create(root)
    _audit(home, "init", key_id=key.public.key_id)
    out = {"key_id": key.public.key_id, "private": str(private_path(root)),
           "public": str(private_path(root).with_name("fleet.pub"))}
    if json_out:
        print_json(out)
    else:
        console.print(f"fleet key {out['key_id']}: {out['private']} (public: {out['public']})")


@app.command()
def rotate(home: Path | None = HOME_OPTION,
           json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """New key pair; packages pushed from now on are encrypted for the new and the old key.

    Re-enroll the devices (their bundles carry the new key), then run finish-rotation.

    Example: edgefleet keys fleet-key rotate
    """
    from edgefleet.server.fleet.package_key import rotate as do_rotate

    root = _root(home)
    old, new = do_rotate(root)
    _audit(home, "rotate", old=old.key_id, new=new.public.key_id)
    if json_out:
        print_json({"old": old.key_id, "new": new.public.key_id})
    else:
        console.print(f"fleet key is now {new.public.key_id}; {old.key_id} stays a recipient "
                      "until `edgefleet keys fleet-key finish-rotation`")


@app.command("finish-rotation")
def finish_rotation(home: Path | None = HOME_OPTION) -> None:
    """Stop encrypting new packages for the previous key.

    Example: edgefleet keys fleet-key finish-rotation
    """
    from edgefleet.server.fleet.package_key import finish_rotation as finish

    root = _root(home)
    prev = finish(root)
    if prev is None:
        console.print("no rotation in progress")
        return
    _audit(home, "finish_rotation", retired=prev.key_id)
    console.print(f"new packages are no longer encrypted for {prev.key_id}")


@app.command()
def show(home: Path | None = HOME_OPTION,
         json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """The key ids new packages are encrypted for (current first).

    Example: edgefleet keys fleet-key show --json
    """
    from edgefleet.server.fleet.package_key import publish_keys

    ids = [k.key_id for k in publish_keys(_root(home))]
    if json_out:
        print_json({"encrypt_for": ids})
    else:
        console.print("encrypt for: " + ", ".join(ids))
