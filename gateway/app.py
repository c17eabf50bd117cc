"""The gateway: KServe v2 / Triton HTTP on aiohttp, turning each call into a NATS message.

It holds no model state of its own: the model view comes from the models KV bucket, and every
inference goes through the broker to whichever worker instance pulls it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from broker import auth, jetstream, recovery
from broker.requester import Requester
from broker.view import ModelRegistry
from gateway import answers, infer, logging_api, sharedmemory, stats, streaming, trace_api
from gateway.admission import admission_ctx
from gateway.fleet import FleetView
from gateway.health import not_ready_reason
from gateway.keys import (
    FLEET,
    GATEWAY_TASKS,
    METRICS,
    NATS,
    OPTIONS,
    REGISTRY,
    REQUESTER,
    GatewayOptions,
    model_view,
)
from gateway.metrics import GatewayMetrics
from gateway.middleware import error_response, errors_middleware, json_object, json_response
from gateway.restricted import ACCESS, AccessPolicy, check_upload, restricted_middleware
from natron.errors import InvalidArgument
from natron.tasks import EssentialTasks

log = logging.getLogger(__name__)

# -- health and metadata -------------------------------------------------------------------


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    reason = not_ready_reason(request.app)
    if reason is None:
        return web.Response(status=200)
    return error_response(503, reason)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(answers.server_metadata())


async def model_metadata(request: web.Request) -> web.Response:
    view, version = model_view(request)
    return json_response(answers.model_metadata(view, version))


async def model_ready(request: web.Request) -> web.Response:
    view, version = model_view(request)
    view.resolve(version)  # raises 404 / 503 with the reason
    return web.Response(status=200)


async def model_config(request: web.Request) -> web.Response:
    view, version = model_view(request)
    return json_response(answers.model_config(view, version))


async def repository_index(request: web.Request) -> web.Response:
    ready_only = json_object(await request.read(), "repository index").get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidArgument("'ready' must be a boolean")
    return json_response(answers.repository_index(request.app[REGISTRY], ready_only))


async def _control(request: web.Request, verb: str) -> web.Response:
    params = json_object(await request.read(), verb).get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be a JSON object")
    if verb == "load":
        check_upload(request.app, "http", request.match_info["model"], params)
    await answers.control(request.app, verb, request.match_info["model"], params)
    return web.Response(status=200)


async def load_model(request: web.Request) -> web.Response:
    return await _control(request, "load")


async def unload_model(request: web.Request) -> web.Response:
    return await _control(request, "unload")


# -- inference -----------------------------------------------------------------------------


# -- the app -------------------------------------------------------------------------------


# Each resource opens in a cleanup context of its own, so a startup that fails partway closes
# exactly what it opened, in reverse order: requester, broker-state watch, fleet view, model
# view, connection.


async def _connection_ctx(app: web.Application) -> AsyncIterator[None]:
    options = app[OPTIONS]
    nc = await jetstream.connect(
        options.nats_url,
        name="natron-gateway",
        auth=options.nats_auth,
        inbox_prefix=auth.private_inbox(options.subjects, "gateway"),
    )
    app[NATS] = nc
    try:
        await jetstream.ensure_stream(nc.jetstream(), options.subjects, options.storage)
        yield
    finally:
        await jetstream.close_connection(nc)


async def _model_view_ctx(app: web.Application) -> AsyncIterator[None]:
    options = app[OPTIONS]
    kv = await jetstream.ensure_bucket(app[NATS].jetstream(), options.subjects.models_bucket, options.storage)
    await app[REGISTRY].start(kv, recovery.reconnects_of(app[NATS]))
    try:
        yield
    finally:
        await app[REGISTRY].stop()


async def _fleet_view_ctx(app: web.Application) -> AsyncIterator[None]:
    options = app[OPTIONS]
    kv = await jetstream.ensure_bucket(
        app[NATS].jetstream(), options.subjects.workers_bucket, options.storage
    )
    await app[FLEET].start(kv, recovery.reconnects_of(app[NATS]))
    try:
        yield
    finally:
        await app[FLEET].stop()


# A request the broker kept across a reconnect is answered within this long after it, or given
# up with 503: its answer may have been sent while this gateway was away.
ANSWER_AFTER_RECONNECT_S = 10.0


async def _reassert(app: web.Application, lost: bool) -> None:
    """After a reconnect: the stream and buckets (this gateway may be the first service back
    after a broker that lost them); the views watch again by themselves. Requests the broker
    never took, or forgot with its state, are published again; none waits for its deadline
    for an answer that cannot come (broker/requester.py, recover_in_flight)."""
    options, js = app[OPTIONS], app[NATS].jetstream()
    await jetstream.ensure_stream(js, options.subjects, options.storage)
    subjects = options.subjects
    for bucket in (subjects.models_bucket, subjects.workers_bucket, sharedmemory.bucket_name(subjects)):
        await jetstream.ensure_bucket(js, bucket, options.storage)
    if REQUESTER not in app:
        return
    resent, ended = await app[REQUESTER].recover_in_flight(
        recovery.reconnects_of(app[NATS]).count, lost, ANSWER_AFTER_RECONNECT_S
    )
    if resent or ended:
        log.warning(
            "after the reconnect: %d request(s) published again, %d stream(s) ended with 503", resent, ended
        )


async def _broker_state_ctx(app: web.Application) -> AsyncIterator[None]:
    """After every reconnect, re-assert what the gateway needs (broker/recovery.py)."""
    app[GATEWAY_TASKS].spawn(
        recovery.reassert_after_reconnects(
            app[NATS], app[OPTIONS].subjects, "gateway", lambda lost: _reassert(app, lost)
        ),
        "gateway-reassert",
    )
    try:
        yield
    finally:
        await app[GATEWAY_TASKS].stop()


async def _requester_ctx(app: web.Application) -> AsyncIterator[None]:
    requester = Requester(app[NATS], app[OPTIONS].subjects)
    await requester.start()
    app[REQUESTER] = requester
    try:
        yield
    finally:
        await requester.close()


def essential_tasks(app: web.Application) -> tuple[EssentialTasks, ...]:
    """What the process's runner watches: a failure here ends the gateway."""
    return (app[REGISTRY].tasks, app[FLEET].tasks, app[GATEWAY_TASKS], app[sharedmemory.SHARED_MEMORY].tasks)


