"""Triton's trace extension: `GET|POST /v2/trace/setting` and
`GET|POST /v2/models/{model}/trace/setting` (docs/extensions.md).

The settings are the deployment's: a change is stored and broadcast through the broker
(broker/shared_settings.py, record `trace`) and every gateway follows them into its tracer
(gateway/tracing.py), which samples and exports the spans. `trace_count` in an answer is what
remains to be sampled in the answering gateway.

The gRPC service answers `TraceSetting` with `trace_setting_rpc`, over the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from aiohttp import web
from tritonclient.grpc import service_pb2 as pb

from broker import shared_settings
from gateway.keys import GATEWAY_TASKS, NATS, OPTIONS, REGISTRY
from gateway.middleware import json_object, json_response
from gateway.tracing import TRACER, GatewayTracer
from natron import tracesettings, tracing
from natron.errors import InternalError, InvalidArgument, NotFound
from natron.tracesettings import OPENTELEMETRY, TraceSettings

log = logging.getLogger(__name__)

TRACE = shared_settings.TRACE


def _check_model(app: web.Application, model: str | None) -> None:
    if model:
        try:
            app[REGISTRY].get(model)
        except NotFound:
            # Triton's answer for a model it does not serve: 400, in its words.
            raise InvalidArgument(f"Request for unknown model : {model}") from None


async def _stored(app: web.Application) -> TraceSettings:
    """The deployment's settings as this gateway applies them: with its own trace file, and its
    command line's defaults while none were set."""
    record = await shared_settings.read(app[NATS], app[OPTIONS].subjects, TRACE)
    if record is None:
        return app[TRACER].own(None)
    try:
        return app[TRACER].own(tracesettings.decode(record.value))
    except InvalidArgument as exc:  # the broker's record, not the caller's request
        raise InternalError(f"the stored trace settings are unreadable: {exc.message}") from None


async def get_trace_settings(app: web.Application, model: str | None = None) -> dict[str, str | list[str]]:
    """The trace settings of `model` (its own over the global ones), or the global ones, as
    `GET .../trace/setting` answers them."""
    _check_model(app, model)
    settings = await _stored(app)
    return settings.answer(model, app[TRACER].remaining(settings, model))


async def update_trace_settings(
    app: web.Application, model: str | None, changes: Mapping[str, object]
) -> dict[str, str | list[str]]:
    """Change the settings `changes` names (a `POST .../trace/setting` body), for `model` or
    globally, for the whole deployment, and answer them all. InvalidArgument (400) naming the
    key for a bad one, `trace_file`, an unknown model, or the opentelemetry mode without the
    natron[otel] extra; nothing changes then. Unavailable (503) when the broker cannot store
    them."""
    _check_model(app, model)
    parsed = tracesettings.parse_changes(changes, model)
    if parsed.get("trace_mode") == OPENTELEMETRY and not tracing.available():
        raise InvalidArgument(tracing.OTEL_MISSING)

    tracer = app[TRACER]

    def change(stored: bytes | None) -> bytes:
        # Never set: this gateway's defaults (its command line's) are what the change is to.
        base = tracer.own(None)
        if stored is not None:
            try:
                base = tracesettings.decode(stored)
            except InvalidArgument as exc:  # replaced, rather than failing every change for ever
                log.warning("replacing unreadable stored trace settings: %s", exc.message)
        # A trace file is each gateway's own: none is stored for the deployment.
        return tracesettings.encode(replace(base.updated(parsed, model), trace_file=""))

    # An empty request changes nothing, and stores nothing.
    record = await shared_settings.update(app[NATS], app[OPTIONS].subjects, TRACE, change) if parsed else None
    settings = await _stored(app) if record is None else tracer.own(tracesettings.decode(record.value))
    if record is not None:
        # At once here, so the answer and this gateway agree; the broadcast reaches the others.
        app[TRACER].update(settings)
        log.info("trace settings of %s changed (revision %d)", model or "the deployment", record.revision)
    return settings.answer(model, app[TRACER].remaining(settings, model))


# -- gRPC ----------------------------------------------------------------------------------


async def trace_setting_rpc(app: web.Application, request: Any) -> Any:
    """Triton's `TraceSetting` RPC: settings in the request change them (a setting with no
    value clears it), none reads them; `model_name` names the model, or none for the global
    ones. The answer holds them all (pb.TraceSettingResponse)."""
    model = request.model_name or None
    body = tracesettings.grpc_changes({key: list(value.value) for key, value in request.settings.items()})
    answer = await update_trace_settings(app, model, body) if body else await get_trace_settings(app, model)
    response = pb.TraceSettingResponse()
    for key, value in answer.items():
        response.settings[key].value.extend(value if isinstance(value, list) else [value])
    return response


# -- HTTP ----------------------------------------------------------------------------------


async def get_setting(request: web.Request) -> web.Response:
    return json_response(await get_trace_settings(request.app, request.match_info.get("model")))


async def post_setting(request: web.Request) -> web.Response:
    changes = json_object(await request.read(), "trace settings")
    return json_response(await update_trace_settings(request.app, request.match_info.get("model"), changes))


async def _tracer_ctx(app: web.Application) -> AsyncIterator[None]:
    tracer = app[TRACER]
    tracer.start()

    def apply(record: shared_settings.Record) -> None:
        tracer.update(tracesettings.decode(record.value))

    # An essential loop of the gateway: stopped with the others (GATEWAY_TASKS), after this
    # context closed the tracer (later updates are ignored then).
    follow = shared_settings.follow(app[NATS], app[OPTIONS].subjects, TRACE, apply)
    app[GATEWAY_TASKS].spawn(follow, "gateway-trace-settings")
    try:
        yield
    finally:
        await tracer.close()


def add_routes(app: web.Application) -> None:
    """The routes, the gateway's tracer (app[TRACER], for the infer paths) and its following of
    the settings (after the connection and the gateway's tasks are set up: call it after the
    app's cleanup contexts are in place)."""
    app[TRACER] = GatewayTracer(app[OPTIONS].trace)
    for base in ("/v2", "/v2/models/{model}"):
        app.router.add_get(base + "/trace/setting", get_setting)
        app.router.add_post(base + "/trace/setting", post_setting)
    app.cleanup_ctx.append(_tracer_ctx)
