"""The `natron` command: `serve` runs the whole mesh on one box; `gateway`, `router` and
`worker` run one service each against a NATS URL, so they can run on different hosts.

This module wires things up and owns the signals; the services themselves never read the
environment or install signal handlers. Flag names follow Triton's where Triton has the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from broker.subjects import Subjects
from natron.cli.services import WorkerTuning
from router.service import RouterOptions

log = logging.getLogger("natron")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", default="natron", help="subject prefix of this deployment")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def _add_repository(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repository", nargs="?", type=Path, help="Triton model repository")
    parser.add_argument("--model-repository", dest="model_repository", type=Path, default=None)
    parser.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default="none")
    parser.add_argument("--repository-poll-secs", type=float, default=15.0)
    parser.add_argument(
        "--load-model", action="append", default=[], help="explicit mode: load at start ('*' for all)"
    )
    parser.add_argument("--upload-dir", type=Path, default=None, help="where files uploaded with load go")


def _add_worker_tuning(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ack-wait-s", type=float, default=10.0, help="redeliver a dead worker's requests after this long"
    )
    parser.add_argument("--drain-timeout-s", type=float, default=30.0)
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="intra-op threads per CPU model instance (0: framework default)",
    )
    # A testing and benchmarking aid: a worker made slower on purpose.
    parser.add_argument("--throttle-ms", type=float, default=0.0, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="natron", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run NATS, router, gateway and worker on this box")
    _add_repository(serve)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--http-address", default="0.0.0.0")
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--nats-url", default=None, help="use this NATS server instead of an embedded one")
    serve.add_argument("--nats-port", type=int, default=4222, help="port of the embedded NATS server")
    serve.add_argument("--max-payload-mb", type=int, default=16, help="NATS max_payload, 1..64 MiB")
    serve.add_argument("--workers", type=int, default=1, help="CPU worker processes")
    serve.add_argument("--ready-timeout-s", type=float, default=120.0)
    _add_worker_tuning(serve)
    _add_common(serve)

    gateway = commands.add_parser("gateway", help="the HTTP gateway alone")
    gateway.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    gateway.add_argument("--http-port", type=int, default=8000)
    gateway.add_argument("--http-address", default="0.0.0.0")
    gateway.add_argument("--metrics-port", type=int, default=0, help="0: no metrics endpoint")
    gateway.add_argument("--default-timeout-s", type=float, default=60.0)
    gateway.add_argument("--max-body-mb", type=int, default=64)
    _add_common(gateway)

    router = commands.add_parser("router", help="the control plane alone")
    _add_repository(router)
    router.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    router.add_argument("--metrics-port", type=int, default=0, help="the router's own metrics; 0: none")
    _add_common(router)

    orchestrator = commands.add_parser("ensemble", help="the ensemble orchestrator alone")
    orchestrator.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    orchestrator.add_argument("--worker-id", default=None)
    orchestrator.add_argument("--metrics-port", type=int, default=0)
    _add_worker_tuning(orchestrator)
    _add_common(orchestrator)

    worker = commands.add_parser("worker", help="one worker process alone")
    worker.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    worker.add_argument("--worker-id", default=None)
    worker.add_argument("--metrics-port", type=int, default=0, help="this worker's own metrics; 0: none")
    worker.add_argument("--device", default="cpu", help="'cpu', 'gpu:N' or 'gpu:<UUID>' (GPU or MIG slice)")
    _add_worker_tuning(worker)
    _add_common(worker)
    return parser


def _repository(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    repository: Path | None = args.model_repository or args.repository
    if repository is None:
        parser.error("a model repository is required (positional or --model-repository)")
    if not repository.is_dir():
        parser.error(f"model repository '{repository}' is not a directory")
    return repository.resolve()


def _run(main: Callable[[asyncio.Event], Awaitable[None]], parent_pid: int | None) -> None:
    """Run `main(stop)` on uvloop; SIGINT/SIGTERM set `stop`, a second one forces exit."""
    import uvloop

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        watchdog = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
        try:
            await main(stop)
        finally:
            if watchdog is not None:
                watchdog.cancel()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(runner())


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """A child of `natron serve` stops when its supervisor is gone (even after SIGKILL)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("supervisor %d is gone; stopping", parent_pid)
            stop.set()
            return
        await asyncio.sleep(1.0)


def router_options(args: argparse.Namespace, repository: Path) -> RouterOptions:
    return RouterOptions(
        repository=repository,
        control_mode=args.model_control_mode,
        poll_interval_s=args.repository_poll_secs,
        load_models=tuple(args.load_model),
        upload_dir=args.upload_dir,
    )


def tuning(args: argparse.Namespace) -> WorkerTuning:
    return WorkerTuning(
        ack_wait_s=args.ack_wait_s,
        drain_timeout_s=args.drain_timeout_s,
        throttle_s=args.throttle_ms / 1000,
        cpu_threads=args.cpu_threads,
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {args.command}[%(process)d] %(name)s: %(message)s",
    )
    subjects = Subjects(args.prefix)

    if args.command == "gateway":
        from gateway.keys import GatewayOptions
        from natron.cli.services import run_gateway

        options = GatewayOptions(
            nats_url=args.nats_url,
            subjects=subjects,
            default_timeout_s=args.default_timeout_s,
            max_body_bytes=args.max_body_mb * 1024 * 1024,
        )
        _run(
            lambda stop: run_gateway(options, args.http_address, args.http_port, args.metrics_port, stop),
            args.parent_pid,
        )
    elif args.command == "router":
        from natron.cli.services import run_router

        router_opts = router_options(args, _repository(args, parser))
        _run(
            lambda stop: run_router(args.nats_url, subjects, router_opts, stop, args.metrics_port),
            args.parent_pid,
        )
    elif args.command == "worker":
        from natron.cli.services import run_worker

        _run(
            lambda stop: run_worker(
                args.nats_url, subjects, args.worker_id, args.device, tuning(args), stop, args.metrics_port
            ),
            args.parent_pid,
        )
    elif args.command == "ensemble":
        from natron.cli.services import run_worker

        _run(
            lambda stop: run_worker(
                args.nats_url,
                subjects,
                args.worker_id,
                "cpu",
                tuning(args),
                stop,
                args.metrics_port,
                orchestrator=True,
            ),
            args.parent_pid,
        )
    elif args.command == "serve":
        from natron.cli.serve import serve

        repository = _repository(args, parser)
        _run(lambda stop: serve(args, repository, subjects, stop), None)
    else:  # argparse's `required=True` makes this unreachable
        parser.error(f"unknown command {args.command}")
    sys.exit(0)
