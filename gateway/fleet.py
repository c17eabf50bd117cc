"""The gateway's view of the worker fleet: the workers KV bucket, mirrored, and the statistics
query that reads every live worker's counts as they are now.

Statistics come fresh: on each statistics request or scrape the gateway publishes one query
(`natron.ctl.stats`, no queue group) and every worker and orchestrator answers with its counts
(natron/stats.py). The gateway waits for the workers its view knows, up to
`STATS_QUERY_TIMEOUT_S`; a worker that has not answered by then (stopped, partitioned, its loop
busy) counts with whichever is later of its last answer and its last heartbeat (every 2 s)
instead. So a slow worker delays the answer by that bound at most, and its counts never go
backwards, which Prometheus would take for a counter reset. A worker that leaves takes its
counts with it (a real reset, which `rate()` handles).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from broker.mirror import BucketMirror
from broker.recovery import Reconnects
from broker.subjects import Subjects
from natron.records import READY, WorkerReport
from natron.stats import StatsQuery, empty_stats, merge, progress, read_stats_answer
from natron.tasks import EssentialTasks

log = logging.getLogger(__name__)

# How long a statistics query waits for the answers of the workers in the view. Answers take
# well under a millisecond from a live worker on a LAN; the bound is what a stopped one costs.
STATS_QUERY_TIMEOUT_S = 0.25


@dataclass(slots=True)
class FleetStats:
    """The fleet's statistics at one moment, by worker id and "model/version": answers to the
    query, and the last heartbeat's for workers that did not answer (`stale`)."""

    by_worker: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)

    def total(self, model: str, version: str) -> dict[str, Any]:
        """Statistics of one model version summed over the fleet."""
        key = f"{model}/{version}"
        total = empty_stats()
        for stats in self.by_worker.values():
            one = stats.get(key)
            if one:
                merge(total, one)
        return total

    def keys(self) -> set[tuple[str, str]]:
        """Every (model, version) some worker has statistics of."""
        found: set[tuple[str, str]] = set()
        for stats in self.by_worker.values():
            for key in stats:
                model, _, version = key.partition("/")
                found.add((model, version))
        return found

    def sketches(self) -> dict[str, dict[str, dict[str, Any]]]:
        """worker -> "model/version" -> the latency sketches it answered with ([bucket, count]
        pairs by duration); heartbeats carry none."""
        return {
            worker: {key: one["sketches"] for key, one in stats.items() if "sketches" in one}
            for worker, stats in self.by_worker.items()
            if worker not in self.stale
        }


class FleetView:
    def __init__(self) -> None:
        self._mirror = BucketMirror("worker report", WorkerReport.from_json)
        self._workers = self._mirror.values
        # Set once the workers' reports present at start have been read.
        self.synced = self._mirror.synced
        self.tasks = EssentialTasks("fleet view")
        # worker -> (its process id, its statistics by "model/version" as last answered): what
        # stands in for a worker that does not answer, while newer than its heartbeat.
        self._answered: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {}

    @property
    def workers(self) -> list[WorkerReport]:
        return list(self._workers.values())

    def workers_up(self, model: str) -> int:
        return sum(
            1
            for w in self._workers.values()
            if not w.stopping
            and any(s.state == READY for gen in w.models.get(model, {}).values() for s in gen.values())
        )

    async def query(
        self,
        nc: Client,
        subjects: Subjects,
        model: str | None = None,
        *,
        sketches: bool = False,
        timeout_s: float = STATS_QUERY_TIMEOUT_S,
    ) -> FleetStats:
        """Every worker's statistics now (of `model` alone, when given): the answers to one
        query, and the last heartbeat of each worker in the view that did not answer within
        `timeout_s`. With `sketches`, the answers carry latency sketches too."""
        expected = set(self._workers)
        answers: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {}
        complete = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            try:
                worker, pid, stats = read_stats_answer(msg.data)
            except ValueError as exc:
                log.warning("ignoring a malformed statistics answer: %s", exc)
                return
            answers[worker] = (pid, stats)
            if expected <= answers.keys():
                complete.set()

        if expected and nc.is_connected:
            try:
                sub = await nc.subscribe(nc.new_inbox(), cb=on_answer)
            except Exception as exc:  # the connection closed meanwhile: heartbeats it is
                log.warning("statistics query not sent: %r", exc)
            else:
                try:
                    query = StatsQuery(model, sketches).to_json()
                    await nc.publish(subjects.stats_query, query, reply=sub.subject)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(complete.wait(), timeout_s)
                except Exception as exc:  # disconnected meanwhile: heartbeats for the rest
                    log.warning("statistics query not sent: %r", exc)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        result = FleetStats()
        for worker, (pid, stats) in answers.items():
            result.by_worker[worker] = stats
            self._remember(worker, pid, stats)
        prefix = f"{model}/" if model is not None else ""
        for worker in expected - answers.keys():
            report = self._workers.get(worker)
            if report is not None:
                result.by_worker[worker] = self._latest(report, prefix)
                result.stale.add(worker)
        for gone in self._answered.keys() - self._workers.keys():
            del self._answered[gone]
        return result

    def _remember(self, worker: str, pid: int, stats: dict[str, dict[str, Any]]) -> None:
        known = self._answered.get(worker)
        if known is None or known[0] != pid:
            self._answered[worker] = (pid, dict(stats))
        else:
            known[1].update(stats)

    def _latest(self, report: WorkerReport, prefix: str) -> dict[str, dict[str, Any]]:
        """A silent worker's statistics: per model version, its last answer while that is
        later than its last heartbeat (and from the same process), else the heartbeat's."""
        latest = {k: v for k, v in report.stats.items() if k.startswith(prefix)}
        known = self._answered.get(report.id)
        if known is not None and known[0] == report.pid:
            for key, answered in known[1].items():
                if key.startswith(prefix) and progress(answered) > progress(latest.get(key, {})):
                    # Sketches are for the moment they were asked: an old one would skew the window.
                    latest[key] = {k: v for k, v in answered.items() if k != "sketches"}
        return latest

    async def start(self, kv: KeyValue, reconnects: Reconnects | None = None) -> None:
        """Follow `kv`; with `reconnects`, watched again after each reconnect."""
        self.tasks.spawn(self._mirror.follow(kv, reconnects=reconnects), "follow-workers")

    async def stop(self) -> None:
        await self.tasks.stop()
