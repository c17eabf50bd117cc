"""The trace extension's triton mode against a real `natron serve` started with Triton's trace
flags: sampled requests, over HTTP and gRPC, infer and streaming paths alike, land in the trace
file as tritonserver writes them (every timestamp, in order, the worker's among them where its
answer carries them), the trace API changes the sampling and the file's rotation but never the
file, and bad flags stop the server before it starts."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from examples import build_backend_models
from examples.build_models import TINY_SIZE
from tests.harness import ROOT, Served, natron_serve

pytestmark = pytest.mark.mesh

HTTP_NAMES = [
    "HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", "COMPUTE_START",
    "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END", "HTTP_SEND_START",
    "HTTP_SEND_END",
]  # fmt: skip
GRPC_NAMES = [
    name.replace("HTTP_RECV", "GRPC_WAITREAD").replace("HTTP_SEND", "GRPC_SEND") for name in HTTP_NAMES
]


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traces") / "trace.json"


@pytest.fixture(scope="module")
def deployment(
    model_repository: Path, trace_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """`natron serve` tracing every request to `trace_path`, as a Triton user would start it
    (one setting in the deprecated spelling)."""
    flags = (
        "--trace-config", f"triton,file={trace_path}",
        "--trace-config", "level=TIMESTAMPS",
        "--trace-rate", "1",
    )  # fmt: skip
    # The ONNX test models, and the decoupled `repeat` for the streams.
    repository = tmp_path_factory.mktemp("trace-models") / "models"
    shutil.copytree(model_repository, repository)
    build_backend_models.build(repository, ["repeat"], quiet=True)
    ready = ["tiny", "simple", "ensemble_simple", "repeat"]
    log_dir = tmp_path_factory.mktemp("trace-file")
    with natron_serve(repository, ready, log_dir, flags, timeout_s=120) as served:
        yield served


def _traces(path: Path) -> list[dict[str, Any]]:
    """The file's traces; valid JSON whenever it exists (the writer keeps it closed)."""
    return json.loads(path.read_text()) if path.exists() else []


