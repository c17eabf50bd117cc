"""A normal client's latency while many other connections sit idle or half-sent, and what those
connections cost the gateway in memory (gateway/connections.py).

    .venv/bin/python -m bench.idle_clients                  # ~1 min
    .venv/bin/python -m bench.idle_clients --connections 5000 --requests 5000

One `natron serve` of `tiny` with its default timeouts (keep-alive 75 s, read 30 s: nothing is
closed during a phase). For each phase, the other connections are opened first, then one client
sends `--requests` infer requests back to back on one kept-alive connection; the table gives
its p50/p99 latency and throughput, and the gateway process's resident memory (VmRSS) with
those connections open:

- none: no other connection;
- idle: `--connections` connections that sent nothing;
- half-sent: as many, half with part of a request head, half with a head and part of a body.

Between phases the connections are closed and the gateway is given a moment to notice.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

from examples.build_models import build
from tests.harness import Served, child_processes, natron_serve, wait_until

BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
).encode()
INFER_HEAD = (
    b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
)


@dataclass(slots=True, frozen=True)
class Phase:
    phase: str
    connections: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    req_per_s: float
    gateway_rss_mib: float


def gateway_pid(served: Served) -> int:
    for pid, command in child_processes(served.pid):
        if " gateway" in command:
            return pid
    raise RuntimeError("no gateway process under natron serve")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_connections(host_port: str, count: int, kind: str) -> list[socket.socket]:
    host, port = host_port.split(":")
    socks = []
    for index in range(count):
        sock = socket.create_connection((host, int(port)), timeout=30)
        if kind == "half-sent":
            sock.sendall(INFER_HEAD[:40] if index % 2 else INFER_HEAD + BODY[:10])
        socks.append(sock)
    return socks


def measure(served: Served, phase: str, connections: int, count: int, pid: int) -> Phase:
    latencies: list[float] = []
    errors = 0
    with requests.Session() as session:
        url = f"{served.url}/v2/models/tiny/infer"
        for _ in range(50):  # warm: the connection, the worker, the caches
            session.post(url, data=BODY, timeout=30)
        started = time.perf_counter()
        for _ in range(count):
            sent = time.perf_counter()
            try:
                ok = session.post(url, data=BODY, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            latencies.append(time.perf_counter() - sent)
            errors += not ok
        elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return Phase(
        phase,
        connections,
        count,
        errors,
        round(quantiles[49] * 1e3, 3),
        round(quantiles[98] * 1e3, 3),
        round(count / elapsed, 1),
        round(rss_mib(pid), 1),
    )


def table(phases: list[Phase]) -> Table:
    grid = Table(
        title="a normal client beside idle and half-sent connections (tiny, one keep-alive connection)"
    )
    for column in (
        "phase",
        "other conns",
        "requests",
        "errors",
        "p50 ms",
        "p99 ms",
        "req/s",
        "gateway RSS MiB",
    ):
        grid.add_column(column)
    for p in phases:
        grid.add_row(
            p.phase,
            str(p.connections),
            str(p.requests),
            str(p.errors),
            f"{p.p50_ms:.2f}",
            f"{p.p99_ms:.2f}",
            f"{p.req_per_s:.0f}",
            f"{p.gateway_rss_mib:.1f}",
        )
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=2000, help="other connections per phase")
    parser.add_argument("--requests", type=int, default=2000, help="the normal client's requests per phase")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON goes")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            parser.exit(2, f"the hard limit on open files ({hard}) is below the {wanted} needed\n")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="natron-idle-") as tmp:
        repository = Path(tmp) / "repo"
        build(repository, ["tiny"], quiet=True)
        with natron_serve(repository, ["tiny"], Path(tmp)) as served:
            pid = gateway_pid(served)
            for phase, count in (("none", 0), ("idle", args.connections), ("half-sent", args.connections)):
                socks = open_connections(served.host_port, count, phase)
                try:
                    phases.append(measure(served, phase, count, args.requests, pid))
                finally:
                    for sock in socks:
                        sock.close()
                # The gateway has seen them go before the next phase opens its own.
                wait_until(lambda: requests.get(f"{served.url}/v2/health/live", timeout=5).ok, 10)
                time.sleep(1.0)
    Console(width=200).print(table(phases))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"idle_clients-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps([asdict(p) for p in phases], indent=2))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
