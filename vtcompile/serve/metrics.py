"""Prometheus metrics of one server (prometheus-client, an optional dependency: the `serve` extra).

Each server has a registry of its own (several servers in one process, as tests start them, do not collide). The
gauges read the engine when /metrics is scraped."""
from __future__ import annotations

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """Counters and histograms the engine and the HTTP layer fill (the engine's NullMetrics interface)."""

    def __init__(self, replica: str = "0"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.replica = replica
        labels = ["replica"]
        self.requests = Counter("vtcompile_requests", "HTTP chat requests by status code", labels + ["status"],
                                registry=r)
        self.finish = Counter("vtcompile_request_finish", "Engine requests by how they ended (stop: eos, length, "
                                                          "cancelled: client gone or a stop string, abort, error)",
                              labels + ["reason"], registry=r)
        self.prompt_tokens = Counter("vtcompile_prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=r)
        self.generation_tokens = Counter("vtcompile_generation_tokens", "Tokens generated", labels, registry=r)
        self.time_to_first_token = Histogram("vtcompile_time_to_first_token_seconds", "Submission to first token",
                                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("vtcompile_inter_token_latency_seconds", "Between two tokens of a "
                                             "request", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self._gauges = {}
        for name, doc in (("running", "Requests in the decode batch"), ("waiting", "Requests queued"),
                          ("kv_reserved_bytes", "KV bytes the running requests reserve (prompt cache + max_tokens)"),
                          ("kv_budget_bytes", "The KV budget (--kv-budget-mb; -1: none)"),
                          ("kv_allocated_bytes", "Bytes of the slot cache (rows x per-layer capacity)"),
                          ("peak_running", "Most requests that ran at once")):
            self._gauges[name] = Gauge(f"vtcompile_{name}", doc, labels, registry=r)

    def bind(self, engine) -> None:
        """Gauges that read `engine` at each scrape."""
        for name, gauge in self._gauges.items():
            def read(name=name):
                value = engine.stats()[name]
                return -1 if value is None else value
            gauge.labels(self.replica).set_function(read)

    # the engine's interface (engine.NullMetrics)
    def finished(self, reason: str) -> None:
        self.finish.labels(self.replica, reason).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(self.replica).inc(prompt)
        self.generation_tokens.labels(self.replica).inc(generated)

    def ttft(self, seconds: float) -> None:
        self.time_to_first_token.labels(self.replica).observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.inter_token_latency.labels(self.replica).observe(seconds)

    def request(self, status: int) -> None:
        self.requests.labels(self.replica, str(status)).inc()

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
