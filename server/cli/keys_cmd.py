"""``edgefleet keys``: create and rotate the registry's TUF signing keys and the director key."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError
from edgefleet.server.cli.fleet_key_cmd import app as fleet_key_app
from edgefleet.server.cli.registry_cmd import HOME, PASSPHRASE_FILE, ROOT_KEY, open_registry

__all__ = ["app"]

app = typer.Typer(help="TUF signing keys and the director key (Ed25519): init, rotate, show; "
                       "fleet-key: the package-encryption key.", no_args_is_help=True)
app.add_typer(fleet_key_app, name="fleet-key")


@app.command()
def init(
    home: Path = HOME,
    root_key: Path | None = ROOT_KEY,
    passphrase_file: Path | None = PASSPHRASE_FILE,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Create one key per role (files mode 0600) and sign root v1 and the first metadata.

    Also creates the director key, which signs each device's assignment (devices pin it
    at enrollment; it is not a TUF role).

    Keep the root key offline with --root-key on removable media; only keys init and
    keys rotate need it. Set EDGEFLEET_KEY_PASSPHRASE (or --passphrase-file) to encrypt.

    Example: edgefleet keys init --registry /srv/registry --root-key /media/usb/root.pem
    """
    from edgefleet.server.fleet import director_key
    from edgefleet.server.fleet.keys import DIRECTOR, ROLES

    reg = open_registry(home, root_key, passphrase_file, create=True)
    signers = {role: reg.keys.generate(role) for role in ROLES}
    reg.init_repo()
    director_key.ensure(reg.keys)
    keys = {r: s.public_key.keyid for r, s in signers.items()}
    keys[DIRECTOR] = director_key.load(reg.keys).keyid
    out = {"registry": str(reg.home), "root": str(reg.repo.metadata_dir / "1.root.json"),
           "keys": keys, "encrypted": reg.keys.passphrase is not None}
    if json_out:
        print_json(out)
        return
    for role, keyid in keys.items():
        console.print(f"{role:9} {keyid}  {reg.keys.path(role)}")
    console.print(f"provision devices with {out['root']}")


@app.command()
def rotate(
    role: str = typer.Argument(..., help="root, targets, snapshot, timestamp or director."),
    home: Path = HOME,
    root_key: Path | None = ROOT_KEY,
    passphrase_file: Path | None = PASSPHRASE_FILE,
    recover: bool = typer.Option(
        False, "--recover-fast-forward",
        help="After a fast-forward attack (someone with the role's key pushed a huge "
             "version): also restart the role's metadata at version 1; targets also "
             "rotates the snapshot key. Devices accept the lower versions because the "
             "keys that signed the huge ones are gone (TUF 5.3.11)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Replace a role's key: a new root version (signed by old and new root key) names it.

    Devices follow on their next refresh; the old key file is kept as
    <role>.<keyid>.retired.pem so it can be destroyed deliberately.

    The director key is not in root: its rotation is a link (the new key signed by the
    old) that every assignment signed from now on carries; devices follow it on their
    next assignment (docs/updates.md).

    Example: edgefleet keys rotate timestamp
    (after a fast-forward attack: edgefleet keys rotate snapshot --recover-fast-forward)
    """
    from edgefleet.server.fleet import director_key

    reg = open_registry(home, root_key, passphrase_file)
    if role == director_key.DIRECTOR:
        if recover:
            raise UsageError("--recover-fast-forward is for TUF roles; the director key is "
                             "not in root")
        new = director_key.rotate(reg.keys)
        reg.audit.append("keys.rotate", role=role, keyid=new.keyid, chain=len(new.chain))
        if json_out:
            print_json({"role": role, "keyid": new.keyid, "chain": len(new.chain)})
        else:
            console.print(f"director key is now {new.keyid} ({len(new.chain)} rotations); "
                          "devices move to it with their next assignment")
        return
    keyids = reg.repo.recover_fast_forward(role) if recover else {role: reg.repo.rotate(role)}
    version = reg.repo.root().version
    for name, keyid in keyids.items():
        reg.audit.append("keys.rotate", role=name, keyid=keyid, root_version=version,
                         recover_fast_forward=recover)
    if json_out:
        print_json({"role": role, "keyid": keyids[role], "keyids": keyids,
                    "root_version": version, "recover_fast_forward": recover})
        return
    for name, keyid in keyids.items():
        console.print(f"{name} key is now {keyid} (root v{version})")
    if recover:
        console.print(f"{role} metadata restarted at version 1; devices recover on their "
                      "next refresh")


@app.command()
def show(
    home: Path = HOME,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show the keys and thresholds the current root names, and when metadata expires.

    Example: edgefleet keys show --json
    """
    from edgefleet.server.fleet import director_key

    reg = open_registry(home)
    root = reg.repo.root()
    pub = director_key.public_file(reg.keys.keys_dir)
    director = (director_key.director_key_id(director_key.read_public(pub))
                if pub.is_file() else None)
    out = {"root_version": root.version, "expires": root.expires.isoformat(),
           "roles": {name: {"keyids": role.keyids, "threshold": role.threshold}
                     for name, role in root.roles.items()},
           "timestamp_expires": reg.repo.timestamp().expires.isoformat(),
           "director": director}
    if json_out:
        print_json(out)
        return
    for name, role in root.roles.items():
        console.print(f"{name:9} threshold {role.threshold}  {', '.join(role.keyids)}")
    console.print(f"director  {director or 'none (run keys init on a new registry)'}")
    console.print(f"root v{out['root_version']} expires {out['expires']}")
