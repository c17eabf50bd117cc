"""`natron serve`: the whole mesh on one box. An embedded nats-server with JetStream (unless
--nats-url names one), then router, workers and gateway as supervised processes; prints the
model table once the repository has settled, as Triton does, and stops everything in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from broker import auth, jetstream
from broker.auth import ClientAuth, Role
from broker.cluster import EmbeddedNatsCluster
from broker.mirror import BucketMirror
from broker.server import EmbeddedNatsServer, ServerOptions
from broker.subjects import Subjects, check_name
from natron.cli.supervisor import SUPERVISOR_GRACE_S, Supervisor
from natron.errors import InvalidArgument
from natron.records import LOADING, ModelRecord
from natron.settings import (
    SETTINGS_ENV,
    GatewaySettings,
    OrchestratorSettings,
    RoleSettings,
    RouterSettings,
    ServeSettings,
    StorageKind,
    WorkerSettings,
    exactly,
    settings_json,
)
from natron.tasks import Stopped, cancel_and_wait, until
from workers.devices import Device, discover_gpus

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def expected_models(repositories: tuple[Path, ...]) -> set[str]:
    """The names the router publishes a record for, across every repository: a name found in
    several is one record (UNAVAILABLE, see router/repository.py)."""
    names = set()
    for repository in repositories:
        for child in repository.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                with contextlib.suppress(InvalidArgument):
                    names.add(check_name("model", child.name))
    return names


async def wait_settled(
    nats_url: str,
    subjects: Subjects,
    repositories: tuple[Path, ...],
    http_port: int | None,
    timeout_s: float,
    stop: asyncio.Event,
    access: ClientAuth | None = None,
    ready_headers: Mapping[str, str] | None = None,
) -> list[ModelRecord] | None:
    """The repositories' records once no version is LOADING and the gateway answers ready on
    `http_port` (with None, serving no HTTP, once the records have settled); `ready_headers`:
    what the readiness request carries (the health group's header, where it is restricted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    expected = expected_models(repositories)
    # It reads what the router writes, as the router.
    nc = await jetstream.connect(
        nats_url, name="natron-serve", auth=access, inbox_prefix=auth.private_inbox(subjects, "router")
    )
    # The models bucket followed as every service follows it, not read whole on every check.
    records = BucketMirror("model record", ModelRecord.from_json)
    follow: asyncio.Task[None] | None = None
    try:
        kv = await jetstream.ensure_bucket(nc.jetstream(), subjects.models_bucket)
        follow = asyncio.create_task(records.follow(kv), name="serve-follow-models")
        async with aiohttp.ClientSession() as http:
            while loop.time() < deadline and not stop.is_set() and not follow.done():
                settled = expected <= records.values.keys() and not any(
                    s.state == LOADING for r in records.values.values() for s in r.versions.values()
                )
                if settled and (http_port is None or await _gateway_ready(http, http_port, ready_headers)):
                    return sorted(records.values.values(), key=lambda r: r.name)
                await asyncio.sleep(0.2)
        return None
    finally:
        if follow is not None:
            await cancel_and_wait([follow], 1.0)
        await jetstream.close_connection(nc)


async def _gateway_ready(
    http: aiohttp.ClientSession, port: int, headers: Mapping[str, str] | None = None
) -> bool:
    try:
        async with http.get(
            f"http://127.0.0.1:{port}/v2/health/ready",
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=1),
        ) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def print_table(records: list[ModelRecord], lines: list[str]) -> None:
    console = Console()
    table = Table(title="natron models")
    table.add_column("Model")
    table.add_column("Version")
    table.add_column("Status")
    for record in records:
        if not record.versions:
            table.add_row(record.name, "-", f"UNAVAILABLE: {record.reason}")
        for version in sorted(record.versions, key=int):
            state = record.versions[version]
            status = state.state + (f": {state.reason}" if state.reason else "")
            table.add_row(record.name, version, status)
    console.print(table)
    for line in lines:
        console.print(line)


