"""Run one service until `stop` is set, in the one shutdown order every process follows:
stop intake, finish what is in flight within a bound, cancel the rest, drain NATS, close.

The bound is the process's shutdown budget (`--shutdown-timeout-s`, NATRON_SHUTDOWN_TIMEOUT_S,
default 25 s): requests, batches and streams in flight get the budget less CLOSE_RESERVE_S, the
reserve closes NATS and the metrics endpoint, and `natron.cli.main` ends the process at the
budget whatever is still running. A SIGTERM during startup ends the startup at once.

A service whose essential task dies (natron/tasks.py) stops in the same order, then its runner
raises ServiceFailed: the process exits non-zero and its supervisor restarts it.

`natron gateway --http-workers N` (N > 1) serves no HTTP itself: it supervises N gateway
processes sharing the port, as `natron serve` supervises its children, and stops them within
its own budget (`_gateway_group`).

Each runner takes its role's settings (natron/settings.py); the one function per role below
turns them into that service's own options, the only place the two shapes meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import uuid
from pathlib import Path

import grpc
from aiohttp import web

from broker import auth, jetstream, shared_settings
from broker.auth import ClientAuth
from broker.subjects import Subjects
from ensemble.service import Orchestrator
from gateway import grpc_service
from gateway.app import create_app, essential_tasks
from gateway.connections import ConnectionLimits, body_deadline_middleware
from gateway.fastpath import FastPath
from gateway.keys import FLEET, REGISTRY, GatewayOptions
from gateway.kserve import InputLimits
from gateway.metrics import GatewayMetrics
from gateway.restricted import AccessPolicy
from gateway.stats import create_metrics_app
from natron import restricted_api, tracesettings
from natron.cli.supervisor import SUPERVISOR_GRACE_S, Supervisor
from natron.prometheus import parse_metrics_config
from natron.settings import (
    CommonSettings,
    GatewaySettings,
    OrchestratorSettings,
    RouterSettings,
    WorkerSettings,
    exactly,
)
from natron.tasks import Stopped, until
from natron.tracesettings import TraceSettings
from natron.tracing import ProcessSpans
from router.metrics import router_metrics_app
from router.service import Router, RouterOptions
from router.uploads import UploadLimits
from workers.devices import CPU, Device, pick_device
from workers.metrics import worker_metrics_app
from workers.model_cache import DEFAULT_CACHE_BYTES, ModelFilesMode
from workers.service import Worker, WorkerOptions

log = logging.getLogger(__name__)
MiB = 1024 * 1024

# Of a service's shutdown budget, what closing takes after the drain: NATS (3 s at most, see
# broker.jetstream.close_connection), the metrics endpoint, releasing models.
CLOSE_RESERVE_S = 5.0


def drain_budget_s(shutdown_timeout_s: float) -> float:
    """How long what is in flight may finish on stop, within the shutdown budget."""
    return max(shutdown_timeout_s - CLOSE_RESERVE_S, shutdown_timeout_s / 2)


def storage(settings: CommonSettings) -> jetstream.Storage:
    return jetstream.Storage(settings.jetstream_storage, settings.jetstream_replicas)


def gateway_options(settings: GatewaySettings) -> GatewayOptions:
    return GatewayOptions(
        nats_url=settings.nats_url,
        nats_auth=ClientAuth.of(settings),
        subjects=Subjects(settings.prefix),
        default_timeout_s=settings.default_timeout_s,
        max_body_bytes=settings.max_body_mb * MiB,
        limits=InputLimits(
            max_tensor_elements=settings.max_tensor_elements,
            max_bytes_element_bytes=settings.max_bytes_element_mb * MiB,
            max_json_depth=settings.max_json_depth,
        ),
        strict_readiness=settings.strict_readiness,
        storage=storage(settings),
        trace=trace_defaults(settings),
    )


def trace_defaults(settings: GatewaySettings) -> TraceSettings:
    """The gateway's --trace-config (checked when the settings were read). Gateway processes
    sharing a port write trace files of their own: PATH.gateway-<index>."""
    defaults = tracesettings.startup(settings.trace_config)
    if defaults.trace_file:
        path = os.path.abspath(defaults.trace_file)
        if settings.http_workers > 1:
            path = f"{path}.gateway-{settings.http_worker_index or 0}"
        defaults = dataclasses.replace(defaults, trace_file=path)
    return defaults


def access_policy(settings: GatewaySettings) -> AccessPolicy:
    return AccessPolicy(
        http=restricted_api.http(settings.http_restricted_api),
        grpc=restricted_api.grpc(settings.grpc_restricted_protocol),
        allow_code_upload=settings.allow_code_upload,
    )


# File descriptors a gateway keeps for itself besides its clients' connections: NATS, the
# listeners, the metrics endpoint, logs, a margin.
RESERVED_FDS = 64


def connection_limits(settings: GatewaySettings) -> ConnectionLimits:
    """The settings' limits, the connection cap within what the process may open: the soft
    limit on open files is raised towards the hard one first, and the cap lowered (with a
    warning) where even that is short, so that accept never fails for want of descriptors."""
    import resource

    wanted = settings.http_max_connections + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    cap = settings.http_max_connections
    if soft != resource.RLIM_INFINITY and soft < wanted:
        cap = max(1, soft - RESERVED_FDS)
        log.warning(
            "open files limited to %d: taking %d connections, not --http-max-connections %d",
            soft,
            cap,
            settings.http_max_connections,
        )
    return ConnectionLimits(
        keepalive_timeout_s=settings.http_keepalive_timeout_s,
        request_read_timeout_s=settings.http_request_read_timeout_s,
        max_connections=cap,
    )


def router_options(settings: RouterSettings) -> RouterOptions:
    return RouterOptions(
        repositories=settings.model_repository,
        control_mode=settings.model_control_mode,
        poll_interval_s=settings.repository_poll_secs,
        load_models=settings.load_model,
        upload_dir=settings.upload_dir,
        upload_limits=UploadLimits(settings.max_upload_files, settings.max_upload_mb * MiB),
        queue=jetstream.QueuePolicy(ack_wait_s=settings.ack_wait_s),
        storage=storage(settings),
        model_store=None if settings.model_files_store == "off" else settings.model_files_store,
    )


def worker_options(settings: WorkerSettings | OrchestratorSettings) -> WorkerOptions:
    """A worker's options; an orchestrator's are a CPU worker's with no compute tuning."""
    device: Device = CPU
    throttle_s, cpu_threads = 0.0, 0
    # An orchestrator's loads (ensembles) are quick: it loads as many at once as a worker does
    # by default.
    load_threads: int = WorkerSettings.model_fields["model_load_thread_count"].default
    # An orchestrator's ensembles have no files to fetch.
    model_files: ModelFilesMode = "path"
    cache_dir, cache_bytes = None, DEFAULT_CACHE_BYTES
    if isinstance(settings, WorkerSettings):
        device = pick_device(settings.device)
        throttle_s, cpu_threads = settings.throttle_ms / 1000, settings.cpu_threads
        load_threads = settings.model_load_thread_count
        model_files, cache_dir = settings.model_files, settings.model_cache_dir
        cache_bytes = int(settings.model_cache_gb * 1024 * MiB)
    # An orchestrator's ensembles read their inputs where its requests have them: by reference
    # from this host's shared memory too.
    system_shm = settings.system_shm == "auto" if isinstance(settings, WorkerSettings) else True
    return WorkerOptions(
        worker_id=settings.worker_id or f"worker-{uuid.uuid4().hex[:8]}",
        device=device,
        nats_url=settings.nats_url,
        nats_auth=ClientAuth.of(settings),
        inbox_prefix=auth.private_inbox(
            Subjects(settings.prefix),
            "orchestrator" if isinstance(settings, OrchestratorSettings) else "worker",
        ),
        # The drain asked for, within the budget: a longer one would be cut by the exit.
        drain_timeout_s=min(settings.drain_timeout_s, drain_budget_s(settings.shutdown_timeout_s)),
        throttle_s=throttle_s,
        cpu_threads=cpu_threads,
        model_load_threads=load_threads,
        storage=storage(settings),
        model_files=model_files,
        model_cache_dir=cache_dir,
        model_cache_bytes=cache_bytes,
        system_shm=system_shm,
    )


