"""natron's pipeline benchmark: what the Python backend, ensembles and streams cost.

One `natron serve` (started here, on a temporary repository built by the example scripts)
serves every phase; the phases run one after another, each load alone on the machine:

1. Python backend vs ONNX Runtime: the same INT32 add/sub on [16] served by the Python model
   `py_simple` and the ONNX model `simple` (same config: max_batch_size 8, dynamic batching),
   loaded by wrk (bench.py's runner) at concurrency 1 and 32; the Python backend's overhead per
   request is p50(py_simple) - p50(simple) at concurrency 1.
2. Ensemble overhead per step: `ensemble_chain3` (tiny -> tiny -> tiny) in one HTTP call against
   an aiohttp client calling `tiny` three times itself, at concurrency 1 and 16.
3. Streaming: the decoupled `repeat` model sending 64 answers per request with no delay, driven
   over the WebSocket (`/v2/ws`) and straight over NATS (`Requester.stream`), with 1 and 100
   streams at once: tokens/s, time to first token, stream completion time.

It prints rich tables and writes bench/results/<timestamp>-pipelines.json (and `--json PATH`);
natron's log goes beside it. See bench/README.md.

    .venv/bin/python -m bench.pipelines --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import nats
import numpy as np
import orjson
from rich.table import Table

from bench.bench import (
    REPO_ROOT,
    RESULTS_DIR,
    SERVER_READY_TIMEOUT_S,
    BenchError,
    ServerProcess,
    check_wrk,
    console,
    default_wrk_threads,
    git_revision,
    host_info,
    http_status,
    natron_command,
    ready_urls,
    run_wrk,
    write_json,
)
from bench.fleet import _interrupt, _signals_held
from broker.auth import seed_path
from broker.requester import Requester
from broker.server import free_ports
from broker.subjects import Subjects
from natron.errors import NatronError
from natron.inference import InferRequest, Tensor

T = TypeVar("T")

# 1. Python backend vs ONNX Runtime: model -> backend, both INT32 add/sub on [16].
BACKEND_MODELS: Final = {"simple": "onnxruntime", "py_simple": "python"}
BACKEND_CONCURRENCY: Final = (1, 32)
ADD_SUB_A: Final = list(range(16))
ADD_SUB_B: Final = list(range(100, 116))

# 2. Ensemble overhead: ensemble_chain3 is tiny three times, Y = ((2x+1)*2+1)*2+1 = 8x+7.
CHAIN_MODEL: Final = "ensemble_chain3"
STEP_MODEL: Final = "tiny"
CHAIN_STEPS: Final = 3
CHAIN_CONCURRENCY: Final = (1, 16)
CHAIN_X: Final = [i / 8 for i in range(-8, 8)]  # exact in FP32, and so is 8x+7
CHAIN_WAYS: Final = ("ensemble", "client")

# 3. Streaming: repeat answers once per element of IN (OUT = the element); IN = 0..N-1.
STREAM_MODEL: Final = "repeat"
STREAM_TOKENS: Final = 64
STREAM_CONCURRENCY: Final = (1, 100)
STREAM_TRANSPORTS: Final = ("websocket", "nats")

ONNX_MODELS: Final = ("simple", STEP_MODEL, CHAIN_MODEL)  # examples/build_models.py
PYTHON_MODELS: Final = ("py_simple", STREAM_MODEL)  # examples/build_backend_models.py
PHASE_MODELS: Final = {
    "backends": tuple(BACKEND_MODELS),
    "ensemble": (STEP_MODEL, CHAIN_MODEL),
    "streams": (STREAM_MODEL,),
}
PHASE_NAMES: Final = {
    "backends": "Python backend vs ONNX Runtime",
    "ensemble": "ensemble overhead",
    "streams": "streaming",
}

# A request (or a stream) with no answer (or no next answer) after this long is lost.
REQUEST_TIMEOUT_S: Final = 30.0
JSON_HEADERS: Final = {"Content-Type": "application/json"}


# --- small helpers ---


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client load on uvloop where there is one: less client CPU on a small machine."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def percentile_ms(values_s: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile `q` (0..100) of latencies in seconds, in ms; None when empty."""
    if not values_s:
        return None
    ordered = sorted(values_s)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1] * 1e3


