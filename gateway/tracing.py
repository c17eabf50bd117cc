"""Which inference requests the gateway traces, and their spans (the trace extension's
opentelemetry mode).

A request is traced when its model's trace settings (natron/tracesettings.py) have a level on
and the opentelemetry mode, and either its client sent a W3C trace context (always traced, as
Triton does, its span a child of the client's) or the sampler picks it: every `trace_rate`-th
request of the settings' scope, until `trace_count` traces were taken (-1: no end; a rate of 0
takes none, so only the clients' traces are). Counting is per gateway process: with several
gateways, each takes up to `trace_count`.

The gateway's span ("InferRequest", as Triton names its root span) covers the request from
parsing to answer; its context travels to the worker in the request's `traceparent` and
`tracestate` headers, so the worker's spans join the same trace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from natron import tracing
from natron.tracesettings import OPENTELEMETRY, Effective, TraceSettings

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

    def end(self, status: int, error: str | None = None) -> None:
        self._span.set_attribute("http.response.status_code", status)
        tracing.end_span(self._span, error if error is not None else (None if status < 400 else str(status)))


class GatewayTracer:
    """The gateway's trace settings as last followed, its samplers, and its span export."""

    def __init__(self) -> None:
        self.settings = TraceSettings()
        self.spans = tracing.ProcessSpans(SERVICE_NAME)
        self._counters: dict[str, _Counter] = {}
        # Whether any scope traces now: the hot path's one check while tracing is off.
        self._active = False

    def update(self, settings: TraceSettings) -> None:
        """Follow new settings: the export starts, changes or stops as they say."""
        self.settings = settings
        self.spans.update(settings)
        self._active = self.spans.export is not None

    async def close(self) -> None:
        """Stop tracing and flush what was traced."""
        self._active = False
        await self.spans.close()

    def remaining(self, settings: TraceSettings, model: str | None) -> int | None:
        """The traces still to be sampled in the scope of `model`'s `settings`, where this
        gateway counted any under them."""
        effective = settings.effective(model)
        counter = self._counters.get(effective.scope)
        return counter.remaining if counter is not None and counter.epoch == effective.count_epoch else None

    def begin(self, model: str, version: str, request_id: str, header: HeaderLookup) -> RequestTrace | None:
        """A trace for this request, or None when it is not traced."""
        export = self.spans.export
        if not self._active or export is None:
            return None
        settings = self.settings.effective(model)
        if not settings.on or settings.mode != OPENTELEMETRY:
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
        span = export.start_span(
            "InferRequest", parent if propagated else None, attributes, server=True, start_ns=time.time_ns()
        )
        return RequestTrace(span)

    def _counter(self, settings: Effective) -> _Counter:
        counter = self._counters.get(settings.scope)
        if counter is None or counter.epoch != settings.count_epoch:
            counter = self._counters[settings.scope] = _Counter(settings.count_epoch, settings.count)
        return counter


TRACER: web.AppKey[GatewayTracer] = web.AppKey("tracer", GatewayTracer)
