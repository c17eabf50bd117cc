"""The `natron` command: `serve` runs the whole mesh on one box; `gateway`, `router`, `worker`
and `ensemble` run one service each against a NATS URL, so they can run on different hosts.

This module wires things up and owns the signals; the services themselves never read the
environment or install signal handlers. It parses the settings once (natron/settings.py: flags
over `NATRON_*` variables over defaults) and hands them to the service's runner. Flag names
follow Triton's where Triton has the flag, and are the settings' field names otherwise.
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
import typing
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from natron.settings import (
    ROLES,
    SETTINGS_ENV,
    GatewaySettings,
    OrchestratorSettings,
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

_HELP = {
    "serve": "run NATS, router, gateway, workers and the orchestrator on this box",
    "gateway": "the HTTP gateway alone",
    "router": "the control plane alone",
    "worker": "one worker process alone",
    "ensemble": "the ensemble orchestrator alone",
}


def _version() -> str:
    try:
        return version("natron")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from natron import __version__

        return __version__


def _add_settings(parser: argparse.ArgumentParser, model: type[RoleSettings]) -> None:
    """One flag per field of `model`, named after it, its help line from the field's
    description. No flag has a default here: a flag not given leaves the field to its
    `NATRON_*` variable or its default, which the help line names."""
    for name, field in model.model_fields.items():
        if name == "model_repository":
            parser.add_argument(
                "repository",
                nargs="?",
                metavar="REPO",
                help=f"the Triton model repository (or --model-repository, {env_name(name)})",
            )
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = "" if default in (None, "", ()) else f"; default {default}"
        options: dict[str, Any] = {"dest": name, "help": f"{field.description} [{env_name(name)}{shown}]"}
        if typing.get_origin(field.annotation) is typing.Literal:
            options["metavar"] = "{" + ",".join(typing.get_args(field.annotation)) + "}"
        if name == "load_model":
            options.update(action="append", metavar="NAME")
        parser.add_argument(flag_name(name), **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natron",
        description=__doc__,
        epilog="Every flag can also be set as a NATRON_<FLAG> environment variable "
        "(NATRON_HTTP_PORT=8000); a flag given wins over the variable.",
    )
    parser.add_argument("--version", action="version", version=f"natron {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command, model in ROLES.items():
        # SUPPRESS: only the flags given reach the settings, so they can win over NATRON_*.
        sub = commands.add_parser(command, help=_HELP[command], argument_default=argparse.SUPPRESS)
        _add_settings(sub, model)
    return parser


def parse(argv: list[str] | None = None, settings_json: str | None = None) -> RoleSettings:
    """The settings of this process, from the command line and the environment, or, for a
    child of `natron serve`, from `settings_json` (its parent's choice) and its command line.
    Exits with a message naming the field and the value when one is invalid."""
    parser = build_parser()
    flags = dict(vars(parser.parse_args(argv)))
    command = flags.pop("command")
    repository = flags.pop("repository", None)
    if repository is not None:
        flags.setdefault("model_repository", repository)  # --model-repository wins, as before
    if "load_model" in flags:
        flags["load_model"] = tuple(flags["load_model"])
    try:
        return load(ROLES[command], flags, settings_json)
    except SettingsError as exc:
        parser.exit(2, f"natron {command}: error: {exc}\n")


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
        super().__init__(thread_name_prefix=thread_name_prefix)
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
    _remember_early_signals()
    # Read once and removed: what a parent sent is for this process, not for its descendants.
    settings = parse(argv, os.environ.pop(SETTINGS_ENV, None))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {settings.command}[%(process)d] %(name)s: %(message)s",
    )
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
    else:
        from natron.cli.serve import serve, stop_bound_s

        service = functools.partial(serve, settings)
        # Its children each have the budget; it waits for them a little longer, then NATS.
        budget_s = stop_bound_s(settings.shutdown_timeout_s)
    _run(service, settings.parent_pid, budget_s)
    sys.exit(0)
