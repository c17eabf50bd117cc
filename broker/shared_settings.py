"""Settings of the whole deployment, changed at run time through one gateway and followed by every
process: the logging extension's (`logging`) and the trace extension's (`trace`).

Each setting is one record, kept twice over:

- in the KV bucket `<prefix>_settings` under its name, so that a process started later, or a
  gateway restarted, finds the current value (memory storage, like every natron bucket: the
  record lives as long as the broker's JetStream state);
- broadcast on `<prefix>.ctl.<name>` (core NATS) when it changes, so that every running process
  applies it at once.

A change is a compare-and-set on the KV revision, retried when another gateway changed the
record meanwhile, so two concurrent partial changes both take effect. The revision travels with
the broadcast: a follower subscribes first, then reads the record, and applies only a revision
newer than the last it applied, so the read and a broadcast may arrive in either order.

Broadcast body (msgpack): {"revision": int, "value": bin}; the value's format is the setting's
own (natron/logsettings.py for `logging`). Both sides of it live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import msgpack
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from broker import jetstream
from broker.subjects import Subjects
from natron import logsettings, tracesettings
from natron.errors import InvalidArgument, NatronError, Unavailable
from natron.tasks import EssentialTasks
from natron.tracing import ProcessSpans

log = logging.getLogger(__name__)

# Compare-and-set attempts of one change before it gives up (503): each failure means another
# change landed, so only a storm of changes gets that far.
UPDATE_ATTEMPTS: Final = 8
# A follower that cannot read the record yet (JetStream still starting) tries again this often;
# broadcasts meanwhile wait in its subscription.
READ_RETRY_S: Final = 2.0


def bucket(subjects: Subjects) -> str:
    """KV: setting name -> its current value."""
    return subjects.settings_bucket


@dataclass(slots=True, frozen=True)
class Record:
    revision: int
    value: bytes


def encode_record(record: Record) -> bytes:
    packed: bytes = msgpack.packb({"revision": record.revision, "value": record.value})
    return packed


def decode_record(data: bytes) -> Record:
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise InvalidArgument(f"settings broadcast is not valid msgpack: {exc}") from None
    revision = body.get("revision") if isinstance(body, dict) else None
    value = body.get("value") if isinstance(body, dict) else None
    if not isinstance(revision, int) or isinstance(revision, bool) or not isinstance(value, bytes):
        raise InvalidArgument("settings broadcast must be a map of an int 'revision' and a bin 'value'")
    return Record(revision, value)


async def _open(js: JetStreamContext, subjects: Subjects) -> KeyValue | None:
    try:
        return await js.key_value(bucket(subjects))
    except NotFoundError:  # nats-py raises BucketNotFoundError or NotFoundError by version
        return None


async def _entry(kv: KeyValue, name: str) -> Record | None:
    try:
        entry = await kv.get(name)
    except NotFoundError:  # never set, or deleted
        return None
    return Record(entry.revision or 0, entry.value or b"") if entry.value else None


async def read(nc: Client, subjects: Subjects, name: str) -> Record | None:
    """The record as stored now; None if it was never set. Unavailable if the broker cannot say."""
    try:
        kv = await _open(nc.jetstream(), subjects)
        return None if kv is None else await _entry(kv, name)
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot read the {name} settings from the broker: {exc!r}") from None


async def update(
    nc: Client, subjects: Subjects, name: str, change: Callable[[bytes | None], bytes]
) -> Record:
    """Store `change(current value or None)` as the record, then broadcast it; the stored record.

    `change` may be called more than once (once per attempt) and must not have side effects;
    what it raises (InvalidArgument, say) reaches the caller before anything is stored."""
    try:
        kv = await jetstream.ensure_bucket(nc.jetstream(), bucket(subjects))
        for _ in range(UPDATE_ATTEMPTS):
            current = await _entry(kv, name)
            value = change(None if current is None else current.value)
            try:
                if current is None:
                    revision = await kv.create(name, value)
                else:
                    revision = await kv.update(name, value, last=current.revision)
            except KeyWrongLastSequenceError:
                continue  # another change landed first: apply this one on top of it
            record = Record(revision, value)
            await nc.publish(subjects.ctl(name), encode_record(record))
            return record
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot store the {name} settings in the broker: {exc!r}") from None
    raise Unavailable(f"the {name} settings changed {UPDATE_ATTEMPTS} times during this change; try again")


async def follow(
    nc: Client, subjects: Subjects, name: str, apply: Callable[[Record], None], retry_s: float = READ_RETRY_S
) -> NoReturn:
    """Call `apply` with the stored record (if any), then with every newer one broadcast, until
    cancelled. A record `apply` refuses with a NatronError (a value this process cannot read) is
    logged and skipped; anything else it raises ends the loop, for the owner to see."""
    applied = 0

    def offer(record: Record) -> None:
        nonlocal applied
        if record.revision <= applied:
            return
        try:
            apply(record)
        except NatronError as exc:
            log.warning("%s settings of revision %d not applied: %s", name, record.revision, exc.message)
        applied = record.revision

    sub = await nc.subscribe(subjects.ctl(name))
    try:
        stored = await _read_until_answered(nc, subjects, name, retry_s)
        if stored is not None:
            offer(stored)
        async for message in sub.messages:
            try:
                record = decode_record(message.data)
            except InvalidArgument as exc:
                log.warning("ignored a %s settings broadcast: %s", name, exc.message)
                continue
            offer(record)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    raise RuntimeError(f"the {name} settings subscription ended")


async def _read_until_answered(nc: Client, subjects: Subjects, name: str, retry_s: float) -> Record | None:
    while True:
        try:
            return await read(nc, subjects, name)
        except Unavailable as exc:
            log.warning("%s; trying again in %.0f s", exc.message, retry_s)
        await asyncio.sleep(retry_s)


# -- the logging extension ------------------------------------------------------------------

LOGGING: Final = "logging"


async def follow_log_settings(nc: Client, subjects: Subjects, root: logging.Logger | None = None) -> NoReturn:
    """Apply the deployment's log settings (`/v2/logging`) to this process's logging (`root`,
    the root logger by default), now and whenever they change, until cancelled. Every natron
    process runs it as an essential task."""

    def apply(record: Record) -> None:
        settings = logsettings.decode(record.value)
        logsettings.apply(settings, root)
        log.info("log settings of revision %d applied: %s", record.revision, settings.describe())

    await follow(nc, subjects, LOGGING, apply)


def start_following_log_settings(nc: Client, subjects: Subjects, owner: str) -> EssentialTasks:
    """`follow_log_settings` as an essential task of its own, for a process's runner to watch
    beside its service's (and to `stop()` before it closes the connection)."""
    tasks = EssentialTasks(f"{owner} log settings")
    tasks.spawn(follow_log_settings(nc, subjects), f"{owner}-log-settings")
    return tasks


# -- the trace extension --------------------------------------------------------------------

TRACE: Final = "trace"


def start_following_trace_settings(
    nc: Client, subjects: Subjects, owner: str, spans: ProcessSpans
) -> EssentialTasks:
    """The deployment's trace settings (`/v2/trace/setting`) followed into `spans`, this
    process's span export, as an essential task of its own (see start_following_log_settings)."""

    def apply(record: Record) -> None:
        spans.update(tracesettings.decode(record.value))

    tasks = EssentialTasks(f"{owner} trace settings")
    tasks.spawn(follow(nc, subjects, TRACE, apply), f"{owner}-trace-settings")
    return tasks