def _wait_for(path: Path, count: int, timeout_s: float = 20) -> list[dict[str, Any]]:
    """The file's traces once it holds at least `count` (a bound, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        traces = _traces(path)
        if len(traces) >= count or time.monotonic() > deadline:
            return traces
        time.sleep(0.05)


def _check(trace: dict[str, Any], names: list[str], model: str = "tiny") -> None:
    stamps = trace["timestamps"]
    assert [stamp["name"] for stamp in stamps] == names, trace
    times = [stamp["ns"] for stamp in stamps]
    assert all(isinstance(ns, int) for ns in times)
    assert times == sorted(times), trace
    # Wall-clock ns of now, not a monotonic clock's: within the last few minutes.
    assert abs(times[0] - time.time_ns()) < 600e9
    assert trace["model_name"] == model and trace["model_version"] == 1


def _http_infer(served: Served, request_id: str = "") -> None:
    client = httpclient.InferenceServerClient(served.host_port)
    try:
        data = np.ones((1, TINY_SIZE), np.float32)
        inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        inp.set_data_from_numpy(data)
        result = client.infer("tiny", [inp], request_id=request_id)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), data * 2 + 1)
    finally:
        client.close()


def _grpc_stream(served: Served, model: str, request_id: str) -> list[Any]:
    """One request on a ModelStreamInfer stream: its answers, once the server ended the stream."""
    got: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(served.grpc_url) as client:
        if model == "repeat":
            inp = grpcclient.InferInput("IN", [3], "INT32")
            inp.set_data_from_numpy(np.array([5, 6, 7], dtype=np.int32))
        else:
            inp = grpcclient.InferInput("INPUT0", [1, TINY_SIZE], "FP32")
            inp.set_data_from_numpy(np.ones((1, TINY_SIZE), np.float32))
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer(model, [inp], request_id=request_id)
        client.stop_stream()  # returns once the server has ended the stream
    events = [got.get_nowait() for _ in range(got.qsize())]
    assert [error for _, error in events] == [None] * len(events)
    return [result for result, _ in events]


def _by_id(traces: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {trace["request_id"]: trace for trace in traces}


def _post(served: Served, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{served.url}/v2/trace/setting", json=body, timeout=10)


def test_http_requests_are_traced_with_every_timestamp_in_order(deployment: Served, trace_path: Path) -> None:
    before = len(_traces(trace_path))
    for request_id in ("h1", "h2", ""):
        _http_infer(deployment, request_id)
    traces = _wait_for(trace_path, before + 3)[before:]
    assert len(traces) == 3
    for trace in traces:
        _check(trace, HTTP_NAMES)
    assert [trace.get("request_id") for trace in traces] == ["h1", "h2", None]
    # Ids are the process's, one per trace.
    ids = [trace["id"] for trace in _traces(trace_path)]
    assert len(set(ids)) == len(ids)


def test_grpc_requests_are_traced_with_triton_s_grpc_names(deployment: Served, trace_path: Path) -> None:
    before = len(_traces(trace_path))
    with grpcclient.InferenceServerClient(deployment.grpc_url) as client:
        for request_id in ("g1", "g2"):
            data = np.ones((1, TINY_SIZE), np.float32)
            inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
            inp.set_data_from_numpy(data)
            client.infer("tiny", [inp], request_id=request_id)
    traces = _wait_for(trace_path, before + 2)[before:]
    assert [trace["request_id"] for trace in traces] == ["g1", "g2"]
    for trace in traces:
        _check(trace, GRPC_NAMES)


def test_concurrent_requests_each_get_the_worker_s_timestamps(deployment: Served, trace_path: Path) -> None:
    """A burst to a batching model: requests of one moment share broker messages and batches,
    and each traced one gets its execution's timestamps."""
    before = len(_traces(trace_path))

    async def burst() -> None:
        body = {
            "inputs": [
                {"name": "INPUT0", "shape": [1, TINY_SIZE], "datatype": "FP32", "data": [1.0] * TINY_SIZE}
            ]
        }
        async with aiohttp.ClientSession() as session:

            async def one(number: int) -> None:
                async with session.post(
                    f"{deployment.url}/v2/models/tiny/infer", json={**body, "id": f"b{number}"}
                ) as response:
                    assert response.status == 200, await response.text()

            await asyncio.gather(*(one(number) for number in range(16)))

    asyncio.run(burst())
    traces = _wait_for(trace_path, before + 16)[before:]
    assert sorted(trace["request_id"] for trace in traces) == sorted(f"b{n}" for n in range(16))
    for trace in traces:
        _check(trace, HTTP_NAMES)