async def run_gateway(settings: GatewaySettings, stop: asyncio.Event) -> None:
    if settings.http_workers > 1 and settings.http_worker_index is None:
        await _gateway_group(settings, stop)
        return
    with contextlib.suppress(Stopped):
        await _gateway(settings, stop)


def group_budgets_s(shutdown_timeout_s: float) -> tuple[float, float]:
    """A gateway group's stop, within its own budget: how long it waits for its gateways, and
    each gateway's budget, SUPERVISOR_GRACE_S less (or half the wait, for a short budget). The
    last second is the group's own, to exit after its gateways."""
    wait_s = max(shutdown_timeout_s - 1.0, shutdown_timeout_s / 2)
    return wait_s, max(wait_s - SUPERVISOR_GRACE_S, wait_s / 2)


async def _gateway_group(settings: GatewaySettings, stop: asyncio.Event) -> None:
    """`natron gateway --http-workers N`: N gateway processes on one port, each restarted when
    it dies. In a container this process is the one the orchestrator signals and counts
    restarts of; a gateway that dies comes back here without the container restarting."""
    # Imported here: a gateway process that serves HTTP has no use for serve's code.
    from natron.cli.serve import gateway_children

    wait_s, gateway_budget_s = group_budgets_s(settings.shutdown_timeout_s)
    template = exactly(
        GatewaySettings,
        {**settings.model_dump(), "parent_pid": os.getpid(), "shutdown_timeout_s": gateway_budget_s},
    )
    supervisor = Supervisor()
    # Fresh for each start, so no counter of an earlier group's gateways counts again.
    with tempfile.TemporaryDirectory(prefix="natron-gateway-metrics-") as metrics_dir:
        try:
            for child in gateway_children(template, Path(metrics_dir)):
                args, env = child.command()
                supervisor.add(child.name, args, env=env)
            await supervisor.start()
            log.info("%d gateway processes sharing port %d", settings.http_workers, settings.http_port)
            await stop.wait()
        finally:
            await supervisor.stop(["gateway"], wait_s)


