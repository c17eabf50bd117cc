"""Idle and slow clients against a real `natron serve` (gateway/connections.py): hundreds of
connections that send nothing, half a request head, or half a body, on the infer fast path and
on connections handed to aiohttp, plus raw connections to the gRPC port, do not stop a normal
client, and the gateway closes every one of them once its timeout has passed (short timeouts
here, set by flags). Past --http-max-connections a new connection is answered 503 and closed."""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.harness import Served, natron_serve, wait_until

pytestmark = [pytest.mark.mesh, pytest.mark.timeout(300)]

KEEPALIVE_S = 4
READ_TIMEOUT_S = 2
# How long every connection may take to be closed: well past both timeouts (not a hang).
CLOSED_WITHIN_S = 60.0

BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
).encode()
INFER_HEAD = (
    b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
)
HEALTH = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"

# How many connections of each kind: 1,900 in all, within the file limit raised below.
KINDS = {
    "idle": 800,  # connected, nothing sent (fast path: keep-alive timeout)
    "half head": 400,  # part of an infer request's head (fast path: read timeout)
    "half body": 300,  # an infer head and part of its body (fast path: read timeout)
    "aiohttp idle": 100,  # a health request answered, then nothing (aiohttp: keep-alive)
    "aiohttp half head": 100,  # then part of a head (aiohttp: keep-alive)
    "aiohttp half body": 100,  # then a load request's head and part of its body (read timeout)
    "grpc silent": 100,  # the gRPC port, nothing sent (grpc core: handshake timeout)
}


@pytest.fixture(scope="module", autouse=True)
def enough_files() -> Iterator[None]:
    """This process's soft limit on open files, raised for the connections (and put back)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = sum(KINDS.values()) + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit on open files ({hard}) is below the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def short(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    args = (
        "--model-control-mode", "explicit", "--load-model", "tiny",
        "--http-keepalive-timeout-s", str(KEEPALIVE_S), "--http-request-read-timeout-s", str(READ_TIMEOUT_S),
    )  # fmt: skip
    with natron_serve(model_repository, ["tiny"], tmp_path_factory.mktemp("idle"), args) as served:
        yield served


def address(host_port: str) -> tuple[str, int]:
    host, port = host_port.split(":")
    return host, int(port)


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer to a request on `sock` (blocking), Content-Length framed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before the answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def open_kind(kind: str, http: tuple[str, int], grpc: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(grpc if kind.startswith("grpc") else http, timeout=30)
    if kind.startswith("aiohttp"):
        sock.sendall(HEALTH)  # not an infer request: the connection is aiohttp's from now on
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
    if kind.endswith("half head"):
        sock.sendall(INFER_HEAD[:40])
    elif kind == "half body":
        sock.sendall(INFER_HEAD + BODY[:10])
    elif kind == "aiohttp half body":
        sock.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    sock.setblocking(False)
    return sock


def wait_all_closed(socks: dict[socket.socket, str], within_s: float) -> dict[str, int]:
    """Until the server has closed every socket (EOF or reset); what is still open, by kind."""
    open_ = dict(socks)
    with selectors.DefaultSelector() as selector:
        for sock in open_:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within_s
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset: closed too
                    data = b""
                if not data:
                    selector.unregister(sock)
                    open_.pop(sock)
    left: dict[str, int] = {}
    for kind in open_.values():
        left[kind] = left.get(kind, 0) + 1
    return left


def test_idle_and_half_sent_connections_are_closed_and_do_not_stop_a_normal_client(short: Served) -> None:
    http, grpc = address(short.host_port), address(short.grpc_url)
    socks: dict[socket.socket, str] = {}
    try:
        for kind, count in KINDS.items():
            for _ in range(count):
                socks[open_kind(kind, http, grpc)] = kind
        # A normal client meanwhile: HTTP on one kept-alive connection, and gRPC.
        with requests.Session() as session:
            for value in range(20):
                body = {
                    "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [value] * 16}]
                }
                answer = session.post(f"{short.url}/v2/models/tiny/infer", json=body, timeout=30)
                assert answer.status_code == 200, answer.text
                assert answer.json()["outputs"][0]["data"] == [2.0 * value + 1] * 16
            assert session.get(f"{short.url}/v2/models/tiny/ready", timeout=30).status_code == 200
        client = grpcclient.InferenceServerClient(short.grpc_url)
        try:
            assert client.is_model_ready("tiny")
        finally:
            client.close()
        assert wait_all_closed(socks, CLOSED_WITHIN_S) == {}
    finally:
        for sock in socks:
            sock.close()
    # The gateway serves on as before.
    assert requests.post(f"{short.url}/v2/models/tiny/infer", data=BODY, timeout=30).status_code == 200


def test_a_slow_body_that_keeps_coming_is_read_to_the_end(short: Served) -> None:
    """The read timeout bounds a stall, not a body's whole transfer: a body sent over three
    read timeouts, a few bytes at a time, is answered."""
    with socket.create_connection(address(short.host_port), timeout=30) as sock:
        sock.sendall(INFER_HEAD)
        pieces = [BODY[i : i + len(BODY) // 12 + 1] for i in range(0, len(BODY), len(BODY) // 12 + 1)]
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(READ_TIMEOUT_S * 3 / len(pieces))
        assert read_answer(sock).startswith(b"HTTP/1.1 200")


@pytest.fixture(scope="module")
def capped(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    args = ("--model-control-mode", "explicit", "--load-model", "tiny", "--http-max-connections", "40")
    with natron_serve(model_repository, ["tiny"], tmp_path_factory.mktemp("capped"), args) as served:
        yield served


def ask(http: tuple[str, int]) -> tuple[bytes, bytes]:
    """An infer request on a new connection: the answer's head and body (read to the end)."""
    with socket.create_connection(http, timeout=30) as sock:
        sock.sendall(INFER_HEAD + BODY)
        data = b""
        while b"\r\n\r\n" not in data or (data.startswith(b"HTTP/1.1 503") and not data.endswith(b"}")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return head, body


def test_past_the_connection_cap_a_new_connection_is_answered_503_and_closed(capped: Served) -> None:
    http = address(capped.host_port)
    held: list[socket.socket] = []
    try:
        for _ in range(40):
            held.append(socket.create_connection(http, timeout=30))
        head, body = wait_until(
            lambda: (answer := ask(http))[0].startswith(b"HTTP/1.1 503") and answer,
            30,
            "a connection over the cap refused",
        )
        assert b"\r\nConnection: close" in head
        assert "its limit (--http-max-connections)" in json.loads(body)["error"]
        # The refused connection was closed by the server: it read to EOF above.
        for sock in held[:5]:
            sock.close()
        head, _ = wait_until(
            lambda: (answer := ask(http))[0].startswith(b"HTTP/1.1 200") and answer,
            30,
            "a connection taken again below the cap",
        )
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()


def test_past_the_cap_grpc_takes_no_new_connection(capped: Served) -> None:
    grpc_address = address(capped.grpc_url)
    held = [socket.create_connection(grpc_address, timeout=30) for _ in range(40)]
    try:
        refused = None
        client = grpcclient.InferenceServerClient(capped.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as exc:
                client.is_server_live(client_timeout=5)
            refused = exc.value.status()
        finally:
            client.close()
        assert refused in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"), refused
        for sock in held[:5]:
            sock.close()

        def live() -> bool:
            again = grpcclient.InferenceServerClient(capped.grpc_url)
            try:
                return bool(again.is_server_live(client_timeout=5))
            finally:
                again.close()

        assert wait_until(live, 30, "a gRPC connection taken again below the cap")
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