def _ms(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _count(errors: dict[str, int], key: str) -> None:
    errors[key] = errors.get(key, 0) + 1


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def build_repo(into: Path, models: Sequence[str]) -> Path:
    """The benchmark's repository: just `models`, built by the example scripts."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    # Imported here: it pulls in onnx, which nothing else needs.
    from examples import build_backend_models, build_models

    onnx_models = [m for m in ONNX_MODELS if m in models]
    if CHAIN_MODEL in onnx_models and STEP_MODEL not in onnx_models:
        onnx_models.insert(0, STEP_MODEL)
    build_models.build(into, onnx_models, quiet=True)
    build_backend_models.build(into, [m for m in PYTHON_MODELS if m in models], quiet=True)
    return into


@dataclass(frozen=True)
class Served:
    base_url: str
    nats_url: str
    # nats.connect's arguments to connect as a client of this deployment.
    nats_options: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def serving(repo: Path, models: Sequence[str], log_path: Path) -> Iterator[tuple[Served, float]]:
    """`natron serve` of `repo`, ready for `models`; stopped (SIGINT, SIGKILL after bench.py's
    grace period) however the `with` ends, with Ctrl-C held off meanwhile."""
    http_port, metrics_port, nats_port = free_ports(3)
    creds_dir = log_path.parent / f"{log_path.stem}-creds"
    served = Served(
        f"http://127.0.0.1:{http_port}",
        f"nats://127.0.0.1:{nats_port}",
        {"nkeys_seed": str(seed_path(creds_dir, "client"))},
    )
    command = [
        *natron_command(), "serve", str(repo),
        "--http-port", str(http_port), "--http-address", "127.0.0.1",
        "--metrics-port", str(metrics_port), "--nats-port", str(nats_port),
        "--nats-creds-dir", str(creds_dir),
    ]  # fmt: skip
    console.print(f"[dim]starting {' '.join(command)} (log {log_path})")
    server = ServerProcess("natron", command, log_path)
    try:
        server.start()
        yield served, server.wait_ready(ready_urls(served.base_url, models), SERVER_READY_TIMEOUT_S)
    finally:
        with _signals_held():
            server.stop()


@dataclass(frozen=True)
class Settings:
    duration_s: int
    warmup_s: int
    wrk_threads: int


# --- 1. Python backend vs ONNX Runtime ---


def add_sub_body() -> bytes:
    inputs = [
        {"name": name, "shape": [1, 16], "datatype": "INT32", "data": data}
        for name, data in (("INPUT0", ADD_SUB_A), ("INPUT1", ADD_SUB_B))
    ]
    return orjson.dumps({"inputs": inputs})


def check_add_sub(base_url: str, model: str, body: bytes) -> None:
    """One request, answered right (OUTPUT0 = a + b, OUTPUT1 = a - b), or BenchError."""
    status, raw = http_status(f"{base_url}/v2/models/{model}/infer", body=body, timeout_s=REQUEST_TIMEOUT_S)
    try:
        outputs = {o["name"]: o["data"] for o in orjson.loads(raw)["outputs"]} if status == 200 else {}
    except (orjson.JSONDecodeError, KeyError, TypeError):
        outputs = {}
    expected = {
        "OUTPUT0": [a + b for a, b in zip(ADD_SUB_A, ADD_SUB_B, strict=True)],
        "OUTPUT1": [a - b for a, b in zip(ADD_SUB_A, ADD_SUB_B, strict=True)],
    }
    if outputs != expected:
        raise BenchError(f"a single {model} request answered {status}: {raw[:300]!r}")


def measure_backends(served: Served, work: Path, settings: Settings) -> dict[str, Any]:
    body_path = work / "add_sub.json"
    body_path.write_bytes(add_sub_body())
    for model in BACKEND_MODELS:
        check_add_sub(served.base_url, model, body_path.read_bytes())
        if settings.warmup_s > 0:  # unrecorded: stubs, arenas and batch queues settle
            run_wrk(
                served.base_url,
                model,
                body_path,
                max(BACKEND_CONCURRENCY),
                settings.warmup_s,
                settings.wrk_threads,
            )
    points: list[dict[str, Any]] = []
    for concurrency in BACKEND_CONCURRENCY:
        for model, backend in BACKEND_MODELS.items():  # both models at one level, back to back
            console.print(f"[dim]backends: {model} at concurrency {concurrency} for {settings.duration_s} s")
            point = run_wrk(
                served.base_url, model, body_path, concurrency, settings.duration_s, settings.wrk_threads
            )
            point.update(server="natron", backend=backend)
            points.append(point)

    def p50(model: str, concurrency: int) -> float:
        return float(
            next(p for p in points if p["model"] == model and p["concurrency"] == concurrency)["p50_ms"]
        )

    by_concurrency = {
        str(c): {
            "python_minus_onnx_p50_ms": p50("py_simple", c) - p50("simple", c),
            "python_over_onnx_req_per_s": _ratio(points, c),
        }
        for c in BACKEND_CONCURRENCY
    }
    c1 = str(min(BACKEND_CONCURRENCY))
    return {
        "models": dict(BACKEND_MODELS),
        "points": points,
        "by_concurrency": by_concurrency,
        # The headline: what the Python backend adds to one request on an idle server.
        "python_overhead_ms": by_concurrency[c1]["python_minus_onnx_p50_ms"],
        "python_overhead_at_concurrency": min(BACKEND_CONCURRENCY),
    }


def _ratio(points: Sequence[dict[str, Any]], concurrency: int) -> float | None:
    rates = {p["model"]: p["requests_per_s"] for p in points if p["concurrency"] == concurrency}
    return rates["py_simple"] / rates["simple"] if rates.get("simple") else None


# --- 2. ensemble overhead ---


@dataclass
class ChainTally:
    pipelines_s: list[float] = field(default_factory=list)  # whole pipelines answered right
    calls_s: list[float] = field(default_factory=list)  # every HTTP call answered (any status)
    wrong: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None

    def error(self, key: str, message: str) -> None:
        _count(self.errors, key)
        self.first_error = self.first_error or message


def _expected_chain() -> np.ndarray[Any, np.dtype[np.float32]]:
    x = np.asarray(CHAIN_X, dtype=np.float32)
    for _ in range(CHAIN_STEPS):
        x = x * np.float32(2) + np.float32(1)
    return x


async def chain_load(base_url: str, way: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Closed loop for `duration_s`: `concurrency` clients, each running one pipeline after the
    other, as one `ensemble_chain3` call (way "ensemble") or three `tiny` calls, each fed the
    last one's output (way "client"). Every answer is checked: Y = 8x+7."""
    tally = ChainTally()
    expected = _expected_chain()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def call(model: str, name: str, data: list[float]) -> list[float] | None:
            body = orjson.dumps(
                {"inputs": [{"name": name, "shape": [1, len(data)], "datatype": "FP32", "data": data}]}
            )
            sent = time.perf_counter()
            try:
                async with session.post(
                    f"{base_url}/v2/models/{model}/infer", data=body, headers=JSON_HEADERS
                ) as response:
                    raw = await response.read()
                    status = response.status
            except TimeoutError:
                tally.error("lost", f"{model}: no answer within {REQUEST_TIMEOUT_S:.0f} s")
                return None
            except aiohttp.ClientError as exc:
                tally.error(type(exc).__name__, f"{model}: {exc!r}")
                return None
            tally.calls_s.append(time.perf_counter() - sent)
            if status != 200:
                tally.error(str(status), f"{model} answered {status}: {raw[:300]!r}")
                return None
            try:
                data_out: list[float] = orjson.loads(raw)["outputs"][0]["data"]
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                tally.wrong += 1
                return None
            return data_out

        async def pipeline() -> None:
            started = time.perf_counter()
            out: list[float] | None = CHAIN_X
            if way == "ensemble":
                out = await call(CHAIN_MODEL, "X", CHAIN_X)
            else:
                for _ in range(CHAIN_STEPS):
                    assert out is not None
                    out = await call(STEP_MODEL, "INPUT0", out)
                    if out is None:
                        return
            if out is None:
                return
            if len(out) != len(expected) or not np.allclose(np.asarray(out, dtype=np.float32), expected):
                tally.wrong += 1
                return
            tally.pipelines_s.append(time.perf_counter() - started)

        async def client() -> None:
            while time.monotonic() < deadline:
                await pipeline()

        start = time.monotonic()
        deadline = start + duration_s
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall_s = time.monotonic() - start
    return {
        "way": way,
        "concurrency": concurrency,
        "wall_s": wall_s,
        "pipelines": len(tally.pipelines_s),
        "pipelines_per_s": len(tally.pipelines_s) / wall_s,
        "calls_per_pipeline": 1 if way == "ensemble" else CHAIN_STEPS,
        "http_calls_per_s": len(tally.calls_s) / wall_s,
        "p50_ms": percentile_ms(tally.pipelines_s, 50),
        "p90_ms": percentile_ms(tally.pipelines_s, 90),
        "p99_ms": percentile_ms(tally.pipelines_s, 99),
        "call_p50_ms": percentile_ms(tally.calls_s, 50),
        "call_p99_ms": percentile_ms(tally.calls_s, 99),
        "wrong": tally.wrong,
        "errors": tally.errors,
        "first_error": tally.first_error,
    }


def measure_ensemble(served: Served, settings: Settings) -> dict[str, Any]:
    for way in CHAIN_WAYS:  # a check that both ways answer right, and the warm-up
        check = run_async(
            chain_load(served.base_url, way, max(CHAIN_CONCURRENCY), max(settings.warmup_s, 0.2))
        )
        if not check["pipelines"]:
            raise BenchError(f"{way} pipelines failed: {check['first_error'] or 'wrong answers'}")
    points: list[dict[str, Any]] = []
    per_step: list[dict[str, Any]] = []
    for concurrency in CHAIN_CONCURRENCY:
        at: dict[str, dict[str, Any]] = {}
        for way in CHAIN_WAYS:
            console.print(f"[dim]ensemble: {way} at concurrency {concurrency} for {settings.duration_s} s")
            at[way] = run_async(chain_load(served.base_url, way, concurrency, settings.duration_s))
            points.append(at[way])
        ensemble, chained = at["ensemble"], at["client"]
        one_call = chained["call_p50_ms"]
        ens_p50, chain_p50 = ensemble["p50_ms"], chained["p50_ms"]
        ok = None not in (one_call, ens_p50, chain_p50)
        per_step.append(
            {
                "concurrency": concurrency,
                "ensemble_p50_ms": ens_p50,
                "one_direct_call_p50_ms": one_call,
                "client_chain_p50_ms": chain_p50,
                # Each step past the first: the one direct call already pays HTTP, the queue and
                # one run of tiny; the ensemble adds two more steps and its own orchestration.
                "overhead_per_step_ms": (ens_p50 - one_call) / (CHAIN_STEPS - 1) if ok else None,
                # What a client saves per step by letting the ensemble chain the calls.
                "saved_per_step_ms": (chain_p50 - ens_p50) / CHAIN_STEPS if ok else None,
                "ensemble_over_client_throughput": (
                    ensemble["pipelines_per_s"] / chained["pipelines_per_s"]
                    if chained["pipelines_per_s"]
                    else None
                ),
            }
        )
    return {
        "ensemble": CHAIN_MODEL,
        "step_model": STEP_MODEL,
        "steps": CHAIN_STEPS,
        "points": points,
        "per_step": per_step,
    }


# --- 3. streaming ---


@dataclass
class StreamRecord:
    started: float
    first_at: float | None = None
    ended_at: float | None = None
    tokens: int = 0
    in_order: bool = True
    error: tuple[str, str] | None = None  # (key, message)

    def token(self, value: int, now: float) -> None:
        if self.first_at is None:
            self.first_at = now
        self.in_order = self.in_order and value == self.tokens  # OUT = IN[i] = i
        self.tokens += 1


@dataclass
class StreamTally:
    ttft_s: list[float] = field(default_factory=list)
    completion_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wrong: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None

    def add(self, record: StreamRecord) -> None:
        self.tokens += record.tokens
        if record.error is not None:
            _count(self.errors, record.error[0])
            self.first_error = self.first_error or record.error[1]
        elif record.tokens != STREAM_TOKENS or not record.in_order or record.ended_at is None:
            self.wrong += 1
        else:
            assert record.first_at is not None
            self.ttft_s.append(record.first_at - record.started)
            self.completion_s.append(record.ended_at - record.started)

    def point(self, transport: str, streams: int, wall_s: float) -> dict[str, Any]:
        return {
            "transport": transport,
            "streams": streams,
            "wall_s": wall_s,
            "completed_streams": len(self.completion_s),
            "streams_per_s": len(self.completion_s) / wall_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / wall_s,
            "ttft_p50_ms": percentile_ms(self.ttft_s, 50),
            "ttft_p99_ms": percentile_ms(self.ttft_s, 99),
            "completion_p50_ms": percentile_ms(self.completion_s, 50),
            "completion_p99_ms": percentile_ms(self.completion_s, 99),
            "wrong": self.wrong,
            "errors": self.errors,
            "first_error": self.first_error,
        }


STREAM_VALUES: Final = np.arange(STREAM_TOKENS, dtype=np.int32)


async def ws_streams(base_url: str, streams: int, duration_s: float) -> dict[str, Any]:
    """`streams` requests at once over one WebSocket (the socket is made to carry many), each
    slot starting its next stream when the last one's final frame arrives, for `duration_s`."""
    tally = StreamTally()
    inputs = [{"name": "IN", "shape": [STREAM_TOKENS], "datatype": "INT32", "data": STREAM_VALUES.tolist()}]
    open_streams: dict[str, tuple[StreamRecord, asyncio.Future[None]]] = {}
    send_lock = asyncio.Lock()
    loop = asyncio.get_running_loop()

    def finish(record: StreamRecord, done: asyncio.Future[None], error: tuple[str, str] | None) -> None:
        if record.error is None:
            record.error = error
        if not done.done():
            done.set_result(None)

    async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.perf_counter()
            frame = orjson.loads(message.data)
            entry = open_streams.get(frame.get("id"))
            if entry is None:
                continue
            record, done = entry
            if frame.get("final"):
                record.ended_at = now
                error = (str(frame["status"]), str(frame["error"])) if "error" in frame else None
                finish(record, done, error)
                continue
            try:
                value = next(int(o["data"][0]) for o in frame["outputs"] if o["name"] == "OUT")
            except (KeyError, IndexError, TypeError, ValueError, StopIteration):
                value = -1
            record.token(value, now)
        for record, done in open_streams.values():  # the socket closed under them
            finish(record, done, ("socket closed", f"the WebSocket closed: {ws.close_code}"))

    async def slot(ws: aiohttp.ClientWebSocketResponse, index: int) -> None:
        count = 0
        while time.monotonic() < deadline:
            request_id = f"{index}-{count}"
            count += 1
            frame = orjson.dumps({"id": request_id, "model": STREAM_MODEL, "inputs": inputs}).decode()
            done: asyncio.Future[None] = loop.create_future()
            record = StreamRecord(time.perf_counter())
            open_streams[request_id] = (record, done)
            try:
                async with send_lock:
                    await ws.send_str(frame)
                await asyncio.wait_for(done, REQUEST_TIMEOUT_S)
            except TimeoutError:
                record.error = (
                    "lost",
                    f"stream {request_id}: no final frame within {REQUEST_TIMEOUT_S:.0f} s",
                )
                with contextlib.suppress(Exception):
                    async with send_lock:
                        await ws.send_str(orjson.dumps({"id": request_id, "cancel": True}).decode())
            except (aiohttp.ClientError, ConnectionError) as exc:
                record.error = (type(exc).__name__, f"stream {request_id}: {exc!r}")
            finally:
                del open_streams[request_id]
            tally.add(record)

    async with aiohttp.ClientSession() as session, session.ws_connect(f"{base_url}/v2/ws") as ws:
        reader = asyncio.create_task(read(ws))
        try:
            start = time.monotonic()
            deadline = start + duration_s
            await asyncio.gather(*(slot(ws, i) for i in range(streams)))
            wall_s = time.monotonic() - start
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return tally.point("websocket", streams, wall_s)


async def nats_streams(
    nats_url: str, version: str, streams: int, duration_s: float, nats_options: dict[str, str]
) -> dict[str, Any]:
    """The same load straight over NATS: one connection, one `Requester`, `streams` concurrent
    `Requester.stream` calls, no gateway."""
    tally = StreamTally()
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=3, **nats_options)
    try:
        async with Requester(nc, Subjects()) as requester:

            async def slot(index: int) -> None:
                count = 0
                while time.monotonic() < deadline:
                    request_id = f"{index}-{count}"
                    count += 1
                    tensor = Tensor("IN", "INT32", (STREAM_TOKENS,), STREAM_VALUES)
                    request = InferRequest(request_id, STREAM_MODEL, version, [tensor])
                    record = StreamRecord(time.perf_counter())
                    try:
                        async with asyncio.timeout(REQUEST_TIMEOUT_S):
                            async for answer in requester.stream(request, version, REQUEST_TIMEOUT_S):
                                now = time.perf_counter()
                                out = next((t for t in answer.outputs if t.name == "OUT"), None)
                                record.token(-1 if out is None else int(out.data.ravel()[0]), now)
                        record.ended_at = time.perf_counter()
                    except NatronError as exc:
                        record.error = (str(exc.status), exc.message)
                    except TimeoutError:
                        record.error = (
                            "lost",
                            f"stream {request_id}: unfinished after {REQUEST_TIMEOUT_S:.0f} s",
                        )
                    tally.add(record)

            start = time.monotonic()
            deadline = start + duration_s
            await asyncio.gather(*(slot(i) for i in range(streams)))
            wall_s = time.monotonic() - start
    finally:
        await nc.close()
    return tally.point("nats", streams, wall_s)


