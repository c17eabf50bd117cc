"""The router: publishes the repository's models into the models KV bucket and keeps each
version's state true to what the live workers report.

A worker counts while its heartbeat (its key in the workers bucket, rewritten every few
seconds) is fresh; freshness is judged by this process's monotonic clock at receipt, so clock
skew between hosts cannot make a dead worker look alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.js.kv import KeyValue

from broker import jetstream
from broker.subjects import Subjects
from natron.states import LOADING, READY, UNAVAILABLE, ModelRecord, VersionState, WorkerReport
from router.repository import scan_repository

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class RouterOptions:
    repository: Path
    heartbeat_timeout_s: float = 6.0
    queue: jetstream.QueuePolicy = jetstream.QueuePolicy()


def aggregate(record: ModelRecord, workers: list[WorkerReport]) -> dict[str, VersionState]:
    """Each version's fleet-wide state from the live workers' reports."""
    if record.reason:
        return record.versions
    states: dict[str, VersionState] = {}
    live = [w for w in workers if not w.stopping]
    for version in record.versions:
        seen = [
            w.models[record.name][record.generation][version]
            for w in live
            if version in w.models.get(record.name, {}).get(record.generation, {})
        ]
        if any(s.state == READY for s in seen):
            states[version] = VersionState(READY)
        elif any(s.state == LOADING for s in seen):
            states[version] = VersionState(LOADING)
        elif seen:
            states[version] = VersionState(UNAVAILABLE, seen[0].reason)
        elif not live:
            states[version] = VersionState(UNAVAILABLE, "no live worker serves this model")
        else:
            states[version] = VersionState(LOADING)
    return states


class Router:
    def __init__(self, nc: Client, subjects: Subjects, options: RouterOptions) -> None:
        self._nc = nc
        self._subjects = subjects
        self._options = options
        self._records: dict[str, ModelRecord] = {}
        self._workers: dict[str, WorkerReport] = {}
        self._last_seen_s: dict[str, float] = {}
        self._models_kv: KeyValue | None = None
        self._workers_kv: KeyValue | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def records(self) -> dict[str, ModelRecord]:
        return self._records

    async def start(self) -> None:
        js = self._nc.jetstream()
        await jetstream.ensure_stream(js, self._subjects, self._options.queue)
        self._models_kv = await jetstream.ensure_bucket(js, self._subjects.models_bucket)
        self._workers_kv = await jetstream.ensure_bucket(js, self._subjects.workers_bucket)
        records = await asyncio.to_thread(scan_repository, self._options.repository)
        self._records = {r.name: r for r in records}
        await self._publish_repository()
        self._tasks = [
            asyncio.create_task(self._watch_workers(), name="router-watch-workers"),
            asyncio.create_task(self._reap_workers(), name="router-reap-workers"),
        ]
        log.info("router serving %d model(s) from %s", len(records), self._options.repository)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _publish_repository(self) -> None:
        assert self._models_kv is not None
        try:
            existing = set(await self._models_kv.keys())
        except Exception:  # NoKeysError: an empty bucket
            existing = set()
        for record in self._records.values():
            record.versions = aggregate(record, list(self._workers.values()))
            await self._models_kv.put(record.name, record.to_json())
        for stale in existing - set(self._records):
            await self._models_kv.delete(stale)

    async def _update_states(self) -> None:
        assert self._models_kv is not None
        workers = list(self._workers.values())
        for record in self._records.values():
            states = aggregate(record, workers)
            if states != record.versions:
                record.versions = states
                log.info(
                    "model '%s': %s",
                    record.name,
                    ", ".join(
                        f"v{v} {s.state}{' (' + s.reason + ')' if s.reason else ''}"
                        for v, s in states.items()
                    ),
                )
                await self._models_kv.put(record.name, record.to_json())

    async def _watch_workers(self) -> None:
        assert self._workers_kv is not None
        loop = asyncio.get_running_loop()
        watcher = await self._workers_kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._workers.pop(entry.key, None)
                    self._last_seen_s.pop(entry.key, None)
                else:
                    try:
                        self._workers[entry.key] = WorkerReport.from_json(entry.value)
                    except (KeyError, ValueError, TypeError) as exc:
                        log.warning("ignoring malformed report of worker %s: %s", entry.key, exc)
                        continue
                    self._last_seen_s[entry.key] = loop.time()
                await self._update_states()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _reap_workers(self) -> None:
        assert self._workers_kv is not None
        loop = asyncio.get_running_loop()
        timeout_s = self._options.heartbeat_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 3))
            now = loop.time()
            dead = [w for w, seen in self._last_seen_s.items() if now - seen > timeout_s]
            for worker_id in dead:
                log.warning("worker %s stopped heart-beating; dropping it", worker_id)
                self._workers.pop(worker_id, None)
                self._last_seen_s.pop(worker_id, None)
                with contextlib.suppress(Exception):
                    await self._workers_kv.delete(worker_id)
            if dead:
                await self._update_states()
