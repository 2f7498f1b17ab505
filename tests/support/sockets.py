"""Socket checks shared by the tests of edgefleet's bounded servers (registry, local API)."""

from __future__ import annotations

import socket


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes (or resets) ``s`` within ``seconds``."""
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
