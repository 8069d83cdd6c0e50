"""serve's ``/metrics``: Prometheus text, named as vLLM names the same things (prefix ``qlora_pipeline:``).

Dashboards and alerts written for vLLM's server read these with the prefix changed:
``num_requests_running`` / ``num_requests_waiting``, ``time_to_first_token_seconds``,
``time_per_output_token_seconds``, ``e2e_request_latency_seconds``, ``prompt_tokens_total``,
``generation_tokens_total``, ``request_success_total{finished_reason}``. Ours beside them:
``requests_total{model,status}`` (every completion request by HTTP status), the engine's
``engine_decode_steps_total`` and ``engine_decoded_rows_total`` (their rates' ratio is the mean
batch size) and ``lora_adapters_loaded``. One registry per app, so two servers in one process (the
tests) do not share counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from qlora_pipeline.serving.specs import UNKNOWN_MODEL

PREFIX = "qlora_pipeline:"
# Seconds: a 135M model on a laptop CPU answers its first token in 0.05-2 s, a loaded one later.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine: Any, persona: Any, admission: Any):
        self.persona = persona
        self.statuses: dict[str, set[str]] = {}  # each model's status labels counted, to forget them on unload
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Completion requests by model and HTTP status",
                                ["model", "status"], registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason",
                               ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Between tokens after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        # A request of n choices counts n: the rows it takes in the batch.
        Gauge(PREFIX + "num_requests_running", "Requests (choices) being generated", registry=r).set_function(
            lambda: admission.running)
        Gauge(PREFIX + "num_requests_waiting", "Requests (choices) admitted and waiting for a place in the batch",
              registry=r).set_function(lambda: admission.waiting)
        Gauge(PREFIX + "lora_adapters_loaded", "Adapters served over the base", registry=r).set_function(
            lambda: len(persona.adapters))
        r.register(_EngineCollector(engine))

    def finished(self, reasons: list[str], prompt_tokens: int, completion_tokens: list[int], arrived: float,
                 first_token: float | None, ended: float) -> None:
        """A request whose choices (``n``: one reason and token count each) all ended. Its prompt is counted once,
        as it was prefilled once; each choice is a finished sequence, as vLLM counts them."""
        for reason in reasons:
            self.success.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(sum(completion_tokens))
        self.e2e.observe(ended - arrived)
        longest = max(completion_tokens)  # the choices decode side by side: a step gives each its next token
        if first_token is not None:
            self.ttft.observe(first_token - arrived)
            if longest > 1:
                self.tpot.observe((ended - first_token) / (longest - 1))

    def answered(self, model: str, status: int) -> None:
        # A label per model served, and one for all else: a label per name a client sent grew memory, and the
        # scrape, without bound (1,000 names of 1 MB: 0.9 GB).
        label = model if model in self.persona.names else UNKNOWN_MODEL
        self.requests.labels(label, str(status)).inc()
        self.statuses.setdefault(label, set()).add(str(status))

    def forget(self, model: str) -> None:
        """An unloaded adapter's series go with it: loading, using and unloading new names grew the label set, and
        the scrape, without bound. Loaded again, it counts from 0 (a counter reset, as after a restart)."""
        for status in self.statuses.pop(model, ()):
            self.requests.remove(model, status)


class _EngineCollector:
    """The engine's own counters, read at scrape time."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        steps = CounterMetricFamily(PREFIX + "engine_decode_steps", "Decode steps (one forward each)")
        steps.add_metric([], stats.decode_steps)
        rows = CounterMetricFamily(PREFIX + "engine_decoded_rows", "Rows decoded, summed over steps: "
                                   "rate(rows) / rate(steps) is the mean batch size")
        rows.add_metric([], stats.row_steps)
        return [steps, rows]

    def describe(self):
        return []
