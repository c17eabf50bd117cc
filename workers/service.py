"""The worker service: follows the models bucket, loads every model version it is given,
runs its instances, and reports what it serves in the workers bucket on every heartbeat.

A new generation of a model (changed config, files or versions) is loaded next to the old one
and only then replaces it, so a reload never leaves a gap.

Its loops (following the models, the heartbeat, the keep-alive, the broker-state watch) and its
model instances are essential tasks (natron/tasks.py): one that dies ends the process, which
its supervisor restarts. A report that cannot be written while NATS is away is retried by the
heartbeat instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from broker import jetstream
from broker.mirror import BucketMirror
from broker.puller import CapacityPuller
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
from natron.stats import ModelStats
from natron.tasks import EssentialTasks, cancel_and_wait
from workers.backends import LOADERS, AnyBackend, BackendContext, Loader, load_backend
from workers.devices import Device
from workers.instance import ModelInstance
from workers.telemetry import GpuTelemetry
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
    # How model code reaches the mesh (BLS calls from Python models).
    nats_url: str = ""
    heartbeat_interval_s: float = 2.0
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


@dataclass(slots=True)
class _LoadedVersion:
    # The consumer's ack wait, as the router configured it: keep-alives go every third of it.
    ack_wait_s: float = jetstream.QueuePolicy().ack_wait_s
    instances: list[ModelInstance] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    cancel_sub: Subscription | None = None


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, NatronError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


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
        # (model, generation, version) -> running instances
        self._loaded: dict[tuple[str, str, str], _LoadedVersion] = {}
        # The models bucket: what the router placed and where.
        self._models = BucketMirror("model record", ModelRecord.from_json)
        self._generation: dict[str, str] = {}
        self._good_generation: dict[str, str] = {}
        # (model, version) -> statistics, kept across reloads of the model.
        self._stats: dict[tuple[str, str], ModelStats] = {}
        self._workers_kv: KeyValue | None = None
        self.tasks = EssentialTasks(f"worker {options.worker_id}")
        self._report_changed = asyncio.Event()
        self._model_lock = asyncio.Lock()
        self._telemetry = GpuTelemetry(options.device)
        self._context = BackendContext(
            device=options.device,
            nats_url=options.nats_url,
            prefix=subjects.prefix,
            cpu_threads=options.cpu_threads,
        )

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
        js = self._nc.jetstream()
        await jetstream.ensure_stream(js, self._subjects)
        models_kv = await jetstream.ensure_bucket(js, self._subjects.models_bucket)
        self._workers_kv = await jetstream.ensure_bucket(js, self._subjects.workers_bucket)
        await self._publish_report()
        self.tasks.spawn(jetstream.watch_state(self._nc, self._subjects), "worker-broker-state")
        self.tasks.spawn(self._follow_models(models_kv), "worker-follow-models")
        self.tasks.spawn(self._heartbeat(), "worker-heartbeat")
        self.tasks.spawn(self._keep_alive(), "worker-keep-alive")

    async def stop(self) -> None:
        """Drain: stop pulling, finish batches in hand within the bound, then leave. Works after
        a partial start and after a loop died (its error was logged when it died)."""
        self._report.stopping = True
        # With the broker away, writes would only wait out their timeouts: the router drops
        # this worker when its heartbeat goes stale anyway.
        connected = self._nc.is_connected
        if connected:
            await self._try_publish_report(_STOP_KV_TIMEOUT_S)
        # A load in progress is cancelled with its loop; its thread finishes on its own.
        await self.tasks.stop()
        for key in list(self._loaded):
            await self._unload(key, self._options.drain_timeout_s)
        if self._workers_kv is not None and connected and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._workers_kv.delete(self._options.worker_id), _STOP_KV_TIMEOUT_S)
        self._telemetry.close()

    # -- following the repository ------------------------------------------------------------

    async def _follow_models(self, models_kv: KeyValue) -> None:
        await self._models.follow(models_kv, self._on_record)

    async def _on_record(self, name: str, before: ModelRecord | None, after: ModelRecord | None) -> None:
        await self._apply(name, after)

    async def _apply(self, name: str, record: ModelRecord | None) -> None:
        async with self._model_lock:
            count = record.placement.get(self._options.worker_id, 0) if record and not record.reason else 0
            generation = record.generation if record is not None and count else None
            if generation == self._generation.get(name):
                return  # only states or other workers' placement changed: nothing to load
            keep = None
            if record is not None and generation is not None:
                loaded_all = await self._load_generation(record, count)
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

    async def _load_generation(self, record: ModelRecord, count: int) -> bool:
        """Load every version with `count` instances each; True when all became READY."""
        assert record.config is not None
        states = self._report.models.setdefault(record.name, {}).setdefault(record.generation, {})
        for version in record.versions:
            states[version] = VersionState(LOADING)
        await self._try_publish_report()
        config = cfg.config_from_json(record.config)
        loaded_all = True
        for version in record.versions:
            try:
                await self._load_version(record, config, version, count)
                states[version] = VersionState(READY)
            except Exception as exc:
                reason = describe_error(exc)
                log.warning("model '%s' version %s failed to load: %s", record.name, version, reason)
                states[version] = VersionState(UNAVAILABLE, reason)
                loaded_all = False
            await self._try_publish_report()
        return loaded_all

    async def _load_version(
        self, record: ModelRecord, config: cfg.ModelConfig, version: str, count: int
    ) -> None:
        spec = ModelSpec.from_config(config)
        version_dir = Path(record.path) / version
        backends: list[AnyBackend] = []
        try:
            for _ in range(count):
                backend = await asyncio.to_thread(
                    load_backend, config, version_dir, self._context, self._options.loaders
                )
                backends.append(backend)
                # Warm-up runs before the version is READY, on every instance, as in Triton.
                await asyncio.to_thread(run_warmup, backend, config, spec, version_dir)
        except BaseException:
            for backend in backends:
                await asyncio.to_thread(backend.close)
            raise
        loaded = _LoadedVersion()

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
            capacity = max(spec.max_batch_size, 1)
            for index, backend in enumerate(backends):
                puller = CapacityPuller(self._nc, self._subjects.stream, consumer, capacity)
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
                    stats=self._stats.setdefault((record.name, version), ModelStats()),
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

    # -- reporting ---------------------------------------------------------------------------

    async def _publish_report(self) -> None:
        telemetry = self._telemetry.sample()
        if telemetry and self._report.devices:
            self._report.devices[0]["telemetry"] = telemetry
        self._report.stats = {
            f"{model}/{version}": stats.to_json() for (model, version), stats in self._stats.items()
        }
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