def create_app(
    options: GatewayOptions,
    drain_timeout_s: float = 20.0,
    metrics: GatewayMetrics | None = None,
    access: AccessPolicy | None = None,
) -> web.Application:
    """The gateway app; on shutdown, open streams get `drain_timeout_s` to finish their
    requests before they are closed with a last frame (gateway/streaming.py). `metrics`: where
    it counts its requests (by default, in this process alone). `access`: the restricted API
    groups and whether uploaded code is taken (gateway/restricted.py)."""
    access = access if access is not None else AccessPolicy()
    # The restriction check comes first: a refused request is answered before anything else.
    middlewares = [restricted_middleware(access.http)] if access.http else []
    app = web.Application(
        middlewares=[*middlewares, errors_middleware], client_max_size=options.max_body_bytes
    )
    app[ACCESS] = access
    app[OPTIONS] = options
    app[REGISTRY] = ModelRegistry()
    app[METRICS] = metrics if metrics is not None else GatewayMetrics()
    app[FLEET] = FleetView()
    app[GATEWAY_TASKS] = EssentialTasks("gateway")
    app.cleanup_ctx.extend(
        [_connection_ctx, _model_view_ctx, _fleet_view_ctx, _broker_state_ctx, _requester_ctx, admission_ctx]
    )
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, model_metadata)
        app.router.add_get(base + "/ready", model_ready)
        app.router.add_get(base + "/config", model_config)
        app.router.add_post(base + "/infer", infer.infer)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{model}/load", load_model)
    app.router.add_post("/v2/repository/models/{model}/unload", unload_model)
    stats.add_routes(app)
    streaming.add_routes(app, drain_timeout_s)
    sharedmemory.add_routes(app)
    logging_api.add_routes(app)
    trace_api.add_routes(app)
    return app
