"""The fleet: several worker processes on one model, balanced by capacity, surviving kill -9
and draining on SIGTERM; router and gateway restarts that do not disturb traffic."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import nats
import orjson
import pytest
import requests

from broker.subjects import Subjects
from natron.records import LOADING, READY, ModelRecord, VersionState, WorkerReport
from tests.harness import Mesh


@pytest.fixture
def mesh(model_repository: Path) -> Iterator[Mesh]:
    # The router owns the queues: a 1 s ack wait brings a dead worker's requests back quickly.
    mesh = Mesh(model_repository, ["--ack-wait-s", "1"])
    mesh.start_nats()
    mesh.start_router()
    mesh.start_gateway()
    try:
        yield mesh
    finally:
        mesh.stop()


async def _kv(mesh: Mesh, bucket: str) -> dict[str, bytes]:
    nc = await nats.connect(mesh.nats_url, **mesh.nats_options("admin"))
    try:
        kv = await nc.jetstream().key_value(bucket)
        return {key: (await kv.get(key)).value for key in await kv.keys()}
    finally:
        await nc.close()


def placement(mesh: Mesh, model: str) -> dict[str, int]:
    raw = asyncio.run(_kv(mesh, Subjects().models_bucket))[model]
    return ModelRecord.from_json(raw).placement


def served_by(mesh: Mesh, model_version: str) -> dict[str, int]:
    reports = asyncio.run(_kv(mesh, Subjects().workers_bucket))
    return {
        worker: WorkerReport.from_json(raw).stats.get(model_version, {}).get("inferences", 0)
        for worker, raw in reports.items()
    }


def ready_on(mesh: Mesh, model: str, version: str = "1") -> set[str]:
    """Workers whose last report has `model` `version` READY: loaded, and pulling its requests."""
    reports = asyncio.run(_kv(mesh, Subjects().workers_bucket))
    return {
        worker
        for worker, raw in reports.items()
        if any(
            states.get(version, VersionState(LOADING)).state == READY
            for states in WorkerReport.from_json(raw).models.get(model, {}).values()
        )
    }


async def drive(
    url: str, count: int, concurrency: int, timeout_s: float = 30, under_way: asyncio.Event | None = None
) -> dict[str, int]:
    """`count` distinct tiny requests; tally answers: right, wrong, and by error status.
    `under_way` is set once a sixth of them have their answer, the rest being in flight."""
    tally = {"ok": 0, "wrong": 0}
    answered = 0
    semaphore = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal answered
        body = {
            "id": str(i),
            "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [i] * 16}],
        }
        async with semaphore:
            try:
                async with session.post(f"{url}/v2/models/tiny/infer", data=orjson.dumps(body)) as response:
                    answer = await response.json()
                    if response.status != 200:
                        tally[str(response.status)] = tally.get(str(response.status), 0) + 1
                    elif answer["id"] == str(i) and answer["outputs"][0]["data"] == [2.0 * i + 1] * 16:
                        tally["ok"] += 1
                    else:
                        tally["wrong"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally[type(exc).__name__] = tally.get(type(exc).__name__, 0) + 1
            answered += 1
            if under_way is not None and answered >= count // 6:
                under_way.set()

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))
    return tally


def under_load(mesh: Mesh, count: int, concurrency: int, action: Callable[[], None]) -> dict[str, int]:
    """Drive `count` requests and, once they are under way, run `action` (a kill, a restart)
    while the rest are in flight; the tally of all of them."""

    async def scenario() -> dict[str, int]:
        under_way = asyncio.Event()
        load = asyncio.create_task(drive(mesh.url, count, concurrency, under_way=under_way))
        try:
            await asyncio.wait_for(under_way.wait(), 30)
            assert not load.done()
            action()
            return await load
        finally:
            load.cancel()  # a no-op once it ended
            await asyncio.gather(load, return_exceptions=True)

    return asyncio.run(scenario())


def test_a_worker_that_joins_later_receives_its_share(mesh: Mesh) -> None:
    mesh.start_worker("first")
    mesh.wait_ready("tiny")
    assert placement(mesh, "tiny") == {"first": 1}
    mesh.start_worker("second")
    mesh.wait_until(lambda: placement(mesh, "tiny") == {"first": 1, "second": 1}, what="second placed")
    mesh.wait_until(lambda: "second" in ready_on(mesh, "tiny"), what="second serving tiny")


async def _ack_wait_s(mesh: Mesh, model: str, version: str) -> float:
    nc = await nats.connect(mesh.nats_url, **mesh.nats_options("admin"))
    try:
        subjects = Subjects()
        info = await nc.jetstream().consumer_info(subjects.stream, subjects.consumer(model, version))
        return float(info.config.ack_wait or 0)
    finally:
        await nc.close()


def test_the_router_alone_configures_the_queues_whatever_the_workers_start_with(mesh: Mesh) -> None:
    # The router was started with a 1 s ack wait; this worker's own default would be 10 s, and
    # before the router owned the queues, the last process started wrote its own.
    mesh.start_worker("a", "--drain-timeout-s", "3")
    mesh.wait_until(lambda: ready_on(mesh, "tiny") == {"a"}, what="a serving tiny")
    assert asyncio.run(_ack_wait_s(mesh, "tiny", "1")) == 1.0
    mesh.start_worker("b")
    mesh.wait_until(lambda: ready_on(mesh, "tiny") == {"a", "b"}, what="both serving tiny")
    assert asyncio.run(_ack_wait_s(mesh, "tiny", "1")) == 1.0
    assert mesh.infer_tiny(2.0).status_code == 200


def test_a_worker_killed_mid_load_loses_no_request(mesh: Mesh) -> None:
    # Slow workers (20 ms per batch) keep requests in flight when one dies; the router's 1 s
    # ack wait brings the dead worker's requests back to the survivor quickly.
    for worker in ("a", "b"):
        mesh.start_worker(worker, "--throttle-ms", "20")
    mesh.wait_until(lambda: ready_on(mesh, "tiny") == {"a", "b"}, what="both workers serving tiny")
    mesh.wait_ready("tiny")  # and the gateway knows it
    tally = under_load(mesh, 600, 64, lambda: mesh.signal("a", signal.SIGKILL))
    assert tally == {"ok": 600, "wrong": 0}, tally
    assert mesh.wait_exit("a") == -signal.SIGKILL


def test_sigterm_drains_a_worker_without_failing_a_request(mesh: Mesh) -> None:
    for worker in ("a", "b"):
        mesh.start_worker(worker, "--throttle-ms", "10")
    mesh.wait_until(lambda: ready_on(mesh, "tiny") == {"a", "b"}, what="both workers serving tiny")
    mesh.wait_ready("tiny")  # and the gateway knows it
    tally = under_load(mesh, 500, 32, lambda: mesh.signal("a", signal.SIGTERM))
    assert tally == {"ok": 500, "wrong": 0}, tally
    assert mesh.wait_exit("a") == 0
    assert "unexpected" not in mesh.log("a").lower()


def test_a_faster_worker_serves_proportionally_more(mesh: Mesh) -> None:
    mesh.start_worker("fast")
    mesh.start_worker("slow", "--throttle-ms", "30")
    mesh.wait_until(lambda: ready_on(mesh, "tiny") == {"fast", "slow"}, what="both workers serving tiny")
    mesh.wait_ready("tiny")  # and the gateway knows it
    tally = asyncio.run(drive(mesh.url, count=1500, concurrency=64))
    assert tally == {"ok": 1500, "wrong": 0}, tally
    # Statistics travel with heartbeats (every 2 s).
    mesh.wait_until(lambda: sum(served_by(mesh, "tiny/1").values()) >= 1500, what="stats reported")
    served = served_by(mesh, "tiny/1")
    assert served["fast"] > 2 * served["slow"] > 0, served


def test_a_restarted_router_and_gateway_do_not_disturb_traffic(mesh: Mesh) -> None:
    mesh.start_worker("a")
    mesh.wait_ready("tiny")

    def restart_router() -> None:
        mesh.signal("router", signal.SIGKILL)
        mesh.wait_exit("router")
        mesh.start_router()

    tally = under_load(mesh, 400, 8, restart_router)
    assert tally == {"ok": 400, "wrong": 0}, tally
    index = {m["name"]: m for m in mesh.index()}
    assert index["tiny"]["state"] == "READY"
    # A new gateway rebuilds its view from the broker alone.
    mesh.signal("gateway", signal.SIGTERM)
    mesh.wait_exit("gateway")
    mesh.start_gateway()
    mesh.wait_ready("tiny")
    assert mesh.infer_tiny(1.0).json()["outputs"][0]["data"] == [3.0] * 16


def test_a_dead_worker_is_dropped_and_its_models_shown_unavailable(mesh: Mesh) -> None:
    mesh.start_worker("only")
    mesh.wait_ready("tiny")
    mesh.signal("only", signal.SIGKILL)
    mesh.wait_until(
        lambda: {m["name"]: m for m in mesh.index()}["tiny"]["state"] == "UNAVAILABLE",
        timeout_s=20,
        what="tiny unavailable after its only worker died",
    )
    response = mesh.infer_tiny(1.0)
    assert response.status_code == 503
    assert "no live worker" in response.json()["error"]


def test_the_router_serves_its_own_metrics(model_repository: Path) -> None:
    mesh = Mesh(model_repository)
    port = mesh.spare_port
    mesh.router_args = ["--metrics-port", str(port)]
    mesh.start_nats()
    mesh.start_router()
    mesh.start_worker("a")
    mesh.start_gateway()
    try:
        mesh.wait_ready("tiny")

        def scraped() -> bool:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return "natron_router_workers 1.0" in text and "natron_nats_connected 1.0" in text

        mesh.wait_until(scraped, what="router metrics")
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        ready = re.search(r'^natron_router_model_versions\{state="READY"\} (\d+)', text, re.M)
        assert ready and int(ready[1]) >= 3
        assert "process_cpu_seconds_total" in text
    finally:
        mesh.stop()


def test_a_lost_broker_gives_clear_errors_within_the_deadline_not_a_hang(mesh: Mesh) -> None:
    mesh.start_worker("a")
    mesh.wait_ready("tiny")
    mesh.signal("nats", signal.SIGKILL)
    mesh.wait_exit("nats")
    body = {
        "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}],
        "parameters": {"timeout": 1_000_000},  # one second
    }
    started = time.monotonic()
    response = requests.post(f"{mesh.url}/v2/models/tiny/infer", json=body, timeout=30)
    elapsed_s = time.monotonic() - started
    assert response.status_code in (503, 504), response.text
    assert response.json()["error"]
    assert elapsed_s < 10  # answered at its deadline, not left hanging
    mesh.wait_until(
        lambda: requests.get(f"{mesh.url}/v2/health/ready", timeout=5).status_code == 503,
        what="gateway not ready without its broker",
    )
    assert requests.get(f"{mesh.url}/v2/health/live", timeout=5).status_code == 200
