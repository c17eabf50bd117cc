"""A worker's own metrics: its models' statistics under Triton's names, its GPU, its host's CPU
and memory, its process."""

from __future__ import annotations

from aiohttp import web
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from natron.prometheus import HostMeter, metrics_app, render_fleet
from workers.service import Worker


def worker_metrics_app(worker: Worker, nc: Client) -> web.Application:
    """A worker's own metrics: its models' statistics, its GPU, its host, its process."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    host = HostMeter()

    async def render() -> bytes:
        stats = worker.current_stats()
        keys = [tuple(key.split("/", 1)) for key in stats]
        text = render_fleet(
            [(m, v) for m, v in keys],
            {(m, v): stats[f"{m}/{v}"] for m, v in keys},
            {},
            {},
            [worker.report],
            nc.is_connected,
            host=host.read(),
        )
        return text.encode() + generate_latest(registry)

    return metrics_app(render)
