"""The one test harness: `natron serve` as users run it (`natron_serve`), a mesh of separately
started processes (`Mesh`: nats-server, router, workers, gateway, each killable on its own), and
`wait_until` / `wait_until_async`, the one polling loop for conditions no event announces
(another process's state).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from broker.auth import (
    SERVICE_ROLES,
    ClientAuth,
    Role,
    authorization_block,
    ensure_credentials,
    private_inbox,
    seed_path,
)
from broker.server import ServerOptions, config_text, find_nats_server, free_ports
from broker.subjects import Subjects

ROOT = Path(__file__).resolve().parent.parent


class GiveUp(Exception):
    """Raised by a `wait_until` predicate when the condition can no longer come true (the
    process it waits for has exited): the wait ends at once instead of at its timeout."""


def _timed_out(what: str, timeout_s: float, last_error: Exception | None) -> AssertionError:
    return AssertionError(f"{what} not reached within {timeout_s} s (last error: {last_error!r})")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 30, what: str = "condition", interval_s: float = 0.05
) -> Any:
    """Poll `predicate` until it returns a truthy value (returned); errors count as not yet,
    except `GiveUp`, which ends the wait."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except GiveUp:
            raise
        except Exception as exc:  # not there yet (no bucket, no key, no listener)
            last_error = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s, last_error)
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Callable[[], Awaitable[Any] | Any],
    timeout_s: float = 30,
    what: str = "condition",
    interval_s: float = 0.05,
) -> Any:
    """`wait_until` for a test running on the event loop: the predicate may be a coroutine
    function, and the pauses yield to the loop instead of blocking it."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(value, max(deadline - time.monotonic(), interval_s))
            if value:
                return value
        except GiveUp:
            raise
        except Exception as exc:  # not there yet
            last_error = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s, last_error)
        await asyncio.sleep(interval_s)


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:port
    host_port: str  # 127.0.0.1:port, as tritonclient wants it
    nats_url: str
    metrics_url: str
    output: Path
    repository: Path
    grpc_url: str  # 127.0.0.1:port, as tritonclient.grpc wants it
    pid: int = 0  # the natron serve process
    creds_dir: Path | None = None  # the embedded broker's per-role credentials

    def nats_options(self, role: Role = "client") -> dict[str, Any]:
        """nats.connect's keyword arguments to connect as `role`."""
        assert self.creds_dir is not None, "this natron serve has no embedded broker"
        return role_options(self.creds_dir, role)

    def auth(self, role: Role) -> ClientAuth:
        """What a service started here as `role` connects with."""
        assert self.creds_dir is not None, "this natron serve has no embedded broker"
        return ClientAuth(seed_path(self.creds_dir, role))


def role_options(creds_dir: Path, role: Role) -> dict[str, Any]:
    """nats.connect's arguments for `role`: its seed, and a service's own inbox prefix (where
    only it may subscribe); a client keeps nats-py's default inboxes."""
    options: dict[str, Any] = {"nkeys_seed": str(seed_path(creds_dir, role))}
    if role in SERVICE_ROLES:
        options["inbox_prefix"] = private_inbox(Subjects(), role)
    return options


