"""Triton's statistics extension and the fleet's metrics endpoint, both summed from the
statistics workers report with their heartbeats (gateway/fleet.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.app import FLEET, METRICS, NATS, OPTIONS, REGISTRY, json_response
from gateway.metrics import QueueInfo, metrics_response, render_fleet
from natron.errors import NotFound


def _triton_stats(model: str, version: str, stats: dict[str, Any]) -> dict[str, Any]:
    """natron's summed worker statistics in Triton's statistics-extension shape."""
    fail = {
        "count": sum(d["count"] for d in stats["fail"].values()),
        "ns": sum(d["ns"] for d in stats["fail"].values()),
    }
    zero = {"count": 0, "ns": 0}
    return {
        "name": model,
        "version": version,
        "last_inference": stats["last_inference_ms"],
        "inference_count": stats["inferences"],
        "execution_count": stats["executions"],
        "inference_stats": {
            "success": stats["success"],
            "fail": fail,
            "queue": stats["queue"],
            "compute_input": stats["compute_input"],
            "compute_infer": stats["compute_infer"],
            "compute_output": stats["compute_output"],
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {"batch_size": int(size), **batch}
            for size, batch in sorted(stats["batches"].items(), key=lambda item: int(item[0]))
        ],
    }


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
            entries.append(_triton_stats(view.record.name, v, fleet.stats(view.record.name, v)))
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


async def metrics(request: web.Request) -> web.Response:
    app = request.app[MAIN_APP]
    registry, fleet = app[REGISTRY], app[FLEET]
    versions = [
        (view.record.name, v) for view in registry.all() for v in sorted(view.record.versions, key=int)
    ]
    ready = [(m, v) for m, v in versions if registry.get(m).record.versions[v].state == "READY"]
    text = render_fleet(
        versions,
        {(m, v): fleet.stats(m, v) for m, v in versions},
        await _queue_infos(app, ready),
        {view.record.name: fleet.workers_up(view.record.name) for view in registry.all()},
        fleet.workers,
        app[NATS].is_connected,
    )
    return metrics_response(text, app[METRICS].own())


MAIN_APP: web.AppKey[web.Application] = web.AppKey("main_app", web.Application)


def create_metrics_app(main: web.Application) -> web.Application:
    """The metrics port's app: it reads the state of the gateway app it reports on."""
    app = web.Application()
    app[MAIN_APP] = main
    app.router.add_get("/metrics", metrics)
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v2/models/stats", model_stats)
    app.router.add_get("/v2/models/{model}/stats", model_stats)
    app.router.add_get("/v2/models/{model}/versions/{version}/stats", model_stats)
