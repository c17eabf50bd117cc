"""The server under analysis: a private `natron serve` in explicit control mode when the user
gives a repository, and the repository API that loads each candidate config.

A config is tried by loading the model with Triton's `config` parameter (the override a load
request may carry): the server parses it like a config.pbtxt, the router places it, the workers
load it, and the load answers once it is ready or failed. The model's own files are never
touched; at the end the model is loaded again from its config.pbtxt, or unloaded when it was
not loaded before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from natron.perf.api import PerfError, ServerGone

# A load is a worker opening the model: seconds for most, minutes for a TensorRT build.
LOAD_TIMEOUT_S = 600.0
START_TIMEOUT_S = 120.0
# natron serve stops its children within its shutdown budget (30 s by default).
STOP_TIMEOUT_S = 40.0


# How long a 503 from the control plane is waited out: a private server's router starts a
# moment after its gateway says ready (with no model to load, ready comes first).
UNAVAILABLE_RETRY_S = 30.0


class AnalyzeError(Exception):
    """A problem the user can act on, said in one line."""


class Unavailable(PerfError):
    """A 503: the server cannot do it now, and may later."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class Endpoints:
    http_url: str  # the gateway, e.g. http://127.0.0.1:8000
    metrics_url: str  # its Prometheus endpoint
    grpc_url: str = ""
    nats_url: str = ""
    nats_creds: Path | None = None


class PrivateServer:
    """`natron serve REPO --model-control-mode explicit` on free loopback ports, for one run."""

    def __init__(self, repository: Path, workers: int = 1, extra: list[str] | None = None) -> None:
        self._repository = repository
        self._workers = workers
        self._extra = extra or []
        self._process: asyncio.subprocess.Process | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="natron-analyze-serve-", suffix=".log", delete=False)
        self._creds = tempfile.mkdtemp(prefix="natron-analyze-creds-")

    @property
    def log_path(self) -> str:
        return self._log.name

    async def start(self) -> Endpoints:
        http, grpc, metrics, nats = (_free_port() for _ in range(4))
        command = [
            sys.executable,
            "-m",
            "natron",
            "serve",
            str(self._repository),
            "--model-control-mode",
            "explicit",
            "--http-address",
            "127.0.0.1",
            "--http-port",
            str(http),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--nats-port",
            str(nats),
            "--nats-creds-dir",
            self._creds,
            "--workers",
            str(self._workers),
            *self._extra,
        ]
        # Its own process group: Ctrl-C in the terminal reaches the analyzer, which then stops
        # the server in order instead of the server dying mid-measurement underneath it.
        self._process = await asyncio.create_subprocess_exec(
            *command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        endpoints = Endpoints(
            http_url=f"http://127.0.0.1:{http}",
            metrics_url=f"http://127.0.0.1:{metrics}/metrics",
            grpc_url=f"127.0.0.1:{grpc}",
            nats_url=f"nats://127.0.0.1:{nats}",
            nats_creds=Path(self._creds) / "client.nk",
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self._process.returncode is not None:
                    raise AnalyzeError(f"natron serve exited with {self._process.returncode}: {self._tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(
                        endpoints.http_url + "/v2/health/ready", timeout=aiohttp.ClientTimeout(total=2)
                    ) as response:
                        if response.status == 200:
                            return endpoints
                await asyncio.sleep(0.25)
        raise AnalyzeError(f"natron serve was not ready within {START_TIMEOUT_S:.0f} s: {self._tail()}")

    def _tail(self) -> str:
        try:
            lines = Path(self._log.name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) if lines else "(no output)"

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)
        shutil.rmtree(self._creds, ignore_errors=True)


class Repository:
    """Triton's model repository and configuration endpoints, as far as analysis needs them."""

    def __init__(self, session: aiohttp.ClientSession, http_url: str) -> None:
        self._session = session
        self._url = http_url.rstrip("/")

    async def _call(self, method: str, path: str, body: Any = None, timeout_s: float = 30.0) -> Any:
        try:
            async with self._session.request(
                method,
                self._url + path,
                data=None if body is None else orjson.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                text = await response.read()
                try:
                    data = orjson.loads(text) if text else {}
                except orjson.JSONDecodeError:
                    data = None
                if response.status >= 400:
                    error = data.get("error") if isinstance(data, dict) else None
                    message = error or text.decode(errors="replace")[:200]
                    kind = Unavailable if response.status == 503 else PerfError
                    raise kind(f"{method} {path}: {response.status} {message}")
                if data is None:
                    raise PerfError(
                        f"{method} {path}: the answer is not JSON; is {self._url} a natron gateway?"
                    )
                return data
        except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
            raise ServerGone(f"{self._url} stopped answering ({exc.__class__.__name__}: {exc})", []) from exc

    async def index(self) -> list[dict[str, Any]]:
        return list(await self._call("POST", "/v2/repository/index", {}))

    async def loaded(self, model: str) -> bool:
        for entry in await self.index():
            if entry.get("name") == model and entry.get("state") == "READY":
                return True
        return False

    async def config(self, model: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/v2/models/{model}/config"))

    async def load(self, model: str, config: dict[str, Any] | None = None) -> None:
        body: dict[str, Any] = {}
        if config is not None:
            body = {"parameters": {"config": orjson.dumps(config).decode()}}
        path = f"/v2/repository/models/{model}/load"
        # 503 is "not now" (the router still starting, or restarting): asked again for a while.
        retry_until = time.monotonic() + UNAVAILABLE_RETRY_S
        while True:
            try:
                await self._call("POST", path, body, timeout_s=LOAD_TIMEOUT_S)
                break
            except Unavailable:
                if time.monotonic() > retry_until:
                    raise
                await asyncio.sleep(0.25)
        # The load answers when the router has the model ready; readiness says the gateway
        # sees it too (its view of the models follows the bucket).
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                async with self._session.get(
                    f"{self._url}/v2/models/{model}/ready", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    if response.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
                raise ServerGone(f"{self._url} stopped answering ({exc})", []) from exc
            await asyncio.sleep(0.1)
        raise PerfError(f"model '{model}' loaded but not ready within 30 s")

    async def unload(self, model: str) -> None:
        await self._call("POST", f"/v2/repository/models/{model}/unload", {})
