"""Restricted API groups and uploaded code (natron/restricted_api.py, gateway/restricted.py), and
the fast path's share of both and of the idle and slow client bounds (gateway/fastpath.py,
gateway/connections.py), without a server process."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from tritonclient.grpc import service_pb2

from gateway import fastpath, restricted
from gateway.app import create_app
from gateway.connections import ConnectionLimits, RefusedConnection
from gateway.keys import GatewayOptions
from natron import restricted_api
from natron.cli.main import parse
from natron.restricted_api import Restriction

pytestmark = pytest.mark.unit


# -- the flags ---------------------------------------------------------------------------------


def test_a_flag_restricts_each_group_it_names_with_its_header() -> None:
    parsed = restricted_api.http(["inference,model-config:Infer-Key=s3cret", "logging:admin=a:b=c"])
    assert parsed.get("inference") == Restriction("infer-key", "s3cret", "Infer-Key")
    assert parsed.get("model-config") == parsed.get("inference")
    # Triton's split: the groups end at the first ':', the key at the first '=' after it.
    assert parsed.get("logging") == Restriction("admin", "a:b=c", "admin")
    assert parsed.get("health") is None
    assert parsed and not restricted_api.http([])


def test_grpc_keys_carry_tritons_prefix() -> None:
    parsed = restricted_api.grpc(["health:admin=x"])
    assert parsed.get("health") == Restriction(
        "triton-grpc-protocol-admin", "x", "triton-grpc-protocol-admin"
    )


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("inference", "expected <group>"),
        ("inference:key", "expected <group>"),
        (":key=value", "expected <group>"),
        ("inference:=value", "expected <group>"),
        ("inference:key=", "expected <group>"),
        ("inferencing:key=value", "unknown group 'inferencing'"),
        ("inference,:key=value", "unknown group ''"),
        ("inference:bad key=value", "cannot be a header name"),
    ],
)
def test_a_malformed_flag_is_refused_with_the_reason(item: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        restricted_api.http([item])


def test_a_group_in_two_flags_is_refused() -> None:
    with pytest.raises(ValueError, match="group 'inference' is restricted by another"):
        restricted_api.http(["inference:a=1", "health,inference:b=2"])


def test_the_command_line_takes_the_flags_repeated_for_gateway_and_serve(tmp_path: Any) -> None:
    settings = parse(
        [
            "gateway",
            "--http-restricted-api=inference:k=v",
            "--http-restricted-api",
            "health:h=1",
            "--grpc-restricted-protocol=model-repository:admin=x",
            "--allow-code-upload",
            "true",
        ]
    )
    assert settings.http_restricted_api == ("inference:k=v", "health:h=1")  # type: ignore[union-attr]
    assert settings.grpc_restricted_protocol == ("model-repository:admin=x",)  # type: ignore[union-attr]
    assert settings.allow_code_upload  # type: ignore[union-attr]
    served = parse(["serve", str(tmp_path), "--http-restricted-api=inference:k=v"])
    assert served.http_restricted_api == ("inference:k=v",)  # type: ignore[union-attr]


def test_the_environment_takes_several_groups_whitespace_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATRON_HTTP_RESTRICTED_API", "inference:k=v health,metadata:h=1")
    settings = parse(["gateway"])
    assert settings.http_restricted_api == ("inference:k=v", "health,metadata:h=1")  # type: ignore[union-attr]


def test_a_bad_flag_stops_the_command_line_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["gateway", "--grpc-restricted-protocol=everything:k=v"])
    assert exc.value.code == 2
    assert (
        "--grpc-restricted-protocol 'everything:k=v': unknown group 'everything'" in capsys.readouterr().err
    )


# -- every route and method has its group --------------------------------------------------


def test_every_http_route_belongs_to_a_group() -> None:
    app = create_app(GatewayOptions(nats_url="nats://127.0.0.1:1"))
    groups = {}
    for resource in app.router.resources():
        group = restricted.http_group(resource.canonical)
        assert group in restricted_api.GROUPS, resource.canonical
        groups[resource.canonical] = group
    assert groups["/v2/health/ready"] == "health"
    assert groups["/v2/models/{model}/versions/{version}/ready"] == "health"
    assert groups["/v2"] == "metadata"
    assert groups["/v2/models/{model}"] == "metadata"
    assert groups["/v2/models/{model}/config"] == "model-config"
    assert groups["/v2/models/{model}/versions/{version}/infer"] == "inference"
    assert groups["/v2/models/{model}/generate_stream"] == "inference"
    assert groups["/v2/ws"] == "inference"
    assert groups["/v2/repository/models/{model}/load"] == "model-repository"
    assert groups["/v2/models/stats"] == "statistics"
    assert groups["/v2/models/{model}/versions/{version}/stats"] == "statistics"
    assert groups["/v2/systemsharedmemory/region/{name}/register"] == "shared-memory"
    assert groups["/v2/cudasharedmemory/status"] == "shared-memory"
    assert groups["/v2/trace/setting"] == "trace"
    assert groups["/v2/models/{model}/trace/setting"] == "trace"
    assert groups["/v2/logging"] == "logging"


def test_every_grpc_method_belongs_to_a_group() -> None:
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {method.name for method in service.methods}
    assert methods == set(restricted.GRPC_GROUPS)
    assert set(restricted.GRPC_GROUPS.values()) == set(restricted_api.GROUPS)


# -- the HTTP check ------------------------------------------------------------------------


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _client(restrictions: list[str]) -> TestClient[web.Request, web.Application]:
    app = web.Application(middlewares=[restricted.restricted_middleware(restricted_api.http(restrictions))])
    app.router.add_get("/v2/health/live", _ok)
    app.router.add_post("/v2/models/{model}/infer", _ok)
    app.router.add_get("/v2/ws", _ok)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def test_a_restricted_route_needs_its_header_and_the_others_do_not() -> None:
    async def run() -> list[tuple[int, Any]]:
        client = await _client(["inference:Infer-Key=s3cret"])
        seen = []
        try:
            for method, path, headers in [
                ("POST", "/v2/models/m/infer", {}),
                ("POST", "/v2/models/m/infer", {"infer-key": "wrong"}),
                ("GET", "/v2/ws", {}),
                ("POST", "/v2/models/m/infer", {"INFER-KEY": "s3cret"}),
                ("GET", "/v2/health/live", {}),
                ("GET", "/v2/nothing", {}),
            ]:
                async with client.request(method, path, headers=headers) as response:
                    body = await response.text()
                    seen.append((response.status, json.loads(body) if response.status == 403 else body))
        finally:
            await client.close()
        return seen

    refused = {"error": "This API is restricted, expecting header 'Infer-Key'"}
    assert asyncio.run(run()) == [
        (403, refused),
        (403, refused),
        (403, refused),
        (200, "ok"),
        (200, "ok"),
        (404, "404: Not Found"),
    ]


# -- uploaded code -------------------------------------------------------------------------


def _files(*names: str) -> dict[str, Any]:
    return {f"file:{name}": base64.b64encode(b"x").decode() for name in names}


@pytest.mark.parametrize(
    "params",
    [
        _files("1/model.py"),
        _files("1/model.onnx", "1/helpers/util.py"),
        _files("1/libcustom.so"),
        _files("1/libcustom.so.2.1"),
        _files("1/Model.PY"),
        _files("1/__pycache__/model.cpython-311.pyc"),
        {**_files("1/weights.bin"), "config": json.dumps({"backend": "python"})},
    ],
)
def test_a_load_with_code_is_refused_unless_allowed(params: dict[str, Any]) -> None:
    app = web.Application()
    with pytest.raises(restricted.Forbidden, match="--allow-code-upload") as exc:
        restricted.check_upload(app, "http", "m", params)
    assert exc.value.status == 403
    assert "--http-restricted-api=model-repository:<key>=<value>" in exc.value.message
    app[restricted.ACCESS] = restricted.AccessPolicy(allow_code_upload=True)
    restricted.check_upload(app, "http", "m", params)


@pytest.mark.parametrize(
    "params",
    [
        {},
        _files("1/model.onnx"),
        _files("1/model.pt", "1/model.plan", "1/notes.python"),
        {"config": json.dumps({"backend": "python"})},  # the repository's own files: not uploaded
        {**_files("1/model.onnx"), "config": "{not json"},  # the router answers that one
    ],
)
def test_a_load_without_code_passes(params: dict[str, Any]) -> None:
    restricted.check_upload(web.Application(), "http", "m", params)


def test_a_restricted_model_repository_allows_code_on_that_protocol_only() -> None:
    app = web.Application()
    app[restricted.ACCESS] = restricted.AccessPolicy(
        grpc=restricted_api.grpc(["model-repository:admin=x"]),
        http=restricted_api.http(["inference:admin=x"]),
    )
    restricted.check_upload(app, "grpc", "m", _files("1/model.py"))
    with pytest.raises(restricted.Forbidden):
        restricted.check_upload(app, "http", "m", _files("1/model.py"))


def test_a_refused_load_is_permission_denied_over_grpc() -> None:
    from gateway.grpc_service import status_code

    assert status_code(restricted.Forbidden.status) == grpc.StatusCode.PERMISSION_DENIED


# -- the fast path -------------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.written: list[bytes] = []
        self.eof = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def can_write_eof(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # no socket: the fast path skips its look at the TCP state

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass


class Handed(asyncio.Protocol):
    """aiohttp's side, as the fast path sees it: what it was handed."""

    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


