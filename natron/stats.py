"""The statistics schema, in one place: what a worker counts per model version (`ModelStats`),
its JSON form carried in the worker's heartbeat and in its answer to a statistics query, the
sum of those over a fleet, and Triton's statistics-extension shape the gateway answers with.

Durations are nanoseconds. `queue` runs from the request's storage in JetStream (its timestamp
in the ack subject, a wall clock shared by the cluster) until its batch starts; `success` and
`fail` from that same storage until the answer is published; `first_response` (decoupled
models) from that storage until the request's first stream frame is published.

The statistics query (`natron.ctl.stats`, broker/subjects.py) is how the gateway reads every
live worker's counts as they are now rather than as of its last heartbeat: the gateway publishes
a `StatsQuery`, every worker and orchestrator answers with `stats_answer`, and both sides use
this module's codec for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

# Sub-buckets per power of two in a latency sketch: with 64, a quantile read from a sketch is
# within 0.8 % of a duration observed at exactly that rank.
SKETCH_PRECISION = 64
# The five durations a latency sketch is kept for: Triton's summary families.
SKETCHED = ("success", "queue", "compute_input", "compute_infer", "compute_output")
# Triton's default buckets of nv_inference_first_response_histogram_ms, in milliseconds.
FIRST_RESPONSE_BUCKETS_MS = (100, 500, 2000, 5000)


def sketch_index(ns: float) -> int:
    """The sketch bucket of a duration: log-spaced, SKETCH_PRECISION buckets per octave; 0
    holds everything under 1 ns."""
    if ns < 1:
        return 0
    mantissa, exponent = math.frexp(ns)  # ns = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return exponent * SKETCH_PRECISION + int((mantissa - 0.5) * 2 * SKETCH_PRECISION)


def sketch_value(index: int) -> float:
    """The duration a sketch bucket stands for: the middle of its range."""
    if index <= 0:
        return 0.0
    exponent, sub = divmod(index, SKETCH_PRECISION)
    return math.ldexp(0.5 + (sub + 0.5) / (2 * SKETCH_PRECISION), exponent)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class Observed:
    """A Duration whose observations also go into a sketch (bucket -> count) once someone asks
    for quantiles (`ModelStats.keep_sketches`): `add(ns, count)` is `count` observations of
    `ns / count` each. Until then the sketch is None and costs one test per observation."""

    count: int = 0
    ns: int = 0
    sketch: dict[int, int] | None = None

    def add(self, ns: int, count: int = 1) -> None:
        ns = max(0, ns)
        self.count += count
        self.ns += ns
        sketch = self.sketch
        if sketch is not None and count > 0:
            key = sketch_index(ns / count)
            sketch[key] = sketch.get(key, 0) + count

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class Histogram:
    """Cumulative counts by bucket of `FIRST_RESPONSE_BUCKETS_MS` (the last is +Inf), per
    bucket rather than cumulative so that workers' histograms add element by element."""

    count: int = 0
    ns: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(FIRST_RESPONSE_BUCKETS_MS) + 1))

    def add(self, ns: int) -> None:
        ns = max(0, ns)
        self.count += 1
        self.ns += ns
        ms = ns / 1e6
        for index, bound in enumerate(FIRST_RESPONSE_BUCKETS_MS):
            if ms <= bound:
                self.buckets[index] += 1
                return
        self.buckets[-1] += 1

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "ns": self.ns, "buckets": list(self.buckets)}


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    executions: int = 0
    inferences: int = 0
    last_inference_ms: int = 0
    success: Observed = field(default_factory=Observed)
    fail: dict[str, Duration] = field(default_factory=dict)  # by Triton's failure reason
    queue: Observed = field(default_factory=Observed)
    compute_input: Observed = field(default_factory=Observed)
    compute_infer: Observed = field(default_factory=Observed)
    compute_output: Observed = field(default_factory=Observed)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    first_response: Histogram = field(default_factory=Histogram)

    def executed(self, rows: int, input_ns: int, infer_ns: int, output_ns: int, *, requests: int = 1) -> None:
        """One execution of `requests` requests holding `rows` rows. As in Triton, each request
        is charged the whole execution's time (what it waited for), so perf_analyzer's compute
        per request is the execution's time, not that divided by the batch."""
        self.executions += 1
        self.inferences += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_input.add(max(0, input_ns) * requests, requests)
        self.compute_infer.add(max(0, infer_ns) * requests, requests)
        self.compute_output.add(max(0, output_ns) * requests, requests)
        batch = self.batches.setdefault(rows, BatchStats())
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def failed(self, reason: str, ns: int) -> None:
        self.fail.setdefault(reason, Duration()).add(ns)

    def keep_sketches(self) -> None:
        """From now on, keep latency sketches too (asked for by a gateway that serves Triton's
        summaries); a no-op once they are kept."""
        for name in SKETCHED:
            observed: Observed = getattr(self, name)
            if observed.sketch is None:
                observed.sketch = {}

    def to_json(self, sketches: bool = False) -> dict[str, Any]:
        """The JSON form; with `sketches`, the latency sketches as well (as [bucket, count]
        pairs), which heartbeats leave out."""
        data: dict[str, Any] = {
            "executions": self.executions,
            "inferences": self.inferences,
            "last_inference_ms": self.last_inference_ms,
            "success": self.success.to_json(),
            "fail": {reason: d.to_json() for reason, d in self.fail.items()},
            "queue": self.queue.to_json(),
            "compute_input": self.compute_input.to_json(),
            "compute_infer": self.compute_infer.to_json(),
            "compute_output": self.compute_output.to_json(),
            "batches": {
                str(size): {
                    "compute_input": b.compute_input.to_json(),
                    "compute_infer": b.compute_infer.to_json(),
                    "compute_output": b.compute_output.to_json(),
                }
                for size, b in self.batches.items()
            },
            "first_response": self.first_response.to_json(),
        }
        if sketches:
            data["sketches"] = {
                name: [[index, count] for index, count in sorted(sketch.items())]
                for name in SKETCHED
                if (sketch := getattr(self, name).sketch) is not None
            }
        return data


