"""Life and death of the processes: a service whose loop died leaves and is restarted instead of
lingering, every stop fits the shutdown budget, open streams end with a last frame, and a
stopped `natron serve` leaves no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import requests

from broker.server import free_ports
from examples.build_models import build
from natron.cli.serve import stop_bound_s
from tests.harness import ROOT, Mesh, natron_serve, wait_until

SLOW_CONFIG = """name: "slow"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# A model whose load takes a while: the broker can be pulled away in the middle of it.
SLOW_MODEL = """import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(4)

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())
                ]
            )
            for r in requests
        ]
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("lifecycle")
    build(repo, ["tiny", "simple"], quiet=True)
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    (repo / "slow" / "1" / "model.py").write_text(SLOW_MODEL)
    return repo


def small_repository(repository: Path, tmp_path: Path, names: list[str]) -> Path:
    """A repository of some of the module's models (symlinked, not copied)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in names:
        (repo / name).symlink_to(repository / name, target_is_directory=True)
    return repo


def state(url: str, model: str) -> str:
    index = requests.post(f"{url}/v2/repository/index", json={}, timeout=2).json()
    return str(next((m["state"] for m in index if m["name"] == model), ""))


def infer_slow(url: str) -> requests.Response:
    body = {"inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    return requests.post(f"{url}/v2/models/slow/infer", json=body, timeout=10)


# -- a dead loop ends its process ------------------------------------------------------------


def test_a_worker_that_loses_the_broker_mid_load_finishes_the_load_and_serves_once_it_is_back(
    repository: Path, tmp_path: Path
) -> None:
    """NATS is killed while the worker loads a model, and comes back empty (memory storage).
    No process exits: the router re-creates the stream, consumers and records, the worker
    re-publishes its report and watches the models again, and the model it was loading serves
    (broker/recovery.py)."""
    repo = small_repository(repository, tmp_path, ["tiny", "slow"])
    mesh = Mesh(repo)
    mesh.start_nats()
    try:
        # Not strict: ready while `slow` still loads, which is the moment this test needs.
        # The broker is the mesh's: every service of this serve connects as its operator.
        external = ("--nats-url", mesh.nats_url, "--nats-creds", str(mesh.creds("admin")))
        strict_off = (*external, "--strict-readiness", "false")
        with natron_serve(repo, [], tmp_path, strict_off) as served:
            wait_until(lambda: state(served.url, "slow") == "LOADING", 30, "slow loading")
            mesh.processes["nats"].kill()
            mesh.processes["nats"].wait()
            mesh.start_nats()  # the same port, no streams, no buckets
            wait_until(lambda: infer_slow(served.url).status_code == 200, 60, "slow served again")
            assert infer_slow(served.url).json()["outputs"][0]["data"] == [1, 2, 3, 4]
            assert served.output.read_text().count("model 'slow' version 1 ready") == 1
            text = served.output.read_text()
            assert "exited with code" not in text, text[-4000:]
            assert "broker state re-asserted" in text
    finally:
        mesh.stop()


# -- stopping within the budget --------------------------------------------------------------


def test_sigterm_ends_each_service_at_once_during_a_nats_outage_and_while_nats_is_unreachable(
    repository: Path, tmp_path: Path
) -> None:
    repo = small_repository(repository, tmp_path, ["tiny"])
    mesh = Mesh(repo)
    mesh.start_nats()
    try:
        mesh.start_router()
        mesh.start_worker("w0", "--shutdown-timeout-s", "10")
        mesh.start_gateway()
        mesh.wait_ready("tiny")
        mesh.processes["nats"].kill()
        mesh.processes["nats"].wait()
        # Reconnecting: a drain would raise; the stop closes instead, well within the budget.
        for name in ("gateway", "w0", "router"):
            mesh.signal(name, signal.SIGTERM)
        for name in ("gateway", "w0", "router"):
            assert mesh.wait_exit(name, timeout_s=10) == 0, mesh.log(name)[-3000:]
        # Never connected: a service still trying its first connection stops on SIGTERM too.
        mesh.start_worker("w1")
        wait_until(lambda: "Connection refused" in mesh.log("w1"), 20, "w1 trying to connect")
        started_s = time.monotonic()
        mesh.signal("w1", signal.SIGTERM)
        assert mesh.wait_exit("w1", timeout_s=10) == 0, mesh.log("w1")[-3000:]
        assert time.monotonic() - started_s < 3
    finally:
        mesh.stop()


async def test_a_stopping_gateway_closes_an_idle_websocket_with_1001_and_ends_a_stream_with_a_last_event(
    repository: Path, tmp_path: Path
) -> None:
    from examples import build_backend_models

    repo = tmp_path / "repo"
    build_backend_models.build(repo, ["repeat"], quiet=True)
    mesh = Mesh(repo)
    mesh.start_nats()
    try:
        mesh.start_router()
        mesh.start_worker("w0")
        mesh.natron("gateway", "gateway", "--nats-url", mesh.nats_url, "--http-port", str(mesh.http_port),
                    "--http-address", "127.0.0.1", "--shutdown-timeout-s", "6")  # fmt: skip
        await asyncio.to_thread(mesh.wait_ready, "repeat")
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{mesh.url}/v2/ws")
            # 60 answers 200 ms apart: far longer than the gateway's drain (6 s budget: 3 s).
            sse = await http.post(
                f"{mesh.url}/v2/models/repeat/generate_stream", json={"IN": list(range(60)), "DELAY_MS": 200}
            )
            assert sse.status == 200
            first = await sse.content.readline()
            assert first.startswith(b"data: ")
            started_s = time.monotonic()
            mesh.signal("gateway", signal.SIGTERM)
            closing = await asyncio.wait_for(ws.receive(), 5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1001
            assert time.monotonic() - started_s < 2  # idle: closed at once, not at the drain's end
            events = [line async for line in sse.content if line.startswith(b"data: ")]
            last = json.loads(events[-1].removeprefix(b"data: "))
            assert last == {"error": "the server is shutting down", "status": 503}
            assert len(events) < 59  # cut short by the shutdown, not the end of the stream
        code = await asyncio.to_thread(mesh.wait_exit, "gateway", 10)
        assert code == 0, mesh.log("gateway")[-3000:]
        assert time.monotonic() - started_s < 6
    finally:
        mesh.stop()


# -- natron serve, stopped at random moments -------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(root: int) -> set[int]:
    """Every process whose parent chain leads to `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def naming_parent(pid: int) -> set[int]:
    """Processes whose command line says `--parent-pid pid`: children of that serve, wherever
    they were re-parented."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if b"--parent-pid" in args and args[args.index(b"--parent-pid") + 1] == str(pid).encode():
                found.add(int(entry.name))
    return {p for p in found if alive(p)}


def describe(pids: set[int]) -> str:
    lines = []
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            lines.append(f"{pid}: {b' '.join(args).decode(errors='replace')}")
    return "\n".join(lines)


def test_natron_serve_killed_outright_leaves_no_nats_server_and_no_child_behind(
    repository: Path, tmp_path: Path
) -> None:
    """SIGKILL gives `natron serve` no chance to stop anything: the kernel ends its nats-server
    (PR_SET_PDEATHSIG), and each child notices its supervisor is gone within a second."""
    repo = small_repository(repository, tmp_path, ["tiny"])
    with natron_serve(repo, ["tiny"], tmp_path) as served:
        serve_pid = int(served.output.read_text().split("serve[", 1)[1].split("]", 1)[0])
        started = descendants(serve_pid)
        assert any(b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in started)
        assert naming_parent(serve_pid)
        os.kill(serve_pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in started), 10, "every process of serve gone")


@contextlib.contextmanager
def load(url: str) -> Iterator[None]:
    """A few clients sending requests as fast as they are answered, until the block ends."""
    done = threading.Event()
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}

    def client() -> None:
        with requests.Session() as session:
            while not done.is_set():
                with contextlib.suppress(requests.RequestException):
                    session.post(f"{url}/v2/models/tiny/infer", json=body, timeout=5)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=10)


