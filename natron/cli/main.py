"""The `natron` command: `serve` runs the whole mesh on one box; `gateway`, `router`, `worker`
and `ensemble` run one service each against a NATS URL, so they can run on different hosts.

This module wires things up and owns the signals; the services themselves never read the
environment or install signal handlers. It parses the settings once (natron/settings.py: flags
over `NATRON_*` variables over defaults) and hands them to the service's runner. Flag names
follow Triton's where Triton has the flag, and are the settings' field names otherwise; the
rest of tritonserver's command line is read, or refused by name, in natron/cli/triton_flags.py.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from broker.server import BrokerPortInUse
from natron.cli import triton_flags
from natron.logsettings import ISO8601_DATEFMT
from natron.settings import (
    MAX_MODEL_LOAD_THREADS,
    ROLES,
    SETTINGS_ENV,
    TRITON_SPELLINGS,
    GatewaySettings,
    OrchestratorSettings,
    PushSettings,
    RoleSettings,
    RouterSettings,
    SettingsError,
    WorkerSettings,
    env_name,
    flag_name,
    load,
)
from natron.tasks import ServiceFailed, cancel_and_wait

log = logging.getLogger("natron")
T = TypeVar("T")

# What a flag's value is, where its field's name does not say it well.
_METAVARS = {
    "load_model": "NAME",
    "model_repository": "DIR",
    "upload_dir": "DIR",
    "model_cache_dir": "DIR",
    "metrics_config": "SETTING=VALUE",
    "trace_config": "[MODE,]SETTING=VALUE",
    "http_restricted_api": "GROUPS:KEY=VALUE",
    "grpc_restricted_protocol": "GROUPS:KEY=VALUE",
}

_HELP = {
    "serve": "run NATS, router, gateway, workers and the orchestrator on this box",
    "gateway": "the HTTP gateway alone",
    "router": "the control plane alone",
    "worker": "one worker process alone",
    "ensemble": "the ensemble orchestrator alone",
    "push": "put a model repository's files in the model store, for workers without it",
}


_TOOLS = {
    "creds": "write every role's NATS credentials and the broker's auth.conf",
    "perf": "drive load at a model and measure it, as perf_analyzer (HTTP, gRPC, WebSocket, NATS)",
    "analyze": "search a model's configs for throughput against latency and memory, per device kind",
    "convert": "turn a PyTorch or TensorFlow model into ONNX / TensorRT and a checked model folder",
}


def _version() -> str:
    try:
        return version("natron")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from natron import __version__

        return __version__


def _shown(value: object) -> str:
    """A default as a user would type it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value in (None, "", ()):
        return "none"
    return str(value)


def _add_settings(parser: argparse.ArgumentParser, model: type[RoleSettings]) -> None:
    """One flag per field of `model`, named after it (and after tritonserver's flag, where that
    is spelled otherwise), its help line from the field's description and its default. No flag
    has a default here: a flag not given leaves the field to its `NATRON_*` variable or its
    default, which the help line names. A list's flag is repeated, as Triton's are."""
    for name, field in model.model_fields.items():
        if name == "model_repository":
            parser.add_argument(
                "repository",
                nargs="?",
                metavar="REPO",
                help=f"a Triton model repository (or --model-repository, repeatable; {env_name(name)})",
            )
        description = field.description or ""
        if field.is_required():
            shown = "; required"
        elif "(default:" in description:  # its description words the default
            shown = ""
        else:
            shown = f"; default {_shown(field.get_default(call_default_factory=True))}"
        options: dict[str, Any] = {"dest": name, "help": f"{description} [{env_name(name)}{shown}]"}
        annotation = field.annotation
        if name in _METAVARS:
            options["metavar"] = _METAVARS[name]
        elif typing.get_origin(annotation) is typing.Literal:
            options["metavar"] = "{" + ",".join(typing.get_args(annotation)) + "}"
        elif annotation is bool:
            options["metavar"] = "{true,false}"
        # Triton's --model-repository is repeatable, as is every list here.
        if typing.get_origin(annotation) is tuple:
            options["action"] = "append"
        spellings = [flag_name(name)] + ([TRITON_SPELLINGS[name]] if name in TRITON_SPELLINGS else [])
        parser.add_argument(*spellings, **options)