def _model_version(base_url: str, model: str) -> str:
    """The highest version the server lists for `model` (the NATS client resolves nothing)."""
    status, raw = http_status(f"{base_url}/v2/models/{model}", timeout_s=REQUEST_TIMEOUT_S)
    try:
        versions = [str(v) for v in orjson.loads(raw)["versions"]] if status == 200 else []
    except (orjson.JSONDecodeError, KeyError, TypeError):
        versions = []
    if not versions:
        raise BenchError(f"GET /v2/models/{model} answered {status}: {raw[:300]!r}")
    return max(versions, key=lambda v: int(v) if v.isdigit() else -1)


def measure_streams(served: Served, settings: Settings) -> dict[str, Any]:
    version = _model_version(served.base_url, STREAM_MODEL)

    def load(transport: str, streams: int, duration_s: float) -> dict[str, Any]:
        if transport == "websocket":
            return run_async(ws_streams(served.base_url, streams, duration_s))
        return run_async(nats_streams(served.nats_url, version, streams, duration_s, served.nats_options))

    for transport in STREAM_TRANSPORTS:  # a check that each transport streams right, and the warm-up
        check = load(transport, max(STREAM_CONCURRENCY), max(settings.warmup_s, 0.2))
        if not check["completed_streams"]:
            raise BenchError(f"{transport} streams failed: {check['first_error'] or 'wrong answers'}")
    points: list[dict[str, Any]] = []
    for streams in STREAM_CONCURRENCY:
        for transport in STREAM_TRANSPORTS:
            console.print(f"[dim]streams: {transport}, {streams} at once for {settings.duration_s} s")
            points.append(load(transport, streams, settings.duration_s))
    return {"model": STREAM_MODEL, "version": version, "tokens_per_stream": STREAM_TOKENS, "points": points}


