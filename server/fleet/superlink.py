"""How the server reaches a Flower SuperLink: the ``flwr`` CLI with a generated config.

Enrollment registers SuperNode keys through it and the federated runner submits and
follows runs through it, so it belongs to the fleet, below both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgefleet.device.core.errors import EdgefleetError

__all__ = ["BIN", "CONN", "FlRunError", "SuperLinkConn", "flower_env"]

#: Our venv's programs (``flwr``, ``flower-superlink``, ``flower-supernode``).
BIN = Path(sys.executable).parent
#: The name of the one connection in the generated Flower configuration.
CONN = "edgefleet"


class FlRunError(EdgefleetError):
    """A Flower process or run failed; the message says which and why."""

    exit_code = 70


def flower_env(home: Path) -> dict[str, str]:
    """Environment for a Flower process: its own FLWR_HOME, our venv's tools on PATH."""
    return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}"
            f"{os.environ.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0"}


@dataclass
class SuperLinkConn:
    """How the ``flwr`` CLI reaches a SuperLink; written as a Flower config in ``home``."""

    address: str
    home: Path
    root_certificates: Path | None = None

    def write(self) -> None:
        """Write ``$FLWR_HOME/config.toml`` with one connection named ``edgefleet``."""
        self.home.mkdir(parents=True, exist_ok=True)
        tls = (f'root-certificates = "{self.root_certificates.resolve()}"'
               if self.root_certificates else "insecure = true")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\n'
            f'address = "{self.address}"\n{tls}\n')

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against this SuperLink."""
        self.write()
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                              env=flower_env(self.home), timeout=timeout, check=False)
