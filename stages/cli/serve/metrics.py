"""The server's Prometheus metrics (prometheus-client): requests by adapter and status, clients
that went away, texts, forward passes, texts per forward pass, requests per model call, and
request latency."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram

# Only the totals: the `_created` timestamp series would double every counter's output.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """One server's metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qlora_serve_requests", "Classify requests by adapter and HTTP status "
                                "(adapter is empty when the request named no loaded adapter).",
                                ["adapter", "status"], registry=self.registry)
        self.client_disconnects = Counter("qlora_serve_client_disconnects", "Classify requests whose client "
                                          "disconnected before its body was read (no answer sent; not "
                                          "counted in requests).", registry=self.registry)
        self.texts = Counter("qlora_serve_texts", "Texts classified.", ["adapter"], registry=self.registry)
        self.batches = Counter("qlora_serve_batches", "Forward passes run.", ["adapter"], registry=self.registry)
        self.batch_texts = Histogram("qlora_serve_batch_size_texts", "Texts per forward pass.", ["adapter"],
                                     buckets=SIZE_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("qlora_serve_batch_requests", "Requests merged into one model call.",
                                        ["adapter"], buckets=SIZE_BUCKETS, registry=self.registry)
        self.latency = Histogram("qlora_serve_request_duration_seconds",
                                 "Latency of successful classify requests, body read to response.",
                                 ["adapter"], buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def observe_request(self, adapter: str, status: int, seconds: float | None = None) -> None:
        """One answered request; `seconds` (successful ones) goes into the latency histogram."""
        self.requests.labels(adapter, str(status)).inc()
        if seconds is not None:
            self.latency.labels(adapter).observe(seconds)

    def observe_batch(self, adapter: str, requests: int, texts: int, max_batch_size: int) -> None:
        """One model call: `texts` from `requests` requests, in forward passes of at most
        max_batch_size texts (as predict_logits cuts them)."""
        self.texts.labels(adapter).inc(texts)
        self.batch_requests.labels(adapter).observe(requests)
        for start in range(0, texts, max_batch_size):
            self.batches.labels(adapter).inc()
            self.batch_texts.labels(adapter).observe(min(max_batch_size, texts - start))

    def render(self) -> bytes:
        """The Prometheus text exposition (content type prometheus_client.CONTENT_TYPE_LATEST)."""
        return prometheus_client.generate_latest(self.registry)
