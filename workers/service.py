"""The worker service: follows the models bucket, loads every model version it is given,
runs its instances, reports what it serves in the workers bucket on every heartbeat, and
answers gateways' statistics queries with its counts as they are now.

A new generation of a model (changed config, files or versions) is loaded next to the old one
and only then replaces it, so a reload never leaves a gap.

Models load side by side, as in Triton (`--model-load-thread-count`): each model's record changes
are applied by a task of its own, in order (a model's load, reload and unload never interleave),
the versions of a generation load together, and a semaphore lets at most `model_load_threads`
versions load (backend load and warm-up, in a thread each) at once. So a model whose load takes
minutes delays no other model beyond the slot it holds. A load that a newer record makes
pointless (the model unloaded, placed elsewhere or changed again) is given up rather than waited
for; its thread cannot be stopped, so it keeps its slot until it ends and what it opened is
closed then.

Its loops (following the models, the heartbeat, the keep-alive, the broker-state watch) and its
model instances are essential tasks (natron/tasks.py): one that dies ends the process, which
its supervisor restarts. A report that cannot be written while NATS is away is retried by the
heartbeat instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from broker import jetstream, recovery
from broker.auth import ClientAuth
from broker.mirror import BucketMirror
from broker.puller import CapacityPuller, LevelPuller, Puller
from broker.subjects import REPLY_TO, Subjects
from natron import config as cfg
from natron.errors import NatronError
from natron.records import (
    LOADING,
    READY,
    UNAVAILABLE,
    WORKER,
    ModelRecord,
    VersionState,
    WorkerReport,
)
from natron.spec import ModelSpec
from natron.stats import ModelStats, StatsQuery, stats_answer
from natron.tasks import EssentialTasks, cancel_and_wait
from natron.tracing import ProcessSpans
from workers.backends import LOADERS, AnyBackend, BackendContext, Loader, load_backend
from workers.devices import Device
from workers.instance import ModelInstance
from workers.model_cache import DEFAULT_CACHE_BYTES, LocalVersion, ModelFilesMode, WorkerModelFiles
from workers.sharedmemory import WorkerSharedMemory
from workers.telemetry import GpuTelemetry, resident_bytes
from workers.warmup import run_warmup

log = logging.getLogger(__name__)

# Keep-alives go no more often than this, whatever ack wait a consumer has.
_MIN_KEEP_ALIVE_S = 0.1

# Each KV write on the way out: the broker may be away, and the stop has a budget.
_STOP_KV_TIMEOUT_S = 2.0
# Instances still running at the end of the drain are cancelled; this bounds that too.
_CANCEL_TIMEOUT_S = 2.0


@dataclass(slots=True, frozen=True)
class WorkerOptions:
    worker_id: str
    device: Device
    # How model code reaches the mesh (BLS calls from Python models), as this worker.
    nats_url: str = ""
    nats_auth: ClientAuth | None = None
    inbox_prefix: str = ""
    heartbeat_interval_s: float = 2.0
    # Where the stream and buckets live when this worker is the first to need them.
    storage: jetstream.Storage = field(default_factory=jetstream.Storage)
    # On stop, batches in hand finish within this long; the process's shutdown budget holds it
    # and a few seconds more for closing (natron/cli/services.py).
    drain_timeout_s: float = 20.0
    # Sleep this long after each batch: makes a worker slower on purpose, to show and measure
    # load balancing by capacity (`natron worker --throttle-ms`). 0 in production.
    throttle_s: float = 0.0
    cpu_threads: int = 0  # intra-op threads per CPU instance; 0: the framework's default
    # How long to wait for the router to configure a placed version's consumer.
    bind_timeout_s: float = 30.0
    # WORKER, or ORCHESTRATOR for `natron ensemble` (placement sends ensembles there only).
    role: str = WORKER
    # platform/backend -> loader; an orchestrator's are the ensemble loader alone.
    loaders: Mapping[str, Loader] = field(default_factory=lambda: LOADERS)
    # The process's span export, following the trace settings; None: no spans.
    spans: ProcessSpans | None = None
    # Model versions loading at once (Triton's --model-load-thread-count): each holds a thread
    # of the event loop's default executor while its backends load and warm up.
    model_load_threads: int = 4
    # Where a version's files come from (workers/model_cache.py): "path", the record's folder;
    # "auto", that folder where this host has it, else the model store through the cache;
    # "store", the store only. `natron worker` says "auto".
    model_files: ModelFilesMode = "path"
    model_cache_dir: Path | None = None  # None: a temporary folder, removed on stop
    model_cache_bytes: int = DEFAULT_CACHE_BYTES
    # Map clients' system shared memory regions of this host (workers/sharedmemory.py), so that
    # gateways of this host send those tensors by reference; False: they carry the bytes.
    system_shm: bool = True

    def __post_init__(self) -> None:
        if self.model_load_threads < 1:
            raise ValueError(f"model_load_threads must be at least 1, not {self.model_load_threads}")


@dataclass(slots=True)
class _LoadedVersion:
    # The consumer's ack wait, as the router configured it: keep-alives go every third of it.
    ack_wait_s: float = jetstream.QueuePolicy().ack_wait_s
    instances: list[ModelInstance] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    cancel_sub: Subscription | None = None
    # The folder its instances were loaded from, pinned in the model cache until they are gone.
    files: LocalVersion | None = None


@dataclass(slots=True)
class _ModelChanges:
    """One model's record changes on their way to its applier task."""

    # The latest record (None: deleted), to be applied once `pending`; records that came while
    # a load was under way are skipped for the latest, which decides alone.
    record: ModelRecord | None = None
    pending: bool = False
    applier: asyncio.Task[None] | None = None
    # The generation load under way, to give up when a newer record no longer wants it.
    loading: asyncio.Task[bool] | None = None
    loading_generation: str | None = None


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, NatronError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _open_backends(
    config: cfg.ModelConfig,
    spec: ModelSpec,
    version_dir: Path,
    count: int,
    context: BackendContext,
    loaders: Mapping[str, Loader],
) -> list[AnyBackend]:
    """Blocking: load `count` instances of a version, each warmed up before the next loads (as
    in Triton, warm-up runs on every instance before the version is READY). On an error those
    already loaded are closed and the error, the real reason, is raised."""
    backends: list[AnyBackend] = []
    try:
        for _ in range(count):
            backend = load_backend(config, version_dir, context, loaders)
            backends.append(backend)
            run_warmup(backend, config, spec, version_dir)
    except BaseException:
        for backend in backends:
            _close_quietly(backend, f"model '{config.name}'")
        raise
    return backends


