"""``edgefleet-agent`` with one test hook: lines written to the file ``$SAYER_FILE`` are
logged (logger ``app.sayer``, WARNING) by the running agent process, then the file is
removed. Lets the remote-logs e2e test put known lines (secrets included) into a real
agent's log without a switch in the package."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _watch(path: Path) -> None:
    log = logging.getLogger("app.sayer")
    while True:
        time.sleep(0.1)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        path.unlink()
        for line in text.splitlines():
            log.warning("%s", line)


def say(path: Path, *lines: str) -> None:
    """Lines the running agent logs (it removes the file once they are logged)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def start(tmp: Path, device: str, password: str, broker_port: int,
          package: Path) -> subprocess.Popen[bytes]:
    """``device``'s agent (this module) on the broker at ``broker_port``: telemetry every
    0.5 s, no fallback, no sample store. Its state is ``tmp/state`` (the local API at
    ``tmp/state/agent.sock``), its say file ``tmp/say``, its log ``tmp/agent.log``."""
    pw_file = tmp / f"{device}.pw"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    cfg = tmp / "agent.toml"
    cfg.write_text("\n".join([
        f'device_id = "{device}"', f'state_dir = "{tmp / "state"}"',
        "[mqtt]", 'host = "127.0.0.1"', f"port = {broker_port}", f'username = "{device}"',
        f'password_file = "{pw_file}"', "backoff_base = 0.05", "backoff_cap = 0.5",
        "[model]", f'package = "{package}"', "threads = 1",
        "[telemetry]", "interval_s = 0.5", "[fallback]", 'mode = "off"',
        "[data]", "enabled = false"]) + "\n")
    return subprocess.Popen([sys.executable, "-m", "tests.support.agent_sayer", "run",
                             "--config", str(cfg)],
                            env={**os.environ, "SAYER_FILE": str(tmp / "say")},
                            stdout=subprocess.DEVNULL, stderr=(tmp / "agent.log").open("wb"))


def main() -> None:
    threading.Thread(target=_watch, args=(Path(os.environ["SAYER_FILE"]),),
                     daemon=True).start()
    from edgefleet.device.agent.cli import main as agent_main

    agent_main()


if __name__ == "__main__":
    main()