SERVE_BUDGET_S = 10.0
MOMENTS = ("spawn", "startup", "ready", "load")


def stop_serve_once(repo: Path, log_path: Path, moment: str, rng: random.Random, context: str) -> None:
    """Start `natron serve`, SIGTERM it at `moment`, and check it exits within its bound and
    leaves no process: every descendant seen while it ran, and any process naming it as parent."""
    bound_s = stop_bound_s(SERVE_BUDGET_S)
    http_port, metrics_port, nats_port = free_ports(3)
    url = f"http://127.0.0.1:{http_port}"
    with log_path.open("ab") as log:
        log.write(f"\n==== {context}\n".encode())
        log.flush()
        serve = subprocess.Popen(
            [sys.executable, "-m", "natron", "serve", str(repo), "--http-port", str(http_port),
             "--metrics-port", str(metrics_port), "--nats-port", str(nats_port),
             "--http-address", "127.0.0.1", "--shutdown-timeout-s", str(SERVE_BUDGET_S)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    seen: set[int] = set()

    def watch_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seen.update(descendants(serve.pid))
            time.sleep(0.05)

    def ready() -> bool:
        seen.update(descendants(serve.pid))
        models = ("tiny", "simple")
        return all(requests.get(f"{url}/v2/models/{m}/ready", timeout=1).status_code == 200 for m in models)

    def left() -> set[int]:
        return {pid for pid in seen | naming_parent(serve.pid) if alive(pid)}

    try:
        if moment == "spawn":
            watch_for(rng.uniform(0.0, 0.3))
        elif moment == "startup":
            # From the embedded nats-server's start (serve handles signals by then) to about
            # when the models are ready.
            wait_until(lambda: descendants(serve.pid), 30, f"serve starting, {context}")
            watch_for(rng.uniform(0.0, 2.5))
        else:
            wait_until(ready, 60, f"ready, {context}")
        with load(url) if moment == "load" else contextlib.nullcontext():
            if moment == "load":
                watch_for(0.5)
            seen.update(descendants(serve.pid))
            started_s = time.monotonic()
            serve.send_signal(signal.SIGTERM)
            while serve.poll() is None and time.monotonic() - started_s < bound_s + 5:
                seen.update(descendants(serve.pid))
                time.sleep(0.05)
            took_s = time.monotonic() - started_s
        assert serve.poll() is not None, f"serve still running {took_s:.1f} s after SIGTERM: {context}"
        assert took_s <= bound_s, f"stopping took {took_s:.1f} s, over {bound_s} s: {context}"
        # Signalled before it could install its handler, serve dies of the signal, having
        # started nothing; otherwise it stops cleanly.
        early_death = moment == "spawn" and serve.returncode == -signal.SIGTERM
        assert serve.returncode == 0 or early_death, f"exit status {serve.returncode}: {context}"
        # A Python stub notices its worker is gone within a second; nothing else may linger.
        wait_until(lambda: not left(), 3, f"no process left, {context}")
    except BaseException:
        print(log_path.read_text(errors="replace")[-6000:])
        print(describe(left()))
        raise
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        for pid in left():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# Twelve whole starts of `natron serve`, some of them to READY: each attempt checks its own stop
# bound; the test's timeout only has to let twelve starts happen on a loaded machine.
@pytest.mark.timeout(300)
def test_natron_serve_stopped_three_times_at_each_moment_exits_within_its_budget_and_leaves_no_process(
    repository: Path, tmp_path: Path
) -> None:
    """Twelve stops: each moment three times, at random offsets (a new seed every run, printed
    on failure), so that runs over time cover the moments' ranges."""
    repo = small_repository(repository, tmp_path, ["tiny", "simple"])
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    moments = list(MOMENTS) * 3
    rng.shuffle(moments)
    log_path = tmp_path / "serve.log"
    for attempt, moment in enumerate(moments):
        stop_serve_once(repo, log_path, moment, rng, f"attempt {attempt}: stop at {moment} (seed {seed})")
