"""Triton's restricted API groups (--http-restricted-api, --grpc-restricted-protocol) and the
refusal of uploaded code, against a real `natron serve`: every group's routes over HTTP (the
infer fast path, aiohttp's routes, the WebSocket and SSE streams) and its methods over gRPC
(tritonclient, as users call them) refused without the header, served with it."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from broker.server import free_ports
from tests.harness import Served, natron_serve, wait_until

pytestmark = [pytest.mark.mesh, pytest.mark.timeout(180)]

INFER = {"Infer-Key": "s3cret"}
# A value may hold ':' and '=': the groups end at the first ':', the key at the first '='.
ADMIN = {"admin-key": "ad:min=1"}
GRPC_INFER = {"triton-grpc-protocol-infer-key": "s3cret"}
GRPC_ADMIN = {"triton-grpc-protocol-admin-key": "ad:min=1"}
HTTP_REFUSED_INFER = "This API is restricted, expecting header 'Infer-Key'"
HTTP_REFUSED_ADMIN = "This API is restricted, expecting header 'admin-key'"


@pytest.fixture(scope="module")
def restricted(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # HTTP health stays open: the harness waits for readiness on it. gRPC restricts it.
    args = (
        "--model-control-mode", "explicit", "--load-model", "tiny",
        "--http-restricted-api=inference,model-config:Infer-Key=s3cret",
        "--http-restricted-api",
        "metadata,model-repository,shared-memory,statistics,trace,logging:admin-key=ad:min=1",
        "--grpc-restricted-protocol=health,inference:infer-key=s3cret",
        "--grpc-restricted-protocol=model-repository,logging:admin-key=ad:min=1",
    )  # fmt: skip
    with natron_serve(model_repository, ["tiny"], tmp_path_factory.mktemp("restricted"), args) as served:
        yield served


def tiny_body(value: float = 1.0) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [value] * 16}]}


# Every HTTP group but health, by a route of it: (method, path, body, headers that open it).
ROUTES = [
    ("POST", "/v2/models/tiny/infer", tiny_body(), INFER),
    ("POST", "/v2/models/tiny/versions/1/infer", tiny_body(), INFER),
    ("POST", "/v2/models/tiny/generate", {"INPUT0": [1.0] * 16}, INFER),
    ("POST", "/v2/models/tiny/generate_stream", {"INPUT0": [1.0] * 16}, INFER),
    ("GET", "/v2/models/tiny/config", None, INFER),
    ("GET", "/v2", None, ADMIN),
    ("GET", "/v2/models/tiny", None, ADMIN),
    ("POST", "/v2/repository/index", {}, ADMIN),
    ("GET", "/v2/systemsharedmemory/status", None, ADMIN),
    ("GET", "/v2/cudasharedmemory/status", None, ADMIN),
    ("GET", "/v2/models/stats", None, ADMIN),
    ("GET", "/v2/models/tiny/stats", None, ADMIN),
    ("GET", "/v2/trace/setting", None, ADMIN),
    ("GET", "/v2/logging", None, ADMIN),
]


@pytest.mark.parametrize(("method", "path", "body", "headers"), ROUTES)
def test_a_restricted_route_is_refused_without_its_header_and_served_with_it(
    restricted: Served, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    expected = HTTP_REFUSED_INFER if headers is INFER else HTTP_REFUSED_ADMIN
    url = restricted.url + path
    for sent in ({}, {name: "wrong" for name in headers}, INFER if headers is ADMIN else ADMIN):
        answer = requests.request(method, url, json=body, headers=sent, timeout=30)
        assert answer.status_code == 403, (sent, answer.text)
        assert answer.json() == {"error": expected}
    answer = requests.request(method, url, json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text


def test_an_open_group_needs_no_header(restricted: Served) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready"):
        assert requests.get(restricted.url + path, timeout=10).status_code == 200


def test_header_names_are_case_blind_and_values_exact(restricted: Served) -> None:
    url = f"{restricted.url}/v2/models/tiny/infer"
    assert (
        requests.post(url, json=tiny_body(), headers={"INFER-KEY": "s3cret"}, timeout=30).status_code == 200
    )
    assert (
        requests.post(url, json=tiny_body(), headers={"Infer-Key": "S3CRET"}, timeout=30).status_code == 403
    )


def raw_request(body: bytes, extra: str = "") -> bytes:
    return (
        "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """One response off `sock` (Content-Length framed); what follows stays in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buffer += data
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    head_end = len(head) + 4
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    while len(buffer) < head_end + length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buffer += data
    body = bytes(buffer[head_end : head_end + length])
    del buffer[: head_end + length]
    return int(head.split(b" ")[1]), body


def test_the_infer_fast_path_checks_the_header_on_every_request_of_a_connection(restricted: Served) -> None:
    body = json.dumps(tiny_body(2.0)).encode()
    host, port = restricted.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        buffer = bytearray()
        # Pipelined: allowed (the fast path), refused (aiohttp, which then keeps the connection),
        # allowed again (aiohttp, with the header).
        sock.sendall(
            raw_request(body, "infer-key: s3cret\r\n")
            + raw_request(body)
            + raw_request(body, "Infer-Key: s3cret\r\n")
        )
        first, second, third = (read_response(sock, buffer) for _ in range(3))
    assert first[0] == 200 and json.loads(first[1])["outputs"][0]["data"] == [5.0] * 16
    assert second == (403, json.dumps({"error": HTTP_REFUSED_INFER}, separators=(",", ":")).encode())
    assert third[0] == 200


async def test_the_websocket_is_inference(restricted: Served) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await session.ws_connect(f"{restricted.url}/v2/ws")
        assert exc.value.status == 403
        async with session.ws_connect(f"{restricted.url}/v2/ws", headers=INFER) as ws:
            assert not ws.closed


