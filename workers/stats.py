"""Cumulative statistics of one model version on one worker, in the shape of Triton's
statistics extension, carried in the worker's heartbeat so that a gateway can sum the fleet.

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

    def executed(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.executions += 1
        self.inferences += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_input.add(input_ns, rows)
        self.compute_infer.add(infer_ns, rows)
        self.compute_output.add(output_ns, rows)
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


def stored_ns(reply: str) -> int:
    """When JetStream stored the message (unix ns), from its ack subject; 0 if unknown."""
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[7])
        if len(tokens) >= 11:
            return int(tokens[9])
    except ValueError:
        pass
    return 0


def failure_reason(status: int) -> str:
    """Triton's `reason` label of nv_inference_request_failure for an answer's status."""
    if status == 504:
        return "CANCELED"  # the deadline passed before the request ran
    if status in (400, 404, 413):
        return "REJECTED"
    if status == 503:
        return "REJECTED"
    return "BACKEND"
