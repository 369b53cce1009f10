"""The router's Prometheus metrics, in a registry of its own (so tests can run several routers in
one process) and served on `router.metrics_port` at /metrics.

Latency buckets span a CPU demo (seconds per token) to an H100 node (milliseconds per token).

Per replica, the prefix cache: hit ratios since the replica started (gauges, for a glance),
counters of prompt tokens, hit tokens, requests, hit requests and evictions (for `rate()`: the
hit rate over a window is rate(hit) / rate(prompt)), and the cached blocks. Speculative decoding
likewise: counters of verify steps and of draft tokens proposed, accepted and emitted, and gauges of
the acceptance rate and the mean accepted length (tokens per verify step) since the replica started.
Constrained decoding: counters of constrained requests and of the seconds spent filling masks.
The counters grow by what each replica report adds; a replica that restarts counts again from its
new totals.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cluster.engine.engine import EngineStats

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)
_PREFIX_COUNTERS = (  # EngineStats field, metric name (Prometheus adds _total), help
    ("prefix_prompt_tokens", "prompt_tokens", "Prompt tokens of the requests a replica admitted"),
    ("prefix_hit_tokens", "hit_tokens", "Prompt tokens whose KV a replica found in its prefix cache"),
    ("prefix_requests", "requests", "Requests a replica admitted"),
    ("prefix_hit_requests", "hit_requests", "Requests that found part of their prompt in a replica's prefix cache"),
    ("prefix_evictions", "evictions", "Cached KV blocks a replica evicted for new KV"),
)
_SPEC_COUNTERS = (
    ("spec_steps", "steps", "Speculative verify steps of a sequence (one draft verified in one step)"),
    ("spec_proposed", "proposed_tokens", "Draft tokens a replica proposed"),
    ("spec_accepted", "accepted_tokens", "Draft tokens a replica's verification accepted"),
    ("spec_emitted", "emitted_tokens", "Tokens the verify steps produced (accepted drafts and one more each)"),
)
_GRAMMAR_COUNTERS = (
    ("constrained_requests", "requests", "Constrained requests a replica admitted (a resumed one again)"),
    ("mask_seconds", "mask_seconds", "Seconds a replica's engine spent filling token bitmasks"),
)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("caravan_requests", "Finished requests, by front door (api: grpc or http), method "
                                "and status (a gRPC code name, or an HTTP status)", ["api", "method", "code"],
                                registry=r)
        self.in_flight = Gauge("caravan_in_flight_requests", "Generate requests admitted and not finished",
                               registry=r)
        self.queue_depth = Gauge("caravan_queue_depth", "Admitted Generate requests that have no token yet",
                                 registry=r)
        self.ttft = Histogram("caravan_time_to_first_token_seconds", "Request received to first token sent",
                              ["api"], buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("caravan_time_per_output_token_seconds",
                              "Mean time between output tokens of a finished request", ["api"],
                              buckets=_TPOT_BUCKETS, registry=r)
        self.replica_waits = Histogram("caravan_replica_wait_seconds",
                                       "How long admitted requests waited for a serving replica (while none served)",
                                       buckets=_TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("caravan_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.constrained = Counter("caravan_constrained_requests", "Requests whose output a grammar constrains "
                                   "(response_format, or a forced tool call), by front door", ["api"], registry=r)
        self.grammar_compile = Histogram("caravan_grammar_compile_seconds", "Compiling a request's constraint at "
                                         "the router (a cached one costs a lookup)", buckets=_TPOT_BUCKETS, registry=r)
        self.generated_tokens = Counter("caravan_generated_tokens", "Tokens streamed to clients", registry=r)
        self.tokens_per_second = Gauge("caravan_generated_tokens_per_second",
                                       "Tokens streamed per second over the last health period", registry=r)
        self.running = Gauge("caravan_running_sequences", "Sequences in a replica's running batch", ["replica"],
                             registry=r)
        self.waiting = Gauge("caravan_waiting_sequences", "Sequences waiting for KV blocks or a batch slot",
                             ["replica"], registry=r)
        self.kv_usage = Gauge("caravan_kv_cache_usage_ratio", "Fraction of a replica's KV blocks in use", ["replica"],
                              registry=r)
        self.replica_serving = Gauge("caravan_replica_serving", "1 while a replica makes progress, else 0",
                                     ["replica"], registry=r)
        self.serving = Gauge("caravan_serving", "1 while the router reports SERVING", registry=r)
        self.prefix_blocks = Gauge("caravan_prefix_cache_blocks", "KV blocks of a replica holding cached prefixes",
                                   ["replica"], registry=r)
        self.prefix_token_hit_ratio = Gauge("caravan_prefix_cache_token_hit_ratio",
                                            "Prompt tokens found in a replica's prefix cache, since it started",
                                            ["replica"], registry=r)
        self.prefix_request_hit_ratio = Gauge("caravan_prefix_cache_request_hit_ratio",
                                              "Requests that found part of their prompt cached, since the replica "
                                              "started", ["replica"], registry=r)
        self.prefix_counters = {field: Counter(f"caravan_prefix_cache_{name}", text, ["replica"], registry=r)
                                for field, name, text in _PREFIX_COUNTERS}
        self.prefix_counters |= {field: Counter(f"caravan_speculative_{name}", text, ["replica"], registry=r)
                                 for field, name, text in _SPEC_COUNTERS}
        self.prefix_counters |= {field: Counter(f"caravan_grammar_{name}", text, ["replica"], registry=r)
                                 for field, name, text in _GRAMMAR_COUNTERS}
        self.spec_acceptance = Gauge("caravan_speculative_acceptance_ratio", "Draft tokens accepted per draft token "
                                     "proposed, since the replica started", ["replica"], registry=r)
        self.spec_length = Gauge("caravan_speculative_mean_accepted_length", "Tokens per speculative verify step, "
                                 "since the replica started", ["replica"], registry=r)
        self._prefix_seen: dict[str, EngineStats] = {}
        self._generated = 0
        self._rate_mark = (time.monotonic(), 0)
        self._replicas: set[str] = set()

    def add_generated(self, tokens: int) -> None:
        self._generated += tokens
        self.generated_tokens.inc(tokens)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics endpoint on a thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def observe_replicas(self, stats: dict[str, tuple[bool, EngineStats]]) -> None:
        """stats: replica -> (serving, its engine stats). Replicas that are gone lose their series, so
        dashboards do not show a dead replica's last numbers forever."""
        for name in self._replicas - stats.keys():
            for metric in (self.running, self.waiting, self.kv_usage, self.replica_serving, self.prefix_blocks,
                           self.prefix_token_hit_ratio, self.prefix_request_hit_ratio, self.spec_acceptance,
                           self.spec_length, *self.prefix_counters.values()):
                metric.remove(name)
            self._prefix_seen.pop(name, None)
        self._replicas = set(stats)
        for name, (serving, s) in stats.items():
            self.replica_serving.labels(name).set(int(serving))
            self.running.labels(name).set(s.running)
            self.waiting.labels(name).set(s.waiting)
            self.kv_usage.labels(name).set(1 - s.free_blocks / s.num_blocks if s.num_blocks else 0)
            self._observe_prefix_cache(name, s)
        now, tokens = time.monotonic(), self._generated
        then, before = self._rate_mark
        if now > then:
            self.tokens_per_second.set((tokens - before) / (now - then))
        self._rate_mark = (now, tokens)

    def _observe_prefix_cache(self, name: str, s: EngineStats) -> None:
        self.prefix_blocks.labels(name).set(s.prefix_cached_blocks)
        self.prefix_token_hit_ratio.labels(name).set(s.prefix_hit_tokens / s.prefix_prompt_tokens
                                                     if s.prefix_prompt_tokens else 0)
        self.prefix_request_hit_ratio.labels(name).set(s.prefix_hit_requests / s.prefix_requests
                                                       if s.prefix_requests else 0)
        self.spec_acceptance.labels(name).set(s.spec_accepted / s.spec_proposed if s.spec_proposed else 0)
        self.spec_length.labels(name).set(s.spec_emitted / s.spec_steps if s.spec_steps else 0)
        seen = self._prefix_seen.get(name)
        for field, counter in self.prefix_counters.items():
            now, before = getattr(s, field), getattr(seen, field, 0)
            counter.labels(name).inc(now - before if now >= before else now)  # below: the replica restarted
        self._prefix_seen[name] = s