def test_tritonclient_http_passes_the_header_as_users_do(restricted: Served) -> None:
    client = httpclient.InferenceServerClient(restricted.host_port)
    try:
        tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.full((1, 16), 3.0, dtype=np.float32))
        with pytest.raises(InferenceServerException, match="expecting header 'Infer-Key'"):
            client.infer("tiny", [tensor])
        result = client.infer("tiny", [tensor], headers=INFER)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 7.0, dtype=np.float32))
        assert client.is_server_live()
    finally:
        client.close()


# -- gRPC ------------------------------------------------------------------------------------


def grpc_refused(call: Any, header: str) -> None:
    with pytest.raises(InferenceServerException) as exc:
        call()
    assert exc.value.status() == "StatusCode.PERMISSION_DENIED", exc.value
    assert exc.value.message() == f"This protocol is restricted, expecting header '{header}'"


def test_grpc_methods_need_the_prefixed_metadata(restricted: Served) -> None:
    client = grpcclient.InferenceServerClient(restricted.grpc_url)
    try:
        infer_key, admin_key = "triton-grpc-protocol-infer-key", "triton-grpc-protocol-admin-key"
        # The bare key is not Triton's header: refused like none at all.
        for headers in (None, {"infer-key": "s3cret"}, {infer_key: "nope"}):
            grpc_refused(lambda h=headers: client.is_server_live(headers=h), infer_key)
            grpc_refused(lambda h=headers: client.is_model_ready("tiny", headers=h), infer_key)
        assert client.is_server_live(headers=GRPC_INFER)
        assert client.is_model_ready("tiny", headers=GRPC_INFER)
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.full((1, 16), 1.0, dtype=np.float32))
        grpc_refused(lambda: client.infer("tiny", [tensor]), infer_key)
        result = client.infer("tiny", [tensor], headers=GRPC_INFER)
        assert result.as_numpy("OUTPUT0") is not None
        grpc_refused(lambda: client.get_model_repository_index(), admin_key)
        assert client.get_model_repository_index(headers=GRPC_ADMIN) is not None
        grpc_refused(lambda: client.get_log_settings(), admin_key)
        # Open on gRPC (restricted on HTTP only): metadata, config, statistics, shared memory.
        assert client.get_server_metadata().name == "natron"
        assert client.get_model_config("tiny").config.name == "tiny"
        assert client.get_inference_statistics("tiny") is not None
        assert client.get_system_shared_memory_status() is not None
    finally:
        client.close()


def test_a_grpc_stream_without_the_metadata_is_refused(restricted: Served) -> None:
    import tritonclient.grpc.service_pb2 as pb
    import tritonclient.grpc.service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="tiny")
    with grpc.insecure_channel(restricted.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.ModelStreamInfer(iter([request]), timeout=30))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "expecting header 'triton-grpc-protocol-infer-key'" in (exc.value.details() or "")


# -- uploaded code ---------------------------------------------------------------------------

PY_MODEL = b"class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"


def python_load_body(name: str) -> dict[str, Any]:
    config = {
        "name": name,
        "backend": "python",
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
    }
    return {
        "parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(PY_MODEL).decode()}
    }


def test_uploaded_code_is_refused_where_model_repository_is_open(served: Served) -> None:
    url = f"{served.url}/v2/repository/models/uploaded_py/load"
    answer = requests.post(url, json=python_load_body("uploaded_py"), timeout=60)
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert "'1/model.py'" in error and "--allow-code-upload" in error and "--http-restricted-api" in error
    # gRPC gets the same check, with PERMISSION_DENIED.
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as exc:
            client.load_model("uploaded_py", files={"file:1/lib/native.so": b"\x7fELF"})
        assert exc.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--grpc-restricted-protocol" in (exc.value.message() or "")
    finally:
        client.close()
    # Nothing was loaded.
    index = requests.post(f"{served.url}/v2/repository/index", json={}, timeout=30).json()
    assert "uploaded_py" not in {entry["name"] for entry in index}


def test_uploaded_code_is_taken_from_holders_of_the_model_repository_key(restricted: Served) -> None:
    url = f"{restricted.url}/v2/repository/models/uploaded_py/load"
    body = python_load_body("uploaded_py")
    assert requests.post(url, json=body, timeout=60).status_code == 403  # no key: the group's refusal
    answer = requests.post(url, json=body, headers=ADMIN, timeout=120)
    assert answer.status_code == 200, answer.text


def test_serve_checks_readiness_with_the_health_groups_header(model_repository: Path, tmp_path: Path) -> None:
    """With HTTP health restricted, `natron serve` sends the header in its own readiness check:
    it prints the model table once settled, not after --ready-timeout-s."""
    http_port, grpc_port, nats_port = free_ports(3)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "natron", "serve", str(model_repository),
                "--model-control-mode", "explicit", "--load-model", "tiny",
                "--http-port", str(http_port), "--http-address", "127.0.0.1", "--metrics-port", "0",
                "--grpc-port", str(grpc_port), "--grpc-address", "127.0.0.1", "--nats-port", str(nats_port),
                "--http-restricted-api=health:health-key=h", "--ready-timeout-s", "600",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        wait_until(lambda: requests.get(url, headers={"health-key": "h"}, timeout=2).ok, 120, "ready")
        answer = requests.get(url, timeout=10)
        assert answer.status_code == 403
        assert answer.json() == {"error": "This API is restricted, expecting header 'health-key'"}
        # Well before the 600 s readiness timeout: the table, not the warning.
        wait_until(lambda: "natron models" in log_path.read_text(errors="replace"), 120, "the model table")
        assert "did not settle" not in log_path.read_text(errors="replace")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
