"""Connections, the inference work-queue stream, per-model-version consumers and KV buckets.

Every service calls these idempotent helpers at start, so any of them may come up first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from broker.auth import ClientAuth
from broker.recovery import reconnects_of
from broker.subjects import Subjects
from natron.errors import Unavailable

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class QueuePolicy:
    # Requests waiting per model version; over it the publish is refused and the gateway
    # answers 503 at once instead of queueing without end.
    max_queued_per_version: int = 4096
    # A request nobody took within this long is dropped by the broker; deadlines are
    # normally far shorter, this only bounds garbage.
    max_age_s: float = 300.0
    # Redelivery of requests whose worker died before acknowledging them.
    ack_wait_s: float = 4.0
    max_deliver: int = 3


@dataclass(slots=True, frozen=True)
class Storage:
    """Where the mesh's JetStream state lives: the work queue and the KV buckets.

    memory: fastest, gone when the broker restarts (the services re-create what they own, and
    the requests it held are lost); file: kept across a restart, so a request the broker
    acknowledged is answered after it comes back. `replicas` is 3 on a 3-node cluster, so
    losing a node loses nothing."""

    kind: Literal["memory", "file"] = "memory"
    replicas: int = 1

    @property
    def type(self) -> StorageType:
        return StorageType.FILE if self.kind == "file" else StorageType.MEMORY


# nats-py pings every PING_INTERVAL_S and reconnects after MAX_OUTSTANDING_PINGS unanswered:
# a broker that stops answering (paused, or a network gone quiet) is noticed within about
# 4.5 s, before the router's heartbeat timeout, instead of after nats-py's default 4 minutes.
PING_INTERVAL_S = 1.5
MAX_OUTSTANDING_PINGS = 2
# A publish that finds nats-py's buffer full waits for the socket to take it, and without a
# bound for ever: a node that stopped reading (a cluster peer dying) would hold requests past
# their deadlines. After this it returns; the bytes stay buffered and go out when they can.
FLUSH_TIMEOUT_S = 2.0


def server_urls(url: str) -> list[str]:
    """A NATS URL, or a cluster's comma-separated list of them."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no NATS server in {url!r}")
    return urls


