"""Run one service until `stop` is set, in the one shutdown order every process follows:
stop intake, finish what is in flight within a bound, cancel the rest, drain NATS, close.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from aiohttp import web

from broker import jetstream
from broker.subjects import Subjects
from ensemble.service import Orchestrator
from gateway.app import create_app
from gateway.keys import GatewayOptions
from gateway.stats import create_metrics_app
from router.metrics import router_metrics_app
from router.service import Router, RouterOptions
from workers.devices import CPU, pick_device
from workers.metrics import worker_metrics_app
from workers.service import Worker, WorkerOptions

log = logging.getLogger(__name__)


async def run_gateway(
    options: GatewayOptions, host: str, port: int, metrics_port: int | None, stop: asyncio.Event
) -> None:
    app = create_app(options)
    # shutdown_timeout bounds how long requests in flight may finish after intake stops.
    # handler_cancellation: a client that closes its connection cancels its request, and the
    # requester tells the worker to drop it.
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=options.default_timeout_s, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    log.info("gateway listening on http://%s:%d", host, port)
    metrics_runner: web.AppRunner | None = None
    if metrics_port:
        metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, host, metrics_port, reuse_address=True).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()


async def run_router(
    nats_url: str, subjects: Subjects, options: RouterOptions, stop: asyncio.Event, metrics_port: int = 0
) -> None:
    nc = await jetstream.connect(nats_url, name="natron-router")
    router = Router(nc, subjects, options)
    metrics_runner: web.AppRunner | None = None
    try:
        await router.start()
        if metrics_port:
            metrics_runner = web.AppRunner(router_metrics_app(router, nc), access_log=None)
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, "0.0.0.0", metrics_port, reuse_address=True).start()
        await stop.wait()
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await router.stop()
        await nc.drain()


@dataclass(slots=True, frozen=True)
class WorkerTuning:
    ack_wait_s: float = 10.0
    drain_timeout_s: float = 30.0
    throttle_s: float = 0.0
    cpu_threads: int = 0


async def run_worker(
    nats_url: str,
    subjects: Subjects,
    worker_id: str | None,
    device_spec: str,
    tuning: WorkerTuning,
    stop: asyncio.Event,
    metrics_port: int = 0,
    orchestrator: bool = False,
) -> None:
    """A worker on `device_spec`, or with `orchestrator` the ensemble orchestrator role."""
    device = CPU if orchestrator else pick_device(device_spec)
    worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    nc = await jetstream.connect(nats_url, name=f"natron-{worker_id}")
    options = WorkerOptions(
        worker_id=worker_id,
        device=device,
        nats_url=nats_url,
        drain_timeout_s=tuning.drain_timeout_s,
        throttle_s=tuning.throttle_s,
        cpu_threads=tuning.cpu_threads,
        queue=jetstream.QueuePolicy(ack_wait_s=tuning.ack_wait_s),
    )
    service: Worker | Orchestrator = (
        Orchestrator(nc, subjects, options) if orchestrator else Worker(nc, subjects, options)
    )
    worker = service.worker if isinstance(service, Orchestrator) else service
    metrics_runner: web.AppRunner | None = None
    try:
        await service.start()
        log.info("worker %s serving on %s", worker_id, device.name)
        if metrics_port:
            metrics_runner = web.AppRunner(worker_metrics_app(worker, nc), access_log=None)
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, "0.0.0.0", metrics_port, reuse_address=True).start()
        await stop.wait()
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await service.stop()
        await nc.drain()