# --- output ---


def _bad(point: dict[str, Any]) -> bool:
    if "non200" in point:  # a wrk point
        return bool(point["non200"] or point["socket_errors"])
    return bool(point["errors"] or point["wrong"])


def _backends_table(result: dict[str, Any]) -> Table:
    overhead = result["python_overhead_ms"]
    table = Table(
        title="Python backend vs ONNX Runtime: INT32 add/sub on [16], "
        "`py_simple` (Python) vs `simple` (ONNX), same batching, wrk",
        caption=f"Python backend overhead per request = p50(py_simple) - p50(simple) at concurrency "
        f"{result['python_overhead_at_concurrency']}: {overhead * 1e3:+.0f} us",
    )
    for column in ("backend", "model", "conc", "req/s", "p50 ms", "p90 ms", "p99 ms", "non-200", "sock err"):
        table.add_column(column, justify="left" if column in ("backend", "model") else "right")
    for p in result["points"]:
        table.add_row(
            p["backend"],
            p["model"],
            str(p["concurrency"]),
            f"{p['requests_per_s']:,.0f}",
            f"{p['p50_ms']:.2f}",
            f"{p['p90_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            str(p["non200"]),
            str(p["socket_errors"]),
            style="red" if _bad(p) else None,
        )
    for c, derived in result["by_concurrency"].items():
        ratio = derived["python_over_onnx_req_per_s"]
        table.add_row(
            "python - onnx",
            "",
            c,
            "" if ratio is None else f"x {ratio:.2f}",
            f"{derived['python_minus_onnx_p50_ms']:+.2f}",
            style="dim",
        )
    return table


