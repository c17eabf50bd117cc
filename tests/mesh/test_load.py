"""Under concurrency, every answer belongs to its own request, and dynamic batching forms
batches larger than one."""

from __future__ import annotations

import asyncio

import aiohttp
import nats
import numpy as np
import orjson

from broker.subjects import Subjects
from natron.records import WorkerReport
from tests.harness import Served, wait_until_async

REQUESTS = 600
CONCURRENCY = 200


async def _batch_stats(served: Served, key: str) -> tuple[int, int]:
    nc = await nats.connect(served.nats_url, **served.nats_options("admin"))
    try:
        kv = await nc.jetstream().key_value(Subjects().workers_bucket)
        executions = inferences = 0
        for worker in await kv.keys():
            report = WorkerReport.from_json((await kv.get(worker)).value)
            stats = report.stats.get(key, {})
            executions += stats.get("executions", 0)
            inferences += stats.get("inferences", 0)
        return executions, inferences
    finally:
        await nc.close()


async def test_hundreds_of_concurrent_requests_get_their_own_answers_in_batches(served: Served) -> None:
    before = await _batch_stats(served, "tiny/1")
    semaphore = asyncio.Semaphore(CONCURRENCY)
    mismatches: list[int] = []
    statuses: dict[int, int] = {}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        # Distinct inputs: request i sends i, i+1, ..., so any mix-up shows.
        values = (np.arange(16, dtype=np.float32) + i * 16).tolist()
        body = {
            "id": f"r{i}",
            "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": values}],
        }
        async with (
            semaphore,
            session.post(f"{served.url}/v2/models/tiny/infer", data=orjson.dumps(body)) as response,
        ):
            statuses[response.status] = statuses.get(response.status, 0) + 1
            answer = await response.json()
        if response.status != 200:
            return
        expected = [v * 2 + 1 for v in values]
        if answer["id"] != f"r{i}" or answer["outputs"][0]["data"] != expected:
            mismatches.append(i)

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session, i) for i in range(REQUESTS))), 120)
    assert statuses == {200: REQUESTS}
    assert mismatches == []

    # Worker statistics travel with the heartbeat: wait for the beat that covers this run.
    async def covered() -> tuple[int, int] | None:
        stats = await _batch_stats(served, "tiny/1")
        return stats if stats[1] - before[1] >= REQUESTS else None

    executions, inferences = await wait_until_async(covered, 15, "a heartbeat covering this run", 0.2)
    # `before` may predate a heartbeat that still counted earlier tests' last requests, so
    # the counts can exceed this test's own; batching shows as fewer executions than rows.
    ran = inferences - before[1]
    batches = executions - before[0]
    assert ran >= REQUESTS
    assert batches < ran, f"{batches} executions for {ran} requests: no batch larger than 1"


async def test_requests_of_different_shapes_are_never_mixed_up(served: Served) -> None:
    """identity_fp32 takes any length: concurrent requests of lengths 1..9 may only batch
    with their own length, and each gets exactly its own data back."""
    rng = np.random.default_rng(3)
    bodies = []
    for i in range(300):
        rows, length = int(rng.integers(1, 4)), int(rng.integers(1, 10))
        data = rng.normal(size=(rows, length)).astype(np.float32)
        bodies.append((i, data))
    wrong: list[int] = []

    async def one(session: aiohttp.ClientSession, i: int, data: np.ndarray) -> None:
        body = {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": list(data.shape),
                    "datatype": "FP32",
                    "data": data.ravel().tolist(),
                }
            ]
        }
        async with session.post(f"{served.url}/v2/models/identity_fp32/infer", data=orjson.dumps(body)) as r:
            answer = await r.json()
        output = answer["outputs"][0]
        got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
        if r.status != 200 or got.shape != data.shape or not np.array_equal(got, data):
            wrong.append(i)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session, i, d) for i, d in bodies)), 120)
    assert wrong == []