def failure_reason(status: int) -> str:
    """Triton's `reason` label of nv_inference_request_failure for an answer's status."""
    if status == 504:
        return "CANCELED"  # the deadline passed before the request ran
    if status in (400, 404, 413):
        return "REJECTED"
    if status == 503:
        return "REJECTED"
    return "BACKEND"


# Every `reason` label value Triton 2.4x gives nv_inference_request_failure.
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


# -- the statistics query: the gateway asks, every worker answers ----------------------------


@dataclass(slots=True, frozen=True)
class StatsQuery:
    model: str | None = None  # None: every model
    sketches: bool = False  # the latency sketches too (and keep them from now on)

    def to_json(self) -> bytes:
        return orjson.dumps({"model": self.model, "sketches": self.sketches})

    @staticmethod
    def from_json(data: bytes) -> StatsQuery:
        """ValueError when `data` is not a query."""
        raw = orjson.loads(data) if data else {}
        if not isinstance(raw, dict):
            raise ValueError("a statistics query is a JSON object")
        model = raw.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError("a statistics query's 'model' is a string or null")
        return StatsQuery(model, bool(raw.get("sketches", False)))


def stats_answer(worker_id: str, pid: int, stats: dict[str, dict[str, Any]]) -> bytes:
    """A worker's answer: its id, its process (counts start again in a new one) and its
    statistics by "model/version"."""
    return orjson.dumps({"worker": worker_id, "pid": pid, "stats": stats})


def read_stats_answer(data: bytes) -> tuple[str, int, dict[str, dict[str, Any]]]:
    """The worker id, process id and statistics of an answer; ValueError when malformed."""
    raw = orjson.loads(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("worker"), str):
        raise ValueError("a statistics answer names its worker")
    stats = raw.get("stats", {})
    if not isinstance(stats, dict):
        raise ValueError("a statistics answer's 'stats' is a JSON object")
    return raw["worker"], int(raw.get("pid", 0)), stats


def progress(stats: dict[str, Any]) -> int:
    """How far one worker's statistics of a model version have come: they only grow within a
    process, so of two copies the one with more progress is the later."""
    fail = stats.get("fail", {})
    return (
        int(stats.get("executions", 0))
        + int(stats.get("success", {}).get("count", 0))
        + int(stats.get("queue", {}).get("count", 0))
        + sum(int(d.get("count", 0)) for d in fail.values())
    )


# -- the fleet: JSON statistics of several workers summed, and Triton's shape ---------------

_DURATIONS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def _add_duration(into: dict[str, int], other: dict[str, Any]) -> None:
    into["count"] += int(other.get("count", 0))
    into["ns"] += int(other.get("ns", 0))


def _empty_histogram() -> dict[str, Any]:
    return {"count": 0, "ns": 0, "buckets": [0] * (len(FIRST_RESPONSE_BUCKETS_MS) + 1)}


def empty_stats() -> dict[str, Any]:
    return {
        "executions": 0,
        "inferences": 0,
        "last_inference_ms": 0,
        **{name: {"count": 0, "ns": 0} for name in _DURATIONS},
        "fail": {},
        "batches": {},
        "first_response": _empty_histogram(),
    }


def merge(into: dict[str, Any], stats: dict[str, Any]) -> None:
    into["executions"] += int(stats.get("executions", 0))
    into["inferences"] += int(stats.get("inferences", 0))
    into["last_inference_ms"] = max(into["last_inference_ms"], int(stats.get("last_inference_ms", 0)))
    for name in _DURATIONS:
        _add_duration(into[name], stats.get(name, {}))
    for reason, duration in stats.get("fail", {}).items():
        _add_duration(into["fail"].setdefault(reason, {"count": 0, "ns": 0}), duration)
    for size, batch in stats.get("batches", {}).items():
        target = into["batches"].setdefault(size, {k: {"count": 0, "ns": 0} for k in _DURATIONS[2:]})
        for key in _DURATIONS[2:]:
            _add_duration(target[key], batch.get(key, {}))
    first = stats.get("first_response")
    if first:
        target = into["first_response"]
        _add_duration(target, first)
        buckets = first.get("buckets", [])
        # A report with other bucket bounds (another release) adds its total alone.
        if len(buckets) == len(target["buckets"]):
            target["buckets"] = [a + int(b) for a, b in zip(target["buckets"], buckets, strict=True)]
        else:
            target["buckets"][-1] += int(first.get("count", 0))


def to_triton(model: str, version: str, stats: dict[str, Any]) -> dict[str, Any]:
    """natron's summed worker statistics in Triton's statistics-extension shape."""
    fail = {
        "count": sum(d["count"] for d in stats["fail"].values()),
        "ns": sum(d["ns"] for d in stats["fail"].values()),
    }
    zero = {"count": 0, "ns": 0}
    return {
        "name": model,
        "version": version,
        "last_inference": stats["last_inference_ms"],
        "inference_count": stats["inferences"],
        "execution_count": stats["executions"],
        "inference_stats": {
            "success": stats["success"],
            "fail": fail,
            "queue": stats["queue"],
            "compute_input": stats["compute_input"],
            "compute_infer": stats["compute_infer"],
            "compute_output": stats["compute_output"],
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {"batch_size": int(size), **batch}
            for size, batch in sorted(stats["batches"].items(), key=lambda item: int(item[0]))
        ],
    }
