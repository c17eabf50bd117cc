"""The gateway: KServe v2 / Triton HTTP on aiohttp, turning each call into a NATS message.

It holds no model state of its own: the model view comes from the models KV bucket, and every
inference goes through the broker to whichever worker instance pulls it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from aiohttp import web
from nats.aio.client import Client

from broker import jetstream
from broker.registry import ModelRegistry, ModelView
from broker.requester import Requester
from broker.subjects import Subjects, check_name
from gateway import kserve
from gateway.fleet import FleetView
from gateway.metrics import GatewayMetrics
from natron import __version__
from natron.errors import DeadlineExceeded, InvalidArgument, NatronError, Unavailable, Unsupported

log = logging.getLogger(__name__)

# Request ids for requests that came without one: unique per gateway process, far cheaper
# than uuid4 on the hot path.
_ID_PREFIX = f"gw{os.getpid():x}-"
_ids = itertools.count(1)

_REQUEST_ID = "natron_request_id"
_TRACE_HEADERS = ("traceparent", "tracestate")

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics"]


@dataclass(slots=True, frozen=True)
class GatewayOptions:
    nats_url: str
    subjects: Subjects = Subjects()
    default_timeout_s: float = 60.0
    # HTTP bodies above this are refused with 413 before being read whole.
    max_body_bytes: int = 64 * 1024 * 1024
    # A load answers once every placed worker has the model READY: loads can take minutes.
    control_timeout_s: float = 600.0


NATS: web.AppKey[Client] = web.AppKey("nats", Client)
REQUESTER: web.AppKey[Requester] = web.AppKey("requester", Requester)
REGISTRY: web.AppKey[ModelRegistry] = web.AppKey("registry", ModelRegistry)
OPTIONS: web.AppKey[GatewayOptions] = web.AppKey("options", GatewayOptions)
METRICS: web.AppKey[GatewayMetrics] = web.AppKey("metrics", GatewayMetrics)
FLEET: web.AppKey[FleetView] = web.AppKey("fleet", FleetView)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    return web.Response(body=orjson.dumps({"error": message}), status=status, content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become HTTP: NatronError by its status, aiohttp's own
    (404 route, 405 method, 413 body) as JSON, anything unexpected as a 500 naming it."""
    try:
        return await handler(request)
    except NatronError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return error_response(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.text or exc.reason)
    except Exception as exc:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """A request body that must be a JSON object (empty: {}); a 400 naming `what` otherwise."""
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{what} body must be a JSON object")
    return parsed


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# -- health and metadata -------------------------------------------------------------------


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    nc = request.app[NATS]
    if nc.is_connected and request.app[REGISTRY].synced.is_set():
        return web.Response(status=200)
    return error_response(503, "gateway is not connected to NATS or has not synced the model view")


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": "natron", "version": __version__, "extensions": EXTENSIONS})


def _view(request: web.Request) -> tuple[ModelView, str]:
    view = request.app[REGISTRY].get(request.match_info["model"])
    return view, request.match_info.get("version", "")


