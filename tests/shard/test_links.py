"""Link probes over real gloo process groups in two plain processes (no Ray): a hand-off is timed,
and a peer that never takes its side of a link is an error naming it once the deadline passes,
long before the group's own timeout."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp

from shard.layout import Layout
from shard.links import LinkError, layout_links, probe
from shard.parallel import Endpoint, init_parallel, shutdown_parallel


def _rank(rank: int, port: int, results) -> None:
    layout = Layout(1, 2)
    ctx = init_parallel(layout, rank, Endpoint("127.0.0.1", port, timeout_s=60))
    (link,) = layout_links(layout)
    try:
        # 32 MiB against 4 KiB: on a loaded 2-core machine a 1 MiB hand-off over loopback can take
        # less time than a scheduling hiccup, so the sizes must differ by more than the noise.
        timing = probe(ctx, link, 4096, 2**25, timeout_s=20)
        results.put((rank, "timing", timing.small_s, timing.large_s))
        if rank == 0:  # rank 1 sits this one out: rank 0 must give up at its deadline
            started = time.monotonic()
            try:
                probe(ctx, link, 4096, 2**20, timeout_s=1)
            except LinkError as e:
                results.put((rank, "error", str(e), time.monotonic() - started))
        results.put((rank, "done", None, None))
    finally:
        if rank == 1:
            time.sleep(2)  # stay in the group while rank 0 waits in vain
        shutdown_parallel()


@pytest.mark.slow
def test_a_hand_off_is_timed_and_a_silent_peer_is_an_error_at_the_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = {}
    while not results.empty():
        rank, kind, a, b = results.get()
        got[rank, kind] = (a, b)
    assert all(p.exitcode == 0 for p in procs), got
    for rank in (0, 1):
        small_s, large_s = got[rank, "timing"]
        assert 0 < small_s < large_s < 1
    message, waited = got[0, "error"]
    assert message.startswith("PP send stage 0->1 tp 0 (ranks 0->1): rank 0's send of 4 KiB to rank 1 timed out")
    assert 0.9 < waited < 3