def _wait_ready(url: str, models: list[str], process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until the server and every model of `models` answer ready; a model once ready is not
    asked again. Ends at once if `natron serve` exits."""
    pending = list(models)

    def ready() -> bool:
        if process.poll() is not None:
            raise GiveUp(f"natron serve exited with {process.returncode}")
        if requests.get(f"{url}/v2/health/ready", timeout=1).status_code != 200:
            return False
        pending[:] = [
            m for m in pending if requests.get(f"{url}/v2/models/{m}/ready", timeout=1).status_code != 200
        ]
        return not pending

    try:
        wait_until(ready, timeout_s, "natron serve ready", 0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; models not ready: {pending}") from None


def free_consecutive_ports(count: int, avoid: frozenset[int] | set[int] = frozenset()) -> int:
    """The first of `count` consecutive loopback ports that are all free now."""
    for _ in range(100):
        base = free_ports(1)[0]
        ports = range(base, base + count)
        if avoid & set(ports) or base + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def child_processes(parent: int) -> list[tuple[int, str]]:
    """The live children of `parent`, with their command lines (arguments joined by spaces)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z":
            children.append((int(entry.name), cmd))
    return sorted(children)


@contextlib.contextmanager
def natron_serve(
    repository: Path, ready: list[str], log_dir: Path, extra_args: tuple[str, ...] = (), timeout_s: float = 90
) -> Iterator[Served]:
    """`natron serve` as users run it (embedded NATS, router, gateway, worker, orchestrator) on
    free ports, until `ready` models answer ready; stopped with Ctrl-C (SIGINT) afterwards."""
    http_port, metrics_port, grpc_port = free_ports(3)
    # `--nats-cluster N` puts node i on the NATS port plus i: keep N ports free in a row.
    cluster = extra_args[extra_args.index("--nats-cluster") + 1] if "--nats-cluster" in extra_args else "1"
    nats_port = free_consecutive_ports(int(cluster), avoid={http_port, metrics_port, grpc_port})
    output = log_dir / "serve.log"
    creds_dir: Path | None = None
    if "--nats-url" not in extra_args and "--nats-creds-dir" not in extra_args:
        creds_dir = log_dir / "creds"
        extra_args = (*extra_args, "--nats-creds-dir", str(creds_dir))
    with output.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "natron", "serve", str(repository),
                "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                "--nats-port", str(nats_port), "--http-address", "127.0.0.1",
                "--grpc-port", str(grpc_port), "--grpc-address", "127.0.0.1", *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        url = f"http://127.0.0.1:{http_port}"
        try:
            _wait_ready(url, ready, process, timeout_s)
            yield Served(
                url,
                f"127.0.0.1:{http_port}",
                f"nats://127.0.0.1:{nats_port}",
                f"http://127.0.0.1:{metrics_port}/metrics",
                output,
                repository,
                f"127.0.0.1:{grpc_port}",
                process.pid,
                creds_dir,
            )
        except BaseException:
            print(output.read_text(errors="replace")[-8000:])
            raise
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# The credentials each `natron` subcommand connects with in a Mesh.
_COMMAND_ROLES: dict[str, Role] = {
    "router": "router",
    "push": "router",
    "worker": "worker",
    "ensemble": "orchestrator",
    "gateway": "gateway",
    "serve": "admin",
}


class Mesh:
    def __init__(self, repository: Path, router_args: list[str] | None = None) -> None:
        self.repository = repository
        self.router_args = router_args or []
        # All at once: consecutive free_port() calls may hand the same just-released port back.
        # A third, for a test that gives a service a metrics port.
        self.nats_port, self.http_port, self.spare_port = free_ports(3)
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="natron-mesh-")
        self.logs = Path(self._tmp.name)
        # Every role proves who it is, as under `natron serve` (broker/auth.py).
        self.creds_dir = self.logs / "creds"

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        # Unbuffered: a test reads the logs while the processes run.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.processes[name] = process
        return process

    def start_nats(self) -> None:
        """nats-server configured as `natron serve` configures it (broker.server.config_text:
        max_payload, max_pending, JetStream limits), in a process of its own that a test can kill."""
        conf = self.logs / "nats.conf"
        keys = ensure_credentials(self.creds_dir)
        options = ServerOptions(port=self.nats_port, authorization=authorization_block(keys, Subjects()))
        conf.write_text(config_text(options, self.logs / "js"))
        process = self._spawn("nats", [find_nats_server(), "-c", str(conf)])

        def listening() -> bool:
            if process.poll() is not None:
                raise GiveUp(f"nats-server exited with {process.returncode}: {self.log('nats')[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.nats_port), timeout=0.5):
                return True

        wait_until(listening, 10, "nats-server listening")

    def natron(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """`natron <args>`; a command given --nats-url connects with its role's credentials."""
        role = _COMMAND_ROLES.get(args[0]) if args else None
        creds = ["--nats-creds", str(self.creds(role))] if role and "--nats-url" in args else []
        return self._spawn(name, [sys.executable, "-m", "natron", *args, *creds, "--log-level", "info"])

    def creds(self, role: Role) -> Path:
        return seed_path(self.creds_dir, role)

    def nats_options(self, role: Role = "client") -> dict[str, Any]:
        """nats.connect's keyword arguments to connect as `role`."""
        return role_options(self.creds_dir, role)

    def start_router(self) -> None:
        self.natron("router", "router", str(self.repository), "--nats-url", self.nats_url, *self.router_args)

    def start_worker(self, worker_id: str, *extra: str) -> None:
        self.natron(worker_id, "worker", "--nats-url", self.nats_url, "--worker-id", worker_id, *extra)

    def start_gateway(self, *extra: str) -> None:
        self.natron("gateway", "gateway", "--nats-url", self.nats_url, "--http-port", str(self.http_port),
                    "--http-address", "127.0.0.1", "--default-timeout-s", "30", *extra)  # fmt: skip

    def signal(self, name: str, signum: int) -> None:
        self.processes[name].send_signal(signum)

    def wait_exit(self, name: str, timeout_s: float = 30) -> int:
        return self.processes[name].wait(timeout=timeout_s)

    def stop(self) -> None:
        for name in [
            "gateway",
            *[n for n in self.processes if n not in ("gateway", "router", "nats")],
            "router",
            "nats",
        ]:
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._tmp.cleanup()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    # -- HTTP --------------------------------------------------------------------------------

    def wait_ready(self, model: str, version: str = "", timeout_s: float = 60) -> None:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        self.wait_until(
            lambda: requests.get(self.url + path, timeout=2).status_code == 200,
            timeout_s,
            f"{model} ready",
        )

    def wait_until(self, predicate: Callable[[], Any], timeout_s: float = 30, what: str = "condition") -> Any:
        return wait_until(predicate, timeout_s, f"{what} (logs in {self.logs})")

    def index(self) -> list[dict[str, Any]]:
        response = requests.post(self.url + "/v2/repository/index", timeout=10)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def infer_tiny(self, value: float, model: str = "tiny", timeout_s: float = 30) -> requests.Response:
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [value] * 16}]}
        return requests.post(f"{self.url}/v2/models/{model}/infer", data=json.dumps(body), timeout=timeout_s)