async def _gateway(settings: GatewaySettings, stop: asyncio.Event) -> None:
    options = gateway_options(settings)
    host, port, metrics_port = settings.http_address, settings.http_port, settings.metrics_port
    drain_s = drain_budget_s(settings.shutdown_timeout_s)
    # One of several processes sharing the port: the kernel spreads the connections over them,
    # and they count their requests together (gateway/metrics.py).
    shared = settings.http_workers > 1
    access, limits = access_policy(settings), connection_limits(settings)
    app = create_app(options, drain_timeout_s=drain_s, metrics=GatewayMetrics(shared=shared), access=access)
    app.middlewares.append(body_deadline_middleware(limits.request_read_timeout_s))
    essential = essential_tasks(app)
    # shutdown_timeout bounds how long requests in flight may finish after intake stops;
    # open streams end by then too, with a last frame. handler_cancellation: a client that
    # closes its connection cancels its request, and the requester tells the worker to drop it.
    # keepalive_timeout: an idle connection aiohttp holds, or one with half a request head,
    # closes then (gateway/connections.py).
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=drain_s,
        handler_cancellation=True,
        keepalive_timeout=limits.keepalive_timeout_s,
    )

    # Connections start on the infer fast path and go to aiohttp at their first other request
    # (gateway/fastpath.py); its requests in flight drain with aiohttp's on shutdown.
    def aiohttp_connection() -> asyncio.Protocol:
        server = runner.server
        assert server is not None, "the runner is set up before the listener opens"
        return server()

    def handed_over() -> int:
        server = runner.server
        return len(server.connections) if server is not None else 0

    fast = FastPath(
        app,
        aiohttp_connection,
        options.max_body_bytes,
        limits,
        restriction=access.http.get("inference"),
        handed_over=handed_over,
    )
    grpc_server: grpc.aio.Server | None = None

    async def drain(_: web.Application) -> None:
        # Both protocols drain together, within the one drain budget, before the requester
        # and the views close (aiohttp's cleanup contexts run after this).
        draining = [fast.shutdown(drain_s)]
        if grpc_server is not None:
            draining.append(grpc_server.stop(drain_s))
        await asyncio.gather(*draining)

    app.on_shutdown.append(drain)
    listener: asyncio.Server | None = None
    metrics_runner: web.AppRunner | None = None
    try:
        # Startup (connecting, the cleanup contexts) ends early on SIGTERM; whatever opened
        # is closed by cleanup() below.
        await until(stop, runner.setup(), essential)
        if shared:
            # Joining a port that others serve: take connections only once the model view is
            # in, or a restarted gateway's first clients get 404 for models its siblings serve.
            # The fleet view too: a restarted gateway's statistics must not read zero.
            await until(stop, app[REGISTRY].synced.wait(), essential)
            await until(stop, app[FLEET].synced.wait(), essential)
        if settings.allow_http:
            listener = await asyncio.get_running_loop().create_server(
                fast.accept, host, port, backlog=1024, reuse_address=True, reuse_port=shared or None
            )
            if shared:
                log.info(
                    "gateway %d of %d listening on http://%s:%d (port shared)",
                    (settings.http_worker_index or 0) + 1,
                    settings.http_workers,
                    host,
                    port,
                )
            else:
                log.info("gateway listening on http://%s:%d", host, port)
        if settings.allow_grpc:
            grpc_server, grpc_port = await grpc_service.start_server(
                app, settings.grpc_address, settings.grpc_port, shared_port=shared, limits=limits
            )
            log.info("gateway serving gRPC on %s:%d", settings.grpc_address, grpc_port)
        if metrics_port and settings.allow_metrics:
            metrics_app = create_metrics_app(app, parse_metrics_config(settings.metrics_config))
            metrics_runner = await _serve_metrics(metrics_app, host, metrics_port)
        await until(stop, None, essential)
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if listener is not None:
            listener.close()
        await runner.cleanup()
        if grpc_server is not None:
            await grpc_server.stop(0)  # stopped already, unless startup failed before the drain


