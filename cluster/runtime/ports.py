"""Free local ports, for what starts next and must be told where to listen (a router, a rendezvous, a
local Ray dashboard).

A port is chosen above Ray's worker ports (see `LOWEST`) and below the kernel's ephemeral range
(`/proc/sys/net/ipv4/ip_local_port_range`), where it can still be free when the listener binds it:
inside the range, any outgoing connection of the processes starting meanwhile (a Ray cluster opens
hundreds) may take it as its source port first.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Below: Ray's worker ports (10002-19999 by default; its workers listen there, and `ray start` refuses
# a dashboard or GCS port inside that span) and the ports well-known services hold.
LOWEST = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range where there is room below it
    (port 0 would hide the choice from whoever must connect)."""
    top = ephemeral_start()
    for port in random.sample(range(LOWEST, top), min(64, max(0, top - LOWEST))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range (or none free there): the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768, Linux's default, where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def dashboard_port(preferred: int = 8265) -> int:
    """Ray's usual dashboard port, or a free one when something (another local Ray cluster) holds it:
    the dashboard's URL is printed either way."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred
