"""The router's own metrics: model versions by state, live workers, NATS, its process."""

from __future__ import annotations

from aiohttp import web
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest

from natron.prometheus import metrics_app
from natron.records import LOADING, READY, UNAVAILABLE, UNLOADING
from router.service import Router


def router_metrics_app(router: Router, nc: Client) -> web.Application:
    """The router's own metrics: model versions by state, live workers, its process."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    versions = Gauge("natron_router_model_versions", "Model versions by state", ["state"], registry=registry)
    workers = Gauge("natron_router_workers", "Workers with a fresh heartbeat", registry=registry)
    connected = Gauge("natron_nats_connected", "1 while connected to NATS", registry=registry)

    async def render() -> bytes:
        counts: dict[str, int] = dict.fromkeys((READY, LOADING, UNAVAILABLE, UNLOADING), 0)
        for record in router.records.values():
            for version_state in record.versions.values():
                counts[version_state.state] = counts.get(version_state.state, 0) + 1
        for state, count in counts.items():
            versions.labels(state).set(count)
        workers.set(router.live_workers)
        connected.set(1 if nc.is_connected else 0)
        return generate_latest(registry)

    return metrics_app(render)