@dataclass(slots=True, frozen=True)
class ChildSpec:
    """One child of `natron serve`: its settings, whole, and what it adds to the environment."""

    name: str
    settings: RoleSettings
    env: Mapping[str, str] = field(default_factory=dict)

    def command(self) -> tuple[list[str], dict[str, str]]:
        """`natron <role> --parent-pid N` and the environment that carries its settings.

        The command line names only the role and the supervisor, so `ps` tells the children
        apart and a test finds them; every setting travels as JSON, validated by the same
        model in the child. The environment rather than argv: a NATS URL with credentials
        stays out of `ps`. A restarted child is spawned from the same pair, so it comes back
        with the same settings."""
        args = [self.settings.command]
        if self.settings.parent_pid is not None:
            args += ["--parent-pid", str(self.settings.parent_pid)]
        return args, {**self.env, SETTINGS_ENV: settings_json(self.settings)}


# prometheus-client's own switch to its multiprocess mode, read once, when it is imported: each
# process then keeps its counters and histograms in files of its own in that directory.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def gateway_children(settings: GatewaySettings, metrics_dir: Path | None) -> list[ChildSpec]:
    """The gateway processes that serve `settings.http_workers`, for `natron serve` and for
    `natron gateway --http-workers N` alike.

    One gateway is the child it always was. Several share the HTTP port (SO_REUSEPORT, the
    kernel spreads the connections), each knowing its place; the first alone serves the
    metrics port, and every one keeps its request counters in `metrics_dir`, from which the
    first sums them: a scrape sees all the gateways' requests, never one process's share."""
    if settings.http_workers == 1:
        return [ChildSpec("gateway", settings)]
    if metrics_dir is None:
        raise ValueError("gateway processes sharing a port need a directory to share their metrics in")
    env = {PROMETHEUS_MULTIPROC_ENV: str(metrics_dir)}
    fields = settings.model_dump()
    return [
        ChildSpec(
            f"gateway-{index}",
            exactly(
                GatewaySettings,
                {
                    **fields,
                    "http_worker_index": index,
                    "metrics_port": settings.metrics_port if index == 0 else 0,
                },
            ),
            env,
        )
        for index in range(settings.http_workers)
    ]


def worker_ids(settings: ServeSettings, gpus: list[Device], host: str) -> list[str]:
    """The ids of `natron serve`'s workers: one per GPU or MIG slice, else `settings.workers`
    on the CPU."""
    if gpus:
        return [f"{host}-{gpu.uuid}" for gpu in gpus]
    return [f"{host}-cpu-{index}" for index in range(settings.workers)]


def orchestrator_id(host: str) -> str:
    return f"{host}-ensemble"


def _health_headers(settings: ServeSettings) -> dict[str, str]:
    """What serve's own readiness check sends: the health group's header where HTTP restricts it."""
    from natron import restricted_api

    restriction = restricted_api.http(settings.http_restricted_api).get("health")
    return {} if restriction is None else {restriction.header: restriction.value}


