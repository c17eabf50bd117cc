"""One measured load point, its latency statistics, perf_analyzer's CSV row, and the errors
the load generator raises.

Percentiles are nearest-rank: pN is the smallest latency that at least N% of the window's
requests did not exceed (an observed value, never an interpolation between two requests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

# The percentiles every measurement reports, as perf_analyzer's CSV does.
STANDARD_PERCENTILES: Final = (50, 90, 95, 99)

# perf_analyzer's CSV columns after the first (`Concurrency` or `Request Rate`), in its order.
CSV_COLUMNS: Final = (
    "Inferences/Second",
    "Client Send",
    "Network+Server Send/Recv",
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "Client Recv",
    "p50 latency",
    "p90 latency",
    "p95 latency",
    "p99 latency",
    "Avg latency",
)
_SERVER_COLUMNS: Final = {
    "Server Queue": "queue_us",
    "Server Compute Input": "compute_input_us",
    "Server Compute Infer": "compute_infer_us",
    "Server Compute Output": "compute_output_us",
}
# How many different error texts a measurement keeps; the rest count under one key, so that a
# server answering each request with a different message cannot grow the report without end.
MAX_ERROR_SAMPLES: Final = 20
OTHER_ERRORS: Final = "(other errors)"


class PerfError(Exception):
    """Bad input, or a model the server does not have or cannot serve: one line for the user."""


def first_column(mode: str) -> str:
    return "Concurrency" if mode == "concurrency" else "Request Rate"


def csv_header(mode: str) -> list[str]:
    return [first_column(mode), *CSV_COLUMNS]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of values sorted ascending; 0.0 for none."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    if not sorted_values:
        return 0.0
    rank = math.ceil(p / 100 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


def latency_summary(latencies_us: Iterable[float], extra: Iterable[int] = ()) -> dict[str, float]:
    """avg, p50, p90, p95, p99 and any `extra` percentiles (as "pN") of latencies in µs."""
    ordered = sorted(latencies_us)
    summary = {"avg": sum(ordered) / len(ordered) if ordered else 0.0}
    for p in sorted({*STANDARD_PERCENTILES, *extra}):
        summary[f"p{p}"] = percentile(ordered, p)
    return summary


def count_error(samples: dict[str, int], message: str, count: int = 1) -> None:
    """Count `message` (its first line) `count` times in `samples`, keeping at most
    MAX_ERROR_SAMPLES texts."""
    text = (message.strip().splitlines() or ["(empty error)"])[0][:300]
    if text not in samples and len(samples) >= MAX_ERROR_SAMPLES:
        text = OTHER_ERRORS
    samples[text] = samples.get(text, 0) + count


@dataclass(slots=True)
class Measurement:
    mode: str  # "concurrency" | "request_rate"
    load: float  # the concurrency, or the target requests/s
    duration_s: float
    requests: int  # answered OK (and checked) in the window
    errors: int
    error_samples: dict[str, int]  # first line of the error text -> count
    throughput_per_s: float  # inferences/s = requests * batch_size / duration
    latency_us: dict[str, float]  # "avg", "p50", "p90", "p95", "p99" (+ any percentile asked)
    # Per-request averages of the statistics extension's deltas over the window, µs: "queue_us",
    # "compute_input_us", "compute_infer_us", "compute_output_us", and "success" (a count);
    # {} when the server's statistics were not available.
    server: dict[str, float]
    delayed: int = 0  # request-rate mode: sends that left more than 1 ms after their time
    # What the client itself spent per request, µs: building what it sends (tensors are built
    # once; this is the per-request framing), and decoding and checking the answer.
    client_send_us: float = 0.0
    client_recv_us: float = 0.0
    batch_size: int = 1
    sent: int = 0  # requests sent in the window (request-rate mode: how many the rate asked)
    achieved_rate_per_s: float = 0.0  # requests sent per second in the window
    # The stability rule's verdict (None: not checked, one window) and the windows it took.
    stable: bool | None = None
    trials: int = 1

    def csv_row(self) -> dict[str, object]:
        """perf_analyzer's CSV columns (µs, whole numbers). A server column the statistics did
        not give stays empty rather than claiming 0; Network+Server Send/Recv is what is left
        of the average latency after the client's own time and, when known, the server's."""
        avg = self.latency_us.get("avg", 0.0)
        load: object = int(self.load) if self.mode == "concurrency" else round(self.load, 3)
        row: dict[str, object] = {
            first_column(self.mode): load,
            "Inferences/Second": round(self.throughput_per_s, 2),
            "Client Send": round(self.client_send_us),
        }
        server_total = sum(self.server.get(key, 0.0) for key in _SERVER_COLUMNS.values())
        row["Network+Server Send/Recv"] = round(
            max(avg - self.client_send_us - self.client_recv_us - server_total, 0.0)
        )
        for column, key in _SERVER_COLUMNS.items():
            row[column] = round(self.server[key]) if key in self.server else ""
        row["Client Recv"] = round(self.client_recv_us)
        for p in STANDARD_PERCENTILES:
            row[f"p{p} latency"] = round(self.latency_us.get(f"p{p}", 0.0))
        row["Avg latency"] = round(avg)
        return row


class ServerGone(PerfError):
    """The server stopped answering: every request of a whole window failed to connect (refused,
    reset, or the NATS connection lost). `measured` holds the measurements taken before."""

    def __init__(self, message: str, measured: Sequence[Measurement] = ()) -> None:
        super().__init__(message)
        self.measured: list[Measurement] = list(measured)
