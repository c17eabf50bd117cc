"""Triton's trace extension (`/v2[/models/{model}]/trace/setting`, gRPC TraceSetting) and the
opentelemetry mode: settings shared by every gateway of a deployment, sampling by rate and
count, and spans exported over OTLP/HTTP to a collector (a small one in this test, decoding
OTLP's protobuf)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from broker.server import free_ports
from examples import build_backend_models
from gateway import trace_api
from gateway.app import create_app
from gateway.keys import GatewayOptions
from gateway.tracing import TRACER
from natron import tracing
from natron.errors import InvalidArgument
from natron.tracesettings import GLOBAL_KEYS, MODEL_KEYS
from tests.harness import Served, natron_serve, wait_until_async

TRITON_DEFAULTS = {
    "trace_level": ["OFF"],
    "trace_rate": "1000",
    "trace_count": "-1",
    "log_frequency": "0",
    "trace_file": "",
    "trace_mode": "triton",
}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture(scope="module")
def deployment(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A deployment of its own: these tests change its trace settings. With the decoupled
    `repeat` for the streams."""
    repository = tmp_path_factory.mktemp("trace-api-models") / "models"
    shutil.copytree(model_repository, repository)
    build_backend_models.build(repository, ["repeat"], quiet=True)
    log_dir = tmp_path_factory.mktemp("trace")
    with natron_serve(repository, ["tiny", "repeat"], log_dir, timeout_s=120) as served:
        yield served


@dataclass
class Gateway:
    app: web.Application
    host_port: str

    async def triton(self, method: str, **kwargs: Any) -> Any:
        """`tritonclient.http`'s `method`, off the event loop (a client of its own, since its
        gevent pool keeps to the thread that made it)."""
        return await _triton(self.host_port, method, **kwargs)


async def _triton(host_port: str, method: str, **kwargs: Any) -> Any:
    def call() -> Any:
        client = httpclient.InferenceServerClient(host_port)
        try:
            return getattr(client, method)(**kwargs)
        finally:
            client.close()

    return await asyncio.to_thread(call)


@contextlib.asynccontextmanager
async def _gateway(served: Served) -> AsyncIterator[Gateway]:
    """A gateway of the deployment in this process, serving HTTP with the trace routes."""
    app = create_app(GatewayOptions(nats_url=served.nats_url, nats_auth=served.auth("gateway")))
    if TRACER not in app:  # until create_app adds the trace routes itself
        trace_api.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        (port,) = free_ports(1)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield Gateway(app, f"127.0.0.1:{port}")
    finally:
        await runner.cleanup()


async def _reset(app: web.Application) -> None:
    await trace_api.update_trace_settings(app, None, dict.fromkeys(GLOBAL_KEYS))
    await trace_api.update_trace_settings(app, "tiny", dict.fromkeys(MODEL_KEYS))


