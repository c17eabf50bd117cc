"""Streaming and many-requests-per-connection endpoints: Triton's generate extension
(`/generate`, and `/generate_stream` as Server-Sent Events) and natron's WebSocket.

WebSocket framing (documented in docs/streaming.md):
- a request is a text frame holding a KServe v2 infer request plus `"id"` (required, the
  client's correlation key), `"model"` and optionally `"version"`; or a binary frame: a 4-byte
  little-endian length N, N bytes of that JSON, then the binary tensor data as in Triton's
  binary extension (`binary_data_size` on inputs);
- `{"id": ..., "cancel": true}` cancels that request;
- each answer is a text frame with the KServe v2 response plus `"id"`, `"sequence"` (0, 1, ...)
  and `"final"`; when outputs go binary, a binary frame with the same 4-byte-length layout;
- an error is `{"id", "error", "status", "final": true}`; the socket stays open.
A decoupled model answers 0..N times, the last with `"final": true`; others once.
Closing the socket cancels everything still running for it.

On shutdown no stream is cut without a last frame: a WebSocket takes no new request (503), its
requests in flight get the drain time to finish, then it closes with code 1001 (going away); an
SSE stream still running at the end of the drain time ends with a last event
`{"error": ..., "status": 503}`.

Each request is traced as the infer route's are (gateway/tracing.py), when the trace settings
sample it: the trace ends once its last answer was sent, or with its error. A WebSocket's
requests carry on the W3C trace context of the request that opened the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from gateway import admission, kserve
from gateway.infer import trace_headers, utf8_headers
from gateway.keys import OPTIONS, REGISTRY, REQUESTER
from gateway.middleware import json_object, unexpected_error
from gateway.tracing import TRACER, RequestTraces
from natron import datatypes
from natron.errors import InvalidArgument, NatronError
from natron.inference import InferResponse

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_SHUTTING_DOWN = "the server is shutting down"
# A client that does not answer our close frame is not waited for longer than this.
_CLOSE_TIMEOUT_S = 2.0


@dataclass(slots=True)
class _OpenStreams:
    """The WebSockets and SSE streams open now, so that shutdown can end each with a last frame."""

    drain_timeout_s: float
    sockets: set[_Socket] = field(default_factory=set)
    sse: set[asyncio.Timeout] = field(default_factory=set)
    # Loop time by which streams end; set when shutdown begins.
    deadline: float | None = None


_STREAMS: web.AppKey[_OpenStreams] = web.AppKey("open-streams", _OpenStreams)


async def _on_shutdown(app: web.Application) -> None:
    """aiohttp calls this once the listening sockets are closed, before it waits for handlers:
    each stream learns the deadline here and ends itself by then."""
    streams = app[_STREAMS]
    streams.deadline = asyncio.get_running_loop().time() + streams.drain_timeout_s
    for timeout in streams.sse:
        timeout.reschedule(streams.deadline)
    for socket in streams.sockets:
        socket.shut_down(streams.deadline)


def _received_ns(app: web.Application) -> int:
    """Now, for a trace's receive timestamps, while tracing is on (0 otherwise: untraced
    requests read no clock)."""
    return time.time_ns() if app[TRACER].active else 0


def _end(traced: list[RequestTraces], status: int, error: str | None = None) -> None:
    """The request's trace, when it has one, ends (written to the trace file, or exported)."""
    for trace in traced:
        trace.end(status, error)


