"""The gateway's view of the worker fleet, from the workers KV bucket: the statistics every
worker reports with its heartbeat, summed here into Triton's statistics extension and into one
scrape target for the whole fleet's model metrics.

Worker statistics are cumulative per worker and arrive with heartbeats (every 2 s), so the sums
lag by up to that long, and a worker that leaves takes its counts with it (a counter reset for
Prometheus, which `rate()` handles).
"""

from __future__ import annotations

import logging
from typing import Any

from nats.js.kv import KeyValue

from broker.mirror import BucketMirror
from natron.records import READY, WorkerReport
from natron.stats import empty_stats, merge
from natron.tasks import EssentialTasks

log = logging.getLogger(__name__)


class FleetView:
    def __init__(self) -> None:
        self._mirror = BucketMirror("worker report", WorkerReport.from_json)
        self._workers = self._mirror.values
        # Set once the workers' reports present at start have been read.
        self.synced = self._mirror.synced
        self.tasks = EssentialTasks("fleet view")

    @property
    def workers(self) -> list[WorkerReport]:
        return list(self._workers.values())

    def stats(self, model: str, version: str) -> dict[str, Any]:
        """Statistics of one model version summed over the fleet."""
        total = empty_stats()
        for worker in self._workers.values():
            stats = worker.stats.get(f"{model}/{version}")
            if stats:
                merge(total, stats)
        return total

    def workers_up(self, model: str) -> int:
        return sum(
            1
            for w in self._workers.values()
            if not w.stopping
            and any(s.state == READY for gen in w.models.get(model, {}).values() for s in gen.values())
        )

    async def start(self, kv: KeyValue) -> None:
        self.tasks.spawn(self._mirror.follow(kv), "follow-workers")

    async def stop(self) -> None:
        await self.tasks.stop()
