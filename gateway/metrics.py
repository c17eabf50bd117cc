"""The gateway's own metrics: request counts and latency by model, and its process. The fleet's
Triton families on the same endpoint are rendered by `natron.prometheus`."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)


class GatewayMetrics:
    """The gateway's own request latency, and the process collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "natron_gateway_requests",
            "Inference requests answered by the gateway, by outcome (HTTP status)",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.latency_s = Histogram(
            "natron_gateway_request_duration_seconds",
            "Inference request latency seen by the gateway, body read to response built",
            ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
        )
        # labels() takes a lock and hashes on every call: keep the children per label set.
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def observe(self, model: str, version: str, status: int, duration_s: float) -> None:
        key = (model, version, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(model, version, str(status))
        child.inc()
        latency = self._latency_children.get(model)
        if latency is None:
            latency = self._latency_children[model] = self.latency_s.labels(model)
        latency.observe(duration_s)

    def own(self) -> bytes:
        return generate_latest(self.registry)