def _ensemble_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"ensemble overhead: `{result['ensemble']}` ({result['steps']} x `{result['step_model']}` "
        "in one HTTP call) vs the client calling `tiny` 3 times itself (aiohttp)",
        caption="latency of a whole pipeline (X -> 8X+7, every answer checked); one call: p50 of the "
        "client's single `tiny` calls",
    )
    for column in ("way", "conc", "pipelines/s", "HTTP calls/s", "p50 ms", "p90 ms", "p99 ms",
                   "one call p50 ms", "errors"):  # fmt: skip
        table.add_column(column, justify="left" if column == "way" else "right")
    for p in result["points"]:
        label = "ensemble (1 call)" if p["way"] == "ensemble" else f"client ({CHAIN_STEPS} calls)"
        errors = _errors_text(p["errors"]) + (f", wrong: {p['wrong']}" if p["wrong"] else "")
        table.add_row(
            label,
            str(p["concurrency"]),
            f"{p['pipelines_per_s']:,.0f}",
            f"{p['http_calls_per_s']:,.0f}",
            _ms(p["p50_ms"]),
            _ms(p["p90_ms"]),
            _ms(p["p99_ms"]),
            _ms(p["call_p50_ms"]) if p["way"] == "client" else "",
            errors,
            style="red" if _bad(p) else None,
        )
    return table


