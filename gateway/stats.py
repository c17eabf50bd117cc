"""Triton's statistics extension and the fleet's metrics endpoint, both summed from the
statistics of the live workers as they are when asked (gateway/fleet.py: one query that every
worker answers, its last heartbeat standing in for one that does not answer in time).

`model_stats_entries` is the extension's one implementation: the HTTP routes here and the
gRPC service both answer with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.keys import FLEET, METRICS, NATS, OPTIONS, REGISTRY
from gateway.middleware import json_response
from natron.errors import NotFound
from natron.prometheus import (
    HostMeter,
    LatencyWindows,
    MetricsConfig,
    QueueInfo,
    decode_sketches,
    metrics_app,
    render_fleet,
)
from natron.records import READY
from natron.stats import to_triton
from natron.tasks import EssentialTasks


async def model_stats_entries(app: web.Application, name: str | None, version: str) -> list[dict[str, Any]]:
    """Triton's `model_stats` entries: every READY version of every model (`name` None or "":
    `version` is not looked at then, as in Triton), every version of model `name` (`version`
    ""), or that one version. NotFound for an unknown model or version."""
    registry = app[REGISTRY]
    if not name:
        views, version = registry.all(), ""
    else:
        views = [registry.get(name)]
        if version and version not in views[0].record.versions:
            raise NotFound(f"model '{name}' has no version {version}")
    fleet = await app[FLEET].query(app[NATS], app[OPTIONS].subjects, name or None)
    entries: list[dict[str, Any]] = []
    for view in views:
        record = view.record
        if version:
            versions = [version]
        elif name:
            versions = sorted(record.versions, key=int)
        else:
            versions = sorted(record.ready_versions(), key=int)
        entries.extend(to_triton(record.name, v, fleet.total(record.name, v)) for v in versions)
    return entries


async def model_stats(request: web.Request) -> web.Response:
    name = request.match_info.get("model")
    version = request.match_info.get("version", "")
    return json_response({"model_stats": await model_stats_entries(request.app, name, version)})


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


def create_metrics_app(main: web.Application, config: MetricsConfig | None = None) -> web.Application:
    """The metrics port's app: the fleet's Triton families as `config` (Triton's
    --metrics-config; default: latency counters only) asks, the gateway's own metrics and the
    host's CPU and memory, read from the state of the gateway app it reports on."""
    config = config or MetricsConfig()
    host = HostMeter()
    windows = (
        LatencyWindows(config.summary_max_age_s, config.summary_age_buckets)
        if config.summary_latencies
        else None
    )

    async def render() -> bytes:
        registry, fleet, nats = main[REGISTRY], main[FLEET], main[NATS]
        fleet_stats = await fleet.query(nats, main[OPTIONS].subjects, sketches=windows is not None)
        counted = fleet_stats.keys()
        # Every READY version (its counters at 0 from the start, as Triton's), and any other
        # still in the repository that has counts to show.
        versions: list[tuple[str, str]] = []
        ready: list[tuple[str, str]] = []
        decoupled: set[tuple[str, str]] = set()
        for view in registry.all():
            for v in sorted(view.record.versions, key=int):
                key = (view.record.name, v)
                if view.record.versions[v].state == READY:
                    ready.append(key)
                elif key not in counted:
                    continue
                versions.append(key)
                if view.spec is not None and view.spec.decoupled:
                    decoupled.add(key)
        stats = {(m, v): fleet_stats.total(m, v) for m, v in versions}
        window = None
        if windows is not None:
            window = windows.observe(
                asyncio.get_running_loop().time(), decode_sketches(fleet_stats.sketches())
            )
        text = render_fleet(
            versions,
            stats,
            await _queue_infos(main, ready),
            {view.record.name: fleet.workers_up(view.record.name) for view in registry.all()},
            fleet.workers,
            nats.is_connected,
            config=config,
            windows=window,
            decoupled=frozenset(decoupled),
            host=host.read(),
        )
        return text.encode() + main[METRICS].own()

    app = metrics_app(render)
    if windows is not None:
        app.cleanup_ctx.append(_window_snapshots(main, windows))
    return app


def _window_snapshots(
    main: web.Application, windows: LatencyWindows
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Keep a snapshot of the fleet's latency sketches every step of the summaries' window, so
    that a scrape finds a baseline about max_age old however seldom it comes."""

    async def loop() -> None:
        while True:
            fleet = await main[FLEET].query(main[NATS], main[OPTIONS].subjects, sketches=True)
            windows.observe(asyncio.get_running_loop().time(), decode_sketches(fleet.sketches()))
            await asyncio.sleep(windows.step_s)

    async def context(_: web.Application) -> AsyncIterator[None]:
        tasks = EssentialTasks("metrics windows")
        tasks.spawn(loop(), "latency-window-snapshots")
        try:
            yield
        finally:
            await tasks.stop()

    return context


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v2/models/stats", model_stats)
    app.router.add_get("/v2/models/{model}/stats", model_stats)
    app.router.add_get("/v2/models/{model}/versions/{version}/stats", model_stats)
