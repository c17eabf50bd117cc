"""Faults under load: the broker killed, paused or restarted with its files, a worker killed,
while clients keep sending `tiny` requests and check every answer.

    .venv/bin/python -m bench.faults                 # every scenario, ~2 min
    .venv/bin/python -m bench.faults --only broker-kill-memory

Each scenario runs a fresh mesh (nats-server, router, worker, gateway, as separate processes)
and reports, per phase (before the fault, during it, after it is over): requests, answers by
status, wrong answers, requests with no answer at all (a timeout or a broken connection: lost),
p99 latency; and the time from the fault's end to the first good answer again. The mesh tests
(tests/mesh/test_broker_restart.py) run the same scenarios and assert on them; this script
prints the figures for docs/reliability.md and writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats
import requests
from rich.console import Console
from rich.table import Table

from broker.subjects import Subjects
from examples.build_models import build
from tests.harness import Mesh, Served, child_processes, natron_serve

# A request with no answer within this long counts as lost (the gateway's deadline is 30 s).
CLIENT_TIMEOUT_S = 40.0
# A client that got an error waits this long before its next request, as a real client backs
# off: a fleet answering 503 at once must not be measured by how fast clients can spin.
ERROR_BACKOFF_S = 0.05


@dataclass(slots=True, frozen=True)
class Sample:
    start_s: float
    end_s: float
    status: int  # 0: no answer (timeout, broken connection)
    correct: bool
    reason: str = ""  # the error's text, for a status other than 200


class Load:
    """`clients` threads sending `tiny` requests back to back, each answer checked (2x + 1)."""

    def __init__(self, url: str, clients: int = 8, model: str = "tiny") -> None:
        self._url = f"{url}/v2/models/{model}/infer"
        self._clients = clients
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.samples: list[Sample] = []
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        with requests.Session() as http:
            while not self._stop.is_set():
                value = float(rng.randint(-1000, 1000))
                body = {
                    "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [value] * 16}]
                }
                start = time.monotonic()
                try:
                    response = http.post(self._url, data=json.dumps(body), timeout=CLIENT_TIMEOUT_S)
                    status, reason = response.status_code, ""
                    if status == 200:
                        correct = response.json()["outputs"][0]["data"] == [2 * value + 1] * 16
                    else:
                        correct, reason = True, response.text[:200]
                except (requests.RequestException, ValueError, KeyError) as exc:
                    status, correct, reason = 0, True, repr(exc)[:200]
                sample = Sample(start, time.monotonic(), status, correct, reason)
                with self._lock:
                    self.samples.append(sample)
                if status != 200:
                    time.sleep(ERROR_BACKOFF_S)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> list[Sample]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_S + 5)
        return self.samples

    def first_ok_after(self, at_s: float, timeout_s: float) -> float | None:
        """When the first request that started after `at_s` was answered 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                ends = [s.end_s for s in self.samples if s.start_s >= at_s and s.status == 200]
            if ends:
                return min(ends)
            time.sleep(0.05)
        return None


@dataclass(slots=True)
class Phase:
    requests: int = 0
    ok: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    lost: int = 0
    p99_ms: float = 0.0
    longest_ms: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)  # error texts, counted


def _phase(samples: list[Sample]) -> Phase:
    phase = Phase(requests=len(samples))
    latencies = sorted((s.end_s - s.start_s) * 1000 for s in samples)
    for sample in samples:
        phase.by_status[str(sample.status)] = phase.by_status.get(str(sample.status), 0) + 1
        phase.ok += sample.status == 200
        phase.wrong += not sample.correct
        phase.lost += sample.status == 0
        if sample.reason:
            phase.reasons[sample.reason] = phase.reasons.get(sample.reason, 0) + 1
    if latencies:
        phase.p99_ms = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1)
        phase.longest_ms = round(latencies[-1], 1)
    return phase


@dataclass(slots=True)
class Outcome:
    scenario: str
    fault_s: float  # how long the fault lasted (the broker away, paused)
    recovered_s: float | None  # from the fault's end to the first 200 again
    before: Phase
    during: Phase
    after: Phase
    processes_restarted: list[str]
    model_reloads: int  # times the worker loaded `tiny` again during the scenario
    # /v2/health/ready late in the fault (0: no answer): a gateway that lost NATS says 503.
    ready_during: int = 0
    # The requests in flight when the fault began (a part of `during`).
    in_flight: Phase = field(default_factory=Phase)

    @property
    def wrong(self) -> int:
        return self.before.wrong + self.during.wrong + self.after.wrong

    @property
    def lost(self) -> int:
        return self.before.lost + self.during.lost + self.after.lost


