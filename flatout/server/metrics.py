"""Prometheus metrics under `flatout:`, named as vLLM's where the meaning is the same.

Two sources: per-request observations made in the API process (token counts, TTFT, TPOT, E2E
latency, queue time, finish reasons), and the engine core's own counters (running / waiting
requests, KV blocks in use, preemptions, prefix-cache queries and hits, steps), read from the
latest `CoreStats` snapshot when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flatout.engine.outputs import OutputAccumulator, RequestOutput
from flatout.monitor.nvml import Nvml
from flatout.monitor.utilization import UtilizationCollector

prom.disable_created_metrics()

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# paths counted by name in flatout:http_requests_total; the rest are "other" (bounded labels)
_KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                          "/version", "/metrics", "/tokenize", "/detokenize"})


class ServerMetrics:
    def __init__(self, stats_source: Callable[[], Any], model_name: str,
                 nvml: Nvml | None | Literal["auto"] = "auto") -> None:
        """`stats_source` returns the engine's latest CoreStats; `nvml`: the GPUs to report
        (auto: the local ones NVML sees, none without NVML)."""
        self.registry = prom.CollectorRegistry()
        self.model_name = model_name
        self._stats = stats_source
        # flatout:generation_tokens, reported at scrape time (_EngineCollector): a plain count
        # costs a stream's every delta less than a prometheus Counter's locked increment
        self.generation_tokens_seen = 0
        r, m = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> prom.Histogram:
            return prom.Histogram(name, doc, m, registry=r, buckets=buckets).labels(model_name)

        self.request_success = prom.Counter(
            "flatout:request_success", "Finished requests by finish reason.",
            m + ["finished_reason"], registry=r,
        )
        self.http_requests = prom.Counter(
            "flatout:http_requests", "HTTP responses by path and status code.",
            ["path", "status"], registry=r,
        )
        self.prompt_tokens = prom.Counter(
            "flatout:prompt_tokens", "Prompt tokens of admitted requests.", m, registry=r,
        ).labels(model_name)
        self.ttft = hist("flatout:time_to_first_token_seconds",
                         "Time from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.tpot = hist("flatout:time_per_output_token_seconds",
                         "Mean time between generated tokens, per request.", _LATENCY_BUCKETS)
        self.e2e = hist("flatout:e2e_request_latency_seconds",
                        "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.queue_time = hist("flatout:request_queue_time_seconds",
                               "Time a request waited before its first scheduling.",
                               _LATENCY_BUCKETS)
        self.request_prompt_tokens = hist("flatout:request_prompt_tokens",
                                          "Prompt length per request.", _TOKEN_BUCKETS)
        self.request_generation_tokens = hist("flatout:request_generation_tokens",
                                              "Generated tokens per request.", _TOKEN_BUCKETS)
        r.register(_EngineCollector(self))
        # busy fraction, MBU/MFU per step type, NVML per GPU (flatout/monitor/utilization.py)
        r.register(UtilizationCollector(stats_source, model_name,
                                        Nvml.open() if nvml == "auto" else nvml))

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)

    def track(self, arrival: float | None = None) -> RequestTracker:
        return RequestTracker(self, arrival if arrival is not None else time.monotonic())


class RequestTracker:
    """Observes one request's deltas as they arrive; `finish` once at the end."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.first_token: float | None = None
        self.num_prompt_tokens = 0
        self.num_generated = 0
        self.finished = False

    def observe(self, delta: RequestOutput) -> None:
        if self.first_token is None and not self.num_prompt_tokens:
            self.num_prompt_tokens = len(delta.prompt_token_ids)
            self.m.prompt_tokens.inc(self.num_prompt_tokens)
            self.m.request_prompt_tokens.observe(self.num_prompt_tokens)
            queued = delta.metrics.get("queue_time")
            if queued is not None:
                self.m.queue_time.observe(queued)
        outputs = delta.outputs
        new = len(outputs[0].token_ids) if len(outputs) == 1 else sum(
            len(o.token_ids) for o in outputs)
        if new > 0:
            self.m.generation_tokens_seen += new
            self.num_generated += new
            if self.first_token is None:
                self.first_token = now = time.monotonic()
                self.m.ttft.observe(now - self.arrival)

    def finish(self, request: OutputAccumulator) -> None:
        """Record the end of the request from its joined deltas (`request`); samples without a
        finish reason (also those that never produced a token) were aborted."""
        if self.finished:
            return
        self.finished = True
        now = time.monotonic()
        for reason in request.finish_reasons():
            self.m.request_success.labels(self.m.model_name, reason or "abort").inc()
        if self.first_token is None:
            return
        self.m.e2e.observe(now - self.arrival)
        self.m.request_generation_tokens.observe(self.num_generated)
        max_sample_tokens = max(request.num_tokens(), default=0)
        if max_sample_tokens > 1:
            self.m.tpot.observe((now - self.first_token) / (max_sample_tokens - 1))


class _EngineCollector:
    """The engine core's state, read at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        st = self.m._stats()
        label = [self.m.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        yield gauge("flatout:num_requests_running", "Sequences in the running batch.",
                    st.num_running)
        yield gauge("flatout:num_requests_waiting", "Sequences waiting to be scheduled.",
                    st.num_waiting)
        usage = st.num_used_blocks / st.num_blocks if st.num_blocks else 0.0
        yield gauge("flatout:kv_cache_usage_perc",
                    "Fraction of KV-cache blocks held by requests (0: idle, 1: full).", usage)
        yield gauge("flatout:kv_cache_num_blocks", "KV-cache blocks in all.", st.num_blocks)
        yield counter("flatout:generation_tokens", "Generated tokens.",
                      self.m.generation_tokens_seen)
        yield counter("flatout:num_preemptions", "Preemptions (KV cache ran out).",
                      st.num_preemptions)
        yield counter("flatout:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                      "cache.", st.prefix_queried_tokens)
        yield counter("flatout:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      st.prefix_hit_tokens)
        hit_rate = st.prefix_hit_tokens / st.prefix_queried_tokens if st.prefix_queried_tokens \
            else 0.0
        yield gauge("flatout:prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens, "
                    "since start.", hit_rate)
        yield counter("flatout:engine_steps", "Engine steps run.", st.num_steps)
        yield counter("flatout:prefill_tokens", "Prompt tokens computed (cache hits excluded).",
                      st.num_prefill_tokens)
        yield gauge("flatout:step_batch_size", "Sequences that produced a token in the last "
                    "step.", st.step_batch_size)
        mean = self.m.generation_tokens_seen / st.num_steps if st.num_steps else 0.0
        yield gauge("flatout:mean_running_batch_size", "Generated tokens per engine step since "
                    "start: how many sequences a step advances on average.", mean)


CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


class HTTPMetricsMiddleware:
    """Counts HTTP responses by path and status (pure ASGI, so streams pass through). A request
    whose client hung up before any response started (headers only, a short or unterminated
    body, `Expect: 100-continue` then nothing) counts as 499: no status was ever sent, so it must
    not show as a 5xx."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = client_gone = False

        async def receive_wrapper() -> dict[str, Any]:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
            return message

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start" and not started:
                started = not client_gone
                status = message["status"] if started else CLIENT_CLOSED
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if client_gone and not started:
                status = CLIENT_CLOSED
            path = scope.get("path", "")
            self.metrics.http_requests.labels(
                path if path in _KNOWN_PATHS else "other", str(status)
            ).inc()
