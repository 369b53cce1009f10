"""Free local ports, for what starts next and must be told where to listen (a router, a rendezvous, a
local Ray dashboard)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (port 0 would hide the choice from whoever must connect)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def dashboard_port(preferred: int = 8265) -> int:
    """Ray's usual dashboard port, or a free one when something (another local Ray cluster) holds it:
    the dashboard's URL is printed either way."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred
