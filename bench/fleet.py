"""natron's fleet benchmark: what several worker processes give, one question at a time.

1. Scale-out: `mlp` at wrk concurrency 128 under `natron serve --workers 1`, then 2, then 4
   (a fresh `natron serve` each): samples/s, p50/p99, the ratio to one worker and each worker's
   share of the rows served.
2. Capacity balance: a mesh of separate processes (nats-server, router, gateway and workers
   `fast` and `slow` (--throttle-ms 20)) on `tiny` at concurrency 64, three fresh meshes: fast
   alone, slow alone, both. Both together should give at least 0.9 of the two alone summed, each
   worker serving in proportion to its capacity (shares from the workers KV bucket's stats).
3. kill -9: two workers (--throttle-ms 5 so requests are in flight, --ack-wait-s 1), a Python
   load of N distinct `tiny` requests at concurrency 64, each checked in its answer, and SIGKILL of
   one worker once a third of them are sent: sent, right, wrong, errors by status, lost.

It prints rich tables and writes bench/results/<timestamp>-fleet.json (and `--json PATH`);
service logs go to bench/results/<timestamp>-fleet-logs/. See bench/README.md.

    .venv/bin/python -m bench.fleet --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final

import aiohttp
import nats
import orjson
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from rich.table import Table

from bench.bench import (
    MODEL_INPUT_SIZES,
    RESULTS_DIR,
    SERVER_READY_TIMEOUT_S,
    BenchError,
    ServerProcess,
    _errors_note,
    _target,
    _targets_table,
    bench_repo,
    check_wrk,
    console,
    default_wrk_threads,
    ensure_models,
    git_revision,
    host_info,
    http_status,
    infer_body,
    natron_command,
    ready_urls,
    run_wrk,
    write_json,
)
from broker.auth import seed_path
from broker.server import ServerOptions, config_text, find_nats_server, free_ports
from broker.subjects import Subjects
from natron.records import READY, ModelRecord, WorkerReport

SCALE_MODEL: Final = "mlp"
SCALE_CONCURRENCY: Final = 128
SCALE_WORKERS: Final = (1, 2, 4)

BALANCE_MODEL: Final = "tiny"
BALANCE_CONCURRENCY: Final = 64
SLOW_THROTTLE_MS: Final = 20
# worker id -> extra `natron worker` arguments
BALANCE_WORKERS: Final[dict[str, list[str]]] = {"fast": [], "slow": ["--throttle-ms", str(SLOW_THROTTLE_MS)]}
BALANCE_PHASES: Final = (("fast alone", ("fast",)), ("slow alone", ("slow",)), ("both", ("fast", "slow")))
TARGET_BALANCE_FRACTION: Final = 0.9

KILL_MODEL: Final = "tiny"
KILL_CONCURRENCY: Final = 64
KILL_THROTTLE_MS: Final = 5
KILL_ACK_WAIT_S: Final = 1
KILL_REQUESTS: Final = 3000
KILL_REQUESTS_QUICK: Final = 1000
KILL_VICTIM: Final = "a"
KILL_WORKERS: Final[dict[str, list[str]]] = {
    worker: ["--throttle-ms", str(KILL_THROTTLE_MS), "--ack-wait-s", str(KILL_ACK_WAIT_S)]
    for worker in (KILL_VICTIM, "b")
}

# The version every benchmark model serves (examples/build_models.py writes version 1).
VERSION: Final = "1"
NATS_READY_TIMEOUT_S: Final = 15.0
# Workers publish their report (with cumulative stats) every 2 s.
HEARTBEAT_TIMEOUT_S: Final = 15.0


# --- processes ---


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C (and SIGTERM) ignored while the processes we started are being stopped, so a
    second one cannot leave some of them running."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Fleet:
    """Every process one phase starts, each in its own session; leaving the `with` stops them in
    reverse order of start (gateway, workers, router, NATS): SIGTERM, then SIGKILL after
    bench.py's grace period, whatever ended the phase."""

    def __init__(self, phase: str, logs: Path) -> None:
        self.phase = phase
        self.logs = logs
        self.servers: dict[str, ServerProcess] = {}

    def start(self, name: str, command: list[str]) -> ServerProcess:
        log_path = self.logs / f"{self.phase}-{name}.log"
        server = ServerProcess(f"{self.phase}/{name}", command, log_path, stop_signal=signal.SIGTERM)
        self.servers[name] = server  # first: a start that fails half-way is still cleaned up
        server.start()
        return server

    def check_alive(self) -> None:
        for server in self.servers.values():
            process = server.process
            if process is not None and process.poll() is not None:
                raise BenchError(
                    f"{server.name} exited with code {process.returncode}; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )

    def stop(self) -> None:
        with _signals_held():
            for server in reversed(list(self.servers.values())):
                try:
                    server.stop()
                except Exception as exc:  # keep stopping the others
                    console.print(f"[red]could not stop {server.name}: {exc!r}")

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_tcp(port: int, fleet: Fleet, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        fleet.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on port {port} after {timeout_s:.0f} s") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class Mesh:
    nats_url: str
    base_url: str
    workers: list[str]
    # nats.connect's credentials for reading the broker's state (an operator's: admin).
    nats_options: dict[str, str] = field(default_factory=dict)


def admin_options(creds_dir: Path | None) -> dict[str, str]:
    """nats.connect's arguments for the admin role of a `natron serve` keeping its credentials in
    `creds_dir` (None: a broker without authorization, as `start_mesh` runs)."""
    return {} if creds_dir is None else {"nkeys_seed": str(seed_path(creds_dir, "admin"))}


def start_mesh(
    fleet: Fleet,
    repo: Path,
    model: str,
    workers: dict[str, list[str]],
    store: Path,
    gateway_timeout_s: float = 60.0,
) -> Mesh:
    """nats-server, router, the workers and a gateway, each its own process; returns once the
    gateway is ready and every worker runs `model`."""
    nats_port, http_port = free_ports(2)
    nats_url = f"nats://127.0.0.1:{nats_port}"
    base_url = f"http://127.0.0.1:{http_port}"
    # natron services stop on their own when this script dies without stopping them.
    common = ["--nats-url", nats_url, "--parent-pid", str(os.getpid())]
    # Configured as `natron serve` configures its embedded server (max_payload, JetStream limits).
    conf = store.with_suffix(".conf")
    conf.write_text(config_text(ServerOptions(port=nats_port), store))
    fleet.start("nats", [find_nats_server(), "-c", str(conf)])
    wait_tcp(nats_port, fleet, NATS_READY_TIMEOUT_S)
    fleet.start("router", [*natron_command(), "router", str(repo), *common])
    for worker, extra in workers.items():
        fleet.start(worker, [*natron_command(), "worker", "--worker-id", worker, *extra, *common])
    gateway = fleet.start(
        "gateway",
        [*natron_command(), "gateway", "--http-port", str(http_port), "--http-address", "127.0.0.1",
         "--default-timeout-s", str(gateway_timeout_s), *common],
    )  # fmt: skip
    gateway.wait_ready(ready_urls(base_url, [model]), SERVER_READY_TIMEOUT_S)
    placed = asyncio.run(
        wait_placed(nats_url, model, len(workers), SERVER_READY_TIMEOUT_S, fleet.check_alive)
    )
    if sorted(placed) != sorted(workers):
        raise BenchError(f"{model} placed on {placed}, expected {sorted(workers)}")
    return Mesh(nats_url, base_url, placed)


# --- the KV buckets ---


async def _entries(js: JetStreamContext, bucket: str) -> dict[str, tuple[int, bytes]]:
    """key -> (revision, value) of every live key; empty while the bucket does not exist yet."""
    try:
        kv = await js.key_value(bucket)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError):
        return {}
    entries: dict[str, tuple[int, bytes]] = {}
    for key in keys:
        with contextlib.suppress(KeyNotFoundError):  # deleted since keys() (a worker leaving)
            entry = await kv.get(key)
            if entry.value:
                entries[key] = (entry.revision or 0, entry.value)
    return entries


def _runs(report: WorkerReport, model: str, generation: str) -> bool:
    states = report.models.get(model, {}).get(generation, {})
    return any(state.state == READY for state in states.values())


async def wait_placed(
    nats_url: str,
    model: str,
    count: int,
    timeout_s: float,
    check: Callable[[], None],
    nats_options: dict[str, str] | None = None,
) -> list[str]:
    """The workers `model` is placed on, once there are `count` and each reports it READY."""
    subjects = Subjects()
    nc = await nats.connect(nats_url, **(nats_options or {}))
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        seen = "no record yet"
        while True:
            check()
            records = await _entries(js, subjects.models_bucket)
            if model in records:
                record = ModelRecord.from_json(records[model][1])
                reports = await _entries(js, subjects.workers_bucket)
                placed = sorted(record.placement)
                ready = [
                    w
                    for w in placed
                    if w in reports and _runs(WorkerReport.from_json(reports[w][1]), model, record.generation)
                ]
                if len(placed) == count and ready == placed:
                    return placed
                seen = f"placement {record.placement}, READY on {ready}"
            if time.monotonic() > deadline:
                raise BenchError(f"{model} not running on {count} worker(s) after {timeout_s:.0f} s: {seen}")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def served_after_heartbeat(
    nats_url: str, model: str, workers: Sequence[str], nats_options: dict[str, str] | None = None
) -> dict[str, int]:
    """Each worker's cumulative inference count for `model`, from the first report every worker
    publishes after this call (so it counts everything answered before the call)."""
    subjects = Subjects()
    model_version = f"{model}/{VERSION}"
    nc = await nats.connect(nats_url, **(nats_options or {}))
    try:
        js = nc.jetstream()
        before = await _entries(js, subjects.workers_bucket)
        revisions = {w: before[w][0] if w in before else 0 for w in workers}
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S
        while True:
            now = await _entries(js, subjects.workers_bucket)
            stale = [w for w in workers if w not in now or now[w][0] <= revisions[w]]
            if not stale:
                return {
                    w: int(
                        WorkerReport.from_json(now[w][1]).stats.get(model_version, {}).get("inferences", 0)
                    )
                    for w in workers
                }
            if time.monotonic() > deadline:
                raise BenchError(f"no heartbeat from {stale} within {HEARTBEAT_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


# --- one wrk point with per-worker shares ---


@dataclass(frozen=True)
class FleetSettings:
    duration_s: int
    warmup_s: int
    wrk_threads: int
    kill_requests: int
    kill_deadline_s: float


def measure_point(
    label: str, mesh: Mesh, model: str, body_path: Path, concurrency: int, settings: FleetSettings
) -> dict[str, Any]:
    """bench.run_wrk's point, plus how many rows each worker ran meanwhile (KV stats differences)."""
    status, answer = http_status(
        f"{mesh.base_url}/v2/models/{model}/infer", body=body_path.read_bytes(), timeout_s=30.0
    )
    if status != 200 or b'"outputs"' not in answer:
        raise BenchError(f"{label}: a single {model} request answered {status}: {answer[:300]!r}")
    if settings.warmup_s > 0:
        run_wrk(mesh.base_url, model, body_path, concurrency, settings.warmup_s, settings.wrk_threads)
    before = asyncio.run(served_after_heartbeat(mesh.nats_url, model, mesh.workers, mesh.nats_options))
    console.print(f"[dim]{label}: {model} at concurrency {concurrency} for {settings.duration_s} s")
    point = run_wrk(mesh.base_url, model, body_path, concurrency, settings.duration_s, settings.wrk_threads)
    after = asyncio.run(served_after_heartbeat(mesh.nats_url, model, mesh.workers, mesh.nats_options))
    served = {w: after[w] - before[w] for w in mesh.workers}
    total = sum(served.values())
    point["server"] = label
    point["served_by_worker"] = served
    point["share_by_worker"] = {w: (n / total if total else 0.0) for w, n in served.items()}
    return point


# --- 1. scale-out ---


def scale_point(workers: int, repo: Path, body: Path, settings: FleetSettings, logs: Path) -> dict[str, Any]:
    http_port, metrics_port, nats_port = free_ports(3)
    base_url = f"http://127.0.0.1:{http_port}"
    nats_url = f"nats://127.0.0.1:{nats_port}"
    command = [
        *natron_command(), "serve", str(repo), "--workers", str(workers),
        "--http-port", str(http_port), "--http-address", "127.0.0.1",
        "--metrics-port", str(metrics_port), "--nats-port", str(nats_port),
        "--nats-creds-dir", str(logs / f"creds-{workers}w"),
    ]  # fmt: skip
    options = admin_options(logs / f"creds-{workers}w")
    with Fleet(f"scale-{workers}w", logs) as fleet:
        console.print(f"[dim]starting {' '.join(command)}")
        server = fleet.start("natron", command)
        ready_s = server.wait_ready(ready_urls(base_url, [SCALE_MODEL]), SERVER_READY_TIMEOUT_S)
        placed = asyncio.run(
            wait_placed(nats_url, SCALE_MODEL, workers, SERVER_READY_TIMEOUT_S, fleet.check_alive, options)
        )
        mesh = Mesh(nats_url, base_url, placed, options)
        point = measure_point(f"{workers} worker(s)", mesh, SCALE_MODEL, body, SCALE_CONCURRENCY, settings)
    point["workers"] = workers
    point["ready_s"] = ready_s
    return point


def scale_out(
    repo: Path, work: Path, bodies: dict[str, Path], settings: FleetSettings, logs: Path
) -> dict[str, Any]:
    served_repo = bench_repo(repo, [SCALE_MODEL], work / "scale-repo")
    points: list[dict[str, Any]] = []
    for workers in SCALE_WORKERS:
        try:
            points.append(scale_point(workers, served_repo, bodies[SCALE_MODEL], settings, logs))
        except BenchError as exc:
            console.print(f"[red]scale-out with {workers} worker(s) failed:[/red] {exc}")
            points.append({"workers": workers, "model": SCALE_MODEL, "error": str(exc)})
    one = next((p for p in points if p["workers"] == 1 and "error" not in p), None)
    for p in points:
        ok = "error" not in p and one is not None and one["samples_per_s"] > 0
        p["ratio_to_1_worker"] = p["samples_per_s"] / one["samples_per_s"] if ok and one else None
    return {"model": SCALE_MODEL, "concurrency": SCALE_CONCURRENCY, "points": points}


# --- 2. capacity balance ---


def balance(
    repo: Path, work: Path, bodies: dict[str, Path], settings: FleetSettings, logs: Path
) -> dict[str, Any]:
    served_repo = bench_repo(repo, [BALANCE_MODEL], work / "balance-repo")
    points: dict[str, dict[str, Any]] = {}
    for label, workers in BALANCE_PHASES:
        phase = f"balance-{label.replace(' ', '-')}"
        try:
            with Fleet(phase, logs) as fleet:
                mesh = start_mesh(
                    fleet,
                    served_repo,
                    BALANCE_MODEL,
                    {w: BALANCE_WORKERS[w] for w in workers},
                    work / f"{phase}-js",
                )
                points[label] = measure_point(
                    label, mesh, BALANCE_MODEL, bodies[BALANCE_MODEL], BALANCE_CONCURRENCY, settings
                )
        except BenchError as exc:
            console.print(f"[red]balance, {label}, failed:[/red] {exc}")
            points[label] = {"server": label, "model": BALANCE_MODEL, "error": str(exc)}
    ok = {label: p for label, p in points.items() if "error" not in p}
    fast, slow, both = ok.get("fast alone"), ok.get("slow alone"), ok.get("both")
    alone_sum = fast["samples_per_s"] + slow["samples_per_s"] if fast and slow else None
    ratio = both["samples_per_s"] / alone_sum if both and alone_sum else None
    expected = (
        {"fast": fast["samples_per_s"] / alone_sum, "slow": slow["samples_per_s"] / alone_sum}
        if fast and slow and alone_sum
        else None
    )
    target = _target(
        f"{BALANCE_MODEL} c={BALANCE_CONCURRENCY}: both / (fast alone + slow alone)",
        ratio,
        TARGET_BALANCE_FRACTION,
        True,
        _errors_note(*ok.values()),
    )
    return {
        "model": BALANCE_MODEL,
        "concurrency": BALANCE_CONCURRENCY,
        "slow_throttle_ms": SLOW_THROTTLE_MS,
        "points": points,
        "alone_sum_samples_per_s": alone_sum,
        "together_over_sum": ratio,
        "expected_share": expected,  # each worker's alone throughput over the sum of both
        "target": target,
    }


# --- 3. kill -9 ---


async def kill_load(
    url: str, count: int, concurrency: int, deadline_s: float, kill_at: int, kill: Callable[[], None]
) -> dict[str, Any]:
    """`count` distinct tiny requests (request i carries i, its answer must be 2i+1); `kill()`
    runs when request number `kill_at` leaves."""
    tally: dict[str, Any] = {"sent": 0, "correct": 0, "wrong": 0, "lost": 0, "errors": {}}
    errors: dict[str, int] = tally["errors"]
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = orjson.dumps(
            {
                "id": str(i),
                "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [i] * 16}],
            }
        )
        async with semaphore:
            tally["sent"] += 1
            if tally["sent"] == kill_at:
                kill()
                tally["killed_at_s"] = time.monotonic() - start
            sent_at = time.monotonic()
            try:
                async with session.post(
                    f"{url}/v2/models/{KILL_MODEL}/infer",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    raw = await response.read()
                    status = response.status
            except TimeoutError:  # nothing came back within the deadline
                tally["lost"] += 1
                return
            except aiohttp.ClientError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            latencies.append(time.monotonic() - sent_at)
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                return
            try:
                answer = orjson.loads(raw)
                right = answer["id"] == str(i) and answer["outputs"][0]["data"] == [2.0 * i + 1] * 16
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                right = False
            tally["correct" if right else "wrong"] += 1

    timeout = aiohttp.ClientTimeout(total=deadline_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))
    tally["wall_s"] = time.monotonic() - start
    latencies.sort()
    if latencies:
        tally["p50_ms"] = latencies[len(latencies) // 2] * 1e3
        tally["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
        tally["max_ms"] = latencies[-1] * 1e3
    return tally


def kill_nine(repo: Path, work: Path, settings: FleetSettings, logs: Path) -> dict[str, Any]:
    served_repo = bench_repo(repo, [KILL_MODEL], work / "kill-repo")
    count = settings.kill_requests
    kill_at = max(1, count // 3)
    # The gateway waits longer than the client: a request nobody answers is lost, not a 504.
    gateway_timeout_s = settings.kill_deadline_s + 30
    with Fleet("kill", logs) as fleet:
        mesh = start_mesh(fleet, served_repo, KILL_MODEL, KILL_WORKERS, work / "kill-js", gateway_timeout_s)
        time.sleep(1.0)  # both instances pulling
        victim = fleet.servers[KILL_VICTIM].process
        assert victim is not None

        def kill() -> None:
            console.print(f"[dim]kill -9 worker {KILL_VICTIM!r} (pid {victim.pid})")
            victim.send_signal(signal.SIGKILL)

        console.print(
            f"[dim]kill -9: {count} {KILL_MODEL} requests at concurrency {KILL_CONCURRENCY}, "
            f"worker {KILL_VICTIM!r} killed at request {kill_at}"
        )
        tally = asyncio.run(
            kill_load(mesh.base_url, count, KILL_CONCURRENCY, settings.kill_deadline_s, kill_at, kill)
        )
        try:
            tally["victim_exit_code"] = victim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tally["victim_exit_code"] = None  # still alive: the kill did not land
    tally.update(
        requests=count,
        concurrency=KILL_CONCURRENCY,
        kill_at_request=kill_at,
        victim=KILL_VICTIM,
        throttle_ms=KILL_THROTTLE_MS,
        ack_wait_s=KILL_ACK_WAIT_S,
        deadline_s=settings.kill_deadline_s,
    )
    return tally


# --- output ---


def _pct(share: float) -> str:
    return f"{share * 100:.1f} %"


def _scale_table(scale: dict[str, Any], cpu_count: int | None) -> Table:
    table = Table(
        title=f"scale-out: {scale['model']} at concurrency {scale['concurrency']}, "
        f"`natron serve --workers N` (os.cpu_count() = {cpu_count})",
        caption=f"{cpu_count} cores for wrk, gateway, NATS and every worker: past {cpu_count} "
        "busy processes more workers only share the same cores, so the curve flattens",
    )
    for column in ("workers", "req/s", "samples/s", "x 1 worker", "p50 ms", "p99 ms", "rows per worker",
                   "non-200", "sock err"):  # fmt: skip
        table.add_column(column, justify="left" if column == "rows per worker" else "right")
    for p in scale["points"]:
        if "error" in p:
            table.add_row(
                str(p["workers"]), "", "", "", "", "", p["error"].splitlines()[0], "", "", style="red"
            )
            continue
        ratio = p["ratio_to_1_worker"]
        table.add_row(
            str(p["workers"]),
            f"{p['requests_per_s']:,.0f}",
            f"{p['samples_per_s']:,.0f}",
            "" if ratio is None else f"{ratio:.2f}",
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            " / ".join(f"{share * 100:.0f}" for share in p["share_by_worker"].values()) + " %",
            str(p["non200"]),
            str(p["socket_errors"]),
            style="red" if p["non200"] or p["socket_errors"] else None,
        )
    return table


def _balance_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"capacity balance: {result['model']} at concurrency {result['concurrency']}, separate "
        f"processes, worker `fast` and worker `slow` (--throttle-ms {result['slow_throttle_ms']})",
        caption="served: that worker's share of the rows run (workers KV stats); "
        "capacity: its alone samples/s over the sum of both alone",
    )
    for column in ("workers", "samples/s", "p50 ms", "p99 ms", "fast served", "slow served", "non-200",
                   "sock err"):  # fmt: skip
        table.add_column(column, justify="left" if column == "workers" else "right")
    expected = result["expected_share"] or {}
    for label, p in result["points"].items():
        if "error" in p:
            table.add_row(label, p["error"].splitlines()[0], "", "", "", "", "", "", style="red")
            continue
        shares = []
        for worker in BALANCE_WORKERS:
            share = p["share_by_worker"].get(worker)
            if share is None:
                shares.append("")
            elif len(p["share_by_worker"]) > 1 and worker in expected:
                shares.append(f"{_pct(share)} (capacity {_pct(expected[worker])})")
            else:
                shares.append(_pct(share))
        table.add_row(
            label,
            f"{p['samples_per_s']:,.0f}",
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            *shares,
            str(p["non200"]),
            str(p["socket_errors"]),
            style="red" if p["non200"] or p["socket_errors"] else None,
        )
    if result["alone_sum_samples_per_s"] is not None:
        table.add_row("fast + slow alone", f"{result['alone_sum_samples_per_s']:,.0f}", style="dim")
    return table


def _kill_table(kill: dict[str, Any]) -> Table:
    table = Table(
        title=f"kill -9: {kill['requests']} distinct {KILL_MODEL} requests at concurrency "
        f"{kill['concurrency']}, "
        f"2 workers (--throttle-ms {kill['throttle_ms']}, --ack-wait-s {kill['ack_wait_s']}), "
        f"worker `{kill['victim']}` SIGKILLed when request {kill['kill_at_request']} left",
        caption=f"lost: no answer within {kill['deadline_s']:.0f} s; latency over the answered requests",
    )
    for column in ("sent", "correct", "wrong", "errors", "lost", "wall s", "req/s", "p50 ms", "p99 ms",
                   "max ms", "killed at s"):  # fmt: skip
        table.add_column(column, justify="right")
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(kill["errors"].items())) or "0"
    perfect = kill["correct"] == kill["requests"]

    def ms(key: str) -> str:
        return f"{kill[key]:.1f}" if key in kill else ""

    table.add_row(
        str(kill["sent"]),
        str(kill["correct"]),
        str(kill["wrong"]),
        errors,
        str(kill["lost"]),
        f"{kill['wall_s']:.2f}",
        f"{kill['correct'] / kill['wall_s']:,.0f}" if kill["wall_s"] else "",
        ms("p50_ms"),
        ms("p99_ms"),
        ms("max_ms"),
        f"{kill['killed_at_s']:.2f}" if "killed_at_s" in kill else "not killed",
        style=None if perfect else "red",
    )
    return table


def report(results: dict[str, Any]) -> None:
    cpu_count = results["host"]["cpu_count"]
    console.print(f"os.cpu_count() = {cpu_count}")
    phases = (("scale", "scale-out"), ("balance", "capacity balance"), ("kill", "kill -9"))
    for key, name in phases:
        phase = results[key]
        if phase is None:
            continue
        if "error" in phase:
            console.print(f"[red]{name} failed:[/red] {phase['error']}")
        elif key == "scale":
            console.print(_scale_table(phase, cpu_count))
        elif key == "balance":
            console.print(_balance_table(phase))
        else:
            console.print(_kill_table(phase))
    if results["targets"]:
        console.print(_targets_table(results["targets"]))


# --- main ---


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="natron's fleet benchmark: scale-out over worker processes, capacity balance "
        "between a fast and a slow worker, and kill -9 of a worker under load.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s points, fewer kill -9 requests: a smoke run"
    )
    parser.add_argument(
        "--duration-s", type=int, default=None, help="seconds per wrk point (default 10, 3 with --quick)"
    )
    parser.add_argument(
        "--warmup-s",
        type=int,
        default=1,
        help="unrecorded wrk seconds before each point, 0 for none (default 1)",
    )
    parser.add_argument(
        "--kill-requests",
        type=int,
        default=None,
        help=f"requests of the kill -9 load (default {KILL_REQUESTS}, {KILL_REQUESTS_QUICK} with --quick)",
    )
    parser.add_argument(
        "--kill-deadline-s",
        type=float,
        default=30.0,
        help="a kill -9 request with no answer after this long is lost (default 30)",
    )
    parser.add_argument("--skip-scale", action="store_true", help="skip the scale-out series")
    parser.add_argument("--skip-balance", action="store_true", help="skip the capacity balance")
    parser.add_argument("--skip-kill", action="store_true", help="skip kill -9")
    parser.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    if args.duration_s is None:
        args.duration_s = 3 if args.quick else 10
    if args.kill_requests is None:
        args.kill_requests = KILL_REQUESTS_QUICK if args.quick else KILL_REQUESTS
    if args.duration_s < 1 or args.warmup_s < 0 or args.kill_requests < 3 or args.kill_deadline_s <= 0:
        parser.error("--duration-s >= 1, --warmup-s >= 0, --kill-requests >= 3 and --kill-deadline-s > 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.skip_scale and args.skip_balance):
        check_wrk()
    timestamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    settings = FleetSettings(
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        wrk_threads=default_wrk_threads(),
        kill_requests=args.kill_requests,
        kill_deadline_s=args.kill_deadline_s,
    )
    models = sorted({SCALE_MODEL, BALANCE_MODEL, KILL_MODEL})
    repo = ensure_models(None, models)
    logs = RESULTS_DIR / f"{timestamp}-fleet-logs"
    results: dict[str, Any] = {
        "timestamp": timestamp,
        "git_revision": git_revision(),
        "host": host_info(),
        "settings": {
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "wrk_threads": settings.wrk_threads,
            "kill_requests": settings.kill_requests,
            "kill_deadline_s": settings.kill_deadline_s,
            "repo": str(repo),
            "logs": str(logs),
        },
        "scale": None,
        "balance": None,
        "kill": None,
        "targets": [],
    }
    console.print(f"[dim]service logs in {logs}")
    with tempfile.TemporaryDirectory(prefix="natron-fleet-") as tmp:
        work = Path(tmp)
        bodies: dict[str, Path] = {}
        for model in models:
            bodies[model] = work / f"{model}.json"
            bodies[model].write_bytes(infer_body(MODEL_INPUT_SIZES[model]))
        phases: list[tuple[str, bool, Callable[[], dict[str, Any]]]] = [
            ("scale", args.skip_scale, lambda: scale_out(repo, work, bodies, settings, logs)),
            ("balance", args.skip_balance, lambda: balance(repo, work, bodies, settings, logs)),
            ("kill", args.skip_kill, lambda: kill_nine(repo, work, settings, logs)),
        ]
        for key, skip, measure in phases:
            if skip:
                continue
            try:
                results[key] = measure()
            except Exception as exc:  # one phase failing must not cost the others
                console.print(f"[red]{key} failed:[/red] {exc!r}")
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    if results["balance"] is not None and "target" in results["balance"]:
        results["targets"].append(results["balance"]["target"])
    return results


def _failed(results: dict[str, Any]) -> bool:
    for key in ("scale", "balance", "kill"):
        phase = results[key]
        if phase is None:
            continue
        if "error" in phase:
            return True
        points = phase.get("points", {})
        if any("error" in p for p in (points.values() if isinstance(points, dict) else points)):
            return True
    return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every phase stops what it started


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process started was stopped")
        return 130
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 1
    report(results)
    for path in write_json(results, args.json, suffix="-fleet"):
        console.print(f"results written to {path}")
    return 1 if _failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
