"""Run one service until `stop` is set, in the one shutdown order every process follows:
stop intake, finish what is in flight within a bound, cancel the rest, drain NATS, close.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

from aiohttp import web

from broker import jetstream
from broker.subjects import Subjects
from gateway.app import METRICS, GatewayOptions, create_app
from router.service import Router, RouterOptions
from workers.devices import CPU, discover_gpus
from workers.service import Worker, WorkerOptions

log = logging.getLogger(__name__)


async def run_gateway(
    options: GatewayOptions, host: str, port: int, metrics_port: int | None, stop: asyncio.Event
) -> None:
    app = create_app(options)
    # shutdown_timeout bounds how long requests in flight may finish after intake stops.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=options.default_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    log.info("gateway listening on http://%s:%d", host, port)
    metrics_runner: web.AppRunner | None = None
    if metrics_port:
        metrics_runner = web.AppRunner(app[METRICS].app(), access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, host, metrics_port, reuse_address=True).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()


async def run_router(nats_url: str, subjects: Subjects, repository: Path, stop: asyncio.Event) -> None:
    nc = await jetstream.connect(nats_url, name="natron-router")
    router = Router(nc, subjects, RouterOptions(repository=repository))
    try:
        await router.start()
        await stop.wait()
    finally:
        await router.stop()
        await nc.drain()


async def run_worker(
    nats_url: str, subjects: Subjects, worker_id: str | None, device_spec: str, stop: asyncio.Event
) -> None:
    device = CPU
    if device_spec.startswith("gpu"):
        gpus = discover_gpus()
        index = int(device_spec.partition(":")[2] or 0)
        matching = [g for g in gpus if g.index == index]
        if matching:
            device = matching[0]
        else:
            log.warning("GPU %d not found (%d GPUs seen); serving on the CPU", index, len(gpus))
    worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    nc = await jetstream.connect(nats_url, name=f"natron-{worker_id}")
    worker = Worker(nc, subjects, WorkerOptions(worker_id=worker_id, device=device, nats_url=nats_url))
    try:
        await worker.start()
        log.info("worker %s serving on %s", worker_id, device.name)
        await stop.wait()
    finally:
        await worker.stop()
        await nc.drain()