async def _answers(
    request: web.Request,
    model: str,
    version: str,
    parsed: kserve.ParsedInfer,
    traced: list[RequestTraces],
    kind: str,
    received_ns: int = 0,
    read_ns: int = 0,
) -> AsyncGenerator[InferResponse, None]:
    """Every answer of one request, decoupled model or not. When the trace settings sample it,
    its trace goes into `traced` (the caller ends it once the last answer was sent) and is
    `answered` when the final answer comes in; `kind`: the path, for the span."""
    view = request.app[REGISTRY].get(model)
    target = view.resolve(version)
    spec = view.spec
    if spec is None:
        raise InvalidArgument(f"model '{model}' has no valid config")
    spec.validate(parsed.request)
    options = request.app[OPTIONS]
    # The queue policy as on the infer route: the priority level, the deadline, and a refusal
    # at once when the level's queue is full (gateway/admission.py).
    queue = admission.queueing(spec.scheduling, parsed.request, parsed.timeout_us, options.default_timeout_s)
    waiting = request.app[admission.ADMISSION].admit(spec, target, queue, parsed.request.id)
    if waiting is not None:
        await waiting
    # The W3C trace context travels on to the worker: the gateway's span's when this request
    # is sampled, else the client's as it came.
    # Header bytes that are not UTF-8 are the client's mistake (a 400), as on the infer route.
    header = utf8_headers(request.headers.get)
    trace = request.app[TRACER].begin(
        model,
        target,
        parsed.request.id,
        header,
        received_ns=received_ns,
        read_ns=read_ns,
        client_request_id=parsed.request.id,
        kind=kind,
    )
    if trace is not None:
        traced.append(trace)
        headers = trace.headers or None
    else:
        headers = trace_headers(header) or None
    requester = request.app[REQUESTER]
    parsed.request.version = target
    if spec.decoupled:
        # With the final flag, to mark when the last answer came in; the worker's timestamps
        # come with its final answer.
        async with contextlib.aclosing(
            requester.stream_marked(
                parsed.request,
                target,
                queue.timeout_s,
                headers,
                queue.subject_level,
                timestamps=None if trace is None else trace.timestamps,
            )
        ) as marked:
            async for answer, final in marked:
                if final and trace is not None:
                    trace.answered()
                if answer.outputs or not final:
                    yield answer
    else:
        answer = await requester.infer(
            parsed.request,
            target,
            queue.timeout_s,
            headers=headers,
            level=queue.subject_level,
            timestamps=None if trace is None else trace.timestamps,
        )
        if trace is not None:
            trace.answered()
        yield answer


# -- generate ------------------------------------------------------------------------------


def _generate_body(request: web.Request, raw: bytes, model: str, version: str) -> kserve.ParsedInfer:
    """Triton's generate request (a flat JSON object, one key per input) as an infer request."""
    view = request.app[REGISTRY].get(model)
    spec = view.spec
    if spec is None:
        raise InvalidArgument(f"model '{model}' has no valid config")
    body = json_object(raw, "generate")
    inputs = []
    for name, value in body.items():
        if name in ("parameters", "id"):
            continue
        tensor = spec.inputs.get(name)
        if tensor is None:
            expected = sorted(spec.inputs)
            raise InvalidArgument(
                f"unexpected generate input '{name}' for model '{model}', expected one of {expected}"
            )
        data = value if isinstance(value, list) else [value]
        shape = ([1] if spec.batching else []) + [len(data)]
        inputs.append({"name": name, "datatype": tensor.datatype, "shape": shape, "data": data})
    infer_body: dict[str, Any] = {"inputs": inputs}
    if "parameters" in body:
        infer_body["parameters"] = body["parameters"]
    if "id" in body:
        infer_body["id"] = body["id"]
    return kserve.parse_infer_doc(
        infer_body, memoryview(b""), model, version, limits=request.app[OPTIONS].limits
    )


def _flat_outputs(answer: InferResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": answer.model, "model_version": answer.version}
    if answer.id:
        out["id"] = answer.id
    for tensor in answer.outputs:
        values = tensor.data.ravel().tolist()
        if tensor.datatype == datatypes.BYTES:
            values = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in values]
        elif tensor.datatype in datatypes.BINARY_ONLY:
            values = [float(v) for v in tensor.data.astype("float32").ravel()]
        out[tensor.name] = values[0] if len(values) == 1 else values
    return out


