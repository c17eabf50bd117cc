"""Prometheus text for the fleet under Triton's names, and the one small app every service serves
its metrics with (gateway, router and worker alike).

Triton's families are rendered here rather than through prometheus-client: its counters always
carry a `_total` suffix, and dashboards built for Triton query `nv_inference_request_success`,
not `nv_inference_request_success_total`. Each process's own collectors (latency histograms,
process metrics) do go through prometheus-client and are appended to the same page.

What Triton's `--metrics-config` turns on or off is a `MetricsConfig` (`parse_metrics_config`):
the latency counters (on), latency summaries with quantiles over a sliding window, and the
first-response histogram of decoupled models (both off).

Summaries cannot be summed over workers as quantiles, so workers keep mergeable latency
sketches instead (natron/stats.py: log-spaced buckets, a quantile within 0.8 % of the duration
at exactly its rank) and the gateway works the window out (`LatencyWindows`): every
max_age / age_buckets it keeps a snapshot of the fleet's cumulative sketches, and a scrape's
window is the sketches now less the oldest snapshot not older than max_age, as Prometheus's own
age buckets rotate. The `error` of each quantile is accepted for Triton's syntax; the sketch's
error is the bound instead. A summary's `_count` and `_sum` are cumulative, as in Triton.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from natron.records import WorkerReport
from natron.stats import FAILURE_REASONS, FIRST_RESPONSE_BUCKETS_MS, sketch_value

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Triton's default summary quantiles, as (quantile, error) pairs.
DEFAULT_QUANTILES = ((0.5, 0.05), (0.9, 0.01), (0.95, 0.001), (0.99, 0.001), (0.999, 0.001))


# -- --metrics-config --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class MetricsConfig:
    """Which latency families the fleet's metrics carry. The defaults are Triton's; max_age and
    age_buckets are those of Triton's summaries (fixed there, settable here)."""

    counter_latencies: bool = True
    summary_latencies: bool = False
    histogram_latencies: bool = False
    summary_quantiles: tuple[tuple[float, float], ...] = DEFAULT_QUANTILES
    summary_max_age_s: float = 60.0
    summary_age_buckets: int = 5


def _flag(entry: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"metrics config '{entry}': expected true or false, got '{value}'")
    return lowered == "true"


def _quantiles(entry: str, value: str) -> tuple[tuple[float, float], ...]:
    pairs: list[tuple[float, float]] = []
    for part in value.split(","):
        quantile_text, colon, error_text = part.strip().partition(":")
        try:
            if not colon:
                raise ValueError
            quantile, error = float(quantile_text), float(error_text)
        except ValueError:
            raise ValueError(
                f"metrics config '{entry}': '{part.strip()}' is not <quantile>:<error>, "
                "e.g. summary_quantiles=0.5:0.05,0.9:0.01,0.99:0.001"
            ) from None
        if not (0.0 <= quantile <= 1.0 and 0.0 <= error <= 1.0):
            raise ValueError(
                f"metrics config '{entry}': quantile and error must lie in [0, 1], got '{part.strip()}'"
            )
        if any(quantile == q for q, _ in pairs):
            raise ValueError(f"metrics config '{entry}': quantile {quantile} is given twice")
        pairs.append((quantile, error))
    return tuple(pairs)


def _positive(entry: str, value: str, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value.strip())
    except ValueError:
        raise ValueError(f"metrics config '{entry}': '{value}' is not a number") from None
    if not number > 0 or math.isinf(number):
        raise ValueError(f"metrics config '{entry}': must be a positive number, got '{value}'")
    return number


_KEYS = (
    "counter_latencies",
    "summary_latencies",
    "histogram_latencies",
    "summary_quantiles",
    "summary_max_age",
    "summary_age_buckets",
)


def parse_metrics_config(entries: tuple[str, ...]) -> MetricsConfig:
    """Triton's `--metrics-config key=value` settings (given several times) as a MetricsConfig;
    a later setting of a key wins, as in Triton. ValueError names an unknown key or bad value.

    Keys: counter_latencies, summary_latencies, histogram_latencies (true/false),
    summary_quantiles (<quantile>:<error>,...), and natron's summary_max_age (seconds) and
    summary_age_buckets (Triton's fixed 60 and 5 by default)."""
    settings: dict[str, Any] = {}
    for entry in entries:
        key, equals, value = entry.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"metrics config '{entry}': expected <setting>=<value>")
        if key in ("counter_latencies", "summary_latencies", "histogram_latencies"):
            settings[key] = _flag(entry, value)
        elif key == "summary_quantiles":
            settings[key] = _quantiles(entry, value)
        elif key == "summary_max_age":
            settings["summary_max_age_s"] = float(_positive(entry, value, float))
        elif key == "summary_age_buckets":
            settings[key] = int(_positive(entry, value, int))
        else:
            raise ValueError(f"metrics config '{entry}': unknown setting '{key}'; known: {', '.join(_KEYS)}")
    return MetricsConfig(**settings)


