"""The router: the control plane. It publishes the models of its repositories (one or several,
as tritonserver's repeated --model-repository; see router/repository.py) into the models KV
bucket, places their instances on the live workers, keeps each version's state true to what
the workers report, and serves Triton's model control (modes none, poll and explicit).

A load over a model that serves never takes it down. A load the router can judge at once (a
config that does not parse or validate, a name found in more than one repository, an
instance_group no worker can take) is refused before any worker sees it; one that fails on the
workers (its files, the backend's load, warm-up) is given up once every placed worker has
reported, and the record that served is published again. Either way the model serves on with
its own config, the load call answers the reason, and the record's `failure` shows it in the
repository index until a load succeeds. (Triton unloads a model whose name turns up in a second
repository; natron keeps it serving from the files it was loaded from, as for any failed
reload, and says why in `failure`.)

A worker counts while its heartbeat (its key in the workers bucket, rewritten every few
seconds) is fresh; freshness is judged by this process's monotonic clock at receipt, so clock
skew between hosts cannot make a dead worker look alive.

Its loops (watching and reaping workers, polling, retrying publishes, the broker-state watch)
are essential tasks (natron/tasks.py): one that dies ends the process, which its supervisor
restarts. A record that cannot be written while NATS is away is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from broker import jetstream, recovery
from broker.mirror import BucketMirror
from broker.objects import ModelFiles, StoreKind
from broker.subjects import Subjects, check_name
from natron import config as cfg
from natron.errors import DeadlineExceeded, InvalidArgument, NatronError, NotFound, Unavailable, Unsupported
from natron.records import UNAVAILABLE, UNLOADING, ModelRecord, VersionState, WorkerReport
from natron.tasks import EssentialTasks
from router import uploads
from router.aggregate import aggregate, gate_ensembles, settle
from router.placement import model_size_bytes, place
from router.repository import find_model, scan_folders, scan_repositories

log = logging.getLogger(__name__)

CONTROL_MODES = ("none", "poll", "explicit")
UNLOADED = "unloaded"
# Retrying records the broker did not take: from the first delay, doubling, up to the last.
_REPUBLISH_FIRST_S = 0.5
_REPUBLISH_MAX_S = 5.0


@dataclass(slots=True, frozen=True)
class RouterOptions:
    # Several serve as one; a model name in more than one is UNAVAILABLE (router/repository.py).
    repositories: tuple[Path, ...]
    control_mode: str = "none"
    poll_interval_s: float = 15.0  # Triton's --repository-poll-secs default
    load_models: tuple[str, ...] = ()  # explicit mode: loaded at start ("*": all)
    heartbeat_timeout_s: float = 6.0
    load_timeout_s: float = 300.0
    upload_dir: Path | None = None  # uploaded model files; None: a temporary folder
    upload_limits: uploads.UploadLimits = field(default_factory=uploads.UploadLimits)
    queue: jetstream.QueuePolicy = field(default_factory=jetstream.QueuePolicy)
    storage: jetstream.Storage = field(default_factory=jetstream.Storage)
    # Publish each served version's files to the model store (broker/objects.py), a bucket
    # with this storage, so that workers without the repository load them; None: workers read
    # the repository's folders.
    model_store: StoreKind | None = None

    def __post_init__(self) -> None:
        if not self.repositories:
            raise InvalidArgument("no model repository given")
        if self.control_mode not in CONTROL_MODES:
            raise InvalidArgument(
                f"model control mode '{self.control_mode}': expected one of {', '.join(CONTROL_MODES)}"
            )


@dataclass(slots=True, eq=False)
class _Attempt:
    """A load under way: the record the workers were told to load, and the record that served
    before it (None when none did), which serves on if this load fails."""

    record: ModelRecord
    serving: ModelRecord | None
    serving_size: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: NatronError | None = None  # once done: why it failed; None when it succeeded

    def finish(self, error: NatronError | None = None) -> None:
        self.error = error
        self.done.set()


def placement_inputs_changed(before: WorkerReport, after: WorkerReport) -> bool:
    """Whether a worker's new report changes what placement and state aggregation read from it:
    its role, whether it is stopping, its devices (less their telemetry, which moves on every
    beat) and the states of the model versions it runs. Statistics are not among them."""
    if before.stopping != after.stopping or before.role != after.role or before.models != after.models:
        return True
    return _devices_sans_telemetry(before) != _devices_sans_telemetry(after)


def _devices_sans_telemetry(report: WorkerReport) -> list[dict[str, Any]]:
    return [{k: v for k, v in device.items() if k != "telemetry"} for device in report.devices]


# How long the reaper waits for the workers bucket to answer before it counts itself blind.
_PROBE_TIMEOUT_S = 1.0


class Router:
    def __init__(self, nc: Client, subjects: Subjects, options: RouterOptions) -> None:
        self._nc = nc
        self._subjects = subjects
        self._options = options
        self._records: dict[str, ModelRecord] = {}
        self._sizes: dict[str, int] = {}
        self._published: dict[str, bytes] = {}
        # Set (under the lock) when the first placement begins: from then on every report that
        # changes what placement reads places again. Not `_published`, which is empty for a
        # moment at start and after a reconnect: a report that came then would go unplaced.
        self._placing = False
        # Loads under way, by model; and the generation whose load last failed over a model
        # that serves on, which polling does not try again until the files change.
        self._attempts: dict[str, _Attempt] = {}
        self._failed_generation: dict[str, str] = {}
        # (model, version) whose consumers this router has configured -> the model's priority
        # levels and default level then (0, 0: one consumer).
        self._queues: dict[tuple[str, str], tuple[int, int]] = {}
        # The workers bucket: each worker's last report.
        self._fleet = BucketMirror("worker report", WorkerReport.from_json)
        self._workers = self._fleet.values
        self._last_seen_s: dict[str, float] = {}
        self._models_kv: KeyValue | None = None
        self._workers_kv: KeyValue | None = None
        self.tasks = EssentialTasks("router")
        self._unpublished = asyncio.Event()
        self._subs: list[Subscription] = []
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()
        self._upload_tmp: tempfile.TemporaryDirectory[str] | None = None
        # Upload folders (resolved paths) that a record or a load under way may use; each is
        # removed once none does (`_drop_uploads`).
        self._uploads: set[str] = set()
        self._files = ModelFiles(nc, subjects.files_bucket) if options.model_store is not None else None

    @property
    def records(self) -> dict[str, ModelRecord]:
        return self._records

    @property
    def live_workers(self) -> int:
        return sum(1 for w in self._workers.values() if not w.stopping)

    @property
    def essential(self) -> tuple[EssentialTasks, ...]:
        """What the process's runner watches: a failure here ends the process."""
        return (self.tasks,)

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        js = self._nc.jetstream()
        await self._ensure_state(js)
        if self._options.upload_dir is None:
            self._upload_tmp = tempfile.TemporaryDirectory(prefix="natron-uploads-")
        self.tasks.spawn(
            recovery.reassert_after_reconnects(self._nc, self._subjects, "router", self._reassert),
            "router-reassert",
        )
        # Know the fleet before publishing anything: a restarted router must not flash
        # "no live worker" over models that are being served.
        self.tasks.spawn(self._watch_workers(), "router-watch-workers")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._fleet.synced.wait(), 10)
        previous = await self._read_published()
        records = await asyncio.to_thread(scan_repositories, self._options.repositories)
        loaded = self._initially_loaded({r.name for r in records}, previous)
        await self._push_files([record for record in records if record.name in loaded])
        for record in records:
            if record.name not in loaded:
                was = previous.get(record.name)
                self._mark_unloaded(record, ever_loaded=was is not None and was.reason != UNLOADED)
            self._records[record.name] = record
        for name, record in previous.items():
            # Models loaded through the API from uploaded files survive a router restart. A
            # load that was under way is not followed up (what served is not known here): its
            # own config is the one clients see from now on.
            if name not in self._records and name in loaded:
                record.serving_config = None
                self._records[name] = record
                if uploads.is_upload(record.path, self._upload_root()):
                    self._uploads.add(record.path)
        if self._options.upload_dir is not None:
            # What a router that stopped left behind, which no record uses any more.
            keep = {record.path for record in self._records.values()}
            left = await asyncio.to_thread(uploads.orphans, self._options.upload_dir, keep)
            await asyncio.to_thread(uploads.remove_folders, left)
        self._sizes = await asyncio.to_thread(lambda: {r.name: model_size_bytes(r) for r in records})
        self.tasks.spawn(self._republish(), "router-republish")
        async with self._lock:
            # A report that comes while this runs waits for the lock, then places again.
            self._placing = True
            await self._publish(delete_others=True)
        self.tasks.spawn(self._reap_workers(), "router-reap-workers")
        if self._options.control_mode == "poll":
            self.tasks.spawn(self._poll(), "router-poll")
        for verb, handler in (("load", self._on_load), ("unload", self._on_unload)):
            self._subs.append(await self._nc.subscribe(self._subjects.ctl(verb), "natron-router", cb=handler))
        log.info(
            "router: %d model(s) in %s, mode %s, %d loaded",
            len(records),
            ", ".join(str(repository) for repository in self._options.repositories),
            self._options.control_mode,
            len(loaded),
        )

    async def _ensure_state(self, js: JetStreamContext) -> None:
        """The stream as this router's queue policy wants it, and the buckets."""
        storage = self._options.storage
        await jetstream.configure_stream(js, self._subjects, self._options.queue, storage)
        self._models_kv = await jetstream.ensure_bucket(js, self._subjects.models_bucket, storage)
        self._workers_kv = await jetstream.ensure_bucket(js, self._subjects.workers_bucket, storage)
        if self._files is not None and self._options.model_store is not None:
            await self._files.ensure_bucket(self._options.model_store, storage.replicas)

    async def _reassert(self, lost: bool) -> None:
        """After a reconnect: the stream, the buckets, every consumer and every record again (a
        broker that lost them gets them back; one that kept them sees the same values). The
        workers get a fresh heartbeat window: a gap in the broker is no sign of their death."""
        js = self._nc.jetstream()
        await self._ensure_state(js)
        if lost:
            # The model store went with the rest: the same files, the same digests, published again.
            await self._push_files(list(self._records.values()))
        now = asyncio.get_running_loop().time()
        for worker_id in self._last_seen_s:
            self._last_seen_s[worker_id] = now
        async with self._lock:
            for (name, version), levels in sorted(self._queues.items()):
                await self._configure_levels(js, name, version, levels)
            self._published.clear()
            await self._publish()
            if lost and any(name not in self._published for name in self._records):
                raise Unavailable("not every model record was published again")

    async def stop(self) -> None:
        """Stop taking control requests (one in flight is answered 503), then the loops. Safe
        after a partial start and after a loop died (its error was logged when it died)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            # Unsubscribing cancels a handler still waiting for a load to settle; it answers.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.tasks.stop()
        if self._upload_tmp is not None:
            self._upload_tmp.cleanup()
            self._upload_tmp = None

    def _initially_loaded(self, names: set[str], previous: dict[str, ModelRecord]) -> set[str]:
        if self._options.control_mode != "explicit":
            return names
        wanted = set(self._options.load_models)
        loaded = set(names) if "*" in wanted else wanted & names
        for name in sorted(wanted - names - {"*"}):
            log.warning("--load-model %s: no such model in the model repositories", name)
        # A restarted router keeps what the fleet was told to load.
        loaded |= {name for name, record in previous.items() if record.reason != UNLOADED}
        return loaded

    @staticmethod
    def _mark_unloaded(record: ModelRecord, ever_loaded: bool) -> None:
        record.reason = UNLOADED
        record.serving_config = None
        record.failure = ""
        record.versions = (
            {v: VersionState(UNAVAILABLE, UNLOADED) for v in record.versions} if ever_loaded else {}
        )
        record.placement = {}

    async def _read_published(self) -> dict[str, ModelRecord]:
        assert self._models_kv is not None
        records: dict[str, ModelRecord] = {}
        try:
            keys = await self._models_kv.keys()
        except Exception:  # NoKeysError: an empty bucket
            return records
        for key in keys:
            with contextlib.suppress(Exception):
                entry = await self._models_kv.get(key)
                if entry.value:
                    records[key] = ModelRecord.from_json(entry.value)
        return records

    # -- publishing --------------------------------------------------------------------------

    async def _publish(self, delete_others: bool = False) -> None:
        """Place, settle the loads under way, aggregate, and write every record whose document
        changed. The loads that ended are told so only once their records are written, so a
        load call answers after the gateways can see its outcome."""
        assert self._models_kv is not None
        workers = list(self._workers.values())
        self._place(workers)
        ended = self._settle_attempts(workers)
        if any(attempt.error is not None and attempt.serving is not None for attempt in ended):
            self._place(workers)  # records that serve on were put back: place them again
        computed: dict[str, dict[str, VersionState]] = {}
        for name, record in self._records.items():
            computed[name] = aggregate(record, workers)
        gate_ensembles(self._records, computed)
        for name, record in self._records.items():
            states = computed[name]
            if states != record.versions:
                record.versions = states
                log.info(
                    "model '%s': %s",
                    name,
                    ", ".join(
                        f"v{v} {s.state}{' (' + s.reason + ')' if s.reason else ''}"
                        for v, s in states.items()
                    )
                    or record.reason,
                )
            document = record.to_json()
            if self._published.get(name) != document:
                try:
                    # The consumers first: a worker that sees its placement binds to them.
                    await self._configure_queues(record)
                    await self._models_kv.put(name, document)
                except Exception as exc:
                    # NATS reconnecting: the retry loop writes it once the broker takes it.
                    # Never raise here: the loop that called (the fleet watch, the reaper)
                    # must live on.
                    if not self._unpublished.is_set():
                        log.warning("model '%s' not published, retrying: %r", name, exc)
                    self._unpublished.set()
                    continue
                self._published[name] = document
        if delete_others:
            with contextlib.suppress(Exception):
                for key in set(await self._models_kv.keys()) - set(self._records):
                    await self._models_kv.delete(key)
        if self._uploads:
            # Before the loads that ended answer: a client told its reload is done finds the
            # files of the model it replaced gone.
            await self._drop_uploads()
        for attempt in ended:
            attempt.finish(attempt.error)
        async with self._changed:
            self._changed.notify_all()

    def _upload_root(self) -> Path:
        return self._options.upload_dir or Path(self._upload_tmp.name if self._upload_tmp else ".")

    async def _drop_uploads(self) -> None:
        """Remove the upload folders that nothing serves from or loads from any more: the
        model was unloaded, or a later load replaced it (succeeded, or was superseded), or
        the load that wrote it failed while an older model serves on. Runs where the records
        change (the caller holds the lock, or is starting)."""
        used = {record.path for record in self._records.values() if record.reason != UNLOADED}
        for attempt in self._attempts.values():
            used.add(attempt.record.path)
            if attempt.serving is not None:
                used.add(attempt.serving.path)
        stale = self._uploads - used
        if stale:
            self._uploads -= stale
            await asyncio.to_thread(uploads.remove_folders, [Path(folder) for folder in sorted(stale)])

    def _place(self, workers: list[WorkerReport]) -> None:
        placements = place(list(self._records.values()), workers, self._sizes)
        for name, record in self._records.items():
            if not record.reason:
                record.placement, record.placement_reason = placements.get(name, ({}, ""))

    def _settle_attempts(self, workers: list[WorkerReport]) -> list[_Attempt]:
        """End the loads whose placed workers have all reported: a success makes the record's
        own config the one clients see; a failure over a model that served puts that model's
        record back, with the reason. The ended attempts carry their outcome in `error` but are
        not finished yet (the caller finishes them once the records are written)."""
        ended: list[_Attempt] = []
        for name, attempt in list(self._attempts.items()):
            record = attempt.record
            failures = settle(record, workers)
            if failures is None:
                continue
            del self._attempts[name]
            ended.append(attempt)
            if not failures:
                record.serving_config = None
                record.failure = ""
                self._failed_generation.pop(name, None)
                continue
            detail = "; ".join(f"version {v}: {r}" for v, r in failures.items())
            attempt.error = InvalidArgument(f"failed to load '{name}': {detail}")
            if attempt.serving is not None:
                log.warning("model '%s': load failed, the previous model serves on: %s", name, detail)
                attempt.serving.failure = detail
                self._records[name] = attempt.serving
                self._sizes[name] = attempt.serving_size
                self._failed_generation[name] = record.generation
        return ended

    async def _republish(self) -> None:
        """Write the records the broker did not take, with backoff, until it takes them all."""
        delay_s = _REPUBLISH_FIRST_S
        while True:
            await self._unpublished.wait()
            await asyncio.sleep(delay_s)
            self._unpublished.clear()
            async with self._lock:
                await self._publish()
            if self._unpublished.is_set():
                delay_s = min(delay_s * 2, _REPUBLISH_MAX_S)
            else:
                log.info("model records published again")
                delay_s = _REPUBLISH_FIRST_S

    async def _remove(self, name: str) -> None:
        assert self._models_kv is not None
        self._supersede(name, "was removed from the repository meanwhile")
        self._failed_generation.pop(name, None)
        record = self._records.pop(name, None)
        self._published.pop(name, None)
        self._sizes.pop(name, None)
        await self._models_kv.delete(name)
        if record is not None:
            await self._drop_queues(name, list(record.versions))

    async def _configure_queues(self, record: ModelRecord) -> None:
        """The consumer of each version a placed model serves, with this router's queue policy:
        the router is the queues' one owner, so workers with other settings cannot disagree."""
        if not record.placement or record.reason:
            return
        js = self._nc.jetstream()
        levels = _priority_levels(record)
        for version in record.versions:
            if self._queues.get((record.name, version)) != levels:
                await self._configure_levels(js, record.name, version, levels)
                self._queues[(record.name, version)] = levels

    async def _configure_levels(
        self, js: JetStreamContext, name: str, version: str, levels: tuple[int, int]
    ) -> None:
        """One consumer per priority level (docs/design.md, "Queue policy and priorities"), or
        the version's one consumer for a model without levels."""
        count, default_level = levels
        for level in range(1, count + 1) if count else (0,):
            await jetstream.configure_consumer(
                js,
                self._subjects,
                name,
                version,
                self._options.queue,
                level=level,
                default_level=level == default_level,
            )

    async def _drop_queues(self, name: str, versions: list[str]) -> None:
        """A model version no longer served needs no consumer: delete it with whatever it still
        held (nobody can publish to it any more), so the stream does not keep dead consumers."""
        js = self._nc.jetstream()
        for version in versions:
            count, _ = self._queues.pop((name, version), (0, 0))
            with contextlib.suppress(Exception):  # already gone, or the broker is away
                await jetstream.delete_consumer(js, self._subjects, name, version, levels=count)

    # -- the fleet ---------------------------------------------------------------------------

    async def _watch_workers(self) -> None:
        assert self._workers_kv is not None
        await self._fleet.follow(self._workers_kv, self._on_report, recovery.reconnects_of(self._nc))

    async def _on_report(
        self, worker_id: str, before: WorkerReport | None, after: WorkerReport | None
    ) -> None:
        if after is None:
            self._last_seen_s.pop(worker_id, None)
        else:
            self._last_seen_s[worker_id] = asyncio.get_running_loop().time()
            if before is not None and not placement_inputs_changed(before, after):
                # Most reports are heartbeats that only refresh the worker's freshness and
                # statistics: nothing to place or aggregate again.
                return
        if self._fleet.synced.is_set() and self._placing:
            async with self._lock:
                await self._publish()

    async def _reap_workers(self) -> None:
        assert self._workers_kv is not None
        loop = asyncio.get_running_loop()
        timeout_s = self._options.heartbeat_timeout_s
        js = self._nc.jetstream()
        blind = False
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 3))
            if not self._nc.is_connected or not self._fleet.live or not await self._bucket_writable(js):
                # No heartbeat can be written or reach this router now (the broker is away, a
                # cluster is electing the bucket's leader, the watch is being opened again):
                # none is late for that.
                blind = True
                continue
            now = loop.time()
            if blind:
                blind = False
                for worker_id in self._last_seen_s:
                    self._last_seen_s[worker_id] = now
            dead = []
            for worker_id, seen in list(self._last_seen_s.items()):
                if now - seen <= timeout_s:
                    continue
                # A watch can fall behind its bucket unnoticed for a while (broker/mirror.py):
                # the bucket itself says whether the worker wrote since.
                written = await self._fleet.written_since_seen(self._workers_kv, worker_id)
                if written is False:
                    dead.append(worker_id)
                elif written:
                    self._last_seen_s[worker_id] = now
            for worker_id in dead:
                log.warning("worker %s stopped heart-beating; placing its models elsewhere", worker_id)
                self._workers.pop(worker_id, None)
                self._last_seen_s.pop(worker_id, None)
                with contextlib.suppress(Exception):
                    await self._workers_kv.delete(worker_id)
            if dead:
                async with self._lock:
                    await self._publish()

    async def _bucket_writable(self, js: JetStreamContext) -> bool:
        """The workers bucket has a leader that answers: workers can write their heartbeats."""
        try:
            await asyncio.wait_for(js.stream_info(self._subjects.workers_stream), _PROBE_TIMEOUT_S)
            return True
        except Exception:  # no responders, timeout, reconnecting
            return False

    # -- poll mode ---------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._options.poll_interval_s)
            try:
                await self.rescan()
            except Exception:  # a transient file system error must not end polling
                log.exception("repository poll failed")

    async def rescan(self) -> None:
        """Pick up added, removed and changed models and version folders."""
        scanned = await asyncio.to_thread(scan_repositories, self._options.repositories)
        await self._push_files(scanned)
        sizes = await asyncio.to_thread(lambda: {r.name: model_size_bytes(r) for r in scanned})
        async with self._lock:
            names = {r.name for r in scanned}
            for name in [n for n in self._records if n not in names]:
                log.info("model '%s' left the repository: unloading", name)
                await self._remove(name)
            for record in scanned:
                known = self._records.get(record.name)
                if known is not None and known.generation == record.generation:
                    if known.failure and record.name not in self._attempts:
                        known.failure = ""  # the repository is back to what serves
                        self._failed_generation.pop(record.name, None)
                    continue
                if self._failed_generation.get(record.name) == record.generation:
                    continue  # failed before: tried again once its files or config change
                log.info("model '%s' %s", record.name, "changed: reloading" if known else "added: loading")
                attempt = self._begin(record, sizes.get(record.name, 0))
                if attempt.error is not None and attempt.serving is not None:
                    log.warning("%s; the previous model serves on", attempt.error.message)
            await self._publish()

    async def _push_files(self, records: list[ModelRecord]) -> None:
        """Publish the files of each record's versions to the model store before the record:
        their digests are part of its generation. Files that cannot be published (over the
        limits, unreadable) make the model UNAVAILABLE with the reason, as a broken config
        does; the store away raises Unavailable (a poll tries again, a load answers 503)."""
        if self._files is None:
            return
        for record in records:
            if record.reason or record.config is None:
                continue
            versions = sorted(record.versions, key=int)
            try:
                record.digests = await self._files.push_versions(record.name, Path(record.path), versions)
            except InvalidArgument as exc:
                record.reason = f"model files not published: {exc.message}"
                record.versions = {v: VersionState(UNAVAILABLE, record.reason) for v in versions}
            record.generation = record.compute_generation()

    # -- loads under way -----------------------------------------------------------------------

    def _serving(self, name: str) -> ModelRecord | None:
        """The record that serves `name` now, and that a failed load must leave serving."""
        attempt = self._attempts.get(name)
        if attempt is not None:
            return attempt.serving
        record = self._records.get(name)
        if record is not None and not record.reason and record.ready_versions():
            return record
        return None

    def _supersede(self, name: str, why: str) -> None:
        attempt = self._attempts.pop(name, None)
        if attempt is not None:
            attempt.finish(Unavailable(f"the load of '{name}' was given up: '{name}' {why}"))

    def _begin(self, candidate: ModelRecord, size: int) -> _Attempt:
        """Start loading `candidate` in place of what serves `name` (caller holds the lock and
        publishes). A candidate the router can judge at once (a broken config, an
        instance_group placement refuses) never replaces a record that serves: the attempt
        comes back finished with the reason, noted on that record."""
        name = candidate.name
        serving = self._serving(name)
        under_way = self._attempts.get(name)
        serving_size = under_way.serving_size if under_way is not None else self._sizes.get(name, 0)
        attempt = _Attempt(candidate, serving, serving_size if serving is not None else 0)
        refusal = candidate.reason
        if serving is not None and not refusal:
            refusal = self._placement_refusal(candidate, size)
        if serving is not None and refusal:
            # The published record is the one that serves, or a load under way over it: it
            # carries the reason, and a load under way goes on.
            self._records[name].failure = refusal
            self._failed_generation[name] = candidate.generation
            attempt.finish(InvalidArgument(f"failed to load '{name}': {refusal}"))
            return attempt
        self._supersede(name, "was loaded again meanwhile")
        self._failed_generation.pop(name, None)
        candidate.serving_config = serving.config if serving is not None else None
        self._records[name] = candidate
        self._sizes[name] = size
        if candidate.reason:
            attempt.finish(InvalidArgument(f"failed to load '{name}': {candidate.reason}"))
        else:
            self._attempts[name] = attempt
        return attempt

    def _placement_refusal(self, candidate: ModelRecord, size: int) -> str:
        """Why placement would give `candidate` no worker at all, with the fleet as it is; ""
        when it places it somewhere."""
        others = [r for name, r in self._records.items() if name != candidate.name]
        sizes = {**self._sizes, candidate.name: size}
        placement, reason = place([*others, candidate], list(self._workers.values()), sizes)[candidate.name]
        return "" if placement else reason or "no worker can take the model"

    # -- explicit mode: load and unload ------------------------------------------------------

    async def _reply(self, msg: Msg, error: NatronError | None) -> None:
        body: dict[str, Any] = (
            {"status": 200} if error is None else {"status": error.status, "error": error.message}
        )
        if msg.reply:
            await self._nc.publish(msg.reply, orjson.dumps(body))

    async def _on_load(self, msg: Msg) -> None:
        try:
            request = orjson.loads(msg.data)
            await self.load(str(request.get("name", "")), request.get("parameters") or {})
            await self._reply(msg, None)
        except NatronError as exc:
            await self._reply(msg, exc)
        except asyncio.CancelledError:
            await self._reply_stopping(msg)
            raise
        except Exception:
            # The client gets an incident id, never the exception's text (it may hold host paths).
            incident = secrets.token_hex(6)
            log.exception("load failed: internal error %s", incident)
            message = f"load failed: internal error (incident {incident}): the router's log has the details"
            await self._reply(msg, NatronError(message))

    async def _on_unload(self, msg: Msg) -> None:
        try:
            request = orjson.loads(msg.data)
            await self.unload(str(request.get("name", "")))
            await self._reply(msg, None)
        except NatronError as exc:
            await self._reply(msg, exc)
        except asyncio.CancelledError:
            await self._reply_stopping(msg)
            raise
        except Exception:
            # The client gets an incident id, never the exception's text (it may hold host paths).
            incident = secrets.token_hex(6)
            log.exception("unload failed: internal error %s", incident)
            message = f"unload failed: internal error (incident {incident}): the router's log has the details"
            await self._reply(msg, NatronError(message))

    async def _reply_stopping(self, msg: Msg) -> None:
        """The router stops with a load or unload in flight: its caller learns it at once
        rather than at its timeout. A bounded wait, as the stop is under way."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._reply(msg, Unavailable("the router is stopping; the request may have been applied")),
                1.0,
            )

    def _require_explicit(self) -> None:
        if self._options.control_mode != "explicit":
            raise Unsupported(
                f"explicit model load / unload is not allowed in model control mode "
                f"'{self._options.control_mode}'"
            )

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        """Load (or reload) `name`; return once every placed worker has settled it, each
        version READY on at least one of them. A load that fails leaves what serves serving."""
        self._require_explicit()
        check_name("model", name)
        if not isinstance(parameters, dict):
            raise InvalidArgument("'parameters' must be a JSON object")
        try:
            folders, override, uploaded = await self._load_source(name, parameters)
        except InvalidArgument as exc:
            await self._note_refused(name, exc)
            raise
        try:
            # A name in several repositories scans as UNAVAILABLE with the reason, refused
            # below as a broken config is.
            record = await asyncio.to_thread(scan_folders, name, folders, override)
            await self._push_files([record])
            size = await asyncio.to_thread(model_size_bytes, record)
            async with self._lock:
                attempt = self._begin(record, size)
                if uploaded:
                    # From here on the folder goes when nothing uses it (`_drop_uploads`).
                    self._uploads.add(record.path)
                    uploaded = False
                await self._publish()
        finally:
            if uploaded:  # the load ended before its record was taken: nothing uses the files
                await asyncio.to_thread(uploads.remove_folders, folders)
        await self._wait_loaded(attempt)

    async def _load_source(
        self, name: str, parameters: dict[str, Any]
    ) -> tuple[list[Path], dict[str, Any] | None, bool]:
        """The folders that hold `name` (one of uploaded files, or those of the repositories
        that have it: more than one when its name is not unique), the config that replaces
        its config.pbtxt, if any, and whether the folder was uploaded."""
        override = self._config_override(parameters.get("config"))
        prefix = uploads.FILE_PREFIX
        files = {k[len(prefix) :]: v for k, v in parameters.items() if k.startswith(prefix)}
        if files:
            if override is None:
                raise InvalidArgument("loading from uploaded files needs 'config' in the parameters too")
            folder = await asyncio.to_thread(
                uploads.write_uploads, self._upload_root(), name, files, self._options.upload_limits
            )
            return [folder], override, True
        folders = await asyncio.to_thread(find_model, self._options.repositories, name)
        if not folders:
            raise NotFound(f"no model '{name}' in the model repositories")
        return folders, override, False

    async def _note_refused(self, name: str, error: InvalidArgument) -> None:
        """A load refused before any scan (its config parameter, its files) leaves a model that
        serves as it is, with the reason shown next to it."""
        async with self._lock:
            serving = self._serving(name)
            if serving is not None:
                self._records[name].failure = error.message
                await self._publish()

    def _config_override(self, raw: Any) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            config = orjson.loads(raw) if isinstance(raw, str) else raw
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(f"'config' parameter is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InvalidArgument("'config' parameter must be a JSON object")
        # A client's config may name no file outside the model's folder (natron/config.py).
        cfg.check_override(config)
        return config

    async def _wait_loaded(self, attempt: _Attempt) -> None:
        """Until the load ends (settled by `_publish` as the workers report), or the load
        timeout; a load still under way then goes on without its caller."""
        try:
            await asyncio.wait_for(attempt.done.wait(), self._options.load_timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"'{attempt.record.name}' did not finish loading within the load timeout"
            ) from None
        if attempt.error is not None:
            raise attempt.error

    async def unload(self, name: str) -> None:
        """Unload `name`; return once no live worker runs it any more."""
        self._require_explicit()
        check_name("model", name)
        async with self._lock:
            record = self._records.get(name)
            if record is None:
                raise NotFound(f"unknown model '{name}'")
            self._supersede(name, "was unloaded meanwhile")
            self._failed_generation.pop(name, None)
            if record.reason != UNLOADED:
                served = list(record.versions)
                self._mark_unloaded(record, ever_loaded=True)
                # The index says UNLOADING until the last worker has let go of the model.
                record.versions = {v: VersionState(UNLOADING) for v in served}
                record.generation = record.compute_generation()
                await self._publish()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.load_timeout_s
        try:
            async with self._changed:
                while any(name in w.models for w in self._workers.values() if not w.stopping):
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise DeadlineExceeded(f"'{name}' did not finish unloading within the load timeout")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
        finally:
            async with self._lock:
                if self._records.get(name) is record and record.reason == UNLOADED:
                    record.versions = {v: VersionState(UNAVAILABLE, UNLOADED) for v in record.versions}
                    await self._publish()
                    await self._drop_queues(name, list(record.versions))


def _priority_levels(record: ModelRecord) -> tuple[int, int]:
    """The model's priority levels and default level, from its config (0, 0: none)."""
    batching = (record.config or {}).get("dynamic_batching") or {}
    count = int(batching.get("priority_levels") or 0)
    return (count, int(batching.get("default_priority_level") or 0)) if count else (0, 0)
