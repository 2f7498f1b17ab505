"""`make demo`: the whole fleet on this machine with embedded defaults (`edgefleet demo`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    """Hand over to the operator CLI's demo command (extra arguments pass through)."""
    exe = Path(sys.executable).parent / "edgefleet"
    os.execv(exe, [str(exe), "demo", *sys.argv[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