async def run_router(settings: RouterSettings, stop: asyncio.Event) -> None:
    with contextlib.suppress(Stopped):
        await _router(settings, stop)


async def _router(settings: RouterSettings, stop: asyncio.Event) -> None:
    options, metrics_port = router_options(settings), settings.metrics_port
    subjects = Subjects(settings.prefix)
    nc = await until(
        stop,
        jetstream.connect(
            settings.nats_url,
            name="natron-router",
            auth=ClientAuth.of(settings),
            inbox_prefix=auth.private_inbox(subjects, "router"),
        ),
    )
    # The deployment's log settings (/v2/logging), applied to this process as they change.
    log_settings = shared_settings.start_following_log_settings(nc, subjects, "router")
    try:
        router = Router(nc, subjects, options)
        essential = (*router.essential, log_settings)
        metrics_runner: web.AppRunner | None = None
        try:
            await until(stop, router.start(), essential)
            if metrics_port:
                metrics_runner = await _serve_metrics(router_metrics_app(router, nc), "0.0.0.0", metrics_port)
            await until(stop, None, essential)
        finally:
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            await router.stop()
    finally:
        await log_settings.stop()
        await jetstream.close_connection(nc)


async def run_worker(settings: WorkerSettings | OrchestratorSettings, stop: asyncio.Event) -> None:
    """A worker, or with OrchestratorSettings the ensemble orchestrator role."""
    with contextlib.suppress(Stopped):
        await _worker(settings, stop)


async def _worker(settings: WorkerSettings | OrchestratorSettings, stop: asyncio.Event) -> None:
    # Spans of the requests its gateways trace, exported as the trace settings say.
    spans = ProcessSpans("natron-worker")
    options, metrics_port = dataclasses.replace(worker_options(settings), spans=spans), settings.metrics_port
    orchestrator = isinstance(settings, OrchestratorSettings)
    worker_id, device, subjects = options.worker_id, options.device, Subjects(settings.prefix)
    nc = await until(
        stop,
        jetstream.connect(
            settings.nats_url,
            name=f"natron-{worker_id}",
            auth=options.nats_auth,
            inbox_prefix=options.inbox_prefix,
        ),
    )
    # The deployment's log and trace settings, applied to this process as they change.
    log_settings = shared_settings.start_following_log_settings(nc, subjects, worker_id)
    trace_settings = shared_settings.start_following_trace_settings(nc, subjects, worker_id, spans)
    try:
        service: Worker | Orchestrator = (
            Orchestrator(nc, subjects, options) if orchestrator else Worker(nc, subjects, options)
        )
        worker = service.worker if isinstance(service, Orchestrator) else service
        essential = (*service.essential, log_settings, trace_settings)
        metrics_runner: web.AppRunner | None = None
        try:
            await until(stop, service.start(), essential)
            log.info("worker %s serving on %s", worker_id, device.name)
            if metrics_port:
                metrics_runner = await _serve_metrics(worker_metrics_app(worker, nc), "0.0.0.0", metrics_port)
            await until(stop, None, essential)
        finally:
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            # Unloads and drains, also after a loop died or a partial start.
            await service.stop()
    finally:
        await trace_settings.stop()
        await log_settings.stop()
        await spans.close()
        await jetstream.close_connection(nc)


async def _serve_metrics(app: web.Application, host: str, port: int) -> web.AppRunner:
    # A scrape is quick: one still running at shutdown is not worth waiting for long.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
