"""A worker loads up to `--model-load-thread-count` model versions at once, as Triton does: a
model whose load takes long holds no other model back beyond the load slot it takes, one model's
changes still apply in order, and a load that a newer record makes pointless is given up without
leaving its instances behind.

The first tests run a `Worker` in the test's process against a real nats-server, with a loader
whose loads wait for the test's word: what loads when is then certain, not a matter of timing.
The last ones run `natron serve` with Python models, as users do."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from broker import jetstream
from broker.server import EmbeddedNatsServer
from broker.subjects import Subjects
from examples.build_models import build
from natron.records import LOADING, READY, ModelRecord, VersionState
from tests.harness import natron_serve, wait_until, wait_until_async
from workers.backends import AnyBackend, BackendContext
from workers.devices import CPU
from workers.service import Worker, WorkerOptions

# How long a gated load waits for the test's word before it fails: a bound, so that a test that
# goes wrong ends instead of hanging on a thread nobody releases.
GATE_TIMEOUT_S = 60.0


class Gates:
    """A loader whose loads wait for the test's word. Each load is named by its version folder
    (`<model folder>/<version>`); what happened is kept in order: `start`, `end`, `closed`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Event] = {}
        self.events: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._all_open = False

    def _gate(self, key: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(key, threading.Event())

    def open(self, key: str) -> None:
        self._gate(key).set()

    def open_all(self) -> None:
        """Let every load, present and future, go on (a test's end: no thread stays blocked)."""
        with self._lock:
            self._all_open = True
            gates = list(self._gates.values())
        for gate in gates:
            gate.set()

    def _note(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def started(self) -> list[str]:
        with self._lock:
            return [e.removeprefix("start ") for e in self.events if e.startswith("start ")]

    def load(self, config: Any, version_dir: Path, context: BackendContext) -> AnyBackend:
        key = f"{version_dir.parent.name}/{version_dir.name}"
        with self._lock:
            self.events.append(f"start {key}")
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            gate = self._gates.setdefault(key, threading.Event())
            if self._all_open:
                gate.set()
        try:
            if not gate.wait(GATE_TIMEOUT_S):
                raise TimeoutError(f"{key}: the test never opened its gate")
        finally:
            with self._lock:
                self.in_flight -= 1
                self.events.append(f"end {key}")
        return _GatedBackend(self, key)


@dataclass
class _GatedBackend:
    gates: Gates
    key: str

    def execute(self, inputs: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        return dict(inputs)

    def close(self) -> None:
        self.gates._note(f"closed {self.key}")


def _config(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "gated",
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
    }


@dataclass
class Bench:
    """A worker `w0` in this process, and the models bucket the test writes as a router would."""

    worker: Worker
    gates: Gates
    subjects: Subjects
    js: Any
    models: Any

    async def place(self, name: str, generation: str, versions: tuple[str, ...] = ("1",)) -> None:
        """Publish `name` at `generation`, placed on w0 (its version folders are named
        `<name>-<generation>/<version>`, so each generation's loads have names of their own)."""
        for version in versions:
            await jetstream.configure_consumer(self.js, self.subjects, name, version, jetstream.QueuePolicy())
        record = ModelRecord(
            name=name,
            path=f"/nowhere/{name}-{generation}",
            config=_config(name),
            versions={version: VersionState(LOADING) for version in versions},
            generation=generation,
            placement={"w0": 1},
        )
        await self.models.put(name, record.to_json())

    def state(self, name: str, generation: str, version: str = "1") -> str | None:
        states = self.worker.report.models.get(name, {}).get(generation, {})
        return states[version].state if version in states else None


@contextlib.asynccontextmanager
async def bench(nats_server: EmbeddedNatsServer, load_threads: int) -> AsyncIterator[Bench]:
    subjects = Subjects(f"loads{uuid.uuid4().hex[:8]}")
    gates = Gates()
    nc = await jetstream.connect(nats_server.url, name="test-parallel-loads")
    try:
        js = nc.jetstream()
        await jetstream.configure_stream(js, subjects, jetstream.QueuePolicy())
        models = await jetstream.ensure_bucket(js, subjects.models_bucket)
        options = WorkerOptions(
            worker_id="w0",
            device=CPU,
            heartbeat_interval_s=0.5,
            drain_timeout_s=1.0,
            loaders={"gated": gates.load},
            model_load_threads=load_threads,
        )
        worker = Worker(nc, subjects, options)
        try:
            await worker.start()
            yield Bench(worker, gates, subjects, js, models)
        finally:
            gates.open_all()
            await worker.stop()
    finally:
        await jetstream.close_connection(nc)


# -- in the test's process: what loads when ---------------------------------------------------


@pytest.mark.parametrize("load_threads", [1, 2, 3])
async def test_a_worker_loads_as_many_versions_at_once_as_its_load_threads_and_no_more(
    nats_server: EmbeddedNatsServer, load_threads: int
) -> None:
    """Three loads wanted at once (two versions of one model, one of another): exactly
    `load_threads` of them run together, and each one that ends lets the next one start."""
    async with bench(nats_server, load_threads) as b:
        await b.place("a", "g1", ("1", "2"))
        await b.place("b", "g1")
        wanted = [("a", "1"), ("a", "2"), ("b", "1")]
        # All three are LOADING in the report before any may finish: the loads not running wait
        # for a slot, not for their record.
        await wait_until_async(
            lambda: all(b.state(m, "g1", v) == LOADING for m, v in wanted), 10, "three versions LOADING"
        )
        await wait_until_async(lambda: b.gates.in_flight == load_threads, 10, f"{load_threads} loads running")
        released: set[str] = set()
        while len(released) < len(wanted):
            key = await wait_until_async(
                lambda: next((k for k in b.gates.started() if k not in released), None), 10, "a load started"
            )
            b.gates.open(key)
            released.add(key)
        await wait_until_async(lambda: all(b.state(m, "g1", v) == READY for m, v in wanted), 10, "all READY")
        assert b.gates.most_in_flight == load_threads, b.gates.events
        assert len(b.worker.instances) == 3


async def test_a_slow_load_holds_back_no_other_model(nats_server: EmbeddedNatsServer) -> None:
    async with bench(nats_server, 4) as b:
        await b.place("slow", "g1")
        await wait_until_async(lambda: b.gates.started() == ["slow-g1/1"], 10, "slow loading")
        b.gates.open("quick-g1/1")
        await b.place("quick", "g1")
        await wait_until_async(lambda: b.state("quick", "g1") == READY, 10, "quick READY")
        assert b.state("slow", "g1") == LOADING
        b.gates.open("slow-g1/1")
        await wait_until_async(lambda: b.state("slow", "g1") == READY, 10, "slow READY")


async def test_an_unload_gives_up_a_load_under_way_which_keeps_its_slot_until_its_thread_ends(
    nats_server: EmbeddedNatsServer,
) -> None:
    """The model is unloaded while its load waits: the worker lets go of it at once, while the
    load's thread (which nothing can stop) still runs. That thread keeps its load slot, so the
    next model loads only once it ended, and what it loaded is closed then."""
    async with bench(nats_server, 1) as b:
        await b.place("a", "g1")
        await wait_until_async(lambda: b.gates.started() == ["a-g1/1"], 10, "a loading")
        await b.models.delete("a")
        # The gate is still closed: only a load given up lets the worker drop the model now.
        await wait_until_async(lambda: "a" not in b.worker.report.models, 10, "a gone from the report")
        await b.place("b", "g1")
        await wait_until_async(lambda: b.state("b", "g1") == LOADING, 10, "b waiting for a slot")
        assert b.gates.started() == ["a-g1/1"], b.gates.events
        b.gates.open("a-g1/1")
        b.gates.open("b-g1/1")
        await wait_until_async(lambda: b.state("b", "g1") == READY, 10, "b READY")
        assert b.gates.events == ["start a-g1/1", "end a-g1/1", "closed a-g1/1", "start b-g1/1", "end b-g1/1"]
        assert "a" not in b.worker.report.models
        assert [i.name for i in b.worker.instances] == ["b-v1-0"]


async def test_a_reload_superseded_mid_load_gives_it_up_and_loads_the_newest(
    nats_server: EmbeddedNatsServer,
) -> None:
    async with bench(nats_server, 4) as b:
        b.gates.open("a-g1/1")
        await b.place("a", "g1")
        await wait_until_async(lambda: b.state("a", "g1") == READY, 10, "g1 READY")
        await b.place("a", "g2")
        await wait_until_async(lambda: "a-g2/1" in b.gates.started(), 10, "g2 loading")
        b.gates.open("a-g3/1")
        await b.place("a", "g3")
        await wait_until_async(lambda: list(b.worker.report.models.get("a", {})) == ["g3"], 10, "g3 alone")
        assert b.state("a", "g3") == READY
        assert [i.name for i in b.worker.instances] == ["a-v1-0"]
        assert "closed a-g1/1" in b.gates.events  # retired once g3 was READY
        b.gates.open("a-g2/1")
        await wait_until_async(lambda: "closed a-g2/1" in b.gates.events, 10, "g2's instance closed")


async def test_a_record_the_worker_cannot_apply_ends_the_worker_with_its_reason(
    nats_server: EmbeddedNatsServer,
) -> None:
    """An applier that fails is not lost: the worker's essential loop ends with its error, and
    the process (whose runner awaits this) exits for its supervisor to restart it."""
    async with bench(nats_server, 4) as b:
        record = ModelRecord(
            name="bad",
            path="/nowhere/bad",
            config={**_config("bad"), "max_batch_size": "many"},
            versions={"1": VersionState(LOADING)},
            generation="g1",
            placement={"w0": 1},
        )
        await b.models.put("bad", record.to_json())
        reason = await asyncio.wait_for(b.worker.tasks.failure(), 10)
        assert "worker-follow-models failed" in reason and "invalid model config" in reason, reason


# -- natron serve, with Python models ---------------------------------------------------------

PY_CONFIG = """name: "{name}"
backend: "python"
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

# Initialize writes when it starts and ends to a file the test reads; in between it waits for
# the gate file (or sleeps, without one). One short append per line: lines never mix.
PY_MODEL = """import os
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        with open({events!r}, "a") as f:
            f.write("start " + args["model_name"] + "\\n")
        gate, deadline = {gate!r}, time.monotonic() + 60
        if gate:
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            time.sleep({sleep_s})
        with open({events!r}, "a") as f:
            f.write("end " + args["model_name"] + "\\n")

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


def python_model(repo: Path, name: str, events: Path, gate: Path | None = None, sleep_s: float = 0) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(PY_CONFIG.format(name=name))
    model = PY_MODEL.format(events=str(events), gate=str(gate) if gate else "", sleep_s=sleep_s)
    (repo / name / "1" / "model.py").write_text(model)


def states(url: str) -> dict[str, str]:
    index = requests.post(f"{url}/v2/repository/index", json={}, timeout=5).json()
    return {m["name"]: m.get("state", "") for m in index}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_natron_serve_with_four_load_threads_serves_tiny_while_two_slow_models_load(tmp_path: Path) -> None:
    repo, events, gate = tmp_path / "repo", tmp_path / "events", tmp_path / "gate"
    repo.mkdir()
    build(repo, ["tiny"], quiet=True)
    python_model(repo, "slow_a", events, gate)
    python_model(repo, "slow_b", events, gate)
    args = ("--model-load-thread-count", "4", "--strict-readiness", "false")
    with natron_serve(repo, [], tmp_path, args) as served:
        # Both initialize() calls under way at once: two loads in flight on the one worker.
        wait_until(lambda: sorted(lines(events)) == ["start slow_a", "start slow_b"], 60, "both slow loading")
        wait_until(lambda: states(served.url).get("tiny") == "READY", 60, "tiny READY")
        seen = states(served.url)
        assert (seen["slow_a"], seen["slow_b"]) == ("LOADING", "LOADING"), seen
        gate.touch()
        wait_until(
            lambda: states(served.url)["slow_a"] == states(served.url)["slow_b"] == "READY", 60, "slow READY"
        )
        body: dict[str, Any] = {
            "inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
        }
        answer = requests.post(f"{served.url}/v2/models/slow_a/infer", json=body, timeout=10)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [1, 2, 3, 4]


def test_natron_serve_with_one_load_thread_loads_one_model_at_a_time(tmp_path: Path) -> None:
    """Two models whose initialize takes a couple of seconds, wanted at once: with one load
    thread the second starts only once the first has ended."""
    repo, events = tmp_path / "repo", tmp_path / "events"
    repo.mkdir()
    python_model(repo, "sleepy_a", events, sleep_s=2)
    python_model(repo, "sleepy_b", events, sleep_s=2)
    with natron_serve(repo, ["sleepy_a", "sleepy_b"], tmp_path, ("--model-load-thread-count", "1")) as served:
        seen = lines(events)
        assert len(seen) == 4, seen
        first, second = seen[0].removeprefix("start "), seen[2].removeprefix("start ")
        assert seen == [f"start {first}", f"end {first}", f"start {second}", f"end {second}"], seen
        assert {first, second} == {"sleepy_a", "sleepy_b"}
        assert set(states(served.url).values()) == {"READY"}
