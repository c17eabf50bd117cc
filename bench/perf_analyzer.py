"""Drives Triton's perf_analyzer for bench/sidebyside.py: one concurrency level against one
model, binary tensors over HTTP or gRPC, about `duration_s` of load.

perf_analyzer measures in windows until three in a row agree; here the stability threshold is
set so loose that the first three always agree, and each window is a third of the cell (the
tool sleeps 1.2 times the interval per window), so a cell lasts about 1.2 * duration_s. Its CSV
report (`-f`) gives throughput, the client's latency percentiles and the server's own queue
and compute times (from the statistics extension), all in µs.

The version is named (`-x 1`): without it perf_analyzer picks the version whose statistics'
queue count grew during each window, and fails the run with "failed to find the requested model
version" on a server whose statistics arrive later than the window ends.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final

from bench.bench import BenchError

WINDOWS: Final = 3
# Loose enough that three windows always count as stable: the cell has a fixed length instead.
STABILITY_PERCENTAGE: Final = 1000
MAX_TRIALS: Final = 6
MODEL_VERSION: Final = "1"
_REQUEST_COUNT: Final = re.compile(r"^\s*Request count:\s*(\d+)", re.MULTILINE)

# CSV column -> key in the results, for the columns the comparison and the JSON keep (µs).
_COLUMNS: Final = {
    "Inferences/Second": "requests_per_s",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_send_recv_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
}


def command(
    binary: Path,
    host_port: str,
    model: str,
    concurrency: int,
    duration_s: float,
    report: Path,
    protocol: str = "http",
) -> list[str]:
    interval_ms = max(200, round(duration_s * 1000 / WINDOWS))
    return [
        str(binary),
        "-m", model,
        "-x", MODEL_VERSION,
        "-u", host_port,
        "-i", protocol,
        # gRPC carries tensors raw whatever these say; over HTTP they ask for binary data.
        "--input-tensor-format=binary",
        "--output-tensor-format=binary",
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-mode", "time_windows",
        "--measurement-interval", str(interval_ms),
        "--stability-percentage", str(STABILITY_PERCENTAGE),
        "--max-trials", str(MAX_TRIALS),
        "-f", str(report),
    ]  # fmt: skip


def parse_report(text: str) -> dict[str, float]:
    """The one row of a single-concurrency CSV report, by our keys; latencies stay in µs."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if len(rows) != 1:
        raise BenchError(f"perf_analyzer's report has {len(rows)} rows, expected 1:\n{text}")
    row = rows[0]
    missing = [column for column in _COLUMNS if column not in row]
    if missing:
        raise BenchError(f"perf_analyzer's report lacks columns {missing}:\n{text}")
    return {key: float(row[column]) for column, key in _COLUMNS.items()}


def parse_request_count(stdout: str) -> int | None:
    """Requests completed in the measured windows (the client's count, the first one printed)."""
    match = _REQUEST_COUNT.search(stdout)
    return int(match.group(1)) if match else None


def run(
    binary: Path,
    env: dict[str, str],
    base_url: str,
    model: str,
    concurrency: int,
    duration_s: float,
    protocol: str = "http",
) -> dict[str, Any]:
    """One perf_analyzer run; the point in bench.py's units (req/s, ms) plus the raw columns.
    `base_url`: http://host:port, or host:port of the gRPC endpoint with `protocol` "grpc"."""
    host_port = base_url.removeprefix("http://").removeprefix("https://")
    with tempfile.TemporaryDirectory(prefix="natron-pa-") as tmp:
        report = Path(tmp) / "report.csv"
        args = command(binary, host_port, model, concurrency, duration_s, report, protocol)
        timeout_s = duration_s * 1.2 * MAX_TRIALS / WINDOWS + 60
        try:
            result = subprocess.run(
                args, check=False, capture_output=True, text=True, env=env, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"perf_analyzer ran past {timeout_s:.0f} s: {' '.join(args)}") from exc
        if result.returncode != 0 or not report.is_file():
            raise BenchError(
                f"perf_analyzer failed (exit {result.returncode}): {' '.join(args)}\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
        columns = parse_report(report.read_text())
    windows_s = WINDOWS * 1.2 * duration_s / WINDOWS
    requests = parse_request_count(result.stdout)
    return {
        "model": model,
        "concurrency": concurrency,
        "requests_per_s": columns["requests_per_s"],
        # perf_analyzer stops at the first failed request: a run that ends well had none.
        "errors": 0,
        "requests": requests if requests is not None else round(columns["requests_per_s"] * windows_s),
        "p50_ms": columns["p50_us"] / 1e3,
        "p90_ms": columns["p90_us"] / 1e3,
        "p99_ms": columns["p99_us"] / 1e3,
        "perf_analyzer": columns,
        "command": args,
    }
