"""An agent in this process serving one package, with telemetry and the cloud fallback
off unless a test's sections say otherwise (the e2e tests of inputs and labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet.device.agent.daemon import Agent
from edgefleet.device.agent.settings import AgentConfig
from edgefleet.device.core.metrics import Metrics


def local_agent(tmp_path: Path, package: Path, device_id: str, **sections: Any) -> Agent:
    """A started :class:`Agent` whose state is under ``tmp_path``; ``sections`` are
    config sections added or replaced (``input={...}``, ``mqtt={...}``, ...)."""
    cfg = AgentConfig.model_validate({
        "device_id": device_id, "state_dir": str(tmp_path / "state"),
        "model": {"package": str(package), "threads": 1},
        "telemetry": {"enabled": False}, "fallback": {"mode": "off"}, **sections})
    return Agent(cfg, Metrics()).start()