def test_an_ensemble_s_request_is_traced_with_its_orchestrator_s_timestamps(
    deployment: Served, trace_path: Path
) -> None:
    before = len(_traces(trace_path))
    body: dict[str, Any] = {
        "id": "e1",
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
        ],
    }
    answer = requests.post(f"{deployment.url}/v2/models/ensemble_simple/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    traces = _wait_for(trace_path, before + 1)[before:]
    # The gateway traces the request it was sent; the ensemble's steps are the orchestrator's.
    assert [trace["request_id"] for trace in traces] == ["e1"]
    _check(traces[0], HTTP_NAMES, "ensemble_simple")


def test_generate_and_generate_stream_are_traced(deployment: Served, trace_path: Path) -> None:
    before = len(_traces(trace_path))
    # A model that is not decoupled answers once, with its worker's timestamps.
    body: dict[str, Any] = {"INPUT0": [1.0] * TINY_SIZE, "id": "gen-tiny"}
    answer = requests.post(f"{deployment.url}/v2/models/tiny/generate", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    streamed = requests.post(
        f"{deployment.url}/v2/models/repeat/generate_stream",
        json={"IN": [3, 1, 4], "id": "sse-repeat"},
        timeout=30,
    )
    assert streamed.status_code == 200 and streamed.text.count("data: ") == 3, streamed.text
    traces = _by_id(_wait_for(trace_path, before + 2)[before:])
    assert set(traces) == {"gen-tiny", "sse-repeat"}
    _check(traces["gen-tiny"], HTTP_NAMES)
    # A decoupled model's worker sends its timestamps with its final answer.
    _check(traces["sse-repeat"], HTTP_NAMES, "repeat")


def test_a_failed_generate_is_traced_and_a_refused_one_is_not(deployment: Served, trace_path: Path) -> None:
    before = len(_traces(trace_path))
    # Refused before it ran (an unknown input): nothing to trace, as on the infer route.
    refused = requests.post(f"{deployment.url}/v2/models/repeat/generate", json={"NOPE": 1}, timeout=30)
    assert refused.status_code == 400
    # Ran, then failed: two answers where generate takes one. Traced to its end.
    failed = requests.post(
        f"{deployment.url}/v2/models/repeat/generate", json={"IN": [1, 2], "id": "gen-two"}, timeout=30
    )
    assert failed.status_code == 400 and "generate_stream" in failed.json()["error"]
    traces = _wait_for(trace_path, before + 1)[before:]
    time.sleep(0.5)  # a bound for a trace of the refused request, which must not come
    traces = _traces(trace_path)[before:]
    assert [trace["request_id"] for trace in traces] == ["gen-two"]
    assert traces[0]["model_name"] == "repeat"


def test_websocket_requests_are_traced_each(deployment: Served, trace_path: Path) -> None:
    before = len(_traces(trace_path))

    async def talk() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{deployment.url}/v2/ws") as ws:
            repeat = {"name": "IN", "shape": [2], "datatype": "INT32", "data": [8, 9]}
            tiny = {"name": "INPUT0", "shape": [1, TINY_SIZE], "datatype": "FP32", "data": [1.0] * TINY_SIZE}
            await ws.send_json({"id": "ws-repeat", "model": "repeat", "inputs": [repeat]})
            await ws.send_json({"id": "ws-tiny", "model": "tiny", "inputs": [tiny]})
            finals = 0
            while finals < 2:
                frame = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                assert "error" not in frame, frame
                finals += frame["final"]

    asyncio.run(talk())
    traces = _by_id(_wait_for(trace_path, before + 2)[before:])
    assert set(traces) == {"ws-repeat", "ws-tiny"}
    _check(traces["ws-repeat"], HTTP_NAMES, "repeat")
    _check(traces["ws-tiny"], HTTP_NAMES)


def test_grpc_stream_requests_are_traced_with_triton_s_grpc_names(
    deployment: Served, trace_path: Path
) -> None:
    before = len(_traces(trace_path))
    assert [r.as_numpy("OUT").tolist() for r in _grpc_stream(deployment, "repeat", "gs-repeat")] == [
        [5],
        [6],
        [7],
    ]
    assert len(_grpc_stream(deployment, "tiny", "gs-tiny")) == 1
    traces = _by_id(_wait_for(trace_path, before + 2)[before:])
    assert set(traces) == {"gs-repeat", "gs-tiny"}
    _check(traces["gs-repeat"], GRPC_NAMES, "repeat")
    _check(traces["gs-tiny"], GRPC_NAMES)


def test_the_api_shows_the_file_refuses_to_change_it_and_changes_the_sampling(
    deployment: Served, trace_path: Path
) -> None:
    answer = requests.get(f"{deployment.url}/v2/trace/setting", timeout=10).json()
    assert answer["trace_file"] == str(trace_path)
    assert answer["trace_level"] == ["TIMESTAMPS"] and answer["trace_rate"] == "1"
    refused = _post(deployment, {"trace_file": "/tmp/elsewhere.json"})
    assert refused.status_code == 400 and "trace file location" in refused.json()["error"]
    with grpcclient.InferenceServerClient(deployment.grpc_url) as client:
        with pytest.raises(Exception, match="trace file location"):
            client.update_trace_settings(settings={"trace_file": "/tmp/elsewhere.json"})
    try:
        # Every 2nd request, 2 traces in all.
        changed = _post(deployment, {"trace_rate": "2", "trace_count": "2"})
        assert changed.status_code == 200, changed.text
        assert changed.json()["trace_file"] == str(trace_path)
        before = len(_traces(trace_path))
        for number in range(8):
            _http_infer(deployment, f"r{number}")
        traces = _wait_for(trace_path, before + 2)[before:]
        time.sleep(0.5)  # a bound for a third trace that must not come
        traces = _traces(trace_path)[before:]
        assert [trace["request_id"] for trace in traces] == ["r1", "r3"]
        # Streams are sampled by the same settings: every 2nd, and none once the count is spent.
        assert _post(deployment, {"trace_rate": "2", "trace_count": "1"}).ok
        before = len(_traces(trace_path))
        for number in range(4):
            body: dict[str, Any] = {"IN": [number], "id": f"s{number}"}
            answer = requests.post(
                f"{deployment.url}/v2/models/repeat/generate_stream", json=body, timeout=30
            )
            assert answer.status_code == 200
        traces = _wait_for(trace_path, before + 1)[before:]
        time.sleep(0.5)  # a bound for a second trace that must not come
        traces = _traces(trace_path)[before:]
        assert [trace["request_id"] for trace in traces] == ["s1"]
        # Off: nothing more, on any path.
        assert _post(deployment, {"trace_level": ["OFF"], "trace_count": "-1", "trace_rate": "1"}).ok
        _http_infer(deployment, "off")
        off = requests.post(
            f"{deployment.url}/v2/models/repeat/generate_stream", json={"IN": [1], "id": "off"}, timeout=30
        )
        assert off.status_code == 200
        time.sleep(0.5)
        assert len(_traces(trace_path)) == before + 1
    finally:
        assert _post(deployment, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "-1"}).ok


def test_log_frequency_rotates_into_indexed_files(deployment: Served, trace_path: Path) -> None:
    try:
        assert _post(deployment, {"log_frequency": "2"}).ok
        for number in range(5):
            _http_infer(deployment, f"f{number}")
        files = [Path(f"{trace_path}.{index}") for index in range(3)]
        deadline = time.monotonic() + 20
        while not (files[2].exists() and _traces(files[2])) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [[trace["request_id"] for trace in _traces(file)] for file in files] == [
            ["f0", "f1"],
            ["f2", "f3"],
            ["f4"],
        ]
        for file in files:
            for trace in _traces(file):
                _check(trace, HTTP_NAMES)
    finally:
        assert _post(deployment, {"log_frequency": "0"}).ok


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--trace-config", "rate=often"], "often"),
        (["--trace-config", "level=LOUD"], "LOUD"),
        (["--trace-level", "LOUD"], "LOUD"),
        (["--trace-config", "triton,colour=blue"], "triton,colour=blue"),
    ],
)
def test_a_bad_trace_flag_stops_serve_with_status_2_naming_it(
    flags: list[str], named: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "natron", "serve", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "--trace-config" in done.stderr


def test_gateway_processes_sharing_a_port_write_files_of_their_own(
    model_repository: Path, tmp_path: Path
) -> None:
    path = tmp_path / "trace.json"
    flags = (
        "--http-workers", "2",
        "--trace-config", f"triton,file={path}",
        "--trace-config", "level=TIMESTAMPS",
        "--trace-config", "rate=1",
    )  # fmt: skip
    with natron_serve(model_repository, ["tiny"], tmp_path, flags) as served:
        answered = {
            requests.get(f"{served.url}/v2/trace/setting", timeout=10).json()["trace_file"] for _ in range(12)
        }
        assert answered <= {f"{path}.gateway-0", f"{path}.gateway-1"} and answered
        for number in range(8):
            _http_infer(served, f"w{number}")  # a connection each: the kernel spreads them
        files = [Path(f"{path}.gateway-{index}") for index in range(2)]
        deadline = time.monotonic() + 20
        while sum(len(_traces(file)) for file in files) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    # After shutdown too: whole JSON, every request once, and no shared file.
    assert not path.exists()
    traced = [trace["request_id"] for file in files for trace in _traces(file)]
    assert sorted(traced) == [f"w{number}" for number in range(8)]
