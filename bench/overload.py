"""Overload: a model at four times the load it sustains, with and without a queue policy, and
clients that reset their connections while the gateway is the bottleneck.

    .venv/bin/python -m bench.overload            # ~2 min
    .venv/bin/python -m bench.overload --quick    # shorter phases

The served models are Python models that take SERVICE_MS per request on one instance, so the
load each sustains is known (about 1000 / SERVICE_MS requests per second) and the machine's
two cores are not what saturates. Each gets open-loop load (a request every 1/rate seconds,
whatever the answers do, as independent users send them): half its sustainable rate, then four
times it, then half again. Per model and phase: requests, answers by status, p50/p99 of the
200s, p99 of the refusals (503), and the peak RSS of every natron process.

The models differ only in their `dynamic_batching`:

* `unbounded`: no queue policy (natron before Triton's queue policy): everything is queued and
  waits its turn until the gateway's deadline;
* `bounded`: `max_queue_size` and a queue timeout (`default_timeout_microseconds`, REJECT);
* `queue_only`: a `max_queue_size` of 1 and no timeout.

The reset phase sends bursts of requests to `tiny` on raw connections that are reset (RST)
right after the request is written, so the gateway reads each request and its client's
departure in the same moment, and counts how many of them the worker still executed (the
model's statistics: successes before and after).

It prints tables and writes bench/results/overload-<timestamp>.json (and `--json PATH`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import requests
from rich.console import Console
from rich.table import Table

from examples.build_models import build
from tests.harness import Served, child_processes, natron_serve

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SERVICE_MS = 20.0
QUEUE_TIMEOUT_US = 250_000
CLIENT_TIMEOUT_S = 90.0

_MODEL = """
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            time.sleep(%(service_s)r)
            tag = pb_utils.get_input_tensor_by_name(request, "TAG").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUT", tag)]))
        return responses
"""

MODELS = {
    "unbounded": "",
    "bounded": (
        f"default_queue_policy {{ max_queue_size: 8 default_timeout_microseconds: {QUEUE_TIMEOUT_US} }}"
    ),
    "queue_only": "default_queue_policy { max_queue_size: 1 }",
}


def write_models(repo: Path) -> None:
    build(repo, ["tiny"], quiet=True)
    for name, batching in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(_MODEL % {"service_s": SERVICE_MS / 1000})
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [ { name: "TAG" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
            'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
            f"dynamic_batching {{ {batching} }}\n"
        )


# -- memory --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def processes(served: Served) -> dict[str, int]:
    """natron's processes by a readable name: serve, its children and their children."""
    found = {"serve": served.pid}
    for pid, cmd in child_processes(served.pid):
        words = cmd.split()
        role = next((w for w in words if w in ("gateway", "worker", "router", "ensemble")), "")
        name = role or ("nats-server" if "nats-server" in cmd else words[0].rsplit("/", 1)[-1])
        found[f"{name}[{pid}]"] = pid
        for grandchild, _ in child_processes(pid):
            found[f"{name}-stub[{grandchild}]"] = grandchild
    return found


