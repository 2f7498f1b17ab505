"""The import contracts of pyproject.toml hold, and a breach of each kind makes them fail.

`make lint` runs the same contracts (scripts/lint-imports); these tests show the check
is real: a copy of the tree with one forbidden import added is rejected, naming the
contract it broke.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    root = tree / ".typecheck" / "edgefleet"
    root.mkdir(parents=True, exist_ok=True)
    for pkg in ("device", "server", "models"):
        (root / pkg).symlink_to(tree / pkg)
    return subprocess.run([str(LINT), "--no-cache", str(tree / "pyproject.toml")],
                          cwd=tree, capture_output=True, text=True, timeout=300, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree / ".typecheck")})


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for pkg in ("device", "server", "models"):
        shutil.copytree(REPO / pkg, tree / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    res = _lint(_copy(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "0 broken" in res.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("device/core/retry.py", "import edgefleet.device.wire.scoring",
     "device: agent > updates"),
    ("device/wire/frames.py", "import edgefleet.server.fleet.keys",
     "device never imports server or models"),
    ("server/telemetry/alerts.py", "import edgefleet.device.agent.daemon",
     "server uses device's shared layers"),
    ("models/core/train.py", "import edgefleet.server.fleet.keys",
     "models never imports server"),
    ("server/registry/http.py", "import edgefleet.models.sim.serial_faults",
     "simulators and fault injectors"),
    ("models/core/tasks.py", "import tensorflow",
     "TensorFlow is imported only by the build pipeline"),
    ("server/fleet/keys.py", "import edgefleet.server.registry.repository",
     "no import cycles between sibling packages"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str,
                                                contract: str) -> None:
    tree = _copy(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    res = _lint(tree)
    assert res.returncode != 0
    broken = res.stdout[res.stdout.index("Broken contracts"):]
    assert contract in " ".join(broken.split()), broken[:3000]
