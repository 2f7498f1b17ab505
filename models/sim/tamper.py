"""``edgefleet demo --tampered-update``: show every device refusing a tampered model.

After the signed rollout, the demo registers one more version of the federated model,
then corrupts its archive in the registry's artifact store (what an attacker holding the
download server could do, without the signing keys) and assigns it to the whole fleet.
TUF's signed targets metadata still names the original hash, so each device refuses the
download (``update_rejected_hash_mismatch`` in its telemetry) and keeps serving the
model it has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["bump_version", "corrupt_artifact", "tampered_copy"]


def bump_version(version: str) -> str:
    """The next patch version: ``1.0.3`` -> ``1.0.4``, ``2`` -> ``2.0.1``."""
    parts = [int(p) for p in version.split(".")] + [0, 0]
    major, minor, patch = parts[:3]
    return f"{major}.{minor}.{patch + 1}"


def tampered_copy(package: Path, dest: Path) -> str:
    """A copy of ``package`` with the next patch version (honest: it is signed as is);
    returns the new version."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(package, dest)
    manifest = dest / "manifest.json"
    data = json.loads(manifest.read_text())
    data["version"] = bump_version(str(data["version"]))
    manifest.write_text(json.dumps(data, indent=2))
    return str(data["version"])


def corrupt_artifact(registry: Path, sha256: str) -> Path:
    """Flip bytes in the middle of a stored archive, after it was signed."""
    path = registry / "artifacts" / sha256
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(len(data), mid + 16)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path