def _per_step_table(result: dict[str, Any]) -> Table:
    steps = result["steps"]
    table = Table(
        title="ensemble overhead per step",
        caption=f"overhead per step = (p50 ensemble - p50 one direct call) / {steps - 1}: the latency "
        f"each step past the first adds inside the ensemble, orchestration included (a direct call "
        f"already pays HTTP, the queue and one run of tiny).  saved per step = (p50 client's "
        f"{steps} calls - p50 ensemble) / {steps}",
    )
    for column in ("conc", "ensemble p50 ms", "one call p50 ms", "overhead per step ms",
                   f"client {steps} calls p50 ms", "saved per step ms",
                   "ensemble / client pipelines/s"):  # fmt: skip
        table.add_column(column, justify="right")
    for s in result["per_step"]:
        ratio = s["ensemble_over_client_throughput"]
        table.add_row(
            str(s["concurrency"]),
            _ms(s["ensemble_p50_ms"]),
            _ms(s["one_direct_call_p50_ms"]),
            _ms(s["overhead_per_step_ms"]),
            _ms(s["client_chain_p50_ms"]),
            _ms(s["saved_per_step_ms"]),
            "" if ratio is None else f"{ratio:.2f}",
        )
    return table


def _streams_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"streaming: decoupled `{result['model']}`, {result['tokens_per_stream']} answers per "
        "stream, no delay",
        caption="websocket: every stream on one /v2/ws connection; nats: Requester.stream on one "
        "connection, no gateway. TTFT: request sent to first answer; completion: to the final frame",
    )
    for column in ("transport", "streams", "tokens/s", "streams/s", "TTFT p50 ms", "TTFT p99 ms",
                   "completion p50 ms", "completion p99 ms", "errors"):  # fmt: skip
        table.add_column(column, justify="left" if column == "transport" else "right")
    for p in result["points"]:
        errors = _errors_text(p["errors"]) + (f", wrong: {p['wrong']}" if p["wrong"] else "")
        table.add_row(
            p["transport"],
            str(p["streams"]),
            f"{p['tokens_per_s']:,.0f}",
            f"{p['streams_per_s']:,.1f}",
            _ms(p["ttft_p50_ms"]),
            _ms(p["ttft_p99_ms"]),
            _ms(p["completion_p50_ms"]),
            _ms(p["completion_p99_ms"]),
            errors,
            style="red" if _bad(p) else None,
        )
    return table