def build_parser() -> argparse.ArgumentParser:
    version_line = f"natron {_version()}"
    parser = argparse.ArgumentParser(
        prog="natron",
        description=__doc__,
        epilog="Every flag can also be set as a NATRON_<FLAG> environment variable "
        "(NATRON_HTTP_PORT=8000); a flag given wins over the variable.",
    )
    parser.add_argument(
        "--version", action="version", version=version_line, help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}
    for command, model in ROLES.items():
        # SUPPRESS: only the flags given reach the settings, so they can win over NATRON_*.
        # No abbreviations: a prefix of a flag must not pass for it, nor for a refused one.
        sub = commands.add_parser(
            command,
            help=_HELP[command],
            argument_default=argparse.SUPPRESS,
            allow_abbrev=False,
            epilog="Every flag can also be set as a NATRON_<FLAG> environment variable; a flag "
            "given wins. tritonserver's flags that natron does not take are refused by name, "
            "with the reason (docs/deployment.md lists them).",
        )
        sub.add_argument(
            "--version", action="version", version=version_line, help="print the version and exit"
        )
        _add_settings(sub, model)
        triton_flags.add_translated(sub, model.model_fields)
        subs[command] = sub
    triton_flags.refuse_the_rest(subs)
    # Commands with parsers of their own (main() hands them their arguments before this parser
    # runs): listed here so that `natron --help` names them.
    for command, text in _TOOLS.items():
        commands.add_parser(command, help=text, add_help=False)
    return parser


def parse(argv: list[str] | None = None, settings_json: str | None = None) -> RoleSettings:
    """The settings of this process, from the command line and the environment, or, for a
    child of `natron serve`, from `settings_json` (its parent's choice) and its command line.
    Exits with status 2 and a message naming the field and the value when one is invalid,
    and the flag when it is a tritonserver flag natron does not take."""
    parser = build_parser()
    flags = dict(vars(parser.parse_args(argv)))
    command = flags.pop("command")
    model = ROLES[command]
    repository = flags.pop("repository", None)
    if repository is not None:
        flags.setdefault("model_repository", [repository])  # --model-repository wins, as before
    try:
        flags = triton_flags.translate(flags)
        for name, value in flags.items():
            if isinstance(value, list):
                flags[name] = tuple(value)
        settings = load(model, flags, settings_json)
        _check_metrics_config(settings)
        _check_trace_config(settings)
        _check_restricted(settings)
    except SettingsError as exc:
        parser.exit(2, f"natron {command}: error: {exc}\n")
    return settings


def _check_metrics_config(settings: RoleSettings) -> None:
    """The metrics settings, read as the metrics will read them. Here rather than in the
    settings: the vocabulary's modules do not import each other."""
    given: tuple[str, ...] = getattr(settings, "metrics_config", ())
    if given:
        from natron.prometheus import parse_metrics_config

        try:
            parse_metrics_config(given)
        except ValueError as exc:
            raise SettingsError(f"metrics_config: {exc} (--metrics-config or NATRON_METRICS_CONFIG)") from exc


def _check_trace_config(settings: RoleSettings) -> None:
    """Triton's trace settings, read as the gateway will read them, and the trace file's
    directory: a file that cannot be written is refused at startup, not at the first trace."""
    given: tuple[str, ...] = getattr(settings, "trace_config", ())
    if given:
        from natron import tracesettings, tracing

        try:
            startup = tracesettings.startup(given)
        except ValueError as exc:
            raise SettingsError(f"trace_config: {exc} (--trace-config or NATRON_TRACE_CONFIG)") from exc
        if startup.trace_mode == tracesettings.OPENTELEMETRY and not tracing.available():
            raise SettingsError(f"trace_config: --trace-config mode=opentelemetry: {tracing.OTEL_MISSING}")
        path = startup.trace_file
        directory = os.path.dirname(os.path.abspath(path)) if path else ""
        if directory and not (os.path.isdir(directory) and os.access(directory, os.W_OK)):
            raise SettingsError(
                f"trace_config: --trace-config triton,file={path}: {directory} is not a writable directory"
            )


