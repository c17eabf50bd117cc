"""A bounded fuzz of the gateway's HTTP layer: raw bytes over a socket to a real `natron serve`.

Hypothesis writes requests from parts that are each plausible or broken (methods, paths,
headers with bytes that are not UTF-8, huge values, bad Content-Length, Content-Encoding that
does not decode, chunked framing and garbage, bodies of malformed JSON, wrong types, deep
nesting, binary tensor data with a wrong Inference-Header-Content-Length), aimed at both of the
gateway's HTTP layers: a plain `POST .../infer` with a Content-Length body is served by the
fast path (gateway/fastpath.py), anything else by aiohttp.

Every request that is complete as HTTP framing goes gets an answer with a status line, and no
answer is a 500. A request whose framing promises more than it sends (a Content-Length past
the bytes given) may be closed unanswered once the client closes its side, but is never a 500.
Examples per test come from the Hypothesis profile (tests/conftest.py): about 40 s in all with
the default one, ten times more with NATRON_HYPOTHESIS_PROFILE=thorough.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import zlib
from dataclasses import dataclass, field

import pytest
import requests
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.harness import Served

pytestmark = pytest.mark.mesh

_SCALE = 10 if os.environ.get("NATRON_HYPOTHESIS_PROFILE") == "thorough" else 1
_FUZZ = settings(
    max_examples=1500 * _SCALE,
    deadline=None,
    # The session's `served` fixture is shared on purpose: one gateway takes every example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_ANSWER_TIMEOUT_S = 20.0

TINY = {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}

# -- parts -------------------------------------------------------------------------------------

_INFER_PATHS = [
    b"/v2/models/tiny/infer",
    b"/v2/models/tiny/versions/1/infer",
    b"/v2/models/simple/infer",
    b"/v2/models/identity_bytes/infer",
    b"/v2/models/identity_fp32/infer",
    b"/v2/models/broken/infer",
    b"/v2/models/ensemble_simple/infer",
]
_OTHER_PATHS = [
    b"/v2/health/live",
    b"/v2/health/ready",
    b"/v2",
    b"/v2/models/tiny",
    b"/v2/models/tiny/config",
    b"/v2/models/tiny/ready",
    b"/v2/models/tiny/stats",
    b"/v2/models/tiny/generate",
    b"/v2/models/tiny/generate_stream",
    b"/v2/repository/index",
    b"/v2/repository/models/tiny/load",
    b"/v2/repository/models/tiny/unload",
    b"/v2/systemsharedmemory/status",
    b"/v2/systemsharedmemory/region/r/register",
    b"/v2/cudasharedmemory/status",
    b"/v2/trace/setting",
    b"/v2/logging",
    b"/v2/models/%ff%fe/infer",
    b"/v2/models/" + b"a" * 300 + b"/infer",
    b"/v2/models/tiny/infer?x=1",
    b"/v2/models/tiny/versions/99999999999999999999/infer",
    b"/../../etc/passwd",
    b"*",
]
# What HTTP calls a token: header names and methods.
_TOKEN = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
paths = st.one_of(
    st.sampled_from(_INFER_PATHS),
    st.sampled_from(_OTHER_PATHS),
    st.binary(min_size=1, max_size=40).map(
        lambda b: b"/" + b.replace(b" ", b"_").replace(b"\r", b"").replace(b"\n", b"")
    ),
)
methods = st.one_of(
    st.sampled_from([b"POST"] * 6 + [b"GET", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"]),
    st.text(_TOKEN, min_size=1, max_size=10).map(str.encode),
)
versions = st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/9"])

# Header values: plausible, not UTF-8, huge, or full of odd bytes (no CR/LF: those would end
# the header line and are framing, chosen separately).
odd_values = st.one_of(
    st.sampled_from([b"", b" ", b"\xff\xfe", b"00-\xc3\x28-01", b"\x80" * 10, b"\xed\xa0\x80", b"\t"]),
    st.binary(max_size=64).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.integers(1, 70_000).map(lambda n: b"v" * n),
)
header_length_values = st.one_of(
    st.sampled_from(
        [b"0", b"-1", b"abc", b"\xd9\xa1\xd9\xa2", b"1_0", b"99999999999999999999999", b"+5", b" 7 "]
    ),
    st.integers(0, 1000).map(lambda n: str(n).encode()),
)
extra_headers = st.lists(
    st.one_of(
        st.tuples(
            st.just(b"Content-Type"),
            st.sampled_from([b"application/json", b"application/octet-stream", b"text/plain", b"\xff"]),
        ),
        st.tuples(st.just(b"Inference-Header-Content-Length"), header_length_values),
        st.tuples(st.sampled_from([b"traceparent", b"tracestate"]), odd_values),
        st.tuples(st.just(b"Connection"), st.sampled_from([b"keep-alive", b"close", b"upgrade", b"\xff"])),
        st.tuples(st.just(b"Expect"), st.sampled_from([b"100-continue", b"nonsense"])),
        st.tuples(st.just(b"Upgrade"), st.sampled_from([b"websocket", b"h2c"])),
        st.tuples(st.sampled_from([b"X-Odd", b"User-Agent", b"Accept-Encoding"]), odd_values),
        st.tuples(st.text(_TOKEN, min_size=1, max_size=20).map(str.encode), odd_values),
    ),
    max_size=4,
)


def _infer_doc(draw: st.DrawFn) -> object:
    """A JSON document near a valid infer request: some of its parts wrong."""
    tensor: dict[str, object] = dict(TINY)
    for key, values in (
        ("name", st.sampled_from(["INPUT0", "", "NOPE", "\u0000", "x" * 500])),
        ("shape", st.sampled_from([[1, 16], [16], [], [-1], [2**62, 2**62], [1, 0], "x", [1.5], [True]])),
        ("datatype", st.sampled_from(["FP32", "BYTES", "INT8", "BOOL", "FP16", "BF16", "", "FP99", 7])),
        ("data", st.sampled_from([[1.0] * 16, [], ["a"] * 16, [[1.0] * 16], [None], 3, {"a": 1}, [1e309]])),
    ):
        if draw(st.booleans()) and draw(st.booleans()):
            tensor[key] = draw(values)
    if draw(st.booleans()) and draw(st.booleans()):
        tensor.pop(draw(st.sampled_from(["name", "shape", "datatype", "data"])), None)
    if draw(st.booleans()) and draw(st.booleans()):
        tensor["parameters"] = draw(
            st.sampled_from(
                [
                    {"binary_data_size": 64},
                    {"binary_data_size": -1},
                    {"shared_memory_region": "nope", "shared_memory_byte_size": 64},
                    {"shared_memory_offset": 3},
                    "x",
                ]
            )
        )
    doc: dict[str, object] = {"inputs": draw(st.sampled_from([[tensor], [tensor, tensor], [], "x", [1]]))}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.sampled_from(
                [
                    [{"name": "OUTPUT0"}],
                    [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}],
                    [{"name": f"O{i}"} for i in range(5000)],
                    [{"name": "OUTPUT0", "parameters": {"classification": 3, "binary_data": True}}],
                    [{"name": "OUTPUT0", "parameters": {"classification": "x"}}],
                    [7],
                    {},
                ]
            )
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(
            st.sampled_from(
                [
                    {"timeout": 0},
                    {"timeout": 10**30},
                    {"priority": -1},
                    {"triton_x": 1},
                    {"a": [1]},
                    {"binary_data_output": True},
                ]
            )
        )
    if draw(st.booleans()) and draw(st.booleans()):
        doc["id"] = draw(st.sampled_from([7, "", "x" * 10_000, None]))
    return doc


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["infer", "infer", "infer", "binary", "deep", "garbage", "json", "empty"]))
    if kind == "infer":
        return json.dumps(_infer_doc(draw)).encode()
    if kind == "binary":
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 64},
                    }
                ]
            }
        ).encode()
        return header + draw(st.binary(min_size=0, max_size=80))
    if kind == "deep":
        depth = draw(st.sampled_from([64, 1023, 1025, 5000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": '
            + (opener * depth + "1" + closer * depth).encode()
            + b"}]}"
        )
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(
            draw(
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10,
                )
            )
        ).encode()
    return b""


@dataclass(slots=True)
class Request:
    raw: bytes
    complete: bool  # its framing holds every byte it announces: it must be answered
    notes: list[str] = field(default_factory=list)


def _chunked(body: bytes, garbage: bytes | None) -> bytes:
    if garbage is not None:
        return garbage
    out = b""
    for start in range(0, len(body), 50):
        piece = body[start : start + 50]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


@st.composite
def http_requests(draw: st.DrawFn, infer_only: bool = False) -> Request:
    method = b"POST" if infer_only else draw(methods)
    path = draw(st.sampled_from(_INFER_PATHS)) if infer_only else draw(paths)
    version = b"HTTP/1.1" if infer_only else draw(versions)
    body = draw(bodies())
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"fuzz")]
    headers += draw(extra_headers)
    encoding = draw(
        st.sampled_from([None] * 6 + ["gzip", "deflate", "br", "identity", "gzip-bad", "x-unknown"])
    )
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    if encoding is not None:
        headers.append((b"Content-Encoding", encoding.removesuffix("-bad").encode()))
    complete = True
    framing = draw(
        st.sampled_from(
            ["length"] * 8 + ["chunked", "chunked-garbage", "none", "short", "long", "bad", "twice"]
        )
    )
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = _chunked(body, None)
    elif framing == "chunked-garbage":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = _chunked(
            body,
            draw(st.sampled_from([b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nabcdefgh\r\n0\r\n\r\n", b"-1\r\n\r\n"])),
        )
    elif framing == "short":  # fewer bytes announced: the rest reads as a next request
        headers.append((b"Content-Length", str(max(0, len(body) - 3)).encode()))
    elif framing == "long":  # more announced than sent: the server waits for bytes that never come
        headers.append((b"Content-Length", str(len(body) + 10).encode()))
        complete = False
    elif framing == "bad":
        headers.append(
            (
                b"Content-Length",
                draw(st.sampled_from([b"abc", b"-5", b"1e3", b"\xff", b"99999999999999999999999"])),
            )
        )
    elif framing == "twice":
        headers += [(b"Content-Length", str(len(body)).encode()), (b"Content-Length", b"1")]
    if method == b"HEAD" or version not in (b"HTTP/1.1", b"HTTP/1.0"):
        complete = False  # a HEAD answer, or a version aiohttp refuses: an answer is still checked when given
    order = draw(st.permutations(headers))
    head = b"%s %s %s\r\n" % (method, path, version) + b"".join(b"%s: %s\r\n" % pair for pair in order)
    return Request(head + b"\r\n" + body, complete, [f"framing={framing}", f"encoding={encoding}"])


# -- sending ---------------------------------------------------------------------------------


def send(served: Served, request: Request) -> bytes | None:
    """The first line of the answer, or None when the server closed without one."""
    host, port = served.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=_ANSWER_TIMEOUT_S) as sock:
        sock.sendall(request.raw)
        if not request.complete:
            sock.shutdown(socket.SHUT_WR)  # nothing more comes: the server must not wait for ever
        answer = b""
        while True:
            line, found, _ = answer.partition(b"\r\n")
            if found and not line.startswith(b"HTTP/1.1 100 "):
                return line
            if found and b"\r\n\r\n" in answer:  # past the interim 100 Continue
                answer = answer.split(b"\r\n\r\n", 1)[1]
                continue
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            answer += chunk


def check(served: Served, request: Request) -> None:
    note(repr(request.raw[:2000]))
    note(", ".join(request.notes))
    line = send(served, request)
    if line is None:
        event("closed unanswered")
        assert not request.complete, "the connection closed without an answer"
        return
    assert line.startswith(b"HTTP/1."), line
    status = int(line.split(b" ")[1])
    event(f"status {status}")
    assert status != 500, line


@_FUZZ
@given(request=http_requests())
def test_any_request_gets_an_answer_and_never_a_500(served: Served, request: Request) -> None:
    check(served, request)


@_FUZZ
@given(request=http_requests(infer_only=True))
def test_any_infer_request_on_either_http_layer_gets_an_answer_and_never_a_500(
    served: Served, request: Request
) -> None:
    check(served, request)


@pytest.fixture(scope="module", autouse=True)
def log_start(served: Served) -> int:
    """Where the serve log stood before this module's requests."""
    return served.output.stat().st_size


def test_the_gateway_still_serves_after_the_fuzz_and_logged_no_internal_error(
    served: Served, log_start: int
) -> None:
    assert requests.get(f"{served.url}/v2/health/live", timeout=10).status_code == 200
    response = requests.post(f"{served.url}/v2/models/tiny/infer", json={"inputs": [TINY]}, timeout=30)
    assert response.status_code == 200, response.text
    with served.output.open("rb") as log:
        log.seek(log_start)
        assert b"internal error" not in log.read()
