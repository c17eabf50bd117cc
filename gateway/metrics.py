"""The gateway's own metrics: request counts and latency by model, and its process. The fleet's
Triton families on the same endpoint are rendered by `natron.prometheus`.

Several gateway processes sharing one HTTP port (`--http-workers`) each count the requests the
kernel handed them, in prometheus-client's multiprocess mode: every process writes its values to
files of its own in the directory PROMETHEUS_MULTIPROC_DIR names, set by the process that starts
them, and the one serving the metrics port sums every file, those of gateways that died and were
restarted included, so the totals only ever grow. Process metrics (CPU, memory) are left out
then: they would describe one process of several."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector


class GatewayMetrics:
    """The gateway's own request latency, and the process collectors; with `shared`, the
    request metrics of every gateway process sharing the port (see the module's docstring)."""

    def __init__(self, shared: bool = False) -> None:
        self.registry = CollectorRegistry()
        # What a scrape reads: this process's registry, or the sum over the shared files.
        self._exposed = self.registry
        if shared:
            self._exposed = CollectorRegistry()
            try:
                MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]
            except ValueError:
                raise ValueError(
                    "a gateway sharing its HTTP port keeps its metrics in the directory "
                    "PROMETHEUS_MULTIPROC_DIR names, set by natron serve or natron gateway "
                    "--http-workers: it is unset or not a directory"
                ) from None
        else:
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
        self.shared_memory = Counter(
            "natron_gateway_shared_memory_requests",
            "Inference requests naming system shared memory, by how their tensors were sent: "
            "by reference (the model's workers map the regions), by value (a worker elsewhere "
            "serves the model), or by value again (a worker could not reach the references)",
            ["model", "sent"],
            registry=self.registry,
        )
        # labels() takes a lock and hashes on every call: keep the children per label set.
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._shared_memory_children: dict[tuple[str, str], Any] = {}

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

    def shared_memory_sent(self, model: str, sent: str) -> None:
        """One request naming shared memory; `sent`: by_reference, by_value, by_value_again."""
        child = self._shared_memory_children.get((model, sent))
        if child is None:
            child = self._shared_memory_children[(model, sent)] = self.shared_memory.labels(model, sent)
        child.inc()

    def own(self) -> bytes:
        return generate_latest(self._exposed)
