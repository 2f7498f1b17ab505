"""docs/operations.md, Part 1, executed: every ``bash`` block, in order, as written.

Only paths, host names and ports are substituted (a temporary folder for /srv, /var/lib
and /etc; 127.0.0.1 for fleet.example.org; free ports for 8883, 9092, 8470, 1884).
Between blocks the test waits where an operator would (devices online, an update
installed) and starts the agents the way the guide's ``sh`` block does (systemd on a
real device). The result is the issue's "done": a fleet home, `server up`, two agents on
one host that start without a model, a pushed model rolled out, a federated round whose
result is canaried as the next version and promoted, and `fleet ls` / `alerts` /
`report` answering from the home's store.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.device.core.process import Child
from edgefleet.server.fleet.broker import free_port
from tests.conftest import BIN, run_cli
from tests.support.telemetry import wait_until

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1500)]


def guide_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block of Part 1, in order."""
    part1 = text.split("## Part 2", 1)[0]
    return [(m.group(1), m.group(2)) for m in
            re.finditer(r"^```(\w+)\n(.*?)^```$", part1, flags=re.S | re.M)]


def test_the_guide_has_executable_blocks() -> None:
    blocks = guide_blocks(GUIDE.read_text())
    run = [b for lang, b in blocks if lang == "bash"]
    assert len(run) >= 8 and all(lang in ("bash", "sh") for lang, _ in blocks)
    assert "edgefleet server up" in "\n".join(run)


@pytest.fixture
def where() -> Iterator[Path]:
    """A folder the broker's user can reach (pytest's tmp folders are closed to it)."""
    d = Path(tempfile.mkdtemp(prefix="ef-guide-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _substitutions(root: Path) -> list[tuple[str, str]]:
    return [("/srv/edgefleet", str(root / "srv" / "edgefleet")),
            ("/var/lib/edgefleet", str(root / "var")), ("/etc/edgefleet", str(root / "etc")),
            ("fleet.example.org", "127.0.0.1"),
            *((f":{p}", f":{free_port()}") for p in (8883, 9092, 8470)),
            ("--broker-local-port 1884", f"--broker-local-port {free_port()}"),
            ("sudo ", "")]


def _apply(body: str, subs: list[tuple[str, str]]) -> str:
    for old, new in subs:
        body = body.replace(old, new)
    return body


def test_operations_guide(where: Path) -> None:
    subs = _substitutions(where)
    work = where / "work"
    work.mkdir()
    (where / "srv").mkdir()
    home = Path(_apply("/srv/edgefleet", subs))
    env = {**os.environ, "EDGEFLEET_HOME": str(home), "COLUMNS": "100",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    agents: list[Child] = []
    transcript: list[str] = []

    def fleet() -> dict[str, dict[str, object]]:
        r = run_cli("fleet", "ls", "--json", env={"EDGEFLEET_HOME": str(home)})
        if r.returncode:
            return {}
        return {str(d["device"]): d for d in json.loads(r.stdout)["devices"]}

    def on_version(version: str) -> Callable[[], bool]:
        def check() -> bool:
            rows = fleet()
            return len(rows) == 2 and all(r["model_version"] == version for r in rows.values())
        return check

    def run_block(body: str) -> str:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=work, env=env,
                             capture_output=True, text=True, timeout=900, check=False)
        transcript.append(f"$ {body}\n{res.stdout}{res.stderr}")
        assert res.returncode == 0, "\n".join(transcript[-2:])
        return res.stdout

    def after(body: str, later: list[str]) -> None:
        """Wait where an operator waits; start the agents as the guide's sh block does."""
        if "edgefleet devices ls" in body:
            runs = [line for b in later for line in b.splitlines()
                    if line.startswith("edgefleet-agent run")]
            assert len(runs) == 2, "the guide starts two agents on the bench"
            for i, line in enumerate(runs):
                argv = shlex.split(_apply(line.rstrip(" &"), subs))
                agents.append(Child.start(f"agent-{i}", [str(BIN / argv[0]), *argv[1:]],
                                          log_path=where / f"agent-{i}.log"))
            assert wait_until(lambda: len(fleet()) == 2, 120, every=1.0), _logs()
            assert all(a.alive() for a in agents), _logs()
        elif "--fleet" in body:
            assert wait_until(on_version("1.0.0"), 180, every=1.0), _logs()
        elif "edgefleet promote" in body:
            assert wait_until(on_version("1.1.0"), 180, every=1.0), _logs()

    def _logs() -> str:
        return "\n".join([*transcript[-3:], *(f"--- agent-{i}:\n" + (
            where / f"agent-{i}.log").read_text()[-1500:] for i in range(len(agents)))])

    blocks = guide_blocks(GUIDE.read_text())
    try:
        outputs = []
        for i, (lang, body) in enumerate(blocks):
            if lang != "bash":
                continue
            body = _apply(body, subs)
            outputs.append(run_block(body))
            after(body, [b for _, b in blocks[i + 1:]])
        status = json.loads(run_cli("server", "status", "--json", env=env).stdout)
        assert status["all_up"], status
        # the agents waited: each reported it before the first rollout
        for d in ("pi-01", "pi-02"):
            shown = json.loads(run_cli("fleet", "show", d, "--json", env=env).stdout)
            kinds = [e["kind"] for e in shown["events"]]
            assert any("waiting_for_update" in k for k in kinds), kinds
        # the FL result is the next version of digits-mlp, its parent recorded
        ls = json.loads(run_cli("registry", "ls", "--json", env=env).stdout)["models"]
        fl = next(m for m in ls if m["version"] == "1.1.0")
        assert fl["name"] == "digits-mlp" and fl["lineage"]["parent"] == "digits-mlp@1.0.0"
        assert fl["lineage"]["source"] == "federated"
        assert "digits-mlp@1.1.0" in outputs[-1] or "digits-mlp@1.1.0" in "\n".join(
            transcript)
        assert (work / "report" / "index.html").is_file()
    finally:
        for a in agents:
            a.stop(20)
        run_cli("server", "down", env={"EDGEFLEET_HOME": str(home)}, timeout=120)