async def connect(
    url: str,
    name: str,
    *,
    auth: ClientAuth | None = None,
    inbox_prefix: str | None = None,
    connect_timeout_s: float = 5.0,
) -> Client:
    """A connection that reconnects for ever, to any server of `url` (one, or a cluster's
    comma-separated list): services outlive broker restarts and the loss of a node. Each
    reconnect starts a new epoch (broker.recovery), after which the services re-assert their
    state. `auth` proves the service's role to the broker (broker/auth.py), whose private
    inboxes start with `inbox_prefix`."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats connection %s: %s", name, exc)

    client: list[Client] = []

    async def on_disconnected() -> None:
        if client and not (client[0].is_closed or client[0].is_draining):
            log.warning("nats connection %s lost, reconnecting", name)

    async def on_reconnected() -> None:
        if client:
            log.info("nats connection %s re-established to %s", name, client[0].connected_url)
            reconnects_of(client[0]).bump()

    nc = await nats.connect(
        servers=server_urls(url),
        name=name,
        connect_timeout=connect_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        ping_interval=PING_INTERVAL_S,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        flush_timeout=FLUSH_TIMEOUT_S,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        **({"inbox_prefix": inbox_prefix} if inbox_prefix else {}),
        **(auth.connect_options() if auth is not None else {}),
    )
    client.append(nc)
    reconnects_of(nc)
    return nc


async def close_connection(nc: Client, timeout_s: float = 3.0) -> None:
    """Close `nc` whatever its state, within about `timeout_s`; never raises, safe to call twice.

    Connected, it drains: subscriptions finish the messages they hold and what was published
    is flushed. Reconnecting (nats-py's drain raises then), already draining, or a drain that
    outlives the bound (a subscriber stuck in its callback), it closes: anything unflushed is
    lost, which is what a stop with the broker away means anyway."""
    if nc.is_closed:
        return
    if nc.is_connected and not nc.is_draining:
        # nats-py bounds the subscriptions' part of a drain by this option, then flushes and
        # closes; the outer bound covers a flush whose PONG never comes.
        nc.options["drain_timeout"] = timeout_s / 2
        try:
            await asyncio.wait_for(nc.drain(), timeout_s)
        except Exception as exc:  # reconnecting meanwhile, timed out, or closed under us
            log.debug("drain of %s ended early: %r", nc.options.get("name"), exc)
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout_s)


def _stream_config(subjects: Subjects, policy: QueuePolicy, storage: Storage) -> StreamConfig:
    return StreamConfig(
        name=subjects.stream,
        subjects=[subjects.infer_all],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=storage.type,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_msgs_per_subject=policy.max_queued_per_version,
        max_age=policy.max_age_s,
        num_replicas=storage.replicas,
    )


# The queues have one owner, the router: it configures the stream and every consumer with its
# QueuePolicy, so one policy holds fleet-wide. Everyone else only makes sure the stream exists
# (any service may come up first) and binds to the consumers the router made.


async def configure_stream(
    js: JetStreamContext, subjects: Subjects, policy: QueuePolicy, storage: Storage = Storage()
) -> None:
    """The router's: create the inference stream, or bring an existing one to `policy` (its
    storage kind cannot change: a stream made with another one is an error to fix by hand)."""
    config = _stream_config(subjects, policy, storage)
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another configuration (an older natron, or changed settings).
        await js.update_stream(config)


async def ensure_stream(js: JetStreamContext, subjects: Subjects, storage: Storage = Storage()) -> None:
    """Anyone else's: create the stream with the default policy when it is missing, and leave an
    existing one as its owner configured it."""
    try:
        await js.add_stream(_stream_config(subjects, QueuePolicy(), storage))
    except BadRequestError:
        pass  # exists, configured otherwise by the router: that is its to decide


async def configure_consumer(
    js: JetStreamContext,
    subjects: Subjects,
    model: str,
    version: str,
    policy: QueuePolicy,
    *,
    level: int = 0,
    default_level: bool = True,
) -> str:
    """The router's: the durable pull consumer every instance of `model` `version` shares,
    created or updated to `policy` (the server updates an existing durable's ack wait). A model
    with priority levels has one per `level`; the default level's also takes the plain subject,
    so clients that know nothing of priorities reach it."""
    name = subjects.consumer(model, version, level if not default_level else 0)
    plain = subjects.infer(model, version)
    if not level:
        filters: dict[str, object] = {"filter_subject": plain}
    elif default_level:
        filters = {"filter_subjects": [plain, subjects.infer(model, version, level)]}
    else:
        filters = {"filter_subject": subjects.infer(model, version, level)}
    config = ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=policy.ack_wait_s,
        max_deliver=policy.max_deliver,
        # Outstanding pull requests from all instances of the fleet.
        max_waiting=4096,
        max_ack_pending=-1,
        **filters,  # type: ignore[arg-type]
    )
    # An existing durable is updated, filters included (the model's priority levels changed).
    await js.add_consumer(subjects.stream, config)
    return name


def level_consumers(
    subjects: Subjects, model: str, version: str, levels: int, default_level: int
) -> list[tuple[int, str]]:
    """(level, consumer) of each priority level of a version, highest priority first; [(0, plain
    name)] for a model without levels. The default level keeps the plain consumer name."""
    if not levels:
        return [(0, subjects.consumer(model, version))]
    return [
        (level, subjects.consumer(model, version, 0 if level == default_level else level))
        for level in range(1, levels + 1)
    ]


@dataclass(slots=True, frozen=True)
class Queue:
    """A consumer a worker binds to: its name, and the ack wait its owner chose (the worker
    tells the broker it is still working on a request every third of it)."""

    consumer: str
    ack_wait_s: float


async def bind_consumer(
    js: JetStreamContext,
    subjects: Subjects,
    model: str,
    version: str,
    timeout_s: float,
    *,
    name: str | None = None,
) -> Queue:
    """A worker's: the consumer the router made for `model` `version`. The router configures it
    before it places the version, so it is normally there at once. A worker that is quicker than
    a lagging router, or that asks while NATS reconnects, asks again until `timeout_s`, then
    raises Unavailable with the last reason: a brief outage must not leave the version
    UNAVAILABLE until its record changes. `name`: one priority level's consumer (by default,
    the version's plain one)."""
    name = name or subjects.consumer(model, version)
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s
    delay_s = 0.05
    while True:
        try:
            info = await js.consumer_info(subjects.stream, name, timeout=min(2.0, timeout_s))
            return Queue(name, float(info.config.ack_wait or QueuePolicy().ack_wait_s))
        except NotFoundError:
            reason = "the router has not configured it"
        except (nats.errors.Error, TimeoutError) as exc:  # reconnecting, no responders, timed out
            reason = f"the broker did not answer: {type(exc).__name__}"
        if loop.time() + delay_s > deadline_s:
            raise Unavailable(
                f"no queue for model '{model}' version {version} within {timeout_s:.0f} s: {reason}"
            )
        await asyncio.sleep(delay_s)
        delay_s = min(1.0, delay_s * 2)


async def delete_consumer(
    js: JetStreamContext, subjects: Subjects, model: str, version: str, *, levels: int = 0
) -> None:
    """The version's consumer, and those of its priority levels 1..`levels` (whichever exist)."""
    names = [subjects.consumer(model, version)]
    names += [subjects.consumer(model, version, level) for level in range(1, levels + 1)]
    for name in names:
        try:
            await js.delete_consumer(subjects.stream, name)
        except NotFoundError:
            pass


@dataclass(slots=True, frozen=True)
class BucketChange:
    key: str
    value: bytes | None  # None: the key was deleted or purged
    revision: int = 0  # the bucket stream's sequence of this change (0: not known)


async def follow_bucket(kv: KeyValue) -> AsyncGenerator[BucketChange | None, None]:
    """Every key's current value, then every change as it happens; `None` once, when the
    current values have all been delivered (at once for an empty bucket)."""
    watcher = await kv.watchall()
    synced = False
    try:
        async for entry in watcher:
            if entry is not None:
                deleted = entry.operation in ("DEL", "PURGE") or not entry.value
                yield BucketChange(entry.key, None if deleted else entry.value, entry.revision or 0)
            if not synced and (entry is None or entry.delta == 0):
                synced = True
                yield None
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]


async def ensure_bucket(js: JetStreamContext, bucket: str, storage: Storage = Storage()) -> KeyValue:
    """The bucket, created with `storage` when it is missing (the first service to need it
    makes it; an existing one is used as it is)."""
    try:
        return await js.key_value(bucket)
    except Exception:  # nats-py raises BucketNotFoundError or NotFoundError by version
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, storage=storage.type, replicas=storage.replicas)
        )
