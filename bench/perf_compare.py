"""`natron perf` beside Triton's perf_analyzer, on the same cells of the same natron server.

    .venv/bin/python -m bench.perf_compare [--model simple] [--concurrency 1,4,16] [--duration-s 6]
        [--protocol http|grpc]

Starts `natron serve` on the example model, then, for each concurrency, runs both load
generators one after the other against it: HTTP with binary tensor data (or gRPC), version 1, about
`duration_s` of measured load each. perf_analyzer (from tritonclient 2.41.1's wheel, in
.venv-triton: scripts/install_triton.sh) is driven as bench/sidebyside.py drives it
(bench/perf_analyzer.py: three windows, each a third of the cell, under a stability rule loose
enough that the first three agree); `natron perf` runs as users run it, a process of its own
writing its CSV (`-f`), with the same windows and the same rule after a warm-up.

Both tools write perf_analyzer's CSV, read back here by the same parser. Beside throughput and
latencies, the table gives each tool's own CPU time per 1000 requests (its process's user+system
time over the whole run, warm-up and start included, divided by its measured requests): on a
small machine the client competes with the server for the cores, so a hungrier client leaves
less for the server. Prints a table and writes bench/results/perf_compare-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import perf_analyzer
from bench.bench import (
    REPO_ROOT,
    RESULTS_DIR,
    BenchError,
    ServerProcess,
    bench_repo,
    ensure_models,
    git_revision,
    host_info,
    natron_command,
    ready_urls,
)
from bench.triton import DEFAULT_VENV, TritonMissing, find_install
from broker.server import free_ports

# Piped output (a log, `| tee`) would otherwise be squeezed to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)
SERVER_READY_TIMEOUT_S = 120.0


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_natron_perf(
    base_url: str, model: str, concurrency: int, duration_s: float, protocol: str = "http"
) -> dict[str, Any]:
    """One `natron perf` cell as a process of its own; its CSV row in perf_analyzer's keys.
    `base_url`: http://host:port, or host:port of the gRPC endpoint with `protocol` "grpc"."""
    host_port = base_url.removeprefix("http://")
    with tempfile.TemporaryDirectory(prefix="natron-perf-") as tmp:
        report = Path(tmp) / "report.csv"
        args = [
            *natron_command(), "perf", "-m", model, "-x", perf_analyzer.MODEL_VERSION, "-u", host_port,
            "-i", protocol, "--concurrency-range", str(concurrency),
            # The same windows and stability rule as perf_analyzer's cell (bench/perf_analyzer.py).
            "-p", str(max(200, round(duration_s * 1000 / perf_analyzer.WINDOWS))),
            "-s", str(perf_analyzer.STABILITY_PERCENTAGE), "-r", str(perf_analyzer.MAX_TRIALS),
            "--warmup", "1", "-f", str(report),
        ]  # fmt: skip
        cpu_before = _children_cpu_s()
        result = subprocess.run(args, capture_output=True, text=True, timeout=duration_s + 120, cwd=REPO_ROOT)
        cpu_s = _children_cpu_s() - cpu_before
        if result.returncode != 0 or not report.is_file():
            raise BenchError(f"natron perf failed (exit {result.returncode}): {result.stderr[-2000:]}")
        text = report.read_text()
    columns = perf_analyzer.parse_report(text)
    row = next(csv.DictReader(io.StringIO(text)))
    requests = round(columns["requests_per_s"] * duration_s)
    return {
        "tool": "natron perf",
        "concurrency": concurrency,
        "requests_per_s": columns["requests_per_s"],
        "avg_us": float(row["Avg latency"]),
        "requests": requests,
        "cpu_s": cpu_s,
        "columns": columns,
        "command": args,
    }


def run_perf_analyzer(
    binary: Path,
    env: dict[str, str],
    base_url: str,
    model: str,
    concurrency: int,
    duration_s: float,
    protocol: str = "http",
) -> dict[str, Any]:
    cpu_before = _children_cpu_s()
    point = perf_analyzer.run(binary, env, base_url, model, concurrency, duration_s, protocol)
    cpu_s = _children_cpu_s() - cpu_before
    return {
        "tool": "perf_analyzer",
        "concurrency": concurrency,
        "requests_per_s": point["requests_per_s"],
        "avg_us": None,  # perf_analyzer 2.41's CSV has no average column
        "requests": point["requests"],
        "cpu_s": cpu_s,
        "columns": point["perf_analyzer"],
        "command": point["command"],
    }


