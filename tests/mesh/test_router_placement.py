"""The router in process, against a real nats-server: a worker's report that arrives while the
router writes its first records is placed, not dropped until some other report changes."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from nats.aio.client import Client

from broker import jetstream
from broker.server import EmbeddedNatsServer
from broker.subjects import Subjects
from examples.build_models import build
from natron.records import ModelRecord, WorkerReport
from router.service import Router, RouterOptions
from tests.harness import wait_until_async

pytestmark = pytest.mark.mesh


class _SlowWritingRouter(Router):
    """Writes each record's queue a while after placing it: the moment a report can arrive
    between the router's placement and its first record's write."""

    def __init__(self, nc: Client, subjects: Subjects, options: RouterOptions) -> None:
        super().__init__(nc, subjects, options)
        self.writing = asyncio.Event()

    async def _configure_queues(self, record: ModelRecord) -> None:
        self.writing.set()
        await asyncio.sleep(0.5)
        await super()._configure_queues(record)


async def test_a_report_that_arrives_during_the_first_placement_is_placed(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    build(tmp_path, ["tiny"], quiet=True)
    subjects = Subjects(f"t{uuid.uuid4().hex[:8]}")
    nc = await jetstream.connect(nats_server.url, name="test-router-placement")
    router = _SlowWritingRouter(nc, subjects, RouterOptions((tmp_path,)))
    try:
        starting = asyncio.create_task(router.start())
        await asyncio.wait_for(router.writing.wait(), 30)
        # The router placed `tiny` on no worker and is writing that down: now a worker comes.
        workers = await jetstream.ensure_bucket(nc.jetstream(), subjects.workers_bucket)
        worker = WorkerReport(id="w1", host="h", pid=1, devices=[{"kind": "CPU"}], models={})
        await workers.put("w1", worker.to_json())
        await asyncio.wait_for(starting, 30)
        models = await jetstream.ensure_bucket(nc.jetstream(), subjects.models_bucket)

        async def placed() -> bool:
            record = ModelRecord.from_json((await models.get("tiny")).value or b"")
            return record.placement == {"w1": 1}

        await wait_until_async(placed, 10, "tiny placed on the worker that came")
    finally:
        await router.stop()
        await jetstream.close_connection(nc)