async def generate(request: web.Request) -> web.Response:
    model, version = request.match_info["model"], request.match_info.get("version", "")
    received_ns = _received_ns(request.app)
    raw = await request.read()
    read_ns = time.time_ns() if received_ns else 0
    parsed = _generate_body(request, raw, model, version)
    traced: list[RequestTraces] = []
    status, error = 500, None
    try:
        stream = _answers(request, model, version, parsed, traced, "generate", received_ns, read_ns)
        answers = [a async for a in stream if a.outputs]
        if len(answers) != 1:
            raise InvalidArgument(
                f"model '{model}' sent {len(answers)} responses: generate takes exactly one, "
                "use generate_stream"
            )
        body = orjson.dumps(_flat_outputs(answers[0]))
        status = 200
        return web.Response(body=body, content_type="application/json")
    except NatronError as exc:
        status, error = exc.status, exc.message
        raise
    except asyncio.CancelledError:
        status, error = 499, "cancelled by the client"
        raise
    finally:
        _end(traced, status, error)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    model, version = request.match_info["model"], request.match_info.get("version", "")
    received_ns = _received_ns(request.app)
    raw = await request.read()
    read_ns = time.time_ns() if received_ns else 0
    parsed = _generate_body(request, raw, model, version)
    traced: list[RequestTraces] = []
    # How the stream ended, for its trace: its last event, or the error before any.
    status, error = 500, None
    stream = _answers(request, model, version, parsed, traced, "generate_stream", received_ns, read_ns)
    try:
        # The first answer (or error) decides the status: errors before it are plain HTTP errors.
        first = await anext(stream, None)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        streams = request.app[_STREAMS]
        try:
            # No deadline until shutdown begins; then the stream has until the drain's end.
            async with asyncio.timeout_at(streams.deadline) as timeout:
                streams.sse.add(timeout)
                try:
                    if first is not None:
                        await response.write(b"data: " + orjson.dumps(_flat_outputs(first)) + b"\n\n")
                    async for answer in stream:
                        await response.write(b"data: " + orjson.dumps(_flat_outputs(answer)) + b"\n\n")
                finally:
                    streams.sse.discard(timeout)
                    await stream.aclose()  # a client gone mid-stream cancels the request
            status = 200
        except NatronError as exc:
            status, error = exc.status, exc.message
            await response.write(
                b"data: " + orjson.dumps({"error": exc.message, "status": exc.status}) + b"\n\n"
            )
        except TimeoutError:
            if streams.deadline is None:
                raise
            status, error = 503, _SHUTTING_DOWN
            await response.write(b"data: " + orjson.dumps({"error": _SHUTTING_DOWN, "status": 503}) + b"\n\n")
        await response.write_eof()
        return response
    except NatronError as exc:
        status, error = exc.status, exc.message
        raise
    except asyncio.CancelledError:
        status, error = 499, "cancelled by the client"
        raise
    except Exception as exc:
        # A status set already stands: the stream was answered (its error event or its last
        # answer) before the client went away.
        if status == 500:
            error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _end(traced, status, error)


# -- WebSocket -----------------------------------------------------------------------------


