"""Chosen ports sit below the ephemeral range, where no outgoing connection takes them first."""

from __future__ import annotations

import socket

from cluster.runtime import ports


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound():
    start = ports.ephemeral_start()
    chosen = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST <= p < start for p in chosen), (start, chosen)
    assert not any(10002 <= p <= 19999 for p in chosen)  # Ray's default worker ports: `ray start` refuses them
    assert len(chosen) > 1  # random, so that processes starting together rarely pick the same one
    with socket.socket() as s:
        s.bind(("127.0.0.1", chosen.pop()))


def test_a_port_held_below_the_range_is_skipped_and_no_room_falls_back_to_the_kernel(tmp_path, monkeypatch):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    (tmp_path / "range").write_text(f"{port + 1}\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "range")
    monkeypatch.setattr(ports, "LOWEST", port)  # the only port below the range is held
    try:
        assert ports.free_port() != port
    finally:
        held.close()
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "absent")
    assert ports.ephemeral_start() == 32768