def plan_children(
    settings: ServeSettings,
    nats_url: str,
    gpus: list[Device],
    host: str,
    parent_pid: int,
    gateway_metrics_dir: Path | None = None,
    access: Mapping[str, ClientAuth] | None = None,
) -> list[ChildSpec]:
    """The children of `natron serve`, in start order: router, workers, orchestrator, gateways.

    Each gets the fields of its own role, from `settings` or the role's defaults, never from
    this process's NATRON_* variables: those were read once, into `settings`, and a worker
    must not pick up, say, NATRON_METRICS_PORT meant for the gateway. With --http-workers
    above 1, the gateways share `gateway_metrics_dir` (see `gateway_children`). `access` is
    each role's identity on the broker, or a worker's own, by its id (by default the --nats-*
    files of `settings`)."""
    kind, replicas = storage_of(settings)
    shared = ClientAuth.of(settings)

    def identity(role: Role, worker_id: str | None = None) -> dict[str, Path | None]:
        known = access or {}
        files = known.get(worker_id or "", known.get(role, shared))
        return {
            "nats_creds": files.creds,
            "nats_tls_ca": files.tls_ca,
            "nats_tls_cert": files.tls_cert,
            "nats_tls_key": files.tls_key,
        }

    common = {
        "nats_url": nats_url,
        "jetstream_storage": kind,
        "jetstream_replicas": replicas,
        "prefix": settings.prefix,
        "log_level": settings.log_level,
        "log_format": settings.log_format,
        "parent_pid": parent_pid,
        "shutdown_timeout_s": settings.shutdown_timeout_s,
    }
    drain = {"drain_timeout_s": settings.drain_timeout_s}
    children = [
        ChildSpec(
            "router",
            exactly(
                RouterSettings,
                {
                    **common,
                    **identity("router"),
                    "model_repository": settings.model_repository,
                    "model_control_mode": settings.model_control_mode,
                    "repository_poll_secs": settings.repository_poll_secs,
                    "load_model": settings.load_model,
                    "upload_dir": settings.upload_dir,
                    "max_upload_files": settings.max_upload_files,
                    "max_upload_mb": settings.max_upload_mb,
                    "ack_wait_s": settings.ack_wait_s,
                    # One box: its workers read the repository where it is, so the router
                    # does not copy every model into the broker as well.
                    "model_files_store": "off",
                },
            ),
        )
    ]
    compute = {
        **common,
        **drain,
        "throttle_ms": settings.throttle_ms,
        "model_load_thread_count": settings.model_load_thread_count,
        "model_files": "path",  # the repository is on this box (and the router publishes none)
    }
    if gpus:
        # One worker per GPU or MIG slice, pinned to it by UUID, so each device pulls work by
        # its own capacity; the CPU serves only where no GPU is.
        for gpu, worker_id in zip(gpus, worker_ids(settings, gpus, host), strict=False):
            worker = {"worker_id": worker_id, "device": f"gpu:{gpu.uuid}", **identity("worker", worker_id)}
            children.append(
                ChildSpec(
                    f"worker-gpu{gpu.index}-{gpu.uuid[-8:]}",
                    exactly(WorkerSettings, {**compute, **worker, "cpu_threads": settings.cpu_threads}),
                    {"CUDA_VISIBLE_DEVICES": gpu.uuid},
                )
            )
    else:
        # N CPU workers on one host split its cores, unless told otherwise: N processes that
        # each spread over every core only fight each other.
        threads = settings.cpu_threads or (
            max(1, (os.cpu_count() or 1) // settings.workers) if settings.workers > 1 else 0
        )
        for index, worker_id in enumerate(worker_ids(settings, gpus, host)[: settings.workers]):
            worker = {"worker_id": worker_id, "device": "cpu", **identity("worker", worker_id)}
            children.append(
                ChildSpec(
                    f"worker-{index}", exactly(WorkerSettings, {**compute, **worker, "cpu_threads": threads})
                )
            )
    # The orchestrator computes nothing itself: no device, threads or throttle reach it.
    children.append(
        ChildSpec(
            "ensemble",
            exactly(
                OrchestratorSettings,
                {
                    **common,
                    **identity("orchestrator", orchestrator_id(host)),
                    **drain,
                    "worker_id": orchestrator_id(host),
                },
            ),
        )
    )
    gateway = exactly(
        GatewaySettings,
        {
            **common,
            **identity("gateway"),
            "http_port": settings.http_port,
            "http_address": settings.http_address,
            "allow_http": settings.allow_http,
            # The gateway serves metrics where it has a port for them: without metrics, none.
            "metrics_port": settings.metrics_port if settings.allow_metrics else 0,
            "allow_metrics": settings.allow_metrics,
            "metrics_config": settings.metrics_config,
            "trace_config": settings.trace_config,
            "max_body_mb": settings.max_payload_mb,
            "max_tensor_elements": settings.max_tensor_elements,
            "max_bytes_element_mb": settings.max_bytes_element_mb,
            "max_json_depth": settings.max_json_depth,
            "http_workers": settings.http_workers,
            "grpc_address": settings.grpc_address,
            "grpc_port": settings.grpc_port,
            "allow_grpc": settings.allow_grpc,
            "strict_readiness": settings.strict_readiness,
            "http_restricted_api": settings.http_restricted_api,
            "grpc_restricted_protocol": settings.grpc_restricted_protocol,
            "allow_code_upload": settings.allow_code_upload,
            "http_keepalive_timeout_s": settings.http_keepalive_timeout_s,
            "http_request_read_timeout_s": settings.http_request_read_timeout_s,
            "http_max_connections": settings.http_max_connections,
        },
    )
    children.extend(gateway_children(gateway, gateway_metrics_dir))
    return children


# The embedded nats-server gets this long to stop after the children, then it is killed.
NATS_STOP_TIMEOUT_S = 3.0
# A nats-server that keeps dying is started again after at most this long.
NATS_MAX_BACKOFF_S = 5.0


def storage_of(settings: ServeSettings) -> tuple[StorageKind, int]:
    """The mesh's JetStream storage: file where a directory is given for it (or asked), memory
    otherwise; replicas as asked, or one per embedded node up to 3."""
    kind: StorageKind = settings.jetstream_storage or ("file" if settings.jetstream_dir else "memory")
    replicas = settings.jetstream_replicas
    if replicas == 1 and settings.nats_url is None and settings.nats_cluster > 1:
        replicas = min(3, settings.nats_cluster)
    return kind, replicas


async def supervise_broker(server: EmbeddedNatsServer, stop: asyncio.Event) -> None:
    """Start the embedded nats-server again whenever it exits before `stop`, on the same port
    and store, logging why; backing off while it keeps failing. The services reconnect by
    themselves and re-assert their state (broker/recovery.py)."""
    loop = asyncio.get_running_loop()
    failures = 0
    while not stop.is_set():
        started_s = loop.time()
        code = await server.wait_exit()
        if stop.is_set():
            return
        if loop.time() - started_s > 30:
            failures = 0
        backoff_s = 0.0 if failures == 0 else min(NATS_MAX_BACKOFF_S, 0.25 * 2**failures)
        log.error(
            "nats-server (port %d) exited with code %s; starting it again%s",
            server.port,
            code,
            f" in {backoff_s:.1f} s" if backoff_s else "",
        )
        await asyncio.sleep(backoff_s)
        try:
            await server.restart()
            log.warning("nats-server (port %d) is back", server.port)
        except Exception as exc:
            failures += 1
            log.error("nats-server (port %d) did not start again: %s", server.port, exc)


def stop_bound_s(shutdown_timeout_s: float) -> float:
    """How long `natron serve` may take to stop, its children having `shutdown_timeout_s` each:
    the supervisor's wait, NATS, and a second to spare. Compose and Helm allow longer."""
    return shutdown_timeout_s + SUPERVISOR_GRACE_S + NATS_STOP_TIMEOUT_S + 1.0


def endpoint_lines(settings: ServeSettings, nats_url: str, creds_dir: Path | None = None) -> list[str]:
    """What `natron serve` prints under the model table: where it serves."""
    lines = []
    if settings.allow_http:
        lines.append(
            f"HTTP endpoint:    http://{settings.http_address}:{settings.http_port}"
            + (f" ({settings.http_workers} processes)" if settings.http_workers > 1 else "")
        )
    if settings.allow_grpc:
        lines.append(f"gRPC endpoint:    {settings.grpc_address}:{settings.grpc_port}")
    if settings.allow_metrics and settings.metrics_port:
        lines.append(f"Metrics endpoint: http://{settings.http_address}:{settings.metrics_port}/metrics")
    lines.append(f"NATS:             {nats_url}")
    if creds_dir is not None:
        lines.append(f"NATS credentials: {creds_dir} (clients: {auth.seed_path(creds_dir, 'client')})")
    return lines


def embedded_access(settings: ServeSettings, creds_dir: Path, reporters: list[str]) -> dict[str, ClientAuth]:
    """Each role's identity on the embedded broker, and each of `reporters`' own (the workers
    and the orchestrator, by id: each writes only its own report): its seed in `creds_dir`, and
    the CA its TLS certificate is trusted by (the certificate itself, self-signed, unless one
    is named)."""
    ca = settings.nats_tls_ca or settings.nats_tls_cert
    access: dict[str, ClientAuth] = {
        role: ClientAuth(auth.seed_path(creds_dir, role), tls_ca=ca) for role in auth.ROLES
    }
    for worker_id in reporters:
        access[worker_id] = ClientAuth(auth.worker_seed_path(creds_dir, worker_id), tls_ca=ca)
    return access


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


async def serve(settings: ServeSettings, stop: asyncio.Event) -> None:
    repositories, subjects = settings.model_repository, Subjects(settings.prefix)
    broker: EmbeddedNatsCluster | EmbeddedNatsServer | None = None
    broker_watches: list[asyncio.Task[None]] = []
    supervisor = Supervisor()
    # Fresh for each run: counters of an earlier run's gateways must not count again.
    metrics_dir = (
        Path(tempfile.mkdtemp(prefix="natron-gateway-metrics-")) if settings.http_workers > 1 else None
    )
    # The embedded broker's credentials, when this run made them in a directory of its own.
    temporary_creds: Path | None = None
    creds_dir: Path | None = None
    access: dict[str, ClientAuth] | None = None
    try:
        nats_url = settings.nats_url
        gpus = await asyncio.to_thread(discover_gpus)
        host = socket.gethostname()
        if nats_url is None:
            # Nothing open by default: every connection proves its role (broker/auth.py).
            creds_dir = settings.nats_creds_dir
            if creds_dir is None:
                creds_dir = temporary_creds = Path(tempfile.mkdtemp(prefix="natron-creds-"))
            keys = await asyncio.to_thread(auth.ensure_credentials, creds_dir)
            # The workers and the orchestrator each write their own report, no other.
            reporters: dict[str, Role] = dict.fromkeys(worker_ids(settings, gpus, host), "worker")
            reporters[orchestrator_id(host)] = "orchestrator"
            reporter_keys = await asyncio.to_thread(
                auth.ensure_worker_credentials, creds_dir, list(reporters)
            )
            access = embedded_access(settings, creds_dir, list(reporters))
            if not _loopback(settings.nats_listen) and settings.nats_tls_cert is None:
                log.warning(
                    "the embedded NATS server listens on %s without TLS: its traffic, inference data "
                    "included, crosses the network in clear (--nats-tls-cert/--nats-tls-key)",
                    settings.nats_listen,
                )
            options = ServerOptions(
                port=settings.nats_port,
                host=settings.nats_listen,
                max_payload_bytes=settings.max_payload_mb * MiB,
                store_dir=settings.jetstream_dir,
                authorization=auth.authorization_block(
                    keys,
                    subjects,
                    {worker_id: (role, reporter_keys[worker_id]) for worker_id, role in reporters.items()},
                ),
                tls_cert=settings.nats_tls_cert,
                tls_key=settings.nats_tls_key,
            )
            # --nats-cluster N: N nodes on consecutive ports, one JetStream cluster.
            broker = (
                EmbeddedNatsCluster(settings.nats_cluster, options, probe_auth=access["admin"])
                if settings.nats_cluster > 1
                else EmbeddedNatsServer(options)
            )
            await until(stop, broker.start())
            nodes = broker.nodes if isinstance(broker, EmbeddedNatsCluster) else [broker]
            nats_url = ",".join(f"nats://127.0.0.1:{node.port}" for node in nodes)
            broker_watches = [
                asyncio.create_task(supervise_broker(node, stop), name=f"supervise-nats-server-{index}")
                for index, node in enumerate(nodes)
            ]
        if access is None:  # a broker of the operator's: every service is who --nats-creds says
            access = dict.fromkeys(auth.ROLES, ClientAuth.of(settings))
        children = plan_children(settings, nats_url, gpus, host, os.getpid(), metrics_dir, access)
        for child in children:
            args, env = child.command()
            supervisor.add(child.name, args, env=env)
        await supervisor.start()
        records = await until(
            stop,
            wait_settled(
                nats_url,
                subjects,
                repositories,
                settings.http_port if settings.allow_http else None,
                settings.ready_timeout_s,
                stop,
                access["router"],
                _health_headers(settings),
            ),
        )
        if records is None and not stop.is_set():
            log.warning(
                "models did not settle within %.0f s; serving what is ready", settings.ready_timeout_s
            )
        elif records is not None:
            print_table(records, endpoint_lines(settings, nats_url, creds_dir))
        await stop.wait()
    except Stopped:
        pass
    finally:
        # Also after a failed or interrupted startup: no child and no nats-server is left.
        log.info("stopping: gateway, orchestrator, workers, router, then NATS")
        try:
            await supervisor.stop(
                ["gateway", "ensemble", "worker", "router"], settings.shutdown_timeout_s + SUPERVISOR_GRACE_S
            )
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
            if temporary_creds is not None:
                shutil.rmtree(temporary_creds, ignore_errors=True)
            await cancel_and_wait(broker_watches, 2.0)
            if broker is not None:
                await broker.stop(NATS_STOP_TIMEOUT_S)
