"""Run one service until `stop` is set, in the one shutdown order every process follows:
stop intake, finish what is in flight within a bound, cancel the rest, drain NATS, close.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from aiohttp import web
from nats.aio.client import Client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, ProcessCollector, generate_latest

from broker import jetstream
from broker.subjects import Subjects
from gateway.app import GatewayOptions, create_app
from gateway.metrics import metrics_response, render_fleet
from gateway.stats import create_metrics_app
from router.service import Router, RouterOptions
from workers.devices import CPU, ORCHESTRATOR, Device, discover_gpus
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


def router_metrics_app(router: Router, nc: Client) -> web.Application:
    """The router's own metrics: model versions by state, live workers, its process."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    versions = Gauge("natron_router_model_versions", "Model versions by state", ["state"], registry=registry)
    workers = Gauge("natron_router_workers", "Workers with a fresh heartbeat", registry=registry)
    connected = Gauge("natron_nats_connected", "1 while connected to NATS", registry=registry)

    async def handle(request: web.Request) -> web.Response:
        counts: dict[str, int] = dict.fromkeys(("READY", "LOADING", "UNAVAILABLE", "UNLOADING"), 0)
        for record in router.records.values():
            for version_state in record.versions.values():
                counts[version_state.state] = counts.get(version_state.state, 0) + 1
        for state, count in counts.items():
            versions.labels(state).set(count)
        workers.set(router.live_workers)
        connected.set(1 if nc.is_connected else 0)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


@dataclass(slots=True, frozen=True)
class WorkerTuning:
    ack_wait_s: float = 10.0
    drain_timeout_s: float = 30.0
    throttle_s: float = 0.0
    cpu_threads: int = 0


def pick_device(device_spec: str) -> Device:
    """'cpu', 'gpu:<index>' or 'gpu:<UUID>' (a GPU or MIG slice UUID) -> the device."""
    if device_spec == "ensemble":
        return ORCHESTRATOR
    if not device_spec.startswith("gpu"):
        return CPU
    wanted = device_spec.partition(":")[2] or "0"
    gpus = discover_gpus()
    for gpu in gpus:
        if wanted in (gpu.uuid, str(gpu.index)):
            return gpu
    log.warning("GPU %s not found (%d GPU devices seen); serving on the CPU", wanted, len(gpus))
    return CPU


async def run_worker(
    nats_url: str,
    subjects: Subjects,
    worker_id: str | None,
    device_spec: str,
    tuning: WorkerTuning,
    stop: asyncio.Event,
    metrics_port: int = 0,
) -> None:
    device = pick_device(device_spec)
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
    worker = Worker(nc, subjects, options)
    metrics_runner: web.AppRunner | None = None
    try:
        await worker.start()
        log.info("worker %s serving on %s", worker_id, device.name)
        if metrics_port:
            metrics_runner = web.AppRunner(worker_metrics_app(worker, nc), access_log=None)
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, "0.0.0.0", metrics_port, reuse_address=True).start()
        await stop.wait()
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await worker.stop()
        await nc.drain()


def worker_metrics_app(worker: Worker, nc: Client) -> web.Application:
    """A worker's own metrics: its models' statistics, its GPU, its process."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)

    async def handle(request: web.Request) -> web.Response:
        report = worker.report
        keys = [tuple(key.split("/", 1)) for key in report.stats]
        text = render_fleet(
            [(m, v) for m, v in keys],
            {(m, v): report.stats[f"{m}/{v}"] for m, v in keys},
            {},
            {},
            [report],
            nc.is_connected,
        )
        return metrics_response(text, generate_latest(registry))

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
