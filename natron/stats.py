"""The statistics schema, in one place: what a worker counts per model version (`ModelStats`),
its JSON form carried in the worker's heartbeat, the sum of those over a fleet, and Triton's
statistics-extension shape the gateway answers with.

Durations are nanoseconds. `queue` runs from the request's storage in JetStream (its timestamp
in the ack subject, a wall clock shared by the cluster) until its batch starts; `success` and
`fail` from that same storage until the answer is published.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


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
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    executions: int = 0
    inferences: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: dict[str, Duration] = field(default_factory=dict)  # by Triton's failure reason
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

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

    def to_json(self) -> dict[str, Any]:
        return {
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
        }


def failure_reason(status: int) -> str:
    """Triton's `reason` label of nv_inference_request_failure for an answer's status."""
    if status == 504:
        return "CANCELED"  # the deadline passed before the request ran
    if status in (400, 404, 413):
        return "REJECTED"
    if status == 503:
        return "REJECTED"
    return "BACKEND"


# -- the fleet: JSON statistics of several workers summed, and Triton's shape ---------------

_DURATIONS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def _add_duration(into: dict[str, int], other: dict[str, Any]) -> None:
    into["count"] += int(other.get("count", 0))
    into["ns"] += int(other.get("ns", 0))


def empty_stats() -> dict[str, Any]:
    return {
        "executions": 0,
        "inferences": 0,
        "last_inference_ms": 0,
        **{name: {"count": 0, "ns": 0} for name in _DURATIONS},
        "fail": {},
        "batches": {},
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
