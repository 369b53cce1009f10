"""The CUDA-graph runner without a GPU: bucket choice, padding up to a bucket, the eager fallback
(prefills, batches above the largest bucket, contexts past the graphs' width), checked through a
capture backend that replays eagerly from the same static buffers, against a worker without
graphs. The real capture (`CudaGraphBackend`) needs a GPU: `bench/gpu_layer.py` runs it."""

from __future__ import annotations

import pytest
import torch

from shard.graphs import batch_buckets, bucket_for
from shard.kernels import cpu
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.worker import SeqChunk, ShardWorker, StepInput
from tests.synthetic import make_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
BLOCK, BLOCKS = 4, 40


def test_buckets_are_powers_of_two_then_multiples_of_eight():
    assert batch_buckets(1) == [1]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(256)[:6] == [1, 2, 4, 8, 16, 24] and batch_buckets(256)[-1] == 256
    assert len(batch_buckets(256)) == 3 + 32
    buckets = batch_buckets(64)
    assert [bucket_for(n, buckets) for n in (1, 3, 5, 8, 9, 17, 64, 65)] == [1, 4, 8, 8, 16, 24, 64, None]
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        batch_buckets(0)


class EagerReplay:
    """A capture backend for the CPU: a 'graph' is its forward, rerun from the static buffers on
    each replay; counts captures and replays by batch size."""

    def __init__(self):
        self.captured: list[int] = []
        self.replays: list[int] = []

    def capture(self, forward):
        rows = forward().shape[0]
        self.captured.append(rows)

        def replay():
            self.replays.append(rows)
            return forward()
        return replay

    def memory_bytes(self) -> int:
        return 0


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    if cpu.library() is None:  # the static decode step runs on the C kernels' attention on a CPU
        pytest.skip(f"CPU kernels unavailable: {cpu.why_unavailable()}")
    path = make_llama(tmp_path_factory.mktemp("graphs") / "m", layers=2, heads=4, kv_heads=2, head_dim=16,
                      intermediate=48)
    backend = EagerReplay()
    graphed = ShardWorker(path, ParallelContext(Layout()), num_blocks=BLOCKS, block_size=BLOCK, progress=False,
                          graph_max_batch=4, graph_backend=backend)
    eager = ShardWorker(path, ParallelContext(Layout()), num_blocks=BLOCKS, block_size=BLOCK, progress=False)
    return graphed, eager, backend


def step_both(workers, chunks):
    graphed, eager, _ = workers
    outs = [w.execute(StepInput(chunks, return_logits=True)) for w in (graphed, eager)]
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)
    assert {s: o.token_id for s, o in outs[0].samples.items()} == {s: o.token_id for s, o in outs[1].samples.items()}
    return {s: o.token_id for s, o in outs[0].samples.items()}


def test_capture_per_bucket_largest_first_with_a_pad_block(workers):
    graphed, eager, backend = workers
    assert backend.captured == [4, 2, 1]
    assert graphed.cache.num_blocks == BLOCKS + 1 and eager.cache.num_blocks == BLOCKS
    assert graphed.graphs.pad_block == BLOCKS and graphed.graphs.max_context == BLOCKS * BLOCK


def test_decodes_replay_padded_to_their_bucket_and_the_rest_runs_eagerly(workers):
    _, _, backend = workers
    tables = {s: [4 * s + j for j in range(4)] for s in range(6)}   # 6 sequences, 4 blocks each
    prompts = {s: [7 + s, 11, 13 + s][: 2 + s % 2] for s in range(6)}
    replays = len(backend.replays)

    # Prefills of 3 sequences: eager. Then 3 decodes: the bucket of 4, one padding row.
    tokens = step_both(workers, [SeqChunk(s, prompts[s], 0, tables[s], GREEDY) for s in range(3)])
    assert len(backend.replays) == replays
    lens = {s: len(prompts[s]) for s in range(3)}
    for i in range(2):
        tokens = step_both(workers, [SeqChunk(s, [tokens[s]], lens[s] + i, tables[s], GREEDY, i + 1) for s in range(3)])
    assert backend.replays[replays:] == [4, 4]

    # A short prompt beside a decode: 1 + 3 decode rows, the bucket of 4. One decode alone: the bucket of 1.
    tokens |= step_both(workers, [SeqChunk(0, [tokens[0]], lens[0] + 2, tables[0], GREEDY, 3),
                                  SeqChunk(3, prompts[3], 0, tables[3], GREEDY)])
    step_both(workers, [SeqChunk(3, [tokens[3]], len(prompts[3]), tables[3], GREEDY, 1)])
    assert backend.replays[replays + 2:] == [4, 1]

    # Five decodes (above the largest bucket, 4): eager.
    for s in (4, 5):
        tokens |= step_both(workers, [SeqChunk(s, prompts[s], 0, tables[s], GREEDY)])
    before = len(backend.replays)
    contexts = {0: lens[0] + 3, 1: lens[1] + 2, 2: lens[2] + 2, 4: len(prompts[4]), 5: len(prompts[5])}
    step_both(workers, [SeqChunk(s, [tokens[s]], c, tables[s], GREEDY, 1) for s, c in contexts.items()])
    assert len(backend.replays) == before


def test_a_context_past_the_graphs_width_decodes_eagerly(workers):
    graphed, _, backend = workers
    width = graphed.graphs.max_context
    assert not graphed.graphs.takes([1, 1], [3, width])
    assert graphed.graphs.takes([1, 1], [3, width - 1])
    assert graphed.graphs.takes([1, 2], [3, width - 2]) and not graphed.graphs.takes([1, 2], [3, width - 1])
    assert not graphed.graphs.takes([1, 4], [3, 4])  # 5 rows: above the largest bucket, 4
    assert not graphed.graphs.takes([9], [3]) and not graphed.graphs.takes([], [])  # a prefill; nothing


def test_verifications_replay_the_decode_graphs_row_by_row(workers):
    """A speculative verification (the last token and 2 drafts, 3 rows) beside a decode fills the
    bucket of 4 rows; the logits at every row and the samples equal the eager step's."""
    graphed, _, backend = workers
    tables = {s: [24 + 4 * s + j for j in range(4)] for s in (0, 1)}   # blocks no other test uses
    prompts = {0: [5, 9, 14, 3, 8], 1: [6, 2, 12]}
    tokens = step_both(workers, [SeqChunk(s, p, 0, tables[s], GREEDY) for s, p in prompts.items()])
    before = len(backend.replays)
    draft = [tokens[0], 21, 30]
    step_both(workers, [SeqChunk(0, draft, len(prompts[0]), tables[0], GREEDY, 1, num_draft=2),
                        SeqChunk(1, [tokens[1]], len(prompts[1]), tables[1], GREEDY, 1)])
    assert backend.replays[before:] == [4]


def test_cuda_graphs_on_a_cpu_device_change_nothing(tmp_path):
    path = make_llama(tmp_path / "m", layers=1, heads=4, kv_heads=2, head_dim=16, intermediate=48)
    worker = ShardWorker(path, ParallelContext(Layout()), num_blocks=8, block_size=BLOCK, progress=False,
                         cuda_graphs=True)
    assert worker.graphs is None and worker.cache.num_blocks == 8 and worker.graph_memory_bytes == 0