def _check_restricted(settings: RoleSettings) -> None:
    """Triton's restricted API groups, read as the gateway will read them."""
    from natron import restricted_api

    try:
        restricted_api.http(getattr(settings, "http_restricted_api", ()))
        restricted_api.grpc(getattr(settings, "grpc_restricted_protocol", ()))
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def log_formatter(settings: RoleSettings) -> logging.Formatter:
    """The process's log lines: natron's own (local time), or, with `--log-format ISO8601`, as
    Triton stamps them (UTC, to the second, with a Z)."""
    line = f"%(asctime)s %(levelname)s {settings.command}[%(process)d] %(name)s: %(message)s"
    if settings.log_format != "ISO8601":
        return logging.Formatter(line)
    # The same stamp as the logging API's (natron/logsettings.py), which reads it back.
    formatter = logging.Formatter(line, datefmt=ISO8601_DATEFMT)
    formatter.converter = time.gmtime
    return formatter


def configure_logging(settings: RoleSettings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter(settings))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])


def _run(
    main: Callable[[asyncio.Event], Awaitable[None]], parent_pid: int | None, shutdown_timeout_s: float
) -> None:
    """Run `main(stop)` on uvloop and exit with its outcome: 0 after a clean stop, 1 when it
    failed (at startup, or an essential task died), so that a supervisor restarts it.

    SIGINT/SIGTERM set `stop`; from then on `main` has `shutdown_timeout_s` to return. Past it,
    or at a second signal, the process exits at once: its children go too (a Python stub, a
    child of `natron serve` and the embedded nats-server each notice their parent is gone)."""
    import uvloop

    executor = _CountingExecutor(thread_name_prefix="natron-blocking")

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(executor)
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                _exit_now(128 + signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        if _early_signals:
            log.info("%s before startup: stopping", signal.Signals(_early_signals[0]).name)
            stop.set()
        watchdog = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
        service: asyncio.Future[Any] = asyncio.ensure_future(main(stop))
        stopping: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="stop-signal")
        first: set[asyncio.Future[Any]] = {service, stopping}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not service.done():
            await asyncio.wait({service}, timeout=shutdown_timeout_s)
        if not service.done():
            log.error("still running %.0f s after the stop signal: exiting now", shutdown_timeout_s)
            _log_tasks()
            _exit_now(1)
        code = 0
        try:
            service.result()
        except ServiceFailed as exc:
            log.error("%s; exiting with status 1 (a supervisor restarts this service)", exc)
            code = 1
        except BrokerPortInUse as exc:  # a refusal to explain, not a crash to trace
            log.error("%s", exc)
            code = 1
        except Exception:
            log.exception("failed; exiting with status 1")
            code = 1
        await cancel_and_wait([stopping] + ([watchdog] if watchdog is not None else []), 1.0)
        # What is left (a library's task) is cancelled; a task that will not end, or a blocking
        # call still running in a thread (a model's initialize() when a stop came mid-load),
        # must not hold the exit: the interpreter would wait for it for ever.
        current = asyncio.current_task()
        left = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
        stuck = await cancel_and_wait(left, 1.0)
        if stuck or executor.busy:
            log.warning("%d blocking call(s) still running: not waiting for them", executor.busy)
            _exit_now(code)
        return code

    runner_ = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        code = runner_.run(runner())
    finally:
        runner_.close()
    if code:
        sys.exit(code)


# Signals that came before the event loop took them over: the stop they ask for is not lost.
_early_signals: list[int] = []