@pytest.fixture
async def gateway(deployment: Served) -> AsyncIterator[Gateway]:
    async with _gateway(deployment) as gateway:
        try:
            yield gateway
        finally:
            await _reset(gateway.app)


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, flattened."""

    url: str
    spans: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    (port,) = free_ports(1)
    received = Collector(f"http://127.0.0.1:{port}/v1/traces")

    async def export(request: web.Request) -> web.Response:
        body = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in body.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}[
                "service.name"
            ]
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    received.spans.append(
                        {
                            "service": service,
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "error": span.status.code == span.status.STATUS_CODE_ERROR,
                        }
                    )
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield received
    finally:
        await runner.cleanup()


def _value(value: Any) -> object:
    return getattr(value, value.WhichOneof("value"))


def _otel(collector: Collector, **more: str) -> dict[str, object]:
    return {
        "trace_mode": "opentelemetry",
        "trace_level": ["TIMESTAMPS"],
        "trace_config": [f"url={collector.url}", "bsp_schedule_delay=50"],
        **more,
    }


# -- the settings ----------------------------------------------------------------------------


async def test_global_settings_answer_tritons_defaults(gateway: Gateway) -> None:
    assert await gateway.triton("get_trace_settings") == TRITON_DEFAULTS


async def test_a_change_answers_every_setting_and_reads_back(gateway: Gateway) -> None:
    answer = await gateway.triton(
        "update_trace_settings", settings={"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "5"}
    )
    assert answer == {**TRITON_DEFAULTS, "trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "5"}
    assert await gateway.triton("get_trace_settings") == answer


async def test_a_model_falls_back_to_the_global_settings_and_null_clears_its_own(gateway: Gateway) -> None:
    await gateway.triton("update_trace_settings", settings={"trace_rate": "10"})
    own = await gateway.triton(
        "update_trace_settings", model_name="tiny", settings={"trace_level": ["TENSORS"], "trace_count": "3"}
    )
    assert own == {**TRITON_DEFAULTS, "trace_level": ["TENSORS"], "trace_rate": "10", "trace_count": "3"}
    # The global settings are untouched, and what the model does not name follows them.
    assert (await gateway.triton("get_trace_settings"))["trace_level"] == ["OFF"]
    await gateway.triton("update_trace_settings", settings={"trace_rate": "20"})
    assert (await gateway.triton("get_trace_settings", model_name="tiny"))["trace_rate"] == "20"
    cleared = await gateway.triton(
        "update_trace_settings", model_name="tiny", settings={"trace_level": None, "trace_count": None}
    )
    assert cleared == {**TRITON_DEFAULTS, "trace_rate": "20"}


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v2/trace/setting", b'{"trace_levels": ["OFF"]}', "unknown trace setting 'trace_levels'"),
        ("/v2/trace/setting", b'{"trace_level": "TIMESTAMPS"}', "'trace_level' must be a list of strings"),
        ("/v2/trace/setting", b'{"trace_rate": 5}', "'trace_rate' must be a string"),
        ("/v2/trace/setting", b'{"trace_count": "-5"}', "Unable to parse 'trace_count'"),
        ("/v2/trace/setting", b'{"trace_file": "/etc/cron.d/x"}', "trace file location can not be updated"),
        (
            "/v2/trace/setting",
            b'{"trace_mode": "jaeger"}',
            "'trace_mode' must be one of triton, opentelemetry",
        ),
        ("/v2/models/tiny/trace/setting", b'{"trace_mode": "triton"}', "'trace_mode' is global"),
        ("/v2/models/nope/trace/setting", b'{"trace_rate": "1"}', "Request for unknown model : nope"),
        ("/v2/models/nope/trace/setting", b"", "Request for unknown model : nope"),
        ("/v2/trace/setting", b"[]", "trace settings body must be a JSON object"),
        ("/v2/trace/setting", b'{"trace_rate": "1", "trace_level": ["FULL"]}', 'unknown level "FULL"'),
    ],
)
async def test_a_bad_request_is_400_naming_the_key_and_changes_nothing(
    gateway: Gateway, path: str, body: bytes, needle: str
) -> None:
    response = await asyncio.to_thread(
        requests.post, f"http://{gateway.host_port}{path}", data=body, timeout=10
    )
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]
    assert await gateway.triton("get_trace_settings") == TRITON_DEFAULTS


async def test_the_triton_client_reads_why_trace_file_is_refused(gateway: Gateway) -> None:
    with pytest.raises(InferenceServerException, match="a remote caller must not choose a file"):
        await gateway.triton("update_trace_settings", settings={"trace_file": "/tmp/t.json"})


async def test_the_opentelemetry_mode_without_the_extra_is_400(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "available", lambda: False)
    response = await asyncio.to_thread(
        requests.post,
        f"http://{gateway.host_port}/v2/trace/setting",
        json={"trace_mode": "opentelemetry"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("trace_mode opentelemetry needs the natron[otel] extra")


async def test_a_change_through_one_gateway_reaches_the_others(gateway: Gateway, deployment: Served) -> None:
    async with _gateway(deployment) as other:
        answer = await gateway.triton(
            "update_trace_settings", settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "7"}
        )
        assert await other.triton("get_trace_settings") == answer
        # ... and its tracer follows them (the broadcast).
        await wait_until_async(
            lambda: other.app[TRACER].settings.trace_rate == 7, 15, "other gateway followed"
        )


async def test_grpc_trace_setting_reads_and_changes(gateway: Gateway) -> None:
    def as_dict(response: Any) -> dict[str, list[str]]:
        return {key: list(value.value) for key, value in response.settings.items()}

    read = as_dict(await trace_api.trace_setting_rpc(gateway.app, pb.TraceSettingRequest()))
    assert read == {k: v if isinstance(v, list) else [v] for k, v in TRITON_DEFAULTS.items()}
    request = pb.TraceSettingRequest(model_name="tiny")
    request.settings["trace_rate"].value.append("3")
    request.settings["trace_level"].value.extend(["TIMESTAMPS"])
    changed = as_dict(await trace_api.trace_setting_rpc(gateway.app, request))
    assert changed == {**read, "trace_rate": ["3"], "trace_level": ["TIMESTAMPS"]}
    clear = pb.TraceSettingRequest(model_name="tiny")
    clear.settings["trace_rate"].SetInParent()  # no value: back to the global setting
    assert as_dict(await trace_api.trace_setting_rpc(gateway.app, clear))["trace_rate"] == ["1000"]
    wrong = pb.TraceSettingRequest()
    wrong.settings["trace_count"].value.extend(["1", "2"])
    with pytest.raises(InvalidArgument, match="'trace_count' takes one value, got 2"):
        await trace_api.trace_setting_rpc(gateway.app, wrong)


# -- sampling and spans ----------------------------------------------------------------------


async def test_sampling_follows_rate_and_count_and_spans_reach_the_collector(
    gateway: Gateway, collector: Collector
) -> None:
    settings = _otel(collector, trace_rate="2", trace_count="2")
    answer = await trace_api.update_trace_settings(gateway.app, None, settings)
    assert answer["trace_mode"] == "opentelemetry" and answer["url"] == collector.url
    assert "trace_file" not in answer
    tracer = gateway.app[TRACER]
    no_headers: dict[str, str] = {}
    traced = [tracer.begin("tiny", "1", f"r{i}", no_headers.get) for i in range(1, 7)]
    # Every second request, until two were taken.
    assert [t is not None for t in traced] == [False, True, False, True, False, False]
    for trace in traced:
        if trace is not None:
            flags = re.match(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-([0-9a-f]{2})$", trace.headers["traceparent"])
            assert flags is not None and int(flags[1], 16) & 1  # sampled: the worker records too
            trace.end(200)
    assert (await trace_api.get_trace_settings(gateway.app))["trace_count"] == "0"
    # A client's own trace is followed whatever the count, as Triton does.
    joined = tracer.begin("tiny", "1", "client", {"traceparent": CLIENT_TRACEPARENT}.get)
    assert joined is not None
    assert joined.headers["traceparent"].startswith(f"00-{CLIENT_TRACE}-")
    joined.end(503, "no worker serves the model")
    # ... even one its client did not sample: the gateway's span is recorded, and says so.
    unsampled = tracer.begin("tiny", "1", "unsampled", {"traceparent": CLIENT_TRACEPARENT[:-2] + "00"}.get)
    assert unsampled is not None and int(unsampled.headers["traceparent"][-2:], 16) & 1
    unsampled.end(200)
    # Setting the count again re-arms it.
    await trace_api.update_trace_settings(gateway.app, None, {"trace_count": "2"})
    assert (await trace_api.get_trace_settings(gateway.app))["trace_count"] == "2"

    await wait_until_async(lambda: len(collector.spans) == 4, 30, "four spans exported")
    assert {s["name"] for s in collector.spans} == {"InferRequest"}
    assert {s["service"] for s in collector.spans} == {"natron-gateway"}
    by_request = {s["attributes"]["request.id"]: s for s in collector.spans}
    assert set(by_request) == {"r2", "r4", "client", "unsampled"}
    assert by_request["r2"]["attributes"]["model.name"] == "tiny"
    assert by_request["r2"]["parent"] == ""
    assert by_request["client"]["trace_id"] == CLIENT_TRACE
    assert by_request["client"]["parent"] == CLIENT_SPAN


async def test_a_model_of_its_own_settings_samples_on_its_own(gateway: Gateway, collector: Collector) -> None:
    await trace_api.update_trace_settings(gateway.app, None, _otel(collector, trace_rate="0"))
    await trace_api.update_trace_settings(gateway.app, "tiny", {"trace_rate": "1", "trace_count": "1"})
    tracer = gateway.app[TRACER]
    none: dict[str, str] = {}
    # Rate 0 globally: only clients' traces; tiny's own rate takes its first request.
    assert tracer.begin("simple", "1", "a", none.get) is None
    assert [tracer.begin("tiny", "1", f"t{i}", none.get) is not None for i in range(3)] == [
        True,
        False,
        False,
    ]
    assert (await trace_api.get_trace_settings(gateway.app, "tiny"))["trace_count"] == "0"
    assert (await trace_api.get_trace_settings(gateway.app))["trace_count"] == "-1"


async def test_tracing_off_traces_nothing(gateway: Gateway, collector: Collector) -> None:
    await trace_api.update_trace_settings(
        gateway.app, None, {**_otel(collector, trace_rate="1"), "trace_level": ["OFF"]}
    )
    tracer = gateway.app[TRACER]
    assert tracer.spans.export is None
    assert tracer.begin("tiny", "1", "x", {"traceparent": CLIENT_TRACEPARENT}.get) is None


async def test_the_grpc_client_reads_and_changes_the_same_settings(deployment: Served) -> None:
    def over_grpc() -> dict[str, Any]:
        grpc = grpcclient.InferenceServerClient(deployment.grpc_url)
        try:
            grpc.update_trace_settings(
                model_name="tiny", settings={"trace_rate": "3", "trace_level": ["TIMESTAMPS"]}
            )
            settings: dict[str, Any] = grpc.get_trace_settings(model_name="tiny", as_json=True)["settings"]
            with pytest.raises(InferenceServerException, match="trace file location can not be updated"):
                grpc.update_trace_settings(settings={"trace_file": "/tmp/t.json"})
            grpc.update_trace_settings(model_name="tiny", settings={"trace_rate": None, "trace_level": None})
            return settings
        finally:
            grpc.close()

    settings = await asyncio.to_thread(over_grpc)
    assert settings["trace_rate"] == {"value": ["3"]}
    assert settings["trace_level"] == {"value": ["TIMESTAMPS"]}
    assert await _triton(deployment.host_port, "get_trace_settings", model_name="tiny") == TRITON_DEFAULTS


# -- through the deployment: gateway -> broker -> worker ----------------------------------------


async def test_an_inference_is_one_trace_from_the_client_through_the_gateway_to_the_worker(
    deployment: Served, collector: Collector
) -> None:
    host_port = deployment.host_port
    try:
        await _triton(host_port, "update_trace_settings", settings=_otel(collector, trace_rate="1000"))
        data = np.zeros((1, 16), dtype=np.float32)
        inputs = [httpclient.InferInput("INPUT0", list(data.shape), "FP32")]
        inputs[0].set_data_from_numpy(data)
        # Sampled because the client traces it (rate 1000 would skip it otherwise).
        await _triton(
            host_port, "infer", model_name="tiny", inputs=inputs, headers={"traceparent": CLIENT_TRACEPARENT}
        )
        await wait_until_async(lambda: len(collector.spans) >= 2, 30, "gateway and worker spans")
        by_service = {s["service"]: s for s in collector.spans}
        gateway_span, worker_span = by_service["natron-gateway"], by_service["natron-worker"]
        assert gateway_span["trace_id"] == worker_span["trace_id"] == CLIENT_TRACE
        assert gateway_span["parent"] == CLIENT_SPAN
        assert worker_span["parent"] == gateway_span["span_id"]
    finally:
        await _triton(
            host_port,
            "update_trace_settings",
            settings=dict.fromkeys(("trace_mode", "trace_level", "trace_config")),
        )


async def test_every_streaming_path_is_one_trace_through_the_gateway_to_the_worker(
    deployment: Served, collector: Collector
) -> None:
    """generate, generate_stream, the WebSocket and gRPC ModelStreamInfer: each request sampled
    gets the gateway's span, with its path, whose context the worker's span joins; one that
    fails records its error."""
    url, host_port = deployment.url, deployment.host_port
    tiny = {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}
    repeat = {"name": "IN", "shape": [3], "datatype": "INT32", "data": [5, 6, 7]}
    slow = [repeat, {"name": "DELAY_MS", "shape": [1], "datatype": "UINT32", "data": [2000]}]
    try:
        await _triton(host_port, "update_trace_settings", settings=_otel(collector, trace_rate="1"))
        async with aiohttp.ClientSession() as session:
            body = {"INPUT0": [1.0] * 16, "id": "gen"}
            async with session.post(f"{url}/v2/models/tiny/generate", json=body) as response:
                assert response.status == 200, await response.text()
            body = {"IN": [3, 1, 4], "id": "sse"}
            async with session.post(f"{url}/v2/models/repeat/generate_stream", json=body) as response:
                assert response.status == 200 and (await response.text()).count("data: ") == 3
            # Two answers where generate takes one: the span records the 400.
            body = {"IN": [1, 2], "id": "gen-two"}
            async with session.post(f"{url}/v2/models/repeat/generate", json=body) as response:
                assert response.status == 400
            async with session.ws_connect(f"{url}/v2/ws") as ws:
                await ws.send_json({"id": "ws", "model": "repeat", "inputs": [repeat]})
                await ws.send_json({"id": "ws-tiny", "model": "tiny", "inputs": [tiny]})
                await ws.send_json({"id": "ws-cancel", "model": "repeat", "inputs": slow})
                finals: dict[str, dict[str, Any]] = {}
                while len(finals) < 2:
                    frame = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                    if frame["final"]:
                        finals[frame["id"]] = frame
                assert "error" not in finals["ws"] and "error" not in finals["ws-tiny"]
                await ws.send_json({"id": "ws-cancel", "cancel": True})
                while "ws-cancel" not in finals:
                    frame = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                    if frame["final"]:
                        finals[frame["id"]] = frame
                assert finals["ws-cancel"]["status"] == 499
        answers = await asyncio.to_thread(_grpc_stream, deployment.grpc_url, "grpc")
        assert [a.as_numpy("OUT").tolist() for a in answers] == [[5], [6], [7]]

        kinds = {
            "gen": ("tiny", "generate"),
            "sse": ("repeat", "generate_stream"),
            "gen-two": ("repeat", "generate"),
            "ws": ("repeat", "websocket"),
            "ws-tiny": ("tiny", "websocket"),
            "ws-cancel": ("repeat", "websocket"),
            "grpc": ("repeat", "grpc_stream"),
        }

        def gateway_spans() -> dict[str, dict[str, Any]]:
            spans = [s for s in collector.spans if s["service"] == "natron-gateway"]
            return {s["attributes"]["request.id"]: s for s in spans}

        await wait_until_async(lambda: set(gateway_spans()) >= set(kinds), 30, "a gateway span per request")
        spans = gateway_spans()
        for request_id, (model, kind) in kinds.items():
            span = spans[request_id]
            assert span["name"] == "InferRequest"
            assert span["attributes"]["model.name"] == model
            assert span["attributes"]["request.kind"] == kind
        assert not any(spans[r]["error"] for r in ("gen", "sse", "ws", "ws-tiny", "grpc"))
        assert (
            spans["gen-two"]["error"] and spans["gen-two"]["attributes"]["http.response.status_code"] == 400
        )
        assert spans["ws-cancel"]["error"]
        assert spans["ws-cancel"]["attributes"]["http.response.status_code"] == 499

        # The worker's span of each joins the gateway's: its context went on.
        def joined() -> set[str]:
            workers = [s for s in collector.spans if s["service"] == "natron-worker"]
            return {
                request_id
                for request_id in ("gen", "sse", "ws", "ws-tiny", "grpc")
                if any(
                    w["trace_id"] == spans[request_id]["trace_id"]
                    and w["parent"] == spans[request_id]["span_id"]
                    for w in workers
                )
            }

        await wait_until_async(
            lambda: joined() == {"gen", "sse", "ws", "ws-tiny", "grpc"}, 30, "the worker's spans joined"
        )
    finally:
        await _triton(
            host_port,
            "update_trace_settings",
            settings=dict.fromkeys(("trace_mode", "trace_level", "trace_config", "trace_rate")),
        )


def _grpc_stream(grpc_url: str, request_id: str) -> list[Any]:
    """One request to `repeat` on a ModelStreamInfer stream: its answers, once the stream ended."""
    got: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(grpc_url) as client:
        inp = grpcclient.InferInput("IN", [3], "INT32")
        inp.set_data_from_numpy(np.array([5, 6, 7], dtype=np.int32))
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("repeat", [inp], request_id=request_id)
        client.stop_stream()  # returns once the server has ended the stream
    events = [got.get_nowait() for _ in range(got.qsize())]
    assert [error for _, error in events] == [None] * len(events)
    return [result for result, _ in events]