def _close_quietly(backend: AnyBackend, what: str) -> None:
    """Blocking: close a backend on a path that has a reason of its own to report already."""
    try:
        backend.close()
    except Exception:
        log.exception("%s: closing an instance failed", what)


class Worker:
    def __init__(self, nc: Client, subjects: Subjects, options: WorkerOptions) -> None:
        self._nc = nc
        self._subjects = subjects
        self._options = options
        self._report = WorkerReport(
            id=options.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            devices=[options.device.describe()],
            role=options.role,
        )
        self._shm = WorkerSharedMemory.of_host(options.worker_id, options.system_shm)
        self._report.host_scope = self._shm.scope
        # (model, generation, version) -> running instances
        self._loaded: dict[tuple[str, str, str], _LoadedVersion] = {}
        # The models bucket: what the router placed and where.
        self._models = BucketMirror("model record", ModelRecord.from_json)
        self._generation: dict[str, str] = {}
        self._good_generation: dict[str, str] = {}
        # (model, version) -> statistics, kept across reloads of the model.
        self._stats: dict[tuple[str, str], ModelStats] = {}
        # Latency sketches are kept once a gateway asked for them (it serves Triton's summaries).
        self._sketching = False
        self._stats_sub: Subscription | None = None
        self._workers_kv: KeyValue | None = None
        self.tasks = EssentialTasks(f"worker {options.worker_id}")
        self._report_changed = asyncio.Event()
        # model -> its changes not yet applied, while its applier runs
        self._changes: dict[str, _ModelChanges] = {}
        # The appliers' task group, while the models are followed.
        self._appliers: asyncio.TaskGroup | None = None
        self._load_slots = asyncio.Semaphore(options.model_load_threads)
        # Loads given up whose threads still run: what they open is closed when they end.
        self._given_up: set[asyncio.Task[None]] = set()
        self._telemetry = GpuTelemetry(options.device)
        self._files = WorkerModelFiles(
            nc, subjects.files_bucket, options.model_files, options.model_cache_dir, options.model_cache_bytes
        )
        self._context = BackendContext(
            device=options.device,
            nats_url=options.nats_url,
            nats_auth=options.nats_auth,
            inbox_prefix=options.inbox_prefix,
            prefix=subjects.prefix,
            cpu_threads=options.cpu_threads,
        )

    @property
    def storage(self) -> jetstream.Storage:
        return self._options.storage

    @property
    def report(self) -> WorkerReport:
        return self._report

    @property
    def essential(self) -> tuple[EssentialTasks, ...]:
        """What the process's runner watches: a failure here ends the process."""
        return (self.tasks,)

    @property
    def instances(self) -> list[ModelInstance]:
        return [i for loaded in self._loaded.values() for i in loaded.instances]

    async def start(self) -> None:
        await self._files.start()
        models_kv = await self._ensure_state()
        # Answering before the first report: a gateway that sees this worker can ask it.
        self._stats_sub = await self._nc.subscribe(self._subjects.stats_query, cb=self._answer_stats)
        # A bucket just made on a cluster may not have a leader yet: the heartbeat retries.
        await self._try_publish_report()
        self.tasks.spawn(
            recovery.reassert_after_reconnects(
                self._nc, self._subjects, f"worker {self._options.worker_id}", self._reassert
            ),
            "worker-reassert",
        )
        self.tasks.spawn(self._follow_models(models_kv), "worker-follow-models")
        self.tasks.spawn(self._heartbeat(), "worker-heartbeat")
        self.tasks.spawn(self._keep_alive(), "worker-keep-alive")

    async def _ensure_state(self) -> KeyValue:
        """The stream and buckets (any service may be the first up, or the first back after a
        broker that lost them); the models bucket."""
        js, storage = self._nc.jetstream(), self._options.storage
        await jetstream.ensure_stream(js, self._subjects, storage)
        models_kv = await jetstream.ensure_bucket(js, self._subjects.models_bucket, storage)
        self._workers_kv = await jetstream.ensure_bucket(js, self._subjects.workers_bucket, storage)
        return models_kv

    async def _reassert(self, lost: bool) -> None:
        """After a reconnect: the report at once, so the router counts this worker without
        waiting for a heartbeat. What runs keeps running: the models follow their records
        again (broker/mirror.py), and a record that comes back unchanged reloads nothing."""
        await self._ensure_state()
        await self._publish_report()

    async def stop(self) -> None:
        """Drain: stop pulling, finish batches in hand within the bound, then leave. Works after
        a partial start and after a loop died (its error was logged when it died)."""
        self._report.stopping = True
        # With the broker away, writes would only wait out their timeouts: the router drops
        # this worker when its heartbeat goes stale anyway.
        connected = self._nc.is_connected
        if connected:
            await self._try_publish_report(_STOP_KV_TIMEOUT_S)
        # Loads in progress are cancelled with the loop that follows the models; their threads
        # finish on their own, and are not waited for.
        await self.tasks.stop()
        await cancel_and_wait(self._given_up, _CANCEL_TIMEOUT_S)
        for key in list(self._loaded):
            await self._unload(key, self._options.drain_timeout_s)
        if self._workers_kv is not None and connected and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._workers_kv.delete(self._options.worker_id), _STOP_KV_TIMEOUT_S)
        # Answering until the report is gone: a gateway that still expects an answer gets one.
        if self._stats_sub is not None:
            with contextlib.suppress(Exception):
                await self._stats_sub.unsubscribe()
            self._stats_sub = None
        self._telemetry.close()
        self._shm.close()
        await self._files.close()

    # -- following the repository ------------------------------------------------------------

    async def _follow_models(self, models_kv: KeyValue) -> None:
        """Follow the models bucket. Each model's changes are applied by an applier task of its
        own, in this loop's task group: one model's long load holds no other model's change
        back, and an applier that fails ends this loop, and so the process, with its error."""
        try:
            async with asyncio.TaskGroup() as appliers:
                self._appliers = appliers
                await self._models.follow(models_kv, self._on_record, recovery.reconnects_of(self._nc))
        except BaseExceptionGroup as group:
            # One error reads better than a group of one in the log and the exit reason.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._appliers = None

    async def _on_record(self, name: str, before: ModelRecord | None, after: ModelRecord | None) -> None:
        """Hand a change to the model's applier, starting one if none runs; never waits for a
        load, so the next model's change is seen at once."""
        assert self._appliers is not None, "records come only while the models are followed"
        changes = self._changes.get(name)
        if changes is None:
            changes = self._changes[name] = _ModelChanges()
        changes.record, changes.pending = after, True
        loading = changes.loading
        if (
            loading is not None
            and not loading.done()
            and changes.loading_generation != self._placed(after)[0]
        ):
            # What is loading is wanted no more (unloaded, placed elsewhere, changed again):
            # the load is given up instead of finishing before the newer record is applied.
            log.info(
                "model '%s': load of generation %s given up for a newer record",
                name,
                changes.loading_generation,
            )
            loading.cancel()
        if changes.applier is None:
            changes.applier = self._appliers.create_task(
                self._apply_changes(name, changes), name=f"worker-apply-{name}"
            )

    async def _apply_changes(self, name: str, changes: _ModelChanges) -> None:
        """Apply one model's records in order until none is pending: its load, reload and
        unload never interleave, whatever other models do meanwhile."""
        try:
            while changes.pending:
                changes.pending = False
                await self._apply(name, changes.record, changes)
        finally:
            # No await since the last check: a record that comes next starts a new applier.
            changes.applier = None
            if self._changes.get(name) is changes:
                del self._changes[name]

    def _placed(self, record: ModelRecord | None) -> tuple[str | None, int]:
        """The generation of `record` this worker is to run, with how many instances per
        version; (None, 0) when it is to run none."""
        count = record.placement.get(self._options.worker_id, 0) if record and not record.reason else 0
        return (record.generation if record is not None and count else None), count

    async def _apply(self, name: str, record: ModelRecord | None, changes: _ModelChanges) -> None:
        generation, count = self._placed(record)
        if generation == self._generation.get(name):
            return  # only states or other workers' placement changed: nothing to load
        keep = None
        if generation is not None and generation == self._good_generation.get(name):
            # Back to the generation that serves here: the router gave up a load that
            # failed and published the record that served again. It runs: load nothing.
            self._generation[name] = generation
        elif record is not None and generation is not None:
            loaded_all = await self._load_unless_given_up(record, count, changes)
            if loaded_all is None:
                # A newer record made this load pointless: what it loaded goes, what ran
                # before stays, and the newer record is applied next.
                generation, keep = self._generation.get(name), self._good_generation.get(name)
            else:
                self._generation[name] = generation
                if loaded_all:
                    self._good_generation[name] = generation
                else:
                    # A failed reload leaves the last generation that loaded fully serving.
                    keep = self._good_generation.get(name)
        else:
            self._generation.pop(name, None)
            self._good_generation.pop(name, None)
        for key in [k for k in self._loaded if k[0] == name and k[1] not in (generation, keep)]:
            await self._unload(key, self._options.drain_timeout_s)
        gens = self._report.models.get(name, {})
        for old in [g for g in gens if g not in (generation, keep)]:
            del gens[old]
        if not gens:
            self._report.models.pop(name, None)
        self._report_changed.set()

    async def _load_unless_given_up(
        self, record: ModelRecord, count: int, changes: _ModelChanges
    ) -> bool | None:
        """`_load_generation`'s outcome, or None when a newer record gave the load up."""
        loading = asyncio.get_running_loop().create_task(
            self._load_generation(record, count), name=f"worker-load-{record.name}"
        )
        changes.loading, changes.loading_generation = loading, record.generation
        try:
            return await loading
        except asyncio.CancelledError:
            # Given up (see _on_record), unless this applier itself is being cancelled (a stop).
            current = asyncio.current_task()
            if loading.cancelled() and current is not None and not current.cancelling():
                return None
            raise
        finally:
            changes.loading = changes.loading_generation = None

    async def _load_generation(self, record: ModelRecord, count: int) -> bool:
        """Load every version with `count` instances each, side by side within the load slots;
        True when all became READY."""
        assert record.config is not None
        states = self._report.models.setdefault(record.name, {}).setdefault(record.generation, {})
        for version in record.versions:
            states[version] = VersionState(LOADING)
        await self._try_publish_report()
        config = cfg.config_from_json(record.config)
        async with asyncio.TaskGroup() as group:
            loads = [
                group.create_task(
                    self._load_and_report(record, config, version, count, states),
                    name=f"worker-load-{record.name}-v{version}",
                )
                for version in record.versions
            ]
        return all(load.result() for load in loads)

    async def _load_and_report(
        self,
        record: ModelRecord,
        config: cfg.ModelConfig,
        version: str,
        count: int,
        states: dict[str, VersionState],
    ) -> bool:
        """Load one version and report its state; True when it became READY."""
        try:
            await self._load_version(record, config, version, count)
            states[version] = VersionState(READY)
            loaded = True
        except Exception as exc:
            reason = describe_error(exc)
            log.warning("model '%s' version %s failed to load: %s", record.name, version, reason)
            states[version] = VersionState(UNAVAILABLE, reason)
            loaded = False
        await self._try_publish_report()
        return loaded

    async def _load_version(
        self, record: ModelRecord, config: cfg.ModelConfig, version: str, count: int
    ) -> None:
        spec = ModelSpec.from_config(config)
        digest = record.digests.get(version, "")
        files = await self._files.version_dir(record.name, record.path, version, digest)
        try:
            backends = await self._open_backends(
                f"model '{record.name}' version {version}", config, spec, files.path, count
            )
        except BaseException:
            files.release()
            raise
        loaded = _LoadedVersion(files=files)

        # Cancellations (clients gone) reach every instance of the version on this worker.
        async def on_cancel(msg: Msg) -> None:
            request_id = msg.data.decode(errors="replace")
            # With the request's reply subject, only the request answered there is meant.
            reply_to = (msg.headers or {}).get(REPLY_TO, "")
            for instance in loaded.instances:
                instance.cancel(request_id, reply_to)

        try:
            js = self._nc.jetstream()
            queue = await jetstream.bind_consumer(
                js, self._subjects, record.name, version, self._options.bind_timeout_s
            )
            consumer, loaded.ack_wait_s = queue.consumer, queue.ack_wait_s
            scheduling = spec.scheduling
            # A model with priority levels: one consumer per level, each instance pulling from
            # all of them, highest first (broker/puller.py, LevelPuller).
            levels = jetstream.level_consumers(
                self._subjects, record.name, version, scheduling.levels, scheduling.default_level
            )
            for _, name in levels if scheduling.levels else ():
                await jetstream.bind_consumer(
                    js, self._subjects, record.name, version, self._options.bind_timeout_s, name=name
                )
            capacity = max(spec.max_batch_size, 1)
            for index, backend in enumerate(backends):
                puller: Puller = (
                    LevelPuller(self._nc, self._subjects.stream, levels, capacity)
                    if scheduling.levels
                    else CapacityPuller(self._nc, self._subjects.stream, consumer, capacity)
                )
                await puller.start()
                name = f"{record.name}-v{version}-{index}"
                instance = ModelInstance(
                    self._nc,
                    puller,
                    spec,
                    version,
                    backend,
                    name,
                    throttle_s=self._options.throttle_s,
                    stats=self._stats_of(record.name, version),
                    spans=self._options.spans,
                    shm=self._shm,
                )
                loaded.instances.append(instance)
                task = asyncio.create_task(instance.run(), name=name)
                loaded.tasks.append(task)
                # An instance runs until it is unloaded; one whose loop ended otherwise would
                # leave the version READY in the report with nobody pulling its queue.
                self.tasks.watch(task)
            loaded.cancel_sub = await self._nc.subscribe(
                self._subjects.cancel(record.name, version), cb=on_cancel
            )
        except BaseException:
            # A version that did not come up (the broker away, a stop) leaves nothing running:
            # its instances stop, and the models not yet in one are closed.
            await self._retire(loaded, 0.0)
            for backend in backends[len(loaded.instances) :]:
                await asyncio.to_thread(backend.close)
            raise
        self._loaded[(record.name, record.generation, version)] = loaded
        log.info("model '%s' version %s ready with %d instance(s)", record.name, version, count)

    async def _open_backends(
        self, what: str, config: cfg.ModelConfig, spec: ModelSpec, version_dir: Path, count: int
    ) -> list[AnyBackend]:
        """A version's `count` backends, loaded and warmed up in a thread once a load slot is
        free. The slot is the version's until its thread ends: a wait that is cancelled (a stop,
        the load given up) cannot stop the thread, which keeps the slot, and what it opens is
        closed when it ends, so a load given up leaves no model (nor a Python model's stub
        process) behind."""
        await self._load_slots.acquire()
        opening = asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                _open_backends, config, spec, version_dir, count, self._context, self._options.loaders
            ),
        )
        try:
            backends = await asyncio.shield(opening)
        except asyncio.CancelledError:
            task = asyncio.get_running_loop().create_task(
                self._close_when_opened(what, opening), name=f"worker-given-up-{what}"
            )
            self._given_up.add(task)
            task.add_done_callback(self._forget_given_up)
            raise
        except BaseException:
            self._load_slots.release()
            raise
        self._load_slots.release()
        return backends

    async def _close_when_opened(self, what: str, opening: asyncio.Future[list[AnyBackend]]) -> None:
        try:
            try:
                backends = await opening
            except Exception as exc:
                log.info("%s: the load given up ended with an error: %s", what, describe_error(exc))
                return
            for backend in backends:
                await asyncio.to_thread(_close_quietly, backend, what)
            log.info("%s: the load given up ended; its %d instance(s) closed", what, len(backends))
        finally:
            self._load_slots.release()

    def _forget_given_up(self, task: asyncio.Task[None]) -> None:
        self._given_up.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("closing a load given up failed", exc_info=task.exception())

    async def _unload(self, key: tuple[str, str, str], timeout_s: float) -> None:
        loaded = self._loaded.pop(key, None)
        if loaded is not None:
            await self._retire(loaded, timeout_s)

    async def _retire(self, loaded: _LoadedVersion, timeout_s: float) -> None:
        """Stop a version's instances: batches in hand get `timeout_s`, then the models go."""
        self.tasks.unwatch(loaded.tasks)
        if loaded.cancel_sub is not None:
            with contextlib.suppress(Exception):
                await loaded.cancel_sub.unsubscribe()
        for instance in loaded.instances:
            instance.stop()
        # Instances finish the batch in hand; those idle in `take` are woken by close().
        for instance in loaded.instances:
            await instance.close_intake()
        pending: set[asyncio.Task[None]] = set()
        if loaded.tasks:
            _, pending = await asyncio.wait(loaded.tasks, timeout=timeout_s)
        if pending:
            await cancel_and_wait(
                pending, _CANCEL_TIMEOUT_S, "drain timeout: batch abandoned, its messages will be redelivered"
            )
        for instance in loaded.instances:
            await asyncio.to_thread(instance.release)
        if loaded.files is not None:
            loaded.files.release()

    # -- reporting ---------------------------------------------------------------------------

    def current_stats(self) -> dict[str, dict[str, Any]]:
        """Statistics by "model/version" as they are now (the report's are as of its heartbeat)."""
        return {f"{model}/{version}": stats.to_json() for (model, version), stats in self._stats.items()}

    def _stats_of(self, model: str, version: str) -> ModelStats:
        stats = self._stats.get((model, version))
        if stats is None:
            stats = self._stats[(model, version)] = ModelStats()
            if self._sketching:
                stats.keep_sketches()
        return stats

    async def _answer_stats(self, msg: Msg) -> None:
        """A gateway's statistics query: this worker's counts as they are now, rather than as
        of its last heartbeat. A request is counted before its answer is published, so a
        client that has its answer and then asks finds it counted."""
        if not msg.reply:
            return
        try:
            query = StatsQuery.from_json(msg.data)
        except ValueError as exc:
            log.warning("ignoring a malformed statistics query: %s", exc)
            return
        if query.sketches and not self._sketching:
            self._sketching = True
            for stats in self._stats.values():
                stats.keep_sketches()
        chosen = [(m, v, s) for (m, v), s in self._stats.items() if query.model in (None, m)]
        worker_id, pid = self._options.worker_id, self._report.pid
        payload = stats_answer(worker_id, pid, {f"{m}/{v}": s.to_json(query.sketches) for m, v, s in chosen})
        if query.sketches and len(payload) > self._nc.max_payload:
            # The counts matter more than the quantiles: without the sketches they fit.
            log.warning(
                "statistics answer of %d bytes exceeds max_payload: sent without latency sketches",
                len(payload),
            )
            payload = stats_answer(worker_id, pid, {f"{m}/{v}": s.to_json() for m, v, s in chosen})
        try:
            await self._nc.publish(msg.reply, payload)
        except Exception as exc:  # the broker is away: the gateway falls back to the heartbeat
            log.warning("statistics answer not sent: %r", exc)

    async def _publish_report(self) -> None:
        telemetry = self._telemetry.sample()
        if telemetry and self._report.devices:
            self._report.devices[0]["telemetry"] = telemetry
        self._report.stats = self.current_stats()
        self._report.rss_bytes = resident_bytes(self._report.pid)
        if self._workers_kv is not None:
            await self._workers_kv.put(self._options.worker_id, self._report.to_json())

    async def _try_publish_report(self, timeout_s: float = 5.0) -> bool:
        """Publish the report now if the broker takes it; otherwise the heartbeat retries (a
        KV put fails while NATS reconnects: that must not end the loop that asked)."""
        try:
            await asyncio.wait_for(self._publish_report(), timeout_s)
            return True
        except Exception as exc:
            log.warning("report not published, the heartbeat retries: %r", exc)
            self._report_changed.set()
            return False

    async def _keep_alive(self) -> None:
        """Tell the broker every third of the ack wait that requests in hand are still being
        worked on, so a long batch is not delivered again while it runs, and the ack wait can
        stay short enough that a dead worker's requests come back quickly. Each version's
        consumer has its own ack wait (the router's setting when it configured it)."""
        idle_interval_s = jetstream.QueuePolicy().ack_wait_s / 3
        while True:
            thirds = [loaded.ack_wait_s / 3 for loaded in self._loaded.values()]
            await asyncio.sleep(max(_MIN_KEEP_ALIVE_S, min(thirds, default=idle_interval_s)))
            for loaded in list(self._loaded.values()):
                for instance in loaded.instances:
                    try:
                        await instance.keep_alive(older_than_s=loaded.ack_wait_s / 3)
                    except Exception as exc:  # disconnected: redelivery after ack wait is the fallback
                        log.warning("keep-alive not sent: %s", exc)

    async def _heartbeat(self) -> None:
        interval_s = self._options.heartbeat_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_changed.wait(), interval_s)
            self._report_changed.clear()
            try:
                await asyncio.wait_for(self._publish_report(), interval_s * 2)
            except Exception as exc:
                # The broker is briefly away: the next beat retries, one interval later even if
                # the report changed meanwhile. A broker that came back without its buckets is
                # the broker-state watch's to report.
                log.warning("heartbeat not published: %r", exc)
                self._report_changed.clear()