class RssSampler:
    """The peak RSS of every natron process while it runs (sampled every 0.25 s)."""

    def __init__(self, served: Served) -> None:
        self._served = served
        self.peak_mb: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in processes(self._served).items():
                self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), rss_mb(pid))
            self._stop.wait(0.25)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- open-loop load ------------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    model: str
    name: str
    rate_per_s: float
    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    ok_p50_ms: float | None = None
    ok_p99_ms: float | None = None
    refused_p99_ms: float | None = None
    refused_max_ms: float | None = None
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def open_loop(url: str, model: str, rate_per_s: float, duration_s: float) -> list[tuple[int, float]]:
    """(status, seconds) of each request, sent every 1/rate seconds whatever the answers do."""
    body = json.dumps({"inputs": [{"name": "TAG", "shape": [1], "datatype": "INT32", "data": [1]}]})
    results: list[tuple[int, float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            started = time.monotonic()
            try:
                async with session.post(f"{url}/v2/models/{model}/infer", data=body) as answer:
                    await answer.read()
                    results.append((answer.status, time.monotonic() - started))
            except (aiohttp.ClientError, TimeoutError):
                results.append((0, time.monotonic() - started))

        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(int(rate_per_s * duration_s)):
            delay = start + i / rate_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return results


def run_phase(served: Served, model: str, name: str, rate_per_s: float, duration_s: float) -> Phase:
    with RssSampler(served) as sampler:
        results = asyncio.run(open_loop(served.url, model, rate_per_s, duration_s))
    phase = Phase(model, name, rate_per_s, sent=len(results), peak_rss_mb=dict(sampler.peak_mb))
    for status, _ in results:
        phase.statuses[str(status)] = phase.statuses.get(str(status), 0) + 1
    ok = [s * 1000 for status, s in results if status == 200]
    refused = [s * 1000 for status, s in results if status == 503]
    phase.ok_p50_ms, phase.ok_p99_ms = percentile(ok, 50), percentile(ok, 99)
    phase.refused_p99_ms = percentile(refused, 99)
    phase.refused_max_ms = max(refused) if refused else None
    return phase


# -- clients that reset ----------------------------------------------------------------------


def successes(served: Served, model: str) -> int:
    stats = requests.get(f"{served.url}/v2/models/{model}/stats", timeout=10).json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def reset_bursts(served: Served, bursts: int, per_burst: int) -> dict[str, Any]:
    """Bursts of `tiny` requests whose connections are reset right after the request is
    written; how many ran anyway."""
    host, port = served.host_port.split(":")
    body = json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))}]}
    ).encode()
    head = (
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = successes(served, "tiny")
    for _ in range(bursts):
        sockets = [socket.create_connection((host, int(port))) for _ in range(per_burst)]
        for sock in sockets:
            # SO_LINGER 0: close() sends RST right behind the request, as a client that gave
            # up or crashed: the gateway reads the request and the reset together.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(head + body)
            sock.close()
    time.sleep(3.0)  # whatever was going to run has run
    executed = successes(served, "tiny") - before
    sent = bursts * per_burst
    return {"sent": sent, "executed": executed, "executed_fraction": executed / sent}


# -- report ----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(phases: list[Phase]) -> Table:
    out = Table(title=f"open-loop load, {SERVICE_MS:.0f} ms per request, one instance")
    for column in (
        "model",
        "phase",
        "req/s",
        "sent",
        "200",
        "503",
        "504",
        "other",
        "200 p50 ms",
        "200 p99 ms",
    ):
        out.add_column(column, justify="right")
    out.add_column("503 p99 ms", justify="right")
    out.add_column("peak RSS MB (gateway / worker / stub)", justify="right")
    for p in phases:
        other = p.sent - sum(p.statuses.get(s, 0) for s in ("200", "503", "504"))

        def peak(role: str, phase: Phase = p) -> str:
            values = [mb for name, mb in phase.peak_rss_mb.items() if name.startswith(role)]
            return f"{max(values):.0f}" if values else "-"

        out.add_row(
            p.model,
            p.name,
            f"{p.rate_per_s:.0f}",
            str(p.sent),
            str(p.statuses.get("200", 0)),
            str(p.statuses.get("503", 0)),
            str(p.statuses.get("504", 0)),
            str(other),
            _ms(p.ok_p50_ms),
            _ms(p.ok_p99_ms),
            _ms(p.refused_p99_ms),
            f"{peak('gateway')} / {peak('worker[')} / {peak('worker-stub')}",
        )
    return out


@contextmanager
def serving(quick: bool) -> Iterator[Served]:
    with tempfile.TemporaryDirectory(prefix="natron-overload-") as tmp:
        repo = Path(tmp) / "models"
        write_models(repo)
        logs = Path(tmp) / "logs"
        logs.mkdir()
        with natron_serve(repo, ["tiny", *MODELS], logs, timeout_s=180) as served:
            yield served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    parser.add_argument("--only", default=",".join(MODELS), help="models to load (comma-separated)")
    parser.add_argument("--reset-bursts", type=int, default=5, help="bursts of resetting clients")
    parser.add_argument("--reset-per-burst", type=int, default=200, help="clients per burst")
    args = parser.parse_args(argv)
    console = Console(width=200)
    sustainable = 1000 / SERVICE_MS
    calm_s, storm_s = (3.0, 4.0) if args.quick else (5.0, 10.0)
    phases: list[Phase] = []
    with serving(args.quick) as served:
        for model in [m for m in args.only.split(",") if m]:
            for name, factor, seconds in (
                ("before", 0.5, calm_s),
                ("4x", 4.0, storm_s),
                ("after", 0.5, calm_s),
            ):
                phase = run_phase(served, model, name, sustainable * factor, seconds)
                phases.append(phase)
                console.print(f"{model} {name}: {phase.statuses}")
        reset = reset_bursts(served, args.reset_bursts, args.reset_per_burst) if args.reset_bursts else None
    console.print(table(phases))
    if reset is not None:
        console.print(
            f"clients that reset: {reset['executed']} of {reset['sent']} requests still executed "
            f"({reset['executed_fraction']:.1%})"
        )
    results = {
        "when": datetime.now(UTC).isoformat(),
        "service_ms": SERVICE_MS,
        "queue_timeout_us": QUEUE_TIMEOUT_US,
        "models": MODELS,
        "phases": [asdict(p) for p in phases],
        "reset": reset,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    paths = [RESULTS_DIR / f"overload-{stamp}.json", *([args.json] if args.json else [])]
    for path in paths:
        path.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
