"""Which inference requests the gateway traces: their spans (the trace extension's
opentelemetry mode) or their timestamps in the trace file (the triton mode).

A request is traced when its model's trace settings (natron/tracesettings.py) have a level on,
and the sampler picks it: every `trace_rate`-th request of the settings' scope, until
`trace_count` traces were taken (-1: no end; a rate of 0 takes none). Counting is per gateway
process: with several gateways, each takes up to `trace_count`.

opentelemetry: a request whose client sent a W3C trace context is always traced too (as Triton
does, its span a child of the client's). The gateway's span ("InferRequest", as Triton names
its root span) covers the request from parsing to answer; its context travels to the worker in
the request's `traceparent` and `tracestate` headers, so the worker's spans join the same trace.

triton: only with a trace file (`--trace-config triton,file=PATH`, gateway/tracefile.py). The
request carries the Natron-Trace header to the worker, whose answer carries its QUEUE_START and
COMPUTE_* timestamps (broker/subjects.py); the gateway adds its own (receive, REQUEST_START,
REQUEST_END, send) and writes the trace as Triton does. Every timestamp is wall-clock unix ns
(time.time_ns), the worker's from its own clock and QUEUE_START from the broker's (when
JetStream stored the request): across hosts, their clocks must be in sync (NTP), as for
Triton's OpenTelemetry traces. The TENSORS level writes the timestamps only.

Streams (generate, generate_stream, the WebSocket, gRPC ModelStreamInfer) are traced as one
request each: the span ends, and the trace is written, once the stream's last answer was sent;
REQUEST_END (and the send's start) is when its final answer came in. A decoupled model's worker
sends its timestamps with the final answer: COMPUTE_OUTPUT_START is when the model gave its first
response, COMPUTE_END its last (the final flag). A model that is not decoupled answers once,
with them.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from gateway.tracefile import TraceFile
from natron import tracing
from natron.tracesettings import OPENTELEMETRY, TRITON, Effective, TraceSettings

log = logging.getLogger(__name__)

HeaderLookup = Callable[[str], "str | None"]
SERVICE_NAME = "natron-gateway"


@dataclass(slots=True)
class _Counter:
    """Triton's sampling of one scope: every `rate`-th request, while traces remain."""

    epoch: int
    remaining: int  # -1: no end
    seen: int = 0

    def sample(self, rate: int) -> bool:
        if rate == 0 or self.remaining == 0:
            return False
        self.seen += 1
        if self.seen % rate:
            return False
        if self.remaining > 0:
            self.remaining -= 1
        return True


class RequestTrace:
    """One traced request: the headers that carry its context to the worker, and `end`."""

    __slots__ = ("_span", "headers")

    def __init__(self, span: Any) -> None:
        self._span = span
        self.headers = tracing.context_headers(span)

    # Where the worker's timestamps would go: none for a span (the worker makes its own).
    timestamps: list[int] | None = None

    def answered(self) -> None:
        """The answer is in (the span ends with `end`)."""

    def end(self, status: int, error: str | None = None) -> None:
        self._span.set_attribute("http.response.status_code", status)
        tracing.end_span(self._span, error if error is not None else (None if status < 400 else str(status)))


