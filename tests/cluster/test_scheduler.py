"""The scheduler alone, driven by a fake model that reads its context back from a fake paged cache:
a wrong block table, context length or chunk boundary changes the tokens it produces."""

import random

import pytest

from cluster.engine.request import RequestError
from cluster.engine.scheduler import Batch, Scheduler
from shard.sampler import Sample, SamplingParams

VOCAB = 1000
EOS = 999


def next_token(tokens: list[int]) -> int:
    return hash(tuple(tokens)) % (VOCAB - 1)  # never EOS unless a test asks for it


class FakeModel:
    """Writes each chunk's tokens into slots of a paged cache and samples from what it reads back."""

    def __init__(self, block_size: int):
        self.block_size, self.cache = block_size, {}

    def run(self, batch: Batch) -> dict[int, Sample]:
        out = {}
        for chunk in batch.step.seqs:
            for i, t in enumerate(chunk.token_ids):
                pos = chunk.context_len + i
                self.cache[chunk.block_table[pos // self.block_size] * self.block_size + pos % self.block_size] = t
            if chunk.params is not None:
                n = chunk.context_len + len(chunk.token_ids)
                seen = [self.cache[chunk.block_table[p // self.block_size] * self.block_size + p % self.block_size]
                        for p in range(n)]
                out[chunk.seq_id] = Sample(next_token(seen))
        return out


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens_per_step=32, lanes=1, max_model_len=512,
         prefix_caching=True):
    return Scheduler(num_blocks, block_size, max_num_seqs=max_num_seqs, max_tokens_per_step=max_tokens_per_step,
                     max_model_len=max_model_len, eos_token_ids=frozenset({EOS}), lanes=lanes,
                     prefix_caching=prefix_caching)


def drive(sched: Scheduler, arrivals: dict[int, list[tuple[int, list[int], SamplingParams]]], lanes: int = 1):
    """Runs to completion; `arrivals[step]` are added before that step. Returns outputs and batches."""
    model, outputs, batches, step = FakeModel(sched.block_size), {}, [], 0
    while step <= max(arrivals, default=0) or sched.seqs:
        for seq_id, prompt, params in arrivals.get(step, []):
            sched.add(seq_id, prompt, params)
            outputs[seq_id] = []
        # One batch per lane in flight at once, returned oldest first, as the engine does with PP.
        in_flight = [b for lane in range(lanes) if (b := sched.schedule(lane)) is not None]
        batches += in_flight
        for batch in in_flight:
            for u in sched.update(batch, model.run(batch)):
                outputs[u.seq_id].append(u.sample.token_id)
        step += 1
        assert step < 10_000
    return outputs, batches


def workload(n=32, seed=0, max_step=20):
    rng = random.Random(seed)
    arrivals = {}
    for i in range(n):
        prompt = [rng.randrange(VOCAB - 1) for _ in range(rng.randint(1, 40))]
        step = 0 if i < n // 2 else rng.randint(1, max_step)  # half join mid-flight
        arrivals.setdefault(step, []).append((i, prompt, SamplingParams(temperature=0, max_tokens=rng.randint(1, 24))))
    return arrivals


@pytest.mark.parametrize("num_blocks,lanes", [(400, 1), (24, 1), (400, 2), (48, 3)])
def test_every_sequence_matches_its_solo_run_and_every_block_comes_back(num_blocks, lanes):
    arrivals = workload()
    sched = make(num_blocks=num_blocks, lanes=lanes)
    outputs, batches = drive(sched, arrivals, lanes)
    for reqs in arrivals.values():
        for seq_id, prompt, params in reqs:
            assert outputs[seq_id] == reference(prompt, params.max_tokens), seq_id
    assert sched.num_free_blocks == num_blocks and not sched.seqs
    sched.check_blocks()
    assert (sched.preemptions > 0) == (num_blocks < 100)  # a small KV budget does force preemption
    for b in batches:
        assert b.num_tokens <= 32 and len(b.seqs) <= 8
        assert all(s.lane == b.lane for s in b.seqs)


def test_long_prompt_is_prefilled_in_chunks_and_only_the_last_chunk_samples():
    sched = make(max_tokens_per_step=16, max_num_seqs=4)
    prompt = list(range(1, 41))
    outputs, batches = drive(sched, {0: [(7, prompt, SamplingParams(temperature=0, max_tokens=3))]})
    chunks = [c for b in batches for c in b.step.seqs]
    assert [len(c.token_ids) for c in chunks] == [16, 16, 8, 1, 1]
    assert [c.context_len for c in chunks] == [0, 16, 32, 40, 41]
    assert [c.params is not None for c in chunks] == [False, False, True, True, True]
    assert outputs[7] == reference(prompt, 3)


def test_decodes_are_not_starved_by_a_long_prompt():
    sched = make(max_tokens_per_step=8, max_num_seqs=4)
    sched.add(0, [1, 2], SamplingParams(temperature=0, max_tokens=10))
    model = FakeModel(4)
    first = sched.schedule()
    sched.update(first, model.run(first))
    sched.add(1, list(range(1, 30)), SamplingParams(temperature=0, max_tokens=1))
    second = sched.schedule()
    assert [(c.seq_id, len(c.token_ids)) for c in second.step.seqs] == [(0, 1), (1, 7)]


def test_preempted_sequence_is_recomputed_from_prompt_and_outputs():
    # 3 blocks of 4: two sequences of 4 + 8 tokens cannot both hold their KV to the end. Without the
    # prefix cache, which would give the preempted one its first block back (test_prefix_cache.py).
    sched = make(num_blocks=3, block_size=4, prefix_caching=False)
    a, b = [1, 2, 3], [4, 5, 6]
    outputs, batches = drive(sched, {0: [(0, a, SamplingParams(temperature=0, max_tokens=6)),
                                         (1, b, SamplingParams(temperature=0, max_tokens=6))]})
    assert outputs == {0: reference(a, 6), 1: reference(b, 6)}
    assert sched.preemptions >= 1
    resumed = [c for bt in batches for c in bt.step.seqs if c.seq_id == 1 and c.context_len == 0]
    assert len(resumed) == 2 and len(resumed[1].token_ids) > len(b)  # prompt + produced tokens
    assert resumed[1].output_index == len(resumed[1].token_ids) - len(b)
    assert sched.num_free_blocks == 3


def test_queued_tokens_count_prompt_left_to_prefill_not_decodes():
    sched = make(max_tokens_per_step=16, max_num_seqs=4)
    model = FakeModel(4)
    sched.add(0, list(range(1, 41)), SamplingParams(temperature=0, max_tokens=4))  # 40 tokens: 3 chunks
    sched.add(1, [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
    assert sched.queued_tokens == 43
    batch = sched.schedule()                      # 16 of the long prompt; the short one waits for budget
    assert sched.queued_tokens == 24 + 3
    sched.update(batch, model.run(batch))
    batch = sched.schedule()                      # 16 more; the short one gets no budget yet
    sched.update(batch, model.run(batch))
    assert sched.queued_tokens == 8 + 3
    batch = sched.schedule()                      # the last 8 and the whole short prompt
    assert sched.queued_tokens == 0
    sched.update(batch, model.run(batch))
    assert sched.queued_tokens == 0               # both decode now: one token each is not prefill work
    sched.add(2, [7] * 5, SamplingParams(temperature=0, max_tokens=4))
    sched.abort(0)
    assert sched.queued_tokens == 5


def test_abort_frees_blocks_waiting_running_and_in_flight():
    sched = make(num_blocks=16, max_num_seqs=2)
    for i in range(3):
        sched.add(i, [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=20))
    batch = sched.schedule()  # 0 and 1 in flight, 2 waits (max_num_seqs)
    assert {s.seq_id for s in batch.seqs} == {0, 1}
    assert sched.abort(2) and sched.abort(0)
    assert 0 in sched.seqs  # in flight: forgotten when its batch returns...
    assert sched.num_free_blocks == 16 - 2  # ...but its blocks are free now: a batch that takes them runs after
    ahead = sched.schedule()                # the batch after the one in flight: 1's decode only
    assert [c.seq_id for c in ahead.step.seqs] == [1] and ahead.fed == ahead.step.seqs
    with pytest.raises(AssertionError, match="still has two batches in flight"):
        sched.schedule()
    model = FakeModel(4)
    samples = model.run(batch)
    ahead.feed(samples)
    updates = sched.update(batch, samples)
    assert [u.seq_id for u in updates] == [1] and ahead.step.seqs[0].token_ids == [updates[0].sample.token_id]
    assert set(sched.seqs) == {1} and sched.num_free_blocks == 16 - 2
    assert sched.abort(1) and sched.num_free_blocks == 16 and set(sched.seqs) == {1}  # held by `ahead`
    assert sched.update(ahead, model.run(ahead)) == [] and not sched.seqs
    assert not sched.abort(1) and not sched.abort(42)


def test_stop_tokens_and_eos_finish_a_sequence():
    sched = make()
    prompt = [5, 6]
    first = reference(prompt, 1)[0]
    outputs, _ = drive(sched, {0: [(0, prompt, SamplingParams(temperature=0, max_tokens=9, stop_token_ids={first})),
                                   (1, prompt, SamplingParams(temperature=0, max_tokens=4))]})
    assert outputs == {0: [first], 1: reference(prompt, 4)}
    sched.add(2, prompt, SamplingParams(temperature=0, max_tokens=5))
    batch = sched.schedule()
    (update,) = sched.update(batch, {2: Sample(EOS)})
    assert update.finish_reason == "stop" and not sched.seqs


def test_fail_all_forgets_everything_and_frees_every_block():
    sched = make(num_blocks=16)
    for i in range(4):
        sched.add(i, [1, 2, 3], SamplingParams(temperature=0, max_tokens=8))
    sched.schedule()
    assert sorted(sched.fail_all()) == [0, 1, 2, 3]
    assert sched.num_free_blocks == 16 and not sched.seqs and sched.num_running == sched.num_waiting == 0


@pytest.mark.parametrize("prompt,max_tokens,message", [
    ([], 4, "prompt is empty"),
    ([1] * 500, 20, "exceeds the model's context of 512 tokens; lower max_tokens"),
    ([1] * 200, 100, "needs 75 KV blocks, more than the 64 of one batch lane"),
])
def test_add_refuses_what_could_never_run(prompt, max_tokens, message):
    sched = make()
    with pytest.raises(RequestError, match=message):
        sched.add(0, prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    assert not sched.seqs and sched.num_waiting == 0


def test_add_refuses_a_duplicate_id_and_a_budget_below_the_batch():
    sched = make()
    sched.add(0, [1], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(0, [1], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens_per_step .* must be at least max_num_seqs"):
        make(max_num_seqs=64, max_tokens_per_step=32)


def drive_ahead(sched: Scheduler, arrivals, lanes: int = 1, abort_at: dict[int, list[int]] | None = None):
    """As the engine drives it: while a lane's batch is in flight its next batch is scheduled ahead,
    fed with the returned samples and sent before the returned batch's `update`."""
    model, outputs, step = FakeModel(sched.block_size), {}, 0
    in_flight: dict[int, Batch] = {}
    ready: dict[int, Batch] = {}
    aheads = 0
    while step <= max(arrivals, default=0) or sched.seqs:
        for seq_id, prompt, params in arrivals.get(step, []):
            sched.add(seq_id, prompt, params)
            outputs[seq_id] = []
        for seq_id in (abort_at or {}).get(step, []):
            sched.abort(seq_id)
        for lane in range(lanes):
            if lane not in in_flight and (b := sched.schedule(lane)) is not None:
                in_flight[lane] = b
            if lane in in_flight and lane not in ready and (b := sched.schedule(lane)) is not None:
                ready[lane] = b
        for lane in list(in_flight):
            batch = in_flight.pop(lane)
            samples = model.run(batch)
            if (following := ready.pop(lane, None)) is not None:
                following.feed(samples)
                in_flight[lane] = following
                aheads += 1
            for u in sched.update(batch, samples):
                outputs[u.seq_id].append(u.sample.token_id)
        step += 1
        assert step < 10_000
    return outputs, aheads


@pytest.mark.parametrize("num_blocks,lanes", [(400, 1), (24, 1), (400, 2), (48, 3)])
def test_scheduling_ahead_gives_every_sequence_its_solo_run_and_wastes_no_block(num_blocks, lanes):
    arrivals = workload()
    stop = {}
    for reqs in arrivals.values():   # every third request stops on its third token, one step after it was sent
        for k, (seq_id, prompt, params) in enumerate(reqs):
            if seq_id % 3 == 0 and params.max_tokens > 3:
                stop[seq_id] = reference(prompt, 3)[2]
                reqs[k] = (seq_id, prompt, SamplingParams(temperature=0, max_tokens=params.max_tokens,
                                                          stop_token_ids={stop[seq_id]}))
    sched = make(num_blocks=num_blocks, lanes=lanes)
    outputs, aheads = drive_ahead(sched, arrivals, lanes, abort_at={5: [1, 2]})
    assert aheads > 0
    for reqs in arrivals.values():
        for seq_id, prompt, params in reqs:
            want = reference(prompt, params.max_tokens)
            if seq_id in stop:
                want = want[:want.index(stop[seq_id]) + 1]
            if seq_id in (1, 2):
                assert outputs[seq_id] == want[:len(outputs[seq_id])]
            else:
                assert outputs[seq_id] == want, seq_id
    assert sched.num_free_blocks == num_blocks and not sched.seqs
    sched.check_blocks()


def test_a_sequence_whose_token_in_flight_is_its_last_is_not_scheduled_ahead():
    sched = make()
    sched.add(0, [1, 2, 3], SamplingParams(temperature=0, max_tokens=1))
    sched.add(1, [4, 5, 6], SamplingParams(temperature=0, max_tokens=5))
    batch = sched.schedule()
    assert [c.seq_id for c in batch.step.seqs] == [0, 1]   # both prefills; 0's token in flight will be its last
    ahead = sched.schedule()
    assert [c.seq_id for c in ahead.step.seqs] == [1]
    assert ahead.step.seqs[0].context_len == 3 and ahead.step.seqs[0].output_index == 1


def test_scheduling_ahead_never_preempts():
    # 2 blocks of 4: the two sequences fill them with their prompts; the next decode needs a third.
    sched = make(num_blocks=2, block_size=4, prefix_caching=False)
    sched.add(0, [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=3))
    sched.add(1, [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3))
    batch = sched.schedule()
    assert sched.schedule() is None and sched.preemptions == 0
    sched.update(batch, FakeModel(4).run(batch))
    assert sched.schedule() is not None and sched.preemptions == 1    # with nothing in flight it does


def test_sequences_are_held_by_identity_and_chunks_share_their_block_table():
    sched = make()
    params = SamplingParams(temperature=0, max_tokens=4)
    sched.add(0, [1, 2, 3], params)
    sched.add(1, [1, 2, 3], params)
    a, b = sched.seqs[0], sched.seqs[1]
    a.seq_id = b.seq_id = 7             # equal field by field: still two sequences
    assert a != b and len({a, b}) == 2
    a.seq_id, b.seq_id = 0, 1
    batch = sched.schedule()
    assert [c.block_table for c in batch.step.seqs] == [a.block_table, b.block_table]
    assert batch.step.seqs[0].block_table is a.block_table and batch.step.seqs[1].block_table is b.block_table


def test_per_step_work_does_not_grow_with_the_context(monkeypatch):
    """Decodes of a long sequence append to its token list and hash only the block that fills: no
    token list is rebuilt and no chain recomputed (a property of the work, not a timing)."""
    import cluster.engine.kv_cache as kv

    hashed = []
    real = kv.hashlib.blake2b
    monkeypatch.setattr(kv.hashlib, "blake2b", lambda *a, **k: hashed.append(1) or real(*a, **k))
    sched = make(num_blocks=256, block_size=4, max_model_len=2048, max_tokens_per_step=1024)
    prompt = list(range(1, 801))
    sched.add(0, prompt, SamplingParams(temperature=0, max_tokens=40))
    tokens = sched.seqs[0].tokens
    assert len(hashed) == 200                        # the prompt's blocks, once, at add()
    model = FakeModel(4)
    hashed.clear()
    while sched.seqs:
        batch = sched.schedule()
        assert not sched.seqs or sched.seqs[0].tokens is tokens
        sched.update(batch, model.run(batch))
    assert len(hashed) == (800 + 39) // 4 - 200      # one per block whose KV the output filled
    assert tokens[:800] == prompt and len(tokens) == 840