def outcome(
    scenario: str,
    samples: list[Sample],
    fault_start_s: float,
    fault_end_s: float,
    recovered_at_s: float | None,
) -> tuple[Phase, Phase, Phase, float | None]:
    """Phases: the requests answered before the fault; those in flight at its start or begun
    until service was back; those begun after that."""
    back = recovered_at_s if recovered_at_s is not None else float("inf")
    before = [s for s in samples if s.end_s < fault_start_s]
    during = [s for s in samples if s.end_s >= fault_start_s and s.start_s < back]
    after = [s for s in samples if s.start_s >= back]
    recovered = None if recovered_at_s is None else round(recovered_at_s - fault_end_s, 2)
    return _phase(before), _phase(during), _phase(after), recovered


# -- the mesh ----------------------------------------------------------------------------------


@contextmanager
def mesh_for(repository: Path, *service_args: str, workers: int = 1) -> Iterator[Mesh]:
    """nats-server, router, `workers` workers (w0, w1, ...) and a gateway, `tiny` ready;
    `service_args` go to each."""
    mesh = Mesh(repository, router_args=list(service_args))
    try:
        mesh.start_nats()
        mesh.start_router()
        for index in range(workers):
            mesh.start_worker(f"w{index}", *service_args)
        mesh.natron("gateway", "gateway", "--nats-url", mesh.nats_url, "--http-port", str(mesh.http_port),
                    "--http-address", "127.0.0.1", "--default-timeout-s", "30", *service_args)  # fmt: skip
        mesh.wait_ready("tiny")
        yield mesh
    finally:
        mesh.stop()


def _ready(url: str) -> int:
    try:
        return requests.get(f"{url}/v2/health/ready", timeout=2).status_code
    except requests.RequestException:
        return 0


def _loads(mesh: Mesh) -> int:
    return mesh.log("w0").count("model 'tiny' version 1 ready")


@dataclass(slots=True, frozen=True)
class Target:
    """What a fault runs against: its URL, how many times it has loaded `tiny`, and which of
    its natron processes run (to tell that none was restarted)."""

    url: str
    loads: Callable[[], int]
    processes: Callable[[], dict[str, int]]  # name -> pid, of those running


def mesh_target(mesh: Mesh) -> Target:
    return Target(
        mesh.url,
        lambda: _loads(mesh),
        lambda: {name: p.pid for name, p in mesh.processes.items() if name != "nats" and p.poll() is None},
    )


def serve_target(served: Served) -> Target:
    return Target(
        served.url,
        lambda: served.output.read_text().count("model 'tiny' version 1 ready"),
        lambda: {
            cmd.split(" natron ", 1)[1].split()[0]: pid
            for pid, cmd in child_processes(served.pid)
            if " natron " in cmd
        },
    )


def run_fault(
    target: Target,
    scenario: str,
    fault: Callable[[], None],
    heal: Callable[[], None],
    fault_s: float,
    settle_s: float = 4.0,
) -> Outcome:
    """Load for 2 s, `fault()`, wait `fault_s`, `heal()`, wait for the first good answer, load
    `settle_s` more; the outcome."""
    processes = target.processes()
    load = Load(target.url)
    load.start()
    try:
        time.sleep(2.0)
        loads = target.loads()  # not before: the log line of the first load may come after ready
        fault_start = time.monotonic()
        fault()
        time.sleep(fault_s * 0.8)
        ready_during = _ready(target.url)
        time.sleep(fault_s * 0.2)
        heal()
        fault_end = time.monotonic()
        recovered_at = load.first_ok_after(fault_end, 60.0)
        time.sleep(settle_s)
    finally:
        samples = load.stop()
    before, during, after, recovered = outcome(scenario, samples, fault_start, fault_end, recovered_at)
    in_flight = _phase([s for s in samples if s.start_s < fault_start <= s.end_s])
    now = target.processes()
    return Outcome(
        scenario,
        round(fault_end - fault_start, 2),
        recovered,
        before,
        during,
        after,
        sorted(name for name, pid in processes.items() if now.get(name) != pid),
        target.loads() - loads,
        ready_during,
        in_flight,
    )


def broker_kill(mesh: Mesh, scenario: str, outage_s: float = 3.0) -> Outcome:
    """SIGKILL nats-server; start it again on the same port (and store) `outage_s` later."""

    def kill() -> None:
        mesh.processes["nats"].kill()
        mesh.processes["nats"].wait()

    return run_fault(mesh_target(mesh), scenario, kill, mesh.start_nats, outage_s)


