"""OpenTelemetry for natron's processes: spans exported over OTLP/HTTP as the trace settings'
opentelemetry options say (natron/tracesettings.py), and the W3C trace context (`traceparent`,
`tracestate`) that joins a gateway's span, a worker's and a client's into one trace.

OpenTelemetry is optional (the `natron[otel]` extra): without it `available()` is False, the
gateway refuses `trace_mode` opentelemetry with OTEL_MISSING, and nothing here is imported.
Each process builds its own TracerProvider (never the global one, which belongs to whoever
embeds natron); its BatchSpanProcessor exports from a thread of its own, so the event loop never
waits on the collector.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any, Final

from natron.tracesettings import OPENTELEMETRY, TraceSettings

log = logging.getLogger(__name__)

OTEL_MISSING: Final = (
    "trace_mode opentelemetry needs the natron[otel] extra (pip install 'natron[otel]'): "
    "opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http are not installed"
)
TRACE_HEADERS: Final = ("traceparent", "tracestate")


def available() -> bool:
    """Whether the natron[otel] extra is installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
    )


def resource_attributes(text: str) -> dict[str, str]:
    """The `resource` option, "key=value[,key=value...]" (already checked), as attributes."""
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {key: value for key, _, value in pairs}


class SpanExport:
    """A TracerProvider exporting over OTLP/HTTP as `config` (the opentelemetry options) says.
    Build it with `SpanExport.build` (it needs the extra); `shutdown` flushes and blocks, so
    an event loop calls it in a thread."""

    def __init__(self, config: Mapping[str, str], provider: Any) -> None:
        self.config = dict(config)
        self._provider = provider
        self._tracer = provider.get_tracer("natron")

    @classmethod
    def build(cls, config: Mapping[str, str], service_name: str) -> SpanExport:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        resource = Resource.create({"service.name": service_name, **resource_attributes(config["resource"])})
        # The trace settings decide what is traced (a gateway samples, a worker follows it), so
        # every span started is recorded: a client's unsampled context is traced too, as Triton
        # traces every request that carries one.
        provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=config["url"]),
                max_queue_size=int(config["bsp_max_queue_size"]),
                schedule_delay_millis=float(config["bsp_schedule_delay"]),
                max_export_batch_size=int(config["bsp_max_export_batch_size"]),
            )
        )
        log.info("exporting trace spans to %s", config["url"])
        return cls(config, provider)

    def start_span(
        self,
        name: str,
        parent: Mapping[str, str] | None,
        attributes: Mapping[str, str | int],
        *,
        server: bool,
        start_ns: int | None = None,
    ) -> Any:
        """A started span, the child of the W3C context in `parent` (headers, lowercase names)
        when it holds a valid one, else the root of a new trace."""
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = TraceContextTextMapPropagator().extract(dict(parent)) if parent else None
        return self._tracer.start_span(
            name,
            context=context,
            kind=SpanKind.SERVER if server else SpanKind.INTERNAL,
            attributes=dict(attributes),
            start_time=start_ns,
        )

    def shutdown(self) -> None:
        self._provider.shutdown()


def context_headers(span: Any) -> dict[str, str]:
    """The W3C trace context of `span`, as the headers that carry it to the next process."""
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier


def end_span(span: Any, error: str | None, end_ns: int | None = None) -> None:
    """End `span`, marked failed with `error` when there is one."""
    from opentelemetry.trace import Status, StatusCode

    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)


def valid_parent(headers: Mapping[str, str]) -> bool:
    """Whether `headers` carry a valid W3C trace context (a client's propagated span)."""
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract(dict(headers))
    return bool(get_current_span(context).get_span_context().is_valid)


def sampled_parent(headers: Mapping[str, str]) -> bool:
    """Whether `headers` carry a valid W3C trace context whose caller sampled the trace: a
    worker records spans for such requests only (the gateway decided)."""
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = get_current_span(TraceContextTextMapPropagator().extract(dict(headers))).get_span_context()
    return bool(context.is_valid and context.trace_flags.sampled)


class ProcessSpans:
    """One process's span export as the deployment's trace settings say: on while any scope
    traces in the opentelemetry mode, built anew when the options change. `update` runs on the
    event loop; a replaced export flushes in a thread of its own."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name
        self.export: SpanExport | None = None
        self._closed = False
        self._retiring: set[asyncio.Future[None]] = set()

    def update(self, settings: TraceSettings) -> None:
        if self._closed:
            return
        scopes = [settings.effective(None), *(settings.effective(m) for m in settings.models)]
        wanted = any(s.on and s.mode == OPENTELEMETRY for s in scopes)
        if self.export is not None and (not wanted or self.export.config != dict(settings.trace_config)):
            self._retire(self.export)
            self.export = None
        if wanted and self.export is None:
            if not available():
                log.warning("trace settings ask for spans, but %s", OTEL_MISSING)
                return
            try:
                self.export = SpanExport.build(settings.trace_config, self.service_name)
            except Exception:  # the settings were checked; a failure here is the SDK's
                log.exception("cannot export trace spans to %s", settings.trace_config.get("url"))

    def child(self, name: str, headers: Mapping[str, str], attributes: Mapping[str, str | int]) -> Any:
        """A started span, the child of the sampled trace context in `headers`; None when this
        process exports no spans or the request is not traced."""
        export = self.export
        if export is None or "traceparent" not in headers or not sampled_parent(headers):
            return None
        return export.start_span(name, headers, attributes, server=False)

    async def close(self) -> None:
        """Stop exporting and flush what was recorded (bounded by the exporter's timeouts)."""
        self._closed = True
        if self.export is not None:
            self._retire(self.export)
            self.export = None
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def _retire(self, export: SpanExport) -> None:
        done = asyncio.get_running_loop().run_in_executor(None, export.shutdown)
        self._retiring.add(done)
        done.add_done_callback(self._retiring.discard)