# The frontend's timestamp names in Triton's trace files, by protocol: receive start and end,
# send start and end. Triton's gRPC frontend names its receive GRPC_WAITREAD_*.
_FRONTEND = {
    "HTTP": ("HTTP_RECV_START", "HTTP_RECV_END", "HTTP_SEND_START", "HTTP_SEND_END"),
    "GRPC": ("GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "GRPC_SEND_START", "GRPC_SEND_END"),
}
# The worker's, in the order of the Natron-Timestamps header.
WORKER_TIMESTAMPS = (
    "QUEUE_START",
    "COMPUTE_START",
    "COMPUTE_INPUT_END",
    "COMPUTE_OUTPUT_START",
    "COMPUTE_END",
)


class TritonTrace:
    """One request traced in the triton mode: its timestamps, written to the trace file by
    `end`. `headers` (the client's W3C context, passed on as for any request) and
    `timestamps` (the list the requester fills with the worker's) go to the requester."""

    __slots__ = ("_answered_ns", "_file", "_received", "_record", "_started_ns", "headers", "timestamps")

    def __init__(
        self, file: TraceFile, record: dict[str, Any], received: tuple[int, int], headers: dict[str, str]
    ) -> None:
        self._file = file
        self._record = record
        self._received = received
        self._started_ns = time.time_ns()
        self._answered_ns = 0
        self.headers = headers
        self.timestamps: list[int] = []

    def answered(self) -> None:
        """The answer is in: REQUEST_END, and the send starts (encoding it)."""
        self._answered_ns = time.time_ns()

    def end(self, status: int, error: str | None = None) -> None:
        """The answer went to the HTTP (gRPC) layer, or the request failed: the trace goes to
        the file, with the timestamps it has (a failed request's lack the send, and the
        worker's when it did not run)."""
        end_ns = time.time_ns()
        recv_start, recv_end, send_start, send_end = _FRONTEND[self._record.pop("protocol")]
        stamps = [
            {"name": recv_start, "ns": self._received[0]},
            {"name": recv_end, "ns": self._received[1]},
            {"name": "REQUEST_START", "ns": self._started_ns},
        ]
        if len(self.timestamps) == len(WORKER_TIMESTAMPS):
            stamps += [
                {"name": n, "ns": ns} for n, ns in zip(WORKER_TIMESTAMPS, self.timestamps, strict=True)
            ]
        answered_ns = self._answered_ns or end_ns
        stamps.append({"name": "REQUEST_END", "ns": answered_ns})
        if self._answered_ns:
            stamps += [{"name": send_start, "ns": answered_ns}, {"name": send_end, "ns": end_ns}]
        self._file.submit({**self._record, "timestamps": stamps})


RequestTraces = RequestTrace | TritonTrace


class GatewayTracer:
    """The gateway's trace settings as last followed, its samplers, its span export and its
    trace file. `defaults`: the process's own settings (its command line's `--trace-config`),
    which apply until the deployment's are set over the API; its trace file is always its own."""

    def __init__(self, defaults: TraceSettings | None = None) -> None:
        self.defaults = defaults or TraceSettings()
        self.spans = tracing.ProcessSpans(SERVICE_NAME)
        self.file = TraceFile(self.defaults.trace_file) if self.defaults.trace_file else None
        self._counters: dict[str, _Counter] = {}
        self._ids = itertools.count(1)
        # Whether any scope traces now: the hot path's one check while tracing is off.
        self._active = False
        self.settings = self.defaults
        self._triton = False

    @property
    def active(self) -> bool:
        """Whether any request may be traced now (a request's receive times are read then)."""
        return self._active

    def own(self, stored: TraceSettings | None) -> TraceSettings:
        """The deployment's settings (None: never set) as this gateway applies them: its
        defaults, or the stored ones with its own trace file."""
        if stored is None:
            return self.defaults
        return replace(stored, trace_file=self.defaults.trace_file)

    def update(self, settings: TraceSettings) -> None:
        """Follow new settings: the export starts, changes or stops as they say."""
        self.settings = settings = self.own(settings)
        self.spans.update(settings)
        scopes = [settings.effective(None), *(settings.effective(m) for m in settings.models)]
        self._triton = self.file is not None and any(s.on and s.mode == TRITON for s in scopes)
        if self.file is not None:
            self.file.log_frequency = settings.log_frequency
        self._active = self.spans.export is not None or self._triton

    def start(self) -> None:
        """Apply the defaults (before any stored settings are followed)."""
        self.update(self.defaults)

    async def close(self) -> None:
        """Stop tracing and flush what was traced."""
        self._active = False
        await self.spans.close()
        if self.file is not None:
            await self.file.close()

    def remaining(self, settings: TraceSettings, model: str | None) -> int | None:
        """The traces still to be sampled in the scope of `model`'s `settings`, where this
        gateway counted any under them."""
        effective = settings.effective(model)
        counter = self._counters.get(effective.scope)
        return counter.remaining if counter is not None and counter.epoch == effective.count_epoch else None

    def begin(
        self,
        model: str,
        version: str,
        request_id: str,
        header: HeaderLookup,
        *,
        protocol: str = "HTTP",
        received_ns: int = 0,
        read_ns: int = 0,
        client_request_id: str = "",
        kind: str = "",
    ) -> RequestTraces | None:
        """A trace for this request, or None when it is not traced. `received_ns`, `read_ns`:
        when its handling began and its body was read (wall clock, read only while `active`;
        0: now), for the triton mode's trace; `client_request_id`: the id its client gave ("" for
        none); `kind`: the streaming path that carried it (the span's `request.kind`: generate,
        generate_stream, websocket, grpc_stream), "" for the infer paths."""
        if not self._active:
            return None
        settings = self.settings.effective(model)
        if not settings.on:
            return None
        if settings.mode == TRITON:
            if not self._triton or not self._counter(settings).sample(settings.rate):
                return None
            return self._triton_trace(
                model, version, client_request_id, header, protocol, received_ns, read_ns
            )
        export = self.spans.export
        if export is None or settings.mode != OPENTELEMETRY:
            return None
        parent = {name: value for name in tracing.TRACE_HEADERS if (value := header(name)) is not None}
        propagated = bool(parent) and tracing.valid_parent(parent)
        if not (self._counter(settings).sample(settings.rate) or propagated):
            return None
        attributes: dict[str, str | int] = {
            "model.name": model,
            "model.version": version,
            "request.id": request_id,
            "trace.level": ",".join(settings.level),
        }
        if kind:
            attributes["request.kind"] = kind
        span = export.start_span(
            "InferRequest", parent if propagated else None, attributes, server=True, start_ns=time.time_ns()
        )
        return RequestTrace(span)

    def _triton_trace(
        self,
        model: str,
        version: str,
        client_request_id: str,
        header: HeaderLookup,
        protocol: str,
        received_ns: int,
        read_ns: int,
    ) -> TritonTrace:
        assert self.file is not None
        received_ns = received_ns or time.time_ns()
        read_ns = max(read_ns, received_ns)
        record: dict[str, Any] = {
            "id": next(self._ids),
            "model_name": model,
            # A number, as Triton writes it (natron's versions are numbers).
            "model_version": int(version) if version.isdigit() else version,
            "protocol": protocol,
        }
        if client_request_id:
            record["request_id"] = client_request_id
        passed_on = {name: value for name in tracing.TRACE_HEADERS if (value := header(name)) is not None}
        return TritonTrace(self.file, record, (received_ns, read_ns), passed_on)

    def _counter(self, settings: Effective) -> _Counter:
        counter = self._counters.get(settings.scope)
        if counter is None or counter.epoch != settings.count_epoch:
            counter = self._counters[settings.scope] = _Counter(settings.count_epoch, settings.count)
        return counter


TRACER: web.AppKey[GatewayTracer] = web.AppKey("tracer", GatewayTracer)