def _tensor_metadata(view: ModelView, outputs: bool) -> list[dict[str, Any]]:
    spec = view.spec
    if spec is None:
        return []
    batch = [-1] if spec.batching else []
    tensors = spec.outputs if outputs else spec.inputs
    return [{"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in tensors.values()]


async def model_metadata(request: web.Request) -> web.Response:
    view, version = _view(request)
    if version and version not in view.record.versions:
        raise InvalidArgument(f"model '{view.record.name}' has no version {version}")
    config = view.record.config or {}
    versions = sorted(view.record.versions, key=int)
    return json_response(
        {
            "name": view.record.name,
            "versions": [version] if version else versions,
            "platform": config.get("platform") or config.get("backend", ""),
            "inputs": _tensor_metadata(view, outputs=False),
            "outputs": _tensor_metadata(view, outputs=True),
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    view, version = _view(request)
    view.resolve(version)  # raises 404 / 503 with the reason
    return web.Response(status=200)


async def model_config(request: web.Request) -> web.Response:
    view, version = _view(request)
    if version and version not in view.record.versions:
        raise InvalidArgument(f"model '{view.record.name}' has no version {version}")
    if view.record.config is None:
        raise Unsupported(f"model '{view.record.name}' has no valid config: {view.record.reason}")
    return json_response(view.record.config)


async def repository_index(request: web.Request) -> web.Response:
    ready_only = json_object(await request.read(), "repository index").get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidArgument("'ready' must be a boolean")
    index: list[dict[str, str]] = []
    for view in request.app[REGISTRY].all():
        for version in sorted(view.record.versions, key=int):
            state = view.record.versions[version]
            if ready_only and state.state != "READY":
                continue
            entry = {"name": view.record.name, "version": version, "state": state.state}
            if state.reason:
                entry["reason"] = state.reason
            index.append(entry)
        if not view.record.versions and not ready_only:
            index.append({"name": view.record.name, "state": "UNAVAILABLE", "reason": view.record.reason})
    return json_response(index)


async def _control(request: web.Request, verb: str) -> web.Response:
    """Forward a load/unload to the router and answer once it has taken effect fleet-wide."""
    name = check_name("model", request.match_info["model"])
    params = json_object(await request.read(), verb).get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be a JSON object")
    options = request.app[OPTIONS]
    message: dict[str, Any] = {"name": name, "parameters": params}
    if verb == "unload":
        message["unload_dependents"] = bool(params.get("unload_dependents", False))
    try:
        reply = await request.app[NATS].request(
            options.subjects.ctl(verb), orjson.dumps(message), timeout=options.control_timeout_s
        )
    except nats.errors.NoRespondersError:
        raise Unavailable("no router is running to load or unload models") from None
    except nats.errors.TimeoutError:
        raise DeadlineExceeded(
            f"{verb} of '{name}' did not finish within {options.control_timeout_s:.0f} s"
        ) from None
    answer = orjson.loads(reply.data)
    status = int(answer.get("status", 500))
    if status != 200:
        raise NatronError.from_status(status, str(answer.get("error", f"{verb} failed")))
    return web.Response(status=200)


async def load_model(request: web.Request) -> web.Response:
    return await _control(request, "load")


async def unload_model(request: web.Request) -> web.Response:
    return await _control(request, "unload")


# -- inference -----------------------------------------------------------------------------


async def infer(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    model = request.match_info["model"]
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    status = 500
    try:
        response = await _infer(request)
        status = response.status
        return response
    except NatronError as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client closed the connection; the requester told the worker
        raise
    finally:
        duration_s = loop.time() - started_s
        metrics.observe(model, request.match_info.get("version", ""), status, duration_s)
        request_id = request.get(_REQUEST_ID, "-")
        if status >= 500:
            log.warning("infer %s id=%s -> %d in %.2f ms", model, request_id, status, duration_s * 1e3)
        elif status == 499:
            log.info(
                "infer %s id=%s cancelled by the client after %.2f ms", model, request_id, duration_s * 1e3
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("infer %s id=%s -> %d in %.2f ms", model, request_id, status, duration_s * 1e3)


async def _infer(request: web.Request) -> web.Response:
    view, version = _view(request)
    target = view.resolve(version)
    spec = view.spec
    if spec is None:
        raise Unsupported(f"model '{view.record.name}' has no valid config")
    if spec.decoupled:
        raise Unsupported(f"model '{spec.name}' is decoupled: use the generate_stream or WebSocket endpoints")
    header_length: int | None = None
    raw_length = request.headers.get(kserve.HEADER_LENGTH_HEADER)
    if raw_length is not None:
        try:
            header_length = int(raw_length)
        except ValueError:
            raise InvalidArgument(
                f"{kserve.HEADER_LENGTH_HEADER} must be an integer, got {raw_length!r}"
            ) from None
    body = await request.read()
    parsed = kserve.parse_infer_body(body, header_length, spec.name, target)
    spec.validate(parsed.request)
    request_id = parsed.request.id
    if not request_id:
        # The wire needs an id for logs; the HTTP answer echoes only one the client gave.
        parsed.request.id = f"{_ID_PREFIX}{next(_ids)}"
    request[_REQUEST_ID] = parsed.request.id
    options = request.app[OPTIONS]
    timeout_s = parsed.timeout_us / 1e6 if parsed.timeout_us else options.default_timeout_s
    # W3C trace context travels on to the worker, so a configured tracer can join the spans.
    trace = {k: v for k in _TRACE_HEADERS if (v := request.headers.get(k)) is not None}
    response = await request.app[REQUESTER].infer(parsed.request, target, timeout_s, headers=trace or None)
    out, json_length = kserve.encode_infer_response(response, parsed, request_id, batched=spec.batching)
    if json_length is None:
        return web.Response(body=out, content_type="application/json")
    return web.Response(
        body=out,
        content_type="application/octet-stream",
        headers={kserve.HEADER_LENGTH_HEADER: str(json_length)},
    )


# -- the app -------------------------------------------------------------------------------


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    options = app[OPTIONS]
    nc = await jetstream.connect(options.nats_url, name="natron-gateway")
    app[NATS] = nc
    js = nc.jetstream()
    await jetstream.ensure_stream(js, options.subjects, jetstream.QueuePolicy())
    models_kv = await jetstream.ensure_bucket(js, options.subjects.models_bucket)
    registry = app[REGISTRY]
    await registry.start(models_kv)
    await app[FLEET].start(await jetstream.ensure_bucket(js, options.subjects.workers_bucket))
    requester = Requester(nc, options.subjects)
    await requester.start()
    app[REQUESTER] = requester
    try:
        yield
    finally:
        await requester.close()
        await app[FLEET].stop()
        await registry.stop()
        await nc.drain()


def create_app(options: GatewayOptions) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=options.max_body_bytes)
    app[OPTIONS] = options
    app[REGISTRY] = ModelRegistry()
    app[METRICS] = GatewayMetrics()
    app[FLEET] = FleetView()
    app.cleanup_ctx.append(_broker_ctx)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, model_metadata)
        app.router.add_get(base + "/ready", model_ready)
        app.router.add_get(base + "/config", model_config)
        app.router.add_post(base + "/infer", infer)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{model}/load", load_model)
    app.router.add_post("/v2/repository/models/{model}/unload", unload_model)
    # These modules import this one's app keys, so they are imported here, not at the top.
    from gateway import stats, streaming

    stats.add_routes(app)
    streaming.add_routes(app)
    return app
