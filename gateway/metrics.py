"""The gateway's Prometheus endpoint (Triton's metrics port): request outcomes and latency
as the gateway sees them, plus the process collectors of prometheus-client.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)


class GatewayMetrics:
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

    async def handle(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        return app
