"""The local multi-process replica: failures end in an error naming the rank, never a hang, and
leave no process behind."""

from __future__ import annotations

import time

import pytest

from cluster.runtime.processes import LocalReplica
from cluster.engine.executor import LocalExecutor
from cluster.engine.offline import blocks_needed, generate, Request
from shard.layout import Layout
from shard.sampler import SamplingParams
from tests.synthetic import make_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("local") / "m", layers=2)


@pytest.mark.slow
def test_dead_rank_fails_the_step_fast_and_cleans_up(model_dir):
    requests = [Request([5, 6, 7], GREEDY)]
    replica = LocalReplica(model_dir, Layout(2, 2), num_blocks=blocks_needed(requests, 4), block_size=4,
                           progress=False, timeout_s=15)
    procs = list(replica._procs)
    try:
        events = generate(LocalExecutor(replica), requests, frozenset(), num_blocks=replica.num_blocks,
                          block_size=replica.block_size)
        next(events)  # the replica works ...
        procs[-1].kill()  # ... until the last stage's rank dies
        procs[-1].join()
        start = time.monotonic()
        with pytest.raises(Exception) as info:
            list(events)
        assert time.monotonic() - start < 20, "a lost peer must fail within the collective timeout"
        assert not isinstance(info.value, AssertionError)
    finally:
        replica.close()
    assert not any(p.is_alive() for p in procs)


def test_bad_cache_size_fails_before_any_process_starts(model_dir):
    with pytest.raises(ValueError, match="num_blocks"):
        LocalReplica(model_dir, Layout(2, 1), num_blocks=0, block_size=4, progress=False)
