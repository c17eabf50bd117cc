"""`natron serve`: the whole mesh on one box. An embedded nats-server with JetStream (unless
--nats-url names one), then router, workers and gateway as supervised processes; prints the
model table once the repository has settled, as Triton does, and stops everything in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from broker import jetstream
from broker.server import EmbeddedNatsServer, ServerOptions
from broker.subjects import Subjects, check_name
from natron.cli.supervisor import Supervisor
from natron.errors import InvalidArgument
from natron.records import LOADING, ModelRecord
from workers.devices import discover_gpus

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def expected_models(repository: Path) -> set[str]:
    names = set()
    for child in repository.iterdir():
        if child.is_dir() and not child.name.startswith("."):
            with contextlib.suppress(InvalidArgument):
                names.add(check_name("model", child.name))
    return names


async def wait_settled(
    nats_url: str, subjects: Subjects, repository: Path, http_port: int, timeout_s: float, stop: asyncio.Event
) -> list[ModelRecord] | None:
    """The repository's records once no version is LOADING and the gateway answers ready."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    expected = expected_models(repository)
    nc = await jetstream.connect(nats_url, name="natron-serve")
    try:
        kv = await jetstream.ensure_bucket(nc.jetstream(), subjects.models_bucket)
        async with aiohttp.ClientSession() as http:
            while loop.time() < deadline and not stop.is_set():
                records: list[ModelRecord] = []
                with contextlib.suppress(Exception):  # NoKeysError while the router starts
                    for key in await kv.keys():
                        entry = await kv.get(key)
                        if entry.value:
                            records.append(ModelRecord.from_json(entry.value))
                names = {r.name for r in records}
                settled = expected <= names and not any(
                    s.state == LOADING for r in records for s in r.versions.values()
                )
                if settled and await _gateway_ready(http, http_port):
                    return sorted(records, key=lambda r: r.name)
                await asyncio.sleep(0.2)
        return None
    finally:
        await nc.close()


async def _gateway_ready(http: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with http.get(
            f"http://127.0.0.1:{port}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=1)
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


async def serve(args: argparse.Namespace, repository: Path, subjects: Subjects, stop: asyncio.Event) -> None:
    server: EmbeddedNatsServer | None = None
    nats_url: str = args.nats_url
    if nats_url is None:
        server = EmbeddedNatsServer(
            ServerOptions(
                port=args.nats_port,
                host="0.0.0.0" if args.http_address == "0.0.0.0" else "127.0.0.1",
                max_payload_bytes=args.max_payload_mb * MiB,
            )
        )
        await server.start()
        nats_url = f"nats://127.0.0.1:{server.port}"
    common = ["--prefix", subjects.prefix, "--log-level", args.log_level, "--parent-pid", str(os.getpid())]
    supervisor = Supervisor()
    control = [
        "--model-control-mode",
        args.model_control_mode,
        "--repository-poll-secs",
        str(args.repository_poll_secs),
    ]
    for name in args.load_model:
        control += ["--load-model", name]
    if args.upload_dir is not None:
        control += ["--upload-dir", str(args.upload_dir)]
    supervisor.add("router", ["router", str(repository), "--nats-url", nats_url, *control, *common])
    tuning = [
        "--ack-wait-s", str(args.ack_wait_s), "--drain-timeout-s", str(args.drain_timeout_s),
        "--throttle-ms", str(args.throttle_ms),
    ]  # fmt: skip
    host = socket.gethostname()
    gpus = await asyncio.to_thread(discover_gpus)
    if gpus:
        # One worker per GPU or MIG slice, pinned to it by UUID, so each device pulls work by
        # its own capacity; the CPU serves only where no GPU is.
        for gpu in gpus:
            supervisor.add(
                f"worker-gpu{gpu.index}-{gpu.uuid[-8:]}",
                ["worker", "--nats-url", nats_url, "--worker-id", f"{host}-{gpu.uuid}",
                 "--device", f"gpu:{gpu.uuid}", *tuning, *common],
                env={"CUDA_VISIBLE_DEVICES": gpu.uuid},
            )  # fmt: skip
    else:
        # N CPU workers on one host split its cores, unless told otherwise: N processes that
        # each spread over every core only fight each other.
        threads = args.cpu_threads or (
            max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else 0
        )
        if threads:
            tuning += ["--cpu-threads", str(threads)]
        for index in range(args.workers):
            supervisor.add(
                f"worker-{index}",
                ["worker", "--nats-url", nats_url, "--worker-id", f"{host}-cpu-{index}", *tuning, *common],
            )
    supervisor.add(
        "ensemble",
        ["ensemble", "--nats-url", nats_url, "--worker-id", f"{host}-ensemble", *tuning, *common],
    )
    supervisor.add(
        "gateway",
        [
            "gateway",
            "--nats-url",
            nats_url,
            "--http-port",
            str(args.http_port),
            "--http-address",
            args.http_address,
            "--metrics-port",
            str(args.metrics_port),
            "--max-body-mb",
            str(args.max_payload_mb),
            *common,
        ],
    )
    try:
        await supervisor.start()
        records = await wait_settled(
            nats_url, subjects, repository, args.http_port, args.ready_timeout_s, stop
        )
        if records is None and not stop.is_set():
            log.warning("models did not settle within %.0f s; serving what is ready", args.ready_timeout_s)
        if records is not None:
            print_table(
                records,
                [
                    f"HTTP endpoint:    http://{args.http_address}:{args.http_port}",
                    f"Metrics endpoint: http://{args.http_address}:{args.metrics_port}/metrics",
                    f"NATS:             {nats_url}",
                ],
            )
        await stop.wait()
    finally:
        log.info("stopping: gateway, orchestrator, workers, router, then NATS")
        await supervisor.stop(["gateway", "ensemble", "worker", "router"])
        if server is not None:
            await server.stop()