# -- latency sketches and their sliding window ----------------------------------------------

Sketch = dict[int, int]  # bucket -> count (natron.stats.sketch_index)
# worker -> "model/version" -> duration name -> sketch
FleetSketches = dict[str, dict[str, dict[str, Sketch]]]


def sketch_quantile(sketch: Sketch, quantile: float) -> float:
    """The duration (ns) at `quantile` of the observations in `sketch`; NaN when it is empty,
    as a Prometheus summary with no observations in its window."""
    total = sum(sketch.values())
    if total <= 0:
        return math.nan
    rank = max(1, math.ceil(quantile * total))
    seen = 0
    for index in sorted(sketch):
        seen += sketch[index]
        if seen >= rank:
            return sketch_value(index)
    return sketch_value(max(sketch))


def decode_sketches(by_worker: dict[str, dict[str, dict[str, Any]]]) -> FleetSketches:
    """Workers' answered sketches ([bucket, count] pairs) as sketches."""
    return {
        worker: {
            key: {name: {int(i): int(n) for i, n in pairs} for name, pairs in sketches.items()}
            for key, sketches in per_key.items()
        }
        for worker, per_key in by_worker.items()
    }


def _since(now: Sketch, before: Sketch | None) -> Sketch:
    """Observations in `now` that were not in `before` yet; all of `now` when `before` holds
    more (the worker started again and its counts did too)."""
    if not before or sum(before.values()) > sum(now.values()):
        return now
    return {i: n - before.get(i, 0) for i, n in now.items() if n > before.get(i, 0)}


class LatencyWindows:
    """Prometheus summaries' sliding window over the fleet's cumulative sketches."""

    def __init__(self, max_age_s: float, age_buckets: int) -> None:
        self.max_age_s = max_age_s
        self.step_s = max_age_s / age_buckets
        self._snapshots: deque[tuple[float, FleetSketches]] = deque()

    def observe(self, now_s: float, current: FleetSketches) -> dict[str, dict[str, Sketch]]:
        """The window ending now, by "model/version" and duration, summed over the workers;
        `current` (cumulative, taken at `now_s` on a monotonic clock) is kept as a snapshot
        when the last one is a step old."""
        while self._snapshots and now_s - self._snapshots[0][0] > self.max_age_s:
            self._snapshots.popleft()
        baseline = self._snapshots[0][1] if self._snapshots else {}
        window: dict[str, dict[str, Sketch]] = {}
        for worker, per_key in current.items():
            before = baseline.get(worker, {})
            for key, sketches in per_key.items():
                target = window.setdefault(key, {})
                for name, sketch in sketches.items():
                    into = target.setdefault(name, {})
                    for index, count in _since(sketch, before.get(key, {}).get(name)).items():
                        into[index] = into.get(index, 0) + count
        if not self._snapshots or now_s - self._snapshots[-1][0] >= self.step_s:
            self._snapshots.append((now_s, current))
        return window


# -- the host's CPU and memory ---------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class HostReading:
    cpu_utilization: float  # 0..1 over every core, since the previous reading
    memory_total_bytes: int
    memory_used_bytes: int


