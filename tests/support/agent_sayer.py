"""``edgefleet-agent`` with one test hook: lines written to the file ``$SAYER_FILE`` are
logged (logger ``app.sayer``, WARNING) by the running agent process, then the file is
removed. Lets the remote-logs e2e test put known lines (secrets included) into a real
agent's log without a switch in the package."""

from __future__ import annotations

import logging
import os
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


def main() -> None:
    threading.Thread(target=_watch, args=(Path(os.environ["SAYER_FILE"]),),
                     daemon=True).start()
    from edgefleet.device.agent.cli import main as agent_main

    agent_main()


if __name__ == "__main__":
    main()