class _Socket:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self._request = request
        self._ws = ws
        self._send_lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        # Set on shutdown: closes the socket once its requests finish or the drain ends. The
        # handler awaits it before returning.
        self.closer: asyncio.Task[None] | None = None

    def shut_down(self, deadline: float) -> None:
        """Take no new request; close with 1001 once those in flight are done, or at `deadline`."""
        if self.closer is None:
            self.closer = asyncio.create_task(self._close_when_done(deadline), name="websocket-close")

    async def _close_when_done(self, deadline: float) -> None:
        running = list(self.tasks.values())
        if running:
            await asyncio.wait(running, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        # The handler's loop then ends; requests still running are cancelled there.
        await self._ws.close(code=WSCloseCode.GOING_AWAY, message=_SHUTTING_DOWN.encode())

    async def send_json(self, data: dict[str, Any]) -> None:
        # Answer headers hold numpy arrays for JSON outputs: serialised natively, not as lists.
        async with self._send_lock:
            await self._ws.send_str(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY).decode())

    async def send_binary(self, header: dict[str, Any], chunks: list[Any]) -> None:
        head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
        async with self._send_lock:
            await self._ws.send_bytes(b"".join([_LEN.pack(len(head)), head, *chunks]))

    async def start(self, raw: bytes, header_length: int | None) -> None:
        """Begin one request (a task of its own), or act on a cancel frame."""
        try:
            head = orjson.loads(raw[:header_length] if header_length is not None else raw)
        except orjson.JSONDecodeError as exc:
            await self.send_json({"error": f"frame is not valid JSON: {exc}", "status": 400, "final": True})
            return
        if not isinstance(head, dict) or not isinstance(head.get("id"), str) or not head["id"]:
            await self.send_json(
                {"error": "every frame needs a non-empty string 'id'", "status": 400, "final": True}
            )
            return
        request_id = head["id"]
        if head.get("cancel") is True:
            task = self.tasks.get(request_id)
            if task is not None:
                task.cancel()
            return
        if request_id in self.tasks:
            error = "a request with this id is still running"
            await self.send_json({"id": request_id, "error": error, "status": 400, "final": True})
            return
        if self.closer is not None:
            await self.send_json({"id": request_id, "error": _SHUTTING_DOWN, "status": 503, "final": True})
            return
        task = asyncio.create_task(self._run(request_id, head, raw, header_length))
        self.tasks[request_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(request_id, None))

    async def _run(
        self, request_id: str, head: dict[str, Any], raw: bytes, header_length: int | None
    ) -> None:
        # The frame is in whole: its receive timestamps are both now.
        received_ns = _received_ns(self._request.app)
        traced: list[RequestTraces] = []
        status, error = 500, None  # how it ended, for its trace
        sequence = 0
        try:
            model = head.pop("model", None)
            version = head.pop("version", "") or ""
            if not isinstance(model, str) or not isinstance(version, str):
                raise InvalidArgument("'model' (and 'version', if given) must be strings")
            binary = memoryview(raw)[header_length:] if header_length is not None else memoryview(b"")
            limits = self._request.app[OPTIONS].limits
            parsed = kserve.parse_infer_doc(head, binary, model, version, limits=limits)
            answers = _answers(
                self._request, model, version, parsed, traced, "websocket", received_ns, received_ns
            )
            async for answer in answers:
                header, chunks = kserve.infer_response_doc(answer, parsed, request_id)
                header.update({"id": request_id, "sequence": sequence, "final": False})
                sequence += 1
                if not chunks:
                    await self.send_json(header)
                else:
                    await self.send_binary(header, chunks)
            await self.send_json({"id": request_id, "sequence": sequence, "final": True})
            status = 200
        except NatronError as exc:
            status, error = exc.status, exc.message
            await self.send_json(
                {"id": request_id, "error": exc.message, "status": exc.status, "final": True}
            )
        except asyncio.CancelledError:
            status, error = 499, "cancelled"
            with contextlib.suppress(Exception):
                await self.send_json({"id": request_id, "error": "cancelled", "status": 499, "final": True})
            raise
        except Exception as exc:  # never take the socket down for one request
            error = unexpected_error(exc, f"websocket request {request_id}")
            await self.send_json(
                {
                    "id": request_id,
                    "error": error,
                    "status": 500,
                    "final": True,
                }
            )
        finally:
            _end(traced, status, error)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    # Every request on the socket takes the upgrade's trace context: a header that is not
    # UTF-8 refuses the upgrade with a 400, rather than each request after it.
    trace_headers(utf8_headers(request.headers.get))
    ws = web.WebSocketResponse(
        max_msg_size=request.app[OPTIONS].max_body_bytes, heartbeat=30, timeout=_CLOSE_TIMEOUT_S
    )
    await ws.prepare(request)
    socket = _Socket(request, ws)
    streams = request.app[_STREAMS]
    streams.sockets.add(socket)
    if streams.deadline is not None:  # opened while shutdown began
        socket.shut_down(streams.deadline)
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await socket.start(message.data.encode(), None)
            elif message.type == WSMsgType.BINARY:
                data: bytes = message.data
                if len(data) < 4 or _LEN.unpack_from(data)[0] > len(data) - 4:
                    await socket.send_json(
                        {
                            "error": "binary frame needs a 4-byte JSON length and that JSON",
                            "status": 400,
                            "final": True,
                        }
                    )
                    continue
                length = _LEN.unpack_from(data)[0]
                await socket.start(data[4:], length)
            elif message.type == WSMsgType.ERROR:
                break
    finally:
        streams.sockets.discard(socket)
        # The client is gone: everything still running for it is cancelled.
        tasks = list(socket.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if socket.closer is not None:
            with contextlib.suppress(Exception):
                await socket.closer
    return ws


def add_routes(app: web.Application, drain_timeout_s: float = 20.0) -> None:
    """The streaming routes; on shutdown, open streams end within `drain_timeout_s`."""
    app[_STREAMS] = _OpenStreams(drain_timeout_s)
    app.on_shutdown.append(_on_shutdown)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_post(base + "/generate", generate)
        app.router.add_post(base + "/generate_stream", generate_stream)
    app.router.add_get("/v2/ws", websocket)
