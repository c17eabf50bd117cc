"""Prometheus text for the fleet under Triton's names, and the one small app every service serves
its metrics with (gateway, router and worker alike).

Triton's families are rendered here rather than through prometheus-client: its counters always
carry a `_total` suffix, and dashboards built for Triton query `nv_inference_request_success`,
not `nv_inference_request_success_total`. Each process's own collectors (latency histograms,
process metrics) do go through prometheus-client and are appended to the same page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from natron.records import WorkerReport

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(slots=True, frozen=True)
class QueueInfo:
    pending: int  # waiting in the consumer: the autoscaling signal
    in_hand: int  # delivered to an instance, not yet answered


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


class _Family:
    def __init__(self, name: str, kind: str, doc: str) -> None:
        self.lines = [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, labels: dict[str, str], value: float, suffix: str = "") -> None:
        number = repr(float(value)) if not float(value).is_integer() else f"{int(value)}"
        self.lines.append(f"{self.name}{suffix}{_labels(labels)} {number}")


def render_fleet(
    versions: Iterable[tuple[str, str]],
    stats: dict[tuple[str, str], dict[str, Any]],
    queues: dict[tuple[str, str], QueueInfo],
    workers_up: dict[str, int],
    workers: list[WorkerReport],
    nats_connected: bool,
) -> str:
    """Prometheus text for the fleet: Triton's model families, natron's own, GPU telemetry."""
    f = {
        "success": _Family(
            "nv_inference_request_success", "counter", "Number of successful inference requests"
        ),
        "failure": _Family("nv_inference_request_failure", "counter", "Number of failed inference requests"),
        "count": _Family("nv_inference_count", "counter", "Number of inferences performed (batch rows)"),
        "exec": _Family("nv_inference_exec_count", "counter", "Number of model executions performed"),
        "request_us": _Family(
            "nv_inference_request_duration_us",
            "counter",
            "Cumulative inference request duration in microseconds",
        ),
        "queue_us": _Family(
            "nv_inference_queue_duration_us", "counter", "Cumulative queue duration in microseconds"
        ),
        "input_us": _Family(
            "nv_inference_compute_input_duration_us",
            "counter",
            "Cumulative compute input duration in microseconds",
        ),
        "infer_us": _Family(
            "nv_inference_compute_infer_duration_us",
            "counter",
            "Cumulative compute inference duration in microseconds",
        ),
        "output_us": _Family(
            "nv_inference_compute_output_duration_us",
            "counter",
            "Cumulative compute output duration in microseconds",
        ),
        "pending": _Family(
            "nv_inference_pending_request_count", "gauge", "Requests queued or in hand, not yet answered"
        ),
        "depth": _Family(
            "natron_queue_depth", "gauge", "Requests waiting in the model version's JetStream consumer"
        ),
        "batch": _Family("natron_batch_size", "histogram", "Rows per model execution"),
    }
    for model, version in versions:
        labels = {"model": model, "version": version}
        s = stats.get((model, version))
        if s is not None:
            f["success"].add(labels, s["success"]["count"])
            for reason, duration in sorted(s["fail"].items()):
                f["failure"].add({**labels, "reason": reason}, duration["count"])
            f["count"].add(labels, s["inferences"])
            f["exec"].add(labels, s["executions"])
            fail_ns = sum(d["ns"] for d in s["fail"].values())
            f["request_us"].add(labels, (s["success"]["ns"] + fail_ns) // 1000)
            f["queue_us"].add(labels, s["queue"]["ns"] // 1000)
            f["input_us"].add(labels, s["compute_input"]["ns"] // 1000)
            f["infer_us"].add(labels, s["compute_infer"]["ns"] // 1000)
            f["output_us"].add(labels, s["compute_output"]["ns"] // 1000)
            sizes = {int(size): batch["compute_infer"]["count"] for size, batch in s["batches"].items()}
            cumulative = 0
            for bound in BATCH_BUCKETS:
                cumulative = sum(n for size, n in sizes.items() if size <= bound)
                f["batch"].add({**labels, "le": str(bound)}, cumulative, "_bucket")
            f["batch"].add({**labels, "le": "+Inf"}, sum(sizes.values()), "_bucket")
            f["batch"].add(labels, sum(sizes.values()), "_count")
            f["batch"].add(labels, sum(size * n for size, n in sizes.items()), "_sum")
        queue = queues.get((model, version))
        if queue is not None:
            f["pending"].add(labels, queue.pending + queue.in_hand)
            f["depth"].add(labels, queue.pending)
    up = _Family("natron_workers_up", "gauge", "Live workers serving a READY version of the model")
    for model, count in sorted(workers_up.items()):
        up.add({"model": model}, count)
    connected = _Family("natron_nats_connected", "gauge", "1 while the gateway is connected to NATS")
    connected.add({}, 1 if nats_connected else 0)
    families = [*f.values(), up, connected, *_gpu_families(workers)]
    return "\n".join(line for family in families for line in family.lines) + "\n"


_GPU_METRICS = (
    ("utilization", "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)"),
    ("memory_total_bytes", "nv_gpu_memory_total_bytes", "GPU total memory, in bytes"),
    ("memory_used_bytes", "nv_gpu_memory_used_bytes", "GPU used memory, in bytes"),
    ("power_usage_w", "nv_gpu_power_usage", "GPU power usage in watts"),
    ("power_limit_w", "nv_gpu_power_limit", "GPU power management limit in watts"),
    ("energy_j", "nv_energy_consumption", "GPU energy consumption in joules since the worker started"),
)


def _gpu_families(workers: list[WorkerReport]) -> list[_Family]:
    """GPU telemetry from the workers' heartbeats; absent without GPUs."""
    families = []
    for key, name, doc in _GPU_METRICS:
        family = _Family(name, "counter" if key == "energy_j" else "gauge", doc)
        seen = False
        for worker in workers:
            for device in worker.devices:
                telemetry = device.get("telemetry") or {}
                if device.get("kind") == "GPU" and key in telemetry:
                    family.add({"gpu_uuid": str(device.get("uuid", ""))}, telemetry[key])
                    seen = True
        if seen:
            families.append(family)
    return families


def metrics_app(render: Callable[[], Awaitable[bytes]]) -> web.Application:
    """`GET /metrics` answering with whatever `render()` returns, as Prometheus text."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=await render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