TABLES: Final[dict[str, Sequence[Callable[[dict[str, Any]], Table]]]] = {
    "backends": (_backends_table,),
    "ensemble": (_ensemble_table, _per_step_table),
    "streams": (_streams_table,),
}


def report(results: dict[str, Any]) -> None:
    console.print(
        f"os.cpu_count() = {results['host']['cpu_count']}: the load generators, natron and its "
        "workers share these cores"
    )
    for key, tables in TABLES.items():
        phase = results[key]
        if phase is None:
            continue
        if "error" in phase:
            console.print(f"[red]{PHASE_NAMES[key]} failed:[/red] {phase['error']}")
            continue
        for table in tables:
            console.print(table(phase))


def _failed(results: dict[str, Any]) -> bool:
    for key in TABLES:
        phase = results[key]
        if phase is not None and ("error" in phase or any(_bad(p) for p in phase["points"])):
            return True
    return False


# --- main ---


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="natron's pipeline benchmark: Python backend vs ONNX Runtime, ensemble overhead "
        "per step, and streaming throughput over the WebSocket and NATS.",
    )
    parser.add_argument("--quick", action="store_true", help="3 s points: a smoke run")
    parser.add_argument(
        "--duration-s", type=int, default=None, help="seconds per load point (default 10, 3 with --quick)"
    )
    parser.add_argument(
        "--warmup-s",
        type=int,
        default=1,
        help="unrecorded seconds of load before each phase's points, 0 for a bare check (default 1)",
    )
    parser.add_argument("--skip-backends", action="store_true", help="skip Python backend vs ONNX Runtime")
    parser.add_argument("--skip-ensemble", action="store_true", help="skip the ensemble overhead")
    parser.add_argument("--skip-streams", action="store_true", help="skip streaming")
    parser.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    if args.duration_s is None:
        args.duration_s = 3 if args.quick else 10
    if args.duration_s < 1 or args.warmup_s < 0:
        parser.error("--duration-s >= 1 and --warmup-s >= 0")
    args.phases = [key for key in TABLES if not getattr(args, f"skip_{key}")]
    if not args.phases:
        parser.error("every phase is skipped: nothing to measure")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    if "backends" in args.phases:
        check_wrk()
    timestamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    settings = Settings(args.duration_s, args.warmup_s, default_wrk_threads())
    models = list(dict.fromkeys(m for key in args.phases for m in PHASE_MODELS[key]))
    log_path = RESULTS_DIR / f"{timestamp}-pipelines-natron.log"
    results: dict[str, Any] = {
        "timestamp": timestamp,
        "git_revision": git_revision(),
        "host": host_info(),
        "settings": {
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "wrk_threads": settings.wrk_threads,
            "phases": args.phases,
            "models": models,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "log": str(log_path),
        },
        "backends": None,
        "ensemble": None,
        "streams": None,
    }
    with tempfile.TemporaryDirectory(prefix="natron-pipelines-") as tmp:
        work = Path(tmp)
        repo = build_repo(work / "repo", models)
        with serving(repo, models, log_path) as (served, ready_s):
            console.print(f"[dim]natron ready after {ready_s:.1f} s")
            results["natron_ready_s"] = ready_s
            phases: dict[str, Callable[[], dict[str, Any]]] = {
                "backends": lambda: measure_backends(served, work, settings),
                "ensemble": lambda: measure_ensemble(served, settings),
                "streams": lambda: measure_streams(served, settings),
            }
            for key in args.phases:
                try:
                    results[key] = phases[key]()
                except Exception as exc:  # one phase failing must not cost the others
                    console.print(f"[red]{PHASE_NAMES[key]} failed:[/red] {exc!r}")
                    results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: natron was stopped")
        return 130
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 1
    report(results)
    for path in write_json(results, args.json, suffix="-pipelines"):
        console.print(f"results written to {path}")
    return 1 if _failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