def _fast(
    limits: ConnectionLimits | None = None, restriction: Restriction | None = None, handed_over: int = 0
) -> tuple[fastpath.FastPath, list[Handed]]:
    handed: list[Handed] = []

    def aiohttp_side() -> asyncio.Protocol:
        handed.append(Handed())
        return handed[-1]

    owner = fastpath.FastPath(
        None,  # type: ignore[arg-type]  # nothing here reaches the app
        aiohttp_side,
        1 << 20,
        limits,
        restriction=restriction,
        handed_over=lambda: handed_over,
    )
    return owner, handed


def _connect(owner: fastpath.FastPath) -> tuple[fastpath.FastConnection, FakeTransport]:
    conn = owner()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


INFER_HEAD = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"


def test_an_infer_request_without_the_restricted_header_goes_to_aiohttp() -> None:
    async def run() -> tuple[bytes, bool]:
        owner, handed = _fast(restriction=Restriction("infer-key", "s3cret", "infer-key"))
        conn, _ = _connect(owner)
        request = INFER_HEAD + b"Infer-Key: wrong\r\n\r\n{}{}"
        conn.data_received(request)
        return handed[0].data if handed else b"", conn in owner.connections

    data, still_fast = asyncio.run(run())
    assert data == INFER_HEAD + b"Infer-Key: wrong\r\n\r\n{}{}"  # the whole request, from its first byte
    assert not still_fast


