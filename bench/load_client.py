"""The client side of `bench/load.py`: one request's timestamps, the statistics of a sweep point, how a
point's requests are sent (closed loop or Poisson arrivals), and the two ways of sending one: a
Caravan router's gRPC Generate and its OpenAI-compatible streamed /v1/completions."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class Request:
    """One request's timestamps (perf_counter seconds) and outcome."""

    sent: float
    first: float | None = None  # first output token received
    done: float | None = None  # last output token received
    tokens: int = 0  # output tokens received
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def latency(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def tpot(self) -> float | None:
        return tpot(self.first, self.done, self.tokens)

    def to_dict(self) -> dict:
        return {"ttft_s": self.ttft, "tpot_s": self.tpot, "latency_s": self.latency, "output_tokens": self.tokens,
                "error": self.error}


def tpot(first: float | None, last: float | None, tokens: int) -> float | None:
    """Time per output token after the first: None with fewer than 2 tokens (nothing to divide)."""
    if first is None or last is None or tokens < 2:
        return None
    return (last - first) / (tokens - 1)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 (linear interpolation) and the mean; None for each when there is no value."""
    if not values:
        return {**{f"p{q}": None for q in PERCENTILES}, "mean": None}
    a = np.asarray(values, dtype=float)
    return {**{f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES}, "mean": float(a.mean())}


def summarize(x: float, requests: list[Request]) -> dict:
    """One sweep point: `x` is its concurrency (closed loop) or request rate (open loop). Throughput is over the
    point's span, from its first send to its last token."""
    ok = [r for r in requests if r.error is None and r.done is not None]
    span = max(r.done for r in ok) - min(r.sent for r in requests) if ok else 0.0
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in requests if r.error is not None]
    return {
        "x": x, "requests": len(requests), "ok": len(ok), "errors": len(errors), "first_errors": errors[:3],
        "duration_s": span, "output_tokens": tokens,
        "requests_per_s": len(ok) / span if span else 0.0, "output_tokens_per_s": tokens / span if span else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "latency_s": percentiles([r.latency for r in ok]),
        "per_request": [r.to_dict() for r in requests],
    }


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds of `n` Poisson arrivals at `rate` per second, the first at 0."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def windows(ids: list[int], n: int, length: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `length` ids: windows of `ids` (repeated as needed) at distinct offsets."""
    base = list(ids)
    while len(ids) - length + 1 < n:
        ids = ids + base
    offsets = random.Random(seed).sample(range(len(ids) - length + 1), n)
    return [ids[o : o + length] for o in offsets]



# -- sending a point's requests ------------------------------------------------------------------------------


async def run_point(send, prompts, x: float, closed: bool, budget_s: float, bar) -> list[Request]:
    """One sweep point: `send(ids, start)` runs one request; closed loop with `x` requests in flight, or
    Poisson arrivals at `x` per second."""
    start = time.perf_counter()

    async def one(ids: list[int]) -> Request:
        r = await send(ids, start)
        bar.update(1)
        return r

    if closed:
        queue, out = list(reversed(prompts)), []

        async def worker():
            while queue and time.perf_counter() - start < budget_s:
                out.append(await one(queue.pop()))
        await asyncio.gather(*(worker() for _ in range(int(x))))
        return out
    tasks = []
    for offset, ids in zip(arrivals(len(prompts), x), prompts):
        if offset > budget_s:
            break
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(one(ids)))
    return list(await asyncio.gather(*tasks))


def grpc_sender(stub, metadata, output_tokens: int, budget_s: float):
    import grpc

    from caravan.v1 import inference_pb2 as pb

    async def send(ids: list[int], start: float) -> Request:
        r = Request(sent=time.perf_counter())
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=output_tokens, ignore_eos=True,
                                     sampling=pb.SamplingParams(temperature=0))
        try:
            async for response in stub.Generate(request, metadata=metadata,
                                                timeout=max(1.0, start + budget_s - r.sent)):
                if response.token_ids:
                    r.done = time.perf_counter()
                    r.first = r.first or r.done
                    r.tokens += len(response.token_ids)
        except grpc.aio.AioRpcError as e:
            r.error = f"{e.code().name}: {e.details()}"
        return r
    return send


def openai_sender(session, base: str, model: str, headers: dict, output_tokens: int, budget_s: float):
    """POST /v1/completions, streamed, the same token-id prompt and parameters as over gRPC; an event with
    text is a token arrival, and the token count is the usage the last event reports (an event may carry
    several tokens, as a gRPC response may). A plain HTTP client (aiohttp), as the standard benchmarks use:
    parsing every event into SDK objects would measure this client more than the server."""
    import aiohttp

    async def send(ids: list[int], start: float) -> Request:
        r = Request(sent=time.perf_counter())
        body = {"model": model, "prompt": ids, "max_tokens": output_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        timeout = aiohttp.ClientTimeout(total=max(1.0, start + budget_s - r.sent))
        try:
            async with session.post(base + "/completions", json=body, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return r
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        r.error = f"error event: {event['error']['message']}"
                    elif event["choices"] and event["choices"][0]["text"]:
                        r.done = time.perf_counter()
                        r.first = r.first or r.done
                    elif event.get("usage"):
                        r.tokens = event["usage"]["completion_tokens"]
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            r.error = f"{type(e).__name__}: {e}"
        return r
    return send