def broker_pause(mesh: Mesh, scenario: str, pause_s: float = 10.0) -> Outcome:
    """SIGSTOP nats-server for `pause_s`, then SIGCONT."""
    return run_fault(
        mesh_target(mesh),
        scenario,
        lambda: mesh.signal("nats", signal.SIGSTOP),
        lambda: mesh.signal("nats", signal.SIGCONT),
        pause_s,
    )


def worker_kill(mesh: Mesh, scenario: str) -> Outcome:
    """SIGKILL worker w1 of two: what it held comes back to the consumer after the ack wait
    (two heartbeats), and w0 answers it."""

    def kill() -> None:
        mesh.processes["w1"].kill()
        mesh.processes["w1"].wait()

    return run_fault(mesh_target(mesh), scenario, kill, lambda: None, 0.0, settle_s=8.0)


def cluster_node_kill(served: Served, scenario: str) -> Outcome:
    """`natron serve --nats-cluster 3`: SIGKILL the node that leads the inference stream (the
    hard case: a leader election, and every connection to that node moves); serve starts it
    again."""
    first_port = int(served.nats_url.rsplit(":", 1)[1])
    port = first_port + asyncio.run(_stream_leader(served, first_port))

    def kill() -> None:
        for pid, cmd in child_processes(served.pid):
            if "nats-server" in cmd and _node_port(pid) == port:
                os.kill(pid, signal.SIGKILL)
                return
        raise RuntimeError(f"no nats-server of natron serve on port {port}")

    return run_fault(serve_target(served), scenario, kill, lambda: None, 3.0)


async def _stream_leader(served: Served, first_port: int) -> int:
    """The index of the node leading the inference stream (nodes are named natron-<index>)."""
    nc = await nats.connect(served.nats_url, **served.nats_options("admin"))
    try:
        info = await nc.jetstream().stream_info(Subjects().stream)
        assert info.cluster is not None and info.cluster.leader is not None
        return int(info.cluster.leader.rsplit("-", 1)[1])
    finally:
        await nc.close()


def _node_port(pid: int) -> int | None:
    """The client port of the nats-server `pid`, from the config file it was started with."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    conf = Path(args[args.index(b"-c") + 1].decode())
    for line in conf.read_text().splitlines():
        if line.startswith("listen:"):
            return int(line.rsplit(":", 1)[1].strip().strip('"'))
    return None


SCENARIOS: dict[str, Callable[[Path], Outcome]] = {}


def _scenario(
    name: str, *service_args: str, workers: int = 1
) -> Callable[[Callable[[Mesh, str], Outcome]], None]:
    def register(run: Callable[[Mesh, str], Outcome]) -> None:
        def scenario(repository: Path) -> Outcome:
            with mesh_for(repository, *service_args, workers=workers) as mesh:
                return run(mesh, name)

        SCENARIOS[name] = scenario

    return register


_scenario("broker-kill-memory")(broker_kill)
_scenario("broker-kill-file", "--jetstream-storage", "file")(broker_kill)
_scenario("broker-pause-10s")(broker_pause)
_scenario("worker-kill", workers=2)(worker_kill)


def _cluster_scenario(repository: Path) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="natron-faults-serve-") as logs:
        with natron_serve(repository, ["tiny"], Path(logs), ("--nats-cluster", "3")) as served:
            return cluster_node_kill(served, "cluster-node-kill")


SCENARIOS["cluster-node-kill"] = _cluster_scenario


# -- the report ----------------------------------------------------------------------------------


def table(outcomes: list[Outcome]) -> Table:
    grid = Table(title="faults under load (8 clients on tiny)")
    columns = ("scenario", "fault s", "back after s", "requests", "during: statuses",
               "p99 ms before/during/after", "wrong", "lost", "restarted", "reloads",
               "ready in fault")  # fmt: skip
    for column in columns:
        grid.add_column(column)
    for o in outcomes:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(o.during.by_status.items()))
        grid.add_row(
            o.scenario,
            f"{o.fault_s:.1f}",
            "-" if o.recovered_s is None else f"{o.recovered_s:.2f}",
            str(o.before.requests + o.during.requests + o.after.requests),
            statuses,
            f"{o.before.p99_ms:.0f} / {o.during.p99_ms:.0f} / {o.after.p99_ms:.0f}",
            str(o.wrong),
            str(o.lost),
            ", ".join(o.processes_restarted) or "none",
            str(o.model_reloads),
            str(o.ready_during),
        )
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run this scenario (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON goes")
    args = parser.parse_args(argv)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="natron-faults-") as tmp:
        repository = Path(tmp) / "repo"
        build(repository, ["tiny"], quiet=True)
        for name in args.only or list(SCENARIOS):
            outcomes.append(SCENARIOS[name](repository))
    Console(width=240).print(table(outcomes))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"faults-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
