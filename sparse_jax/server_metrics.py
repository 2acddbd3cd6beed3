"""What the OpenAI server reports to operators: Prometheus metrics (`GET /metrics`) and a
periodic one-line stats log.

Gauges and counters are read from the engine at scrape time (running and waiting requests, KV
pages used, free and cached; prefix-cache queries and hits in tokens, preemptions); histograms and counters are fed once per finished request: time to first token (TTFT),
time per output token after the first (TPOT), end-to-end latency, prompt and generated tokens,
and the fraction of prompt tokens the sparse algorithm kept after prefill (label `algorithm`,
`dense` without one). Each server has its own registry, so several servers in one process
(tests) do not collide.
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("sparse_jax.serve")

PREFIX = "sparse_jax"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class _EngineGauges:
  """A Prometheus collector that reads the engine's queue and page pool when scraped."""

  def __init__(self, engine):
    self.engine = engine

  def collect(self):
    engine, alloc = self.engine, self.engine.allocator
    for name, doc, value in (
        ("num_requests_running", "Requests holding a batch slot.", engine.num_running),
        ("num_requests_waiting", "Requests waiting for a batch slot or KV pages.", engine.num_waiting),
        ("kv_pages_used", "KV cache pages held by requests.", alloc.used_pages),
        ("kv_pages_free", "KV cache pages free to allocate (cached prefix pages nobody holds included).",
         alloc.free_pages),
        ("kv_pages_cached", "Prefix-cache pages nobody holds (evicted when the pool needs them).",
         alloc.cached_pages),
        ("kv_pages_total", "KV cache pages in the pool.", alloc.num_pages)):
      yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
    stats = engine.stats
    for name, doc, value in (
        ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats["prefix_cache_queries"]),
        ("prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled).", stats["prefix_cache_hits"]),
        ("num_preemptions", "Requests preempted to give pages to others.", stats["preemptions"])):
      yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class ServerMetrics:
  """The server's Prometheus registry; `observe(request)` once per request that ends."""

  def __init__(self, engine, algorithm: str):
    self.engine = engine
    self.algorithm = algorithm
    self.registry = CollectorRegistry()
    self.registry.register(_EngineGauges(engine))
    r = self.registry
    self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first generated token.",
                          buckets=_LATENCY_BUCKETS, registry=r)
    self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                          "Mean time per generated token after the first, per request.", buckets=_TPOT_BUCKETS,
                          registry=r)
    self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to the last token.",
                         buckets=_LATENCY_BUCKETS, registry=r)
    self.kept_ratio = Histogram(f"{PREFIX}_kept_prompt_token_ratio",
                                "Prompt tokens kept in the KV cache after prefill / prompt tokens.",
                                ["algorithm"], buckets=_RATIO_BUCKETS, registry=r)
    self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
    self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated for finished requests.",
                                     registry=r)
    self.requests = Counter(f"{PREFIX}_requests", "Requests that ended, by finish reason (stop, length, abort, "
                            "error).", ["finish_reason"], registry=r)
    self._lock = threading.Lock()
    self._window = {"prompt": 0, "generation": 0}  # tokens since the last stats line

  def observe(self, req) -> None:
    """Records a request that ended (any finish reason); latencies only for answered ones."""
    reason = req.finish_reason or "abort"
    self.requests.labels(finish_reason=reason).inc()
    if reason not in ("stop", "length"):
      return
    generated = len(req.output_ids)
    self.prompt_tokens.inc(len(req.prompt_ids))
    self.generation_tokens.inc(generated)
    with self._lock:
      self._window["prompt"] += len(req.prompt_ids)
      self._window["generation"] += generated
    if req.first_token_time is not None:
      self.ttft.observe(req.first_token_time - req.arrival_time)
      if req.finish_time is not None and generated > 1:
        self.tpot.observe((req.finish_time - req.first_token_time) / (generated - 1))
    if req.finish_time is not None:
      self.e2e.observe(req.finish_time - req.arrival_time)
    if req.kept_prompt_tokens is not None and req.prompt_ids:
      self.kept_ratio.labels(algorithm=self.algorithm).observe(req.kept_prompt_tokens / len(req.prompt_ids))

  def exposition(self) -> bytes:
    return generate_latest(self.registry)

  def stats_line(self, interval_s: float) -> str:
    """One line for the log: queue, pool and token throughput since the last line."""
    with self._lock:
      window, self._window = self._window, {"prompt": 0, "generation": 0}
    engine, alloc = self.engine, self.engine.allocator
    return (f"running: {engine.num_running} reqs, waiting: {engine.num_waiting} reqs, "
            f"KV pages used: {alloc.used_pages}/{alloc.num_pages} ({100 * alloc.used_pages / alloc.num_pages:.1f}%), "
            f"prompt throughput: {window['prompt'] / interval_s:.1f} tokens/s, "
            f"generation throughput: {window['generation'] / interval_s:.1f} tokens/s")


class StatsLogger:
  """Logs `metrics.stats_line` every `interval_s` seconds on a daemon thread while there is
  something to say (requests in flight or tokens since the last line)."""

  def __init__(self, metrics: ServerMetrics, interval_s: float):
    self.metrics = metrics
    self.interval_s = interval_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="sparse_jax-stats", daemon=True)

  def start(self) -> "StatsLogger":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()

  def _run(self) -> None:
    last = time.monotonic()
    while not self._stop.wait(self.interval_s):
      now = time.monotonic()
      m = self.metrics
      busy = m.engine.has_unfinished() or any(m._window.values())
      if busy:
        log.info("%s", m.stats_line(now - last))
      last = now