class HostMeter:
    """This host's nv_cpu_* readings from /proc, as Triton takes them: utilization over the time
    since the previous reading (every core together), memory used as MemTotal - MemAvailable.
    Readings closer together than `min_interval_s` repeat the last utilization, since the
    kernel's counters move in 10 ms ticks. None where there is no /proc (not Linux)."""

    def __init__(self, proc: Path = Path("/proc"), min_interval_s: float = 0.5) -> None:
        self._proc = proc
        self._min_interval_s = min_interval_s
        self._last: tuple[float, int, int] | None = None  # (monotonic s, idle ticks, total ticks)
        self._utilization = 0.0

    def read(self) -> HostReading | None:
        try:
            times = self._cpu_ticks()
            memory = self._memory()
        except (OSError, ValueError, KeyError, IndexError):
            return None
        now_s = time.monotonic()
        if self._last is None or now_s - self._last[0] >= self._min_interval_s:
            if self._last is not None:
                idle = times[0] - self._last[1]
                total = times[1] - self._last[2]
                if total > 0:
                    self._utilization = min(1.0, max(0.0, 1.0 - idle / total))
            self._last = (now_s, *times)
        return HostReading(self._utilization, *memory)

    def _cpu_ticks(self) -> tuple[int, int]:
        """(idle, total) ticks of every core since boot: the aggregate `cpu` line of /proc/stat;
        idle counts iowait too, total leaves out guest time (already in user and nice)."""
        first = (self._proc / "stat").read_text().split("\n", 1)[0].split()
        if first[0] != "cpu":
            raise ValueError("no aggregate cpu line in /proc/stat")
        ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
        return ticks[3] + ticks[4], sum(ticks)

    def _memory(self) -> tuple[int, int]:
        fields: dict[str, int] = {}
        for line in (self._proc / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                fields[name] = int(rest.split()[0]) * 1024  # kB
        total = fields["MemTotal"]
        return total, total - fields["MemAvailable"]


# -- rendering -------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class QueueInfo:
    pending: int  # waiting in the consumer: the autoscaling signal
    in_hand: int  # delivered to an instance, not yet answered


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{int(value)}" if value.is_integer() else repr(value)


class _Family:
    def __init__(self, name: str, kind: str, doc: str) -> None:
        self.lines = [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, labels: dict[str, str], value: float, suffix: str = "") -> None:
        self.lines.append(f"{self.name}{suffix}{_labels(labels)} {_number(value)}")


# Triton's latency counters: (statistics duration, family, help).
_COUNTERS = (
    ("queue", "nv_inference_queue_duration_us", "Cumulative queue duration in microseconds"),
    (
        "compute_input",
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds",
    ),
    (
        "compute_infer",
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds",
    ),
    (
        "compute_output",
        "nv_inference_compute_output_duration_us",
        "Cumulative compute output duration in microseconds",
    ),
)

# Triton's latency summaries (--metrics-config summary_latencies=true): (sketched duration,
# family, help). The request summary observes successful requests, so that its _count is
# nv_inference_request_success, as Triton's documentation says it should be.
_SUMMARIES = (
    (
        "success",
        "nv_inference_request_summary_us",
        "Summary of inference request duration in microseconds (includes cached requests)",
    ),
    (
        "queue",
        "nv_inference_queue_summary_us",
        "Summary of inference queuing duration in microseconds (includes cached requests)",
    ),
    (
        "compute_input",
        "nv_inference_compute_input_summary_us",
        "Summary of compute input duration in microseconds (does not include cached requests)",
    ),
    (
        "compute_infer",
        "nv_inference_compute_infer_summary_us",
        "Summary of compute inference duration in microseconds (does not include cached requests)",
    ),
    (
        "compute_output",
        "nv_inference_compute_output_summary_us",
        "Summary of inference compute output duration in microseconds (does not include cached requests)",
    ),
)


def render_fleet(
    versions: Iterable[tuple[str, str]],
    stats: dict[tuple[str, str], dict[str, Any]],
    queues: dict[tuple[str, str], QueueInfo],
    workers_up: dict[str, int],
    workers: list[WorkerReport],
    nats_connected: bool,
    *,
    config: MetricsConfig = MetricsConfig(),
    windows: dict[str, dict[str, Sketch]] | None = None,
    decoupled: frozenset[tuple[str, str]] = frozenset(),
    host: HostReading | None = None,
) -> str:
    """Prometheus text for the fleet: Triton's model families (the latency ones as `config`
    says; summaries' quantiles from `windows`, by "model/version"; the first-response histogram
    for the `decoupled` versions), natron's own, GPU telemetry and the host's CPU."""
    success = _Family("nv_inference_request_success", "counter", "Number of successful inference requests")
    failure = _Family("nv_inference_request_failure", "counter", "Number of failed inference requests")
    count = _Family("nv_inference_count", "counter", "Number of inferences performed (batch rows)")
    executions = _Family("nv_inference_exec_count", "counter", "Number of model executions performed")
    request_us = _Family(
        "nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds"
    )
    counters = [_Family(name, "counter", doc) for _, name, doc in _COUNTERS]
    summaries = [_Family(name, "summary", doc) for _, name, doc in _SUMMARIES]
    first_response = _Family(
        "nv_inference_first_response_histogram_ms",
        "histogram",
        "Duration from request to first response in milliseconds",
    )
    pending = _Family(
        "nv_inference_pending_request_count", "gauge", "Requests queued or in hand, not yet answered"
    )
    depth = _Family(
        "natron_queue_depth", "gauge", "Requests waiting in the model version's JetStream consumer"
    )
    batch = _Family("natron_batch_size", "histogram", "Rows per model execution")
    for model, version in versions:
        labels = {"model": model, "version": version}
        s = stats.get((model, version))
        if s is not None:
            success.add(labels, s["success"]["count"])
            # Every reason Triton knows, at 0 until it happens; any other as it comes.
            for reason in (*FAILURE_REASONS, *sorted(s["fail"].keys() - set(FAILURE_REASONS))):
                failure.add({**labels, "reason": reason}, s["fail"].get(reason, {}).get("count", 0))
            count.add(labels, s["inferences"])
            executions.add(labels, s["executions"])
            if config.counter_latencies:
                fail_ns = sum(d["ns"] for d in s["fail"].values())
                request_us.add(labels, (s["success"]["ns"] + fail_ns) // 1000)
                for family, (key, _, _) in zip(counters, _COUNTERS, strict=True):
                    family.add(labels, s[key]["ns"] // 1000)
            if config.summary_latencies:
                window = (windows or {}).get(f"{model}/{version}", {})
                for family, (key, _, _) in zip(summaries, _SUMMARIES, strict=True):
                    sketch = window.get(key, {})
                    for quantile, _error in config.summary_quantiles:
                        family.add(
                            {**labels, "quantile": _number(quantile)},
                            sketch_quantile(sketch, quantile) / 1000,
                        )
                    family.add(labels, s[key]["ns"] // 1000, "_sum")
                    family.add(labels, s[key]["count"], "_count")
            if config.histogram_latencies and (model, version) in decoupled:
                histogram = s["first_response"]
                cumulative = 0
                for bound, in_bucket in zip(FIRST_RESPONSE_BUCKETS_MS, histogram["buckets"], strict=False):
                    cumulative += in_bucket
                    first_response.add({**labels, "le": _number(bound)}, cumulative, "_bucket")
                first_response.add({**labels, "le": "+Inf"}, histogram["count"], "_bucket")
                first_response.add(labels, histogram["ns"] / 1e6, "_sum")
                first_response.add(labels, histogram["count"], "_count")
            sizes = {int(size): b["compute_infer"]["count"] for size, b in s["batches"].items()}
            for bound in BATCH_BUCKETS:
                batch.add(
                    {**labels, "le": str(bound)},
                    sum(n for size, n in sizes.items() if size <= bound),
                    "_bucket",
                )
            batch.add({**labels, "le": "+Inf"}, sum(sizes.values()), "_bucket")
            batch.add(labels, sum(sizes.values()), "_count")
            batch.add(labels, sum(size * n for size, n in sizes.items()), "_sum")
        queue = queues.get((model, version))
        if queue is not None:
            pending.add(labels, queue.pending + queue.in_hand)
            depth.add(labels, queue.pending)
    up = _Family("natron_workers_up", "gauge", "Live workers serving a READY version of the model")
    for model, workers_count in sorted(workers_up.items()):
        up.add({"model": model}, workers_count)
    connected = _Family("natron_nats_connected", "gauge", "1 while the gateway is connected to NATS")
    connected.add({}, 1 if nats_connected else 0)
    families = [success, failure, count, executions]
    if config.counter_latencies:
        families += [request_us, *counters]
    if config.summary_latencies:
        families += summaries
    if config.histogram_latencies:
        families.append(first_response)
    families += [pending, depth, batch, up, connected, *_gpu_families(workers), _worker_memory(workers)]
    families += cpu_families(host)
    return "\n".join(line for family in families for line in family.lines) + "\n"


def cpu_families(host: HostReading | None) -> list[_Family]:
    """Triton's host CPU and memory families; absent without a reading."""
    if host is None:
        return []
    utilization = _Family("nv_cpu_utilization", "gauge", "CPU utilization rate [0.0 - 1.0]")
    utilization.add({}, host.cpu_utilization)
    total = _Family("nv_cpu_memory_total_bytes", "gauge", "CPU total memory (RAM), in bytes")
    total.add({}, host.memory_total_bytes)
    used = _Family("nv_cpu_memory_used_bytes", "gauge", "CPU used memory (RAM), in bytes")
    used.add({}, host.memory_used_bytes)
    return [utilization, total, used]


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


def _worker_memory(workers: list[WorkerReport]) -> _Family:
    """Each worker's host memory with the device it serves: `natron analyze` reads it to charge a
    configuration for memory per device kind, and to find which kinds the fleet has."""
    family = _Family(
        "natron_worker_resident_memory_bytes",
        "gauge",
        "Resident host memory of a worker and its model processes, in bytes, by the device it serves",
    )
    for worker in workers:
        device = worker.devices[0] if worker.devices else {}
        labels = {
            "worker": worker.id,
            "host": worker.host,
            "role": worker.role,
            "device_kind": str(device.get("kind", "CPU")),
            "device": str(device.get("name", "")),
            "device_index": str(device.get("index", 0)),
            "gpu_uuid": str(device.get("uuid", "")),
        }
        family.add(labels, worker.rss_bytes)
    return family


def metrics_app(render: Callable[[], Awaitable[bytes]]) -> web.Application:
    """`GET /metrics` answering with whatever `render()` returns, as Prometheus text."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=await render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