def table(points: Sequence[dict[str, Any]], protocol: str = "http") -> Table:
    over = "HTTP binary tensors" if protocol == "http" else "gRPC"
    t = Table(title=f"natron perf vs perf_analyzer: same natron server, {over}", title_justify="left")
    for column in ("Conc.", "Tool", "Infer/s", "p50 ms", "p90 ms", "p99 ms", "Srv queue ms", "Srv infer ms",
                   "Net+srv ms", "Client CPU ms/1k req"):  # fmt: skip
        t.add_column(column, justify="right")
    for p in points:
        c = p["columns"]
        cpu_per_k = p["cpu_s"] * 1e6 / p["requests"] if p["requests"] else None
        t.add_row(
            str(p["concurrency"]),
            p["tool"],
            f"{p['requests_per_s']:.1f}",
            f"{c['p50_us'] / 1e3:.2f}",
            f"{c['p90_us'] / 1e3:.2f}",
            f"{c['p99_us'] / 1e3:.2f}",
            f"{c['server_queue_us'] / 1e3:.2f}",
            f"{c['server_compute_infer_us'] / 1e3:.2f}",
            f"{c['network_server_send_recv_us'] / 1e3:.2f}",
            "-" if cpu_per_k is None else f"{cpu_per_k:.0f}",
        )
    return t


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default="simple")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    p.add_argument("--duration-s", type=float, default=6.0, help="measured load per tool and cell")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--triton-venv", type=Path, default=DEFAULT_VENV)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        install = find_install(args.triton_venv)
    except TritonMissing as exc:
        raise BenchError(str(exc)) from None
    missing = install.perf_analyzer_missing()
    if missing:
        raise BenchError(missing)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    source = ensure_models(None, [args.model])
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="natron-perf-compare-") as tmp:
        repo = bench_repo(source, [args.model], Path(tmp) / "models")
        http_port, metrics_port, nats_port, grpc_port = free_ports(4)
        command = [
            *natron_command(), "serve", str(repo),
            "--http-address", "127.0.0.1", "--http-port", str(http_port),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port), "--nats-port", str(nats_port),
        ]  # fmt: skip
        base_url = f"http://127.0.0.1:{http_port}"
        target = base_url if args.protocol == "http" else f"127.0.0.1:{grpc_port}"
        server = ServerProcess("natron", command, Path(tmp) / "natron.log")
        server.start()
        try:
            ready_s = server.wait_ready(ready_urls(base_url, [args.model]), SERVER_READY_TIMEOUT_S)
            console.print(f"[dim]natron ready after {ready_s:.1f} s at {base_url}")
            for concurrency in levels:
                # Alternating which goes first would not change much on a quiet box; each tool
                # warms its own connections, and the server is warm after the first cell.
                console.print(f"[dim]concurrency {concurrency}: perf_analyzer")
                points.append(
                    run_perf_analyzer(
                        install.perf_analyzer,
                        install.perf_analyzer_env(),
                        target,
                        args.model,
                        concurrency,
                        args.duration_s,
                        args.protocol,
                    )
                )
                console.print(f"[dim]concurrency {concurrency}: natron perf")
                points.append(
                    run_natron_perf(target, args.model, concurrency, args.duration_s, args.protocol)
                )
        finally:
            server.stop()
    return {
        "benchmark": "perf_compare",
        "timestamp": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "git_revision": git_revision(),
        "host": {**host_info(), "machine": platform.machine()},
        "settings": {
            "model": args.model,
            "concurrency": levels,
            "duration_s": args.duration_s,
            "protocol": "http, binary tensors" if args.protocol == "http" else "grpc",
        },
        "versions": {"tritonclient (perf_analyzer)": install.versions.get("tritonclient")},
        "points": points,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        results = run(args)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 1
    console.print(table(results["points"], args.protocol))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"perf_compare-{results['timestamp']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {path} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
