"""Triton's statistics extension and the fleet's metrics endpoint, both summed from the
statistics workers report with their heartbeats (gateway/fleet.py)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.keys import FLEET, METRICS, NATS, OPTIONS, REGISTRY
from gateway.middleware import json_response
from natron.errors import NotFound
from natron.prometheus import QueueInfo, metrics_app, render_fleet
from natron.stats import to_triton


async def model_stats(request: web.Request) -> web.Response:
    registry, fleet = request.app[REGISTRY], request.app[FLEET]
    name = request.match_info.get("model")
    version = request.match_info.get("version", "")
    views = [registry.get(name)] if name else registry.all()
    if version and version not in views[0].record.versions:
        raise NotFound(f"model '{name}' has no version {version}")
    entries = []
    for view in views:
        versions = (
            [version]
            if version
            else (view.record.ready_versions() if not name else sorted(view.record.versions, key=int))
        )
        for v in versions:
            entries.append(to_triton(view.record.name, v, fleet.stats(view.record.name, v)))
    return json_response({"model_stats": entries})


async def _queue_infos(
    app: web.Application, versions: list[tuple[str, str]]
) -> dict[tuple[str, str], QueueInfo]:
    js = app[NATS].jetstream()
    subjects = app[OPTIONS].subjects

    async def one(model: str, version: str) -> QueueInfo | None:
        try:
            info = await js.consumer_info(subjects.stream, subjects.consumer(model, version), timeout=1.0)
        except Exception:  # no consumer yet, or the broker is slow: leave the gauge out
            return None
        return QueueInfo(int(info.num_pending or 0), int(info.num_ack_pending or 0))

    results = await asyncio.gather(*(one(m, v) for m, v in versions))
    return {key: info for key, info in zip(versions, results, strict=True) if info is not None}


def create_metrics_app(main: web.Application) -> web.Application:
    """The metrics port's app: the fleet's Triton families and the gateway's own metrics, read
    from the state of the gateway app it reports on."""

    async def render() -> bytes:
        registry, fleet = main[REGISTRY], main[FLEET]
        versions = [
            (view.record.name, v) for view in registry.all() for v in sorted(view.record.versions, key=int)
        ]
        ready = [(m, v) for m, v in versions if registry.get(m).record.versions[v].state == "READY"]
        text = render_fleet(
            versions,
            {(m, v): fleet.stats(m, v) for m, v in versions},
            await _queue_infos(main, ready),
            {view.record.name: fleet.workers_up(view.record.name) for view in registry.all()},
            fleet.workers,
            main[NATS].is_connected,
        )
        return text.encode() + main[METRICS].own()

    return metrics_app(render)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v2/models/stats", model_stats)
    app.router.add_get("/v2/models/{model}/stats", model_stats)
    app.router.add_get("/v2/models/{model}/versions/{version}/stats", model_stats)