def _remember_early_signals() -> None:
    """Until `_run` installs its handlers (a second or so of imports and parsing), SIGINT and
    SIGTERM are remembered instead of killing a half-started process, or, as PID 1 in a
    container, being ignored."""

    def remember(signum: int, frame: object) -> None:
        _early_signals.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, remember)


def _exit_now(code: int) -> None:
    """Exit without waiting for threads or tasks, with the log written out."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _log_tasks() -> None:
    """Where each task still running waits: what made the stop overrun its budget."""
    for task in asyncio.all_tasks():
        stack = io.StringIO()
        task.print_stack(limit=8, file=stack)
        log.error("still running: %s", stack.getvalue().strip())


class _CountingExecutor(ThreadPoolExecutor):
    """The event loop's default executor, counting the blocking calls still running in it."""

    def __init__(self, thread_name_prefix: str) -> None:
        # Threads start only when needed; enough for the most model loads a worker allows
        # (--model-load-thread-count) next to the other blocking calls.
        super().__init__(max_workers=MAX_MODEL_LOAD_THREADS + 8, thread_name_prefix=thread_name_prefix)
        self._busy_lock = threading.Lock()
        self.busy = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        def counted() -> T:
            try:
                return fn(*args, **kwargs)
            finally:
                with self._busy_lock:
                    self.busy -= 1

        with self._busy_lock:
            self.busy += 1
        try:
            return super().submit(counted)
        except BaseException:
            with self._busy_lock:
                self.busy -= 1
            raise


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """A child of `natron serve` stops when its supervisor is gone (even after SIGKILL)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("supervisor %d is gone; stopping", parent_pid)
            stop.set()
            return
        await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["creds"]:  # a one-shot file writer, not a service: no settings, no loop
        from natron.cli import creds

        sys.exit(creds.main(args[1:]))
    # The tools are clients of a mesh, not services: their own flags, no settings, no signals.
    if args[:1] == ["perf"]:
        from natron.perf import cli as perf_cli

        sys.exit(perf_cli.main(args[1:]))
    if args[:1] == ["analyze"]:
        from natron.analyze import cli as analyze_cli

        sys.exit(analyze_cli.main(args[1:]))
    if args[:1] == ["convert"]:
        from natron.convert import cli as convert_cli

        sys.exit(convert_cli.main(args[1:]))
    _remember_early_signals()
    # Read once and removed: what a parent sent is for this process, not for its descendants.
    settings = parse(argv, os.environ.pop(SETTINGS_ENV, None))
    configure_logging(settings)
    # Imported per role: a worker process loads no gateway code, and the reverse.
    service: Callable[[asyncio.Event], Awaitable[None]]
    budget_s = settings.shutdown_timeout_s
    if isinstance(settings, GatewaySettings):
        from natron.cli.services import run_gateway

        service = functools.partial(run_gateway, settings)
    elif isinstance(settings, RouterSettings):
        from natron.cli.services import run_router

        service = functools.partial(run_router, settings)
    elif isinstance(settings, WorkerSettings | OrchestratorSettings):
        from natron.cli.services import run_worker

        service = functools.partial(run_worker, settings)
    elif isinstance(settings, PushSettings):
        from broker.auth import ClientAuth, private_inbox
        from broker.subjects import Subjects
        from natron.cli.push import run_push

        files_bucket = Subjects(settings.prefix).files_bucket
        service = functools.partial(
            run_push,
            settings.nats_url,
            files_bucket,
            settings.model_repository,
            settings.model_files_store,
            settings.jetstream_replicas,
            ClientAuth.of(settings),
            private_inbox(Subjects(settings.prefix), "router"),
        )
    else:
        from natron.cli.serve import serve, stop_bound_s

        service = functools.partial(serve, settings)
        # Its children each have the budget; it waits for them a little longer, then NATS.
        budget_s = stop_bound_s(settings.shutdown_timeout_s)
    _run(service, settings.parent_pid, budget_s)
    sys.exit(0)