def test_an_infer_request_with_the_restricted_header_stays_on_the_fast_path() -> None:
    async def run() -> tuple[int, bool, bool]:
        owner, handed = _fast(restriction=Restriction("infer-key", "s3cret", "infer-key"))
        conn, _ = _connect(owner)
        conn.data_received(INFER_HEAD + b"INFER-KEY: s3cret\r\n\r\n{}{}")
        queued = conn._task is not None
        if conn._task is not None:
            conn._task.cancel()
        return len(handed), queued, conn in owner.connections

    assert asyncio.run(run()) == (0, True, True)


def test_a_connection_over_the_cap_is_answered_503_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.connections.REFUSAL_LINGER_S", 0.05)

    async def run() -> tuple[bool, bool, bytes, bool, bool]:
        owner, _ = _fast(ConnectionLimits(max_connections=3), handed_over=1)
        first, second = owner.accept(), owner.accept()
        for protocol in (first, second):
            protocol.connection_made(FakeTransport())  # type: ignore[arg-type]
        third = owner.accept()
        transport = FakeTransport()
        third.connection_made(transport)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        return (
            isinstance(first, fastpath.FastConnection) and isinstance(second, fastpath.FastConnection),
            isinstance(third, RefusedConnection),
            b"".join(transport.written),
            transport.eof,
            transport.closed,
        )

    fast, refused, written, eof, closed = asyncio.run(run())
    assert fast and refused and eof and closed
    head, _, body = written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nConnection: close" in head
    assert "its limit (--http-max-connections)" in json.loads(body)["error"]


def test_a_head_sent_a_byte_at_a_time_is_closed_after_the_read_timeout() -> None:
    async def run() -> tuple[bool, bool]:
        owner, _ = _fast(ConnectionLimits(keepalive_timeout_s=30, request_read_timeout_s=0.3))
        conn, transport = _connect(owner)
        for byte in INFER_HEAD[:12]:
            conn.data_received(bytes([byte]))
            await asyncio.sleep(0.05)
        before = transport.closed  # 0.6 s since the connection opened, 0.6 s of trickle
        await asyncio.sleep(0.3)
        return before, transport.closed

    before, after = asyncio.run(run())
    # Closed within the read timeout of the first byte, although bytes kept coming.
    assert before and after


def test_a_body_that_keeps_coming_stays_and_one_that_stalls_is_closed() -> None:
    async def run() -> tuple[bool, bool]:
        owner, _ = _fast(ConnectionLimits(keepalive_timeout_s=30, request_read_timeout_s=0.3))
        conn, transport = _connect(owner)
        conn.data_received(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(8):  # 0.8 s of body, a byte every 0.1 s: slow, never stalled
            await asyncio.sleep(0.1)
            conn.data_received(b"x")
        alive = not transport.closed
        await asyncio.sleep(0.6)
        return alive, transport.closed

    assert asyncio.run(run()) == (True, True)


def test_an_idle_connection_waits_the_keepalive_timeout_not_the_read_timeout() -> None:
    async def run() -> tuple[bool, bool]:
        owner, _ = _fast(ConnectionLimits(keepalive_timeout_s=0.6, request_read_timeout_s=0.1))
        _, transport = _connect(owner)
        await asyncio.sleep(0.3)
        before = transport.closed
        await asyncio.sleep(0.6)
        return before, transport.closed

    assert asyncio.run(run()) == (False, True)


# -- the connection cap within the open-files limit ----------------------------------------


def test_the_cap_is_lowered_to_what_the_open_files_limit_allows(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    from natron.cli import services

    limits = {"now": (1024, 2048)}
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: limits.update(now=value))
    settings = parse(["gateway", "--http-max-connections", "5000", "--http-keepalive-timeout-s", "9"])
    got = services.connection_limits(settings)  # type: ignore[arg-type]
    # Raised to the hard limit, and the cap lowered to fit under it, with a warning.
    assert limits["now"] == (2048, 2048)
    assert got == ConnectionLimits(keepalive_timeout_s=9, request_read_timeout_s=30, max_connections=1984)
    assert "taking 1984 connections, not --http-max-connections 5000" in caplog.text
    limits["now"] = (100, 100_000)
    assert services.connection_limits(settings).max_connections == 5000  # type: ignore[arg-type]
    assert limits["now"] == (5064, 100_000)
