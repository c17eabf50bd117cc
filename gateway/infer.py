"""`POST /v2/models/{model}[/versions/{version}]/infer`: parse and check the body against the
model's spec, publish it through the requester, and encode the answer as the client asked."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway import admission, kserve
from gateway.keys import FLEET, METRICS, OPTIONS, REGISTRY, REQUESTER
from gateway.middleware import read_body
from gateway.sharedmemory import SHARED_MEMORY
from gateway.tracing import TRACER, RequestTraces
from natron.errors import InvalidArgument, NatronError, Unsupported
from natron.inference import InferRequest, InferResponse

log = logging.getLogger(__name__)

# Request ids for requests that came without one: unique per gateway process, far cheaper
# than uuid4 on the hot path.
_ID_PREFIX = f"gw{os.getpid():x}-"
_ids = itertools.count(1)

_TRACE_HEADERS = ("traceparent", "tracestate")


def utf8_headers(header: HeaderLookup) -> HeaderLookup:
    """`header`, refusing a value that is not UTF-8 with a 400 naming the header. Both HTTP
    layers decode header bytes as UTF-8 with surrogate escapes, so bytes that are not UTF-8
    show as lone surrogates, which no encoder downstream (NATS headers, logs) would take."""

    def lookup(name: str) -> str | None:
        value = header(name)
        if value is not None and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"header '{name}' is not valid UTF-8") from None
        return value

    return lookup


def new_request_id() -> str:
    """An id for a request that came without one (the wire needs one, for logs and cancels)."""
    return f"{_ID_PREFIX}{next(_ids)}"


def trace_headers(header: HeaderLookup) -> dict[str, str]:
    """The client's W3C trace context, which travels on to the worker."""
    return {key: value for key in _TRACE_HEADERS if (value := header(key)) is not None}


@dataclass(slots=True)
class InferAnswer:
    """A successful infer's HTTP body, and its JSON header's length when binary outputs
    follow it (the `Inference-Header-Content-Length` response header); None: all JSON."""

    body: bytes
    json_length: int | None


# The request's header lookup (case-insensitive) and its body, however the HTTP layer has them.
HeaderLookup = Callable[[str], "str | None"]
BodyReader = Callable[[], Awaitable[bytes]]


async def infer(request: web.Request) -> web.Response:
    """The aiohttp route; gateway/fastpath.py serves the same through `handle`."""
    answer = await handle(
        request.app,
        request.match_info["model"],
        request.match_info.get("version", ""),
        request.headers.get,
        lambda: read_body(request),
    )
    if answer.json_length is None:
        return web.Response(body=answer.body, content_type="application/json")
    return web.Response(
        body=answer.body,
        content_type="application/octet-stream",
        headers={kserve.HEADER_LENGTH_HEADER: str(answer.json_length)},
    )


async def handle(
    app: web.Application, model: str, version: str, header: HeaderLookup, read: BodyReader
) -> InferAnswer:
    """One infer, whatever carried it over HTTP: the answer, or the NatronError (or aiohttp's
    HTTPException, from reading the body) whose status the client gets. Counted and logged."""
    metrics = app[METRICS]
    header = utf8_headers(header)
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    status = 500
    names = ["-"]  # the request id for the log, once known
    traced: list[RequestTraces] = []  # its trace, when the trace settings sample it
    try:
        answer = await _infer(app, model, version, header, read, names, traced)
        status = 200
        return answer
    except NatronError as exc:
        status = exc.status
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client closed the connection; the requester told the worker
        raise
    finally:
        duration_s = loop.time() - started_s
        metrics.observe(model, version, status, duration_s)
        for trace in traced:
            trace.end(status)
        request_id = names[0]
        if status >= 500:
            log.warning("infer %s id=%s -> %d in %.2f ms", model, request_id, status, duration_s * 1e3)
        elif status == 499:
            log.info(
                "infer %s id=%s cancelled by the client after %.2f ms", model, request_id, duration_s * 1e3
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("infer %s id=%s -> %d in %.2f ms", model, request_id, status, duration_s * 1e3)


async def _infer(
    app: web.Application,
    model: str,
    version: str,
    header: HeaderLookup,
    read: BodyReader,
    names: list[str],
    traced: list[RequestTraces],
) -> InferAnswer:
    # When receiving started, for a trace (read only while tracing is on).
    tracer = app[TRACER]
    received_ns = time.time_ns() if tracer.active else 0
    view = app[REGISTRY].get(model)
    target = view.resolve(version)
    spec = view.spec
    if spec is None:
        raise Unsupported(f"model '{view.record.name}' has no valid config")
    if spec.decoupled:
        raise Unsupported(f"model '{spec.name}' is decoupled: use the generate_stream or WebSocket endpoints")
    header_length: int | None = None
    raw_length = header(kserve.HEADER_LENGTH_HEADER)
    if raw_length is not None:
        # ASCII digits only: int() would take "١٢", "1_0" and 4,000-digit numbers too.
        text = raw_length.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 19):
            raise InvalidArgument(
                f"{kserve.HEADER_LENGTH_HEADER} must be a non-negative integer, got {raw_length[:40]!r}"
            )
        header_length = int(text)
    body = await read()
    read_ns = time.time_ns() if received_ns else 0
    limits = app[OPTIONS].limits
    parsed = await app[SHARED_MEMORY].parse(
        lambda window: kserve.parse_infer_body(
            body,
            header_length,
            spec.name,
            target,
            window,
            limits=limits,
            max_inputs=len(spec.inputs),
            max_outputs=len(spec.outputs),
        )
    )
    rows = spec.validate(parsed.request)
    request_id = parsed.request.id
    if not request_id:
        # The wire needs an id for logs; the HTTP answer echoes only one the client gave.
        parsed.request.id = new_request_id()
    names[0] = parsed.request.id
    # The queue policy: the request's priority level, its deadline, and a refusal at once
    # when its level's queue is full.
    default_timeout_s = app[OPTIONS].default_timeout_s
    queue = admission.queueing(spec.scheduling, parsed.request, parsed.timeout_us, default_timeout_s)
    waiting = app[admission.ADMISSION].admit(spec, target, queue, request_id)
    if waiting is not None:
        await waiting
    # W3C trace context travels on to the worker, so its spans join the trace: the gateway's
    # own span's when the trace settings sample this request, else the client's as it came.
    request_trace = tracer.begin(
        model,
        target,
        parsed.request.id,
        header,
        received_ns=received_ns,
        read_ns=read_ns,
        client_request_id=request_id,
    )
    if request_trace is not None:
        traced.append(request_trace)
        trace = request_trace.headers
    else:
        trace = trace_headers(header)
    # Requests of a batching model may share a broker message with others of the same moment.
    requester = app[REQUESTER]

    def send(request: InferRequest) -> Awaitable[InferResponse]:
        return requester.infer(
            request,
            target,
            queue.timeout_s,
            headers=trace or None,
            rows=rows,
            max_rows=spec.max_rows,
            level=queue.subject_level,
            timestamps=request_trace.timestamps if request_trace is not None else None,
        )

    # Tensors in the client's shared memory go by reference when the model's workers share
    # this host (gateway/sharedmemory.py), else their bytes travel.
    response = await app[SHARED_MEMORY].infer(
        parsed.request,
        {name: target.window for name, target in parsed.shm_outputs.items()},
        view.record,
        app[FLEET].workers,
        send,
    )
    if request_trace is not None:
        request_trace.answered()
    out, json_length = kserve.encode_infer_response(response, parsed, request_id, batched=spec.batching)
    return InferAnswer(out, json_length)
