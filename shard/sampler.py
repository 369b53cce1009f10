"""Next-token sampling on the last stage, with different parameters per sequence in one batch.

Seeded sampling is stateless: the random stream of a token depends only on (seed, index of the
token in the output), so a sequence that is preempted and recomputed, or retried on another
replica, samples exactly the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from shard.errors import UserError


class SamplingError(UserError, ValueError):
    """Invalid sampling parameters; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0       # 0 is greedy
    top_k: int = 0                 # 0 keeps every token
    top_p: float = 1.0             # nucleus mass kept
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    logprobs: int | None = None    # None: no logprobs; n: the sampled token's and the top n
    speculate: bool = True         # False: never speculative decoding (the output is the same either way)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise SamplingError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SamplingError(f"seed must be in [0, 2^63), got {self.seed}")
        object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sample:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int],
           bitmasks: list[bytes | None] | None = None) -> list[Sample]:
    """logits: [B, V] (full vocabulary); output_index[i]: how many tokens sequence i has already
    generated (the position of this token in its output, for seeded sampling); bitmasks[i], where
    set: the tokens row i may pick (constrained decoding, `apply_bitmasks`). Logprobs stay those of
    the raw distribution."""
    logits = logits.float()
    pick = apply_bitmasks(logits, bitmasks) if bitmasks and any(b is not None for b in bitmasks) else logits
    chosen = pick.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        chosen_rows = pick[rows]
        # Shift by the row max before dividing: a tiny temperature then gives 0 and -inf, not inf - inf.
        shifted = chosen_rows - chosen_rows.max(dim=-1, keepdim=True).values
        scaled = shifted / torch.tensor([params[i].temperature for i in random_rows])[:, None]
        probs = _filter_top_k_top_p(scaled, [params[i] for i in random_rows]).softmax(dim=-1)
        for j, i in enumerate(random_rows):
            p = params[i]
            gen = None
            if p.seed is not None:
                gen = torch.Generator().manual_seed(_mix(p.seed, output_index[i]))
            # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p exactly.
            noise = torch.empty_like(probs[j]).exponential_(generator=gen)
            chosen[i] = (probs[j] / noise).argmax()
    out = [Sample(int(t)) for t in chosen.tolist()]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        logp = logits[want].log_softmax(dim=-1)
        for j, i in enumerate(want):
            out[i].logprob = float(logp[j, out[i].token_id])
            n = params[i].logprobs
            if n:
                values, ids = logp[j].topk(n)
                out[i].top_logprobs = list(zip(ids.tolist(), values.tolist()))
    return out


def apply_bitmasks(logits: torch.Tensor, bitmasks: list[bytes | None]) -> torch.Tensor:
    """A copy of `logits` [B, V] with -inf wherever a row's bitmask (one bit per token id, packed in
    little-endian int32 words, as `cluster.engine.grammar` sends it) is 0; rows without one are kept.
    xgrammar's kernel does the work (CPU, CUDA): 3.8 ms for 32 rows of 49,152 here, 25 ms in plain torch."""
    import xgrammar

    rows = [i for i, b in enumerate(bitmasks) if b is not None]
    words = len(bitmasks[rows[0]]) // 4
    packed = torch.full((logits.shape[0], words), -1, dtype=torch.int32)
    packed[rows] = torch.frombuffer(bytearray(b"".join(bitmasks[i] for i in rows)), dtype=torch.int32).view(-1, words)
    out = logits.clone()
    xgrammar.apply_token_bitmask_inplace(out, packed.to(out.device), vocab_size=out.shape[-1], indices=rows)
    return out


def _filter_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Masks, per row, tokens outside the top k and outside the smallest set of mass >= top_p."""
    if all(p.top_k == 0 and p.top_p == 1.0 for p in params):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    drop = torch.arange(vocab)[None, :] >= k[:, None]
    top_p = torch.tensor([p.top_p for p in params])
    probs = sorted_logits.masked_fill(drop, -math.inf).softmax(dim=-1)
    # Keep a token while the mass before it is below top_p: the first token always stays.
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))


def _mix(seed: int, index: int) -> int:
    """A well-spread 63-bit seed from (request seed, output position) (splitmix64 finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def stop_reason(params: SamplingParams, token_id: int, num_generated: int, eos_token_ids: frozenset[int]) -> str | None:
    """'stop' when the token ends the sequence, 'length' at max_tokens, else None."""
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
