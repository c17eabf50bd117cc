"""Admission by the model's queue policy, before a request costs the broker or a worker
anything: its priority level, its deadline, and a refusal at once when its level's queue holds
`max_queue_size` requests (Triton's UNAVAILABLE "Exceeds maximum queue size": 503 on HTTP,
UNAVAILABLE on gRPC).

How deep a queue is. The queue of a version's priority level is its JetStream consumer, shared
by every gateway and every direct client, and JetStream's own per-subject bound is stream-wide
(one number for every model), so it cannot be a model's `max_queue_size`. The gateway counts
instead:

1. the consumer's `num_pending` (messages not yet delivered to any instance: what waits),
   asked with a consumer-info request at most every REFRESH_S while the level receives
   requests, in a task of its own so that no request waits for the answer. It is asked once
   the broker has acknowledged the last message this gateway published there (JetStream
   answers an info request without waiting for messages still on their way into the stream),
   so the answer counts every request published before the question;
2. times the requests per message this gateway has been publishing to that subject (a
   coalesced message holds several; the queue's unit is the request, as Triton's);
3. plus the requests this gateway admitted and had not published when it asked.

So one gateway alone never lets its queue grow past the bound; it may refuse a request early
when one it published while the question was on its way had already been counted by the
broker (the window of one round trip). Several gateways (`--http-workers`, or more hosts) may
together overshoot the bound by what the others admitted in one refresh interval; direct NATS
clients are not bounded by it at all. The stream-wide per-subject bound (4096 messages) stays
as the hard ceiling behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import nats.errors
from aiohttp import web
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from broker.requester import Requester
from broker.subjects import Subjects
from gateway.keys import NATS, OPTIONS, REQUESTER
from natron.errors import Unavailable
from natron.inference import InferRequest
from natron.spec import ModelSpec, Scheduling

log = logging.getLogger(__name__)

# How stale a queue's depth may be while it receives requests (seconds).
REFRESH_S = 0.05
# A depth older than this is not trusted: the level received nothing for a while, and what
# this gateway counted as its own since the last question may have been stored and even taken
# meanwhile. The first request after such a quiet spell waits for a fresh answer (a round trip
# or two); under steady traffic the answers are never this old and nobody waits.
STALE_S = 2 * REFRESH_S
_INFO_TIMEOUT_S = 1.0
# How long a question waits for the broker to acknowledge what was published before it.
_STORED_POLL_S = 0.0005
_STORED_POLLS = 10
# A request is refused only on an answer asked for at most this long before: one that the
# known depth would refuse otherwise waits for a fresh answer (see _Depth.queued).
REFUSE_ON_S = 0.005


def log_request(request_id: str) -> str:
    """Triton's prefix for a request's error messages (InferenceRequest::LogRequest)."""
    return f"[request id: {request_id}] " if request_id else ""


@dataclass(slots=True, frozen=True)
class Queueing:
    """Where an admitted request goes and how long the gateway waits for it."""

    level: int  # the priority level (0: the model has none)
    subject_level: int  # the level token of its subject (0: the plain subject)
    timeout_s: float  # the whole request's deadline, from now


def queueing(
    scheduling: Scheduling, request: InferRequest, timeout_us: int | None, fallback_timeout_s: float
) -> Queueing:
    """The request's level (its `priority` parameter, Triton's rule) and deadline.

    A model whose config names a queue policy gives the `timeout` parameter Triton's meaning:
    how long the request may wait to be taken, when the policy allows the override. It travels
    to the worker in the request's parameters (the worker applies the policy), and the request
    as a whole gets `fallback_timeout_s` (the call's deadline or the gateway's default). For
    any other model `timeout` is the whole request's deadline, as natron always had it."""
    priority = request.parameters.get("priority", 0)
    level = scheduling.level_of(priority if type(priority) is int else 0)
    if scheduling.configured:
        if timeout_us:
            request.parameters["timeout"] = timeout_us
        timeout_s = fallback_timeout_s
    else:
        timeout_s = timeout_us / 1e6 if timeout_us else fallback_timeout_s
    # The default level is the plain subject, which clients unaware of priorities use too.
    subject_level = 0 if level == scheduling.default_level else level
    return Queueing(level, subject_level, timeout_s)


@dataclass(slots=True)
class _Depth:
    """What this gateway knows of one priority level's queue."""

    subject: str
    consumer: str
    baseline: int  # requests the requester had published there before admission counted any
    pending_messages: int = 0  # num_pending at the last answer
    requests_per_message: float = 1.0
    admitted: int = 0  # requests admitted, ever
    in_broker: int = 0  # of which published before the last question, so counted in its answer
    asked_s: float = float("-inf")  # loop time the last refresh was asked
    answered_s: float = float("-inf")  # loop time the last refresh was answered
    answered_asked_s: float = float("-inf")  # loop time that answer's question was asked
    asking: asyncio.Task[None] | None = None  # the refresh under way
    counted: tuple[int, int] = (0, 0)  # the requester's (messages, requests) at the last refresh

    @property
    def queued(self) -> float:
        """Requests in the queue, as far as this gateway can tell: never fewer than there are
        (with one gateway), possibly more (its own, counted until the next answer, may have been
        taken meanwhile), which is why a refusal waits for a fresh answer."""
        return self.pending_messages * self.requests_per_message + max(0, self.admitted - self.in_broker)


class Admission:
    """The gateway's view of the queue depths of models with a `max_queue_size`."""

    def __init__(self, nc: Client, subjects: Subjects, requester: Requester) -> None:
        self._nc = nc
        self._subjects = subjects
        self._requester = requester
        self._depths: dict[tuple[str, str, int], _Depth] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    def admit(
        self, spec: ModelSpec, version: str, queueing: Queueing, request_id: str
    ) -> Awaitable[None] | None:
        """Refuse the request (Unavailable) when its level's queue is full; else count it.
        Decided at once (None) unless the depth known is stale: then the awaitable returned
        decides, once a fresh one is known. Synchronous on the hot path, so a model without
        `max_queue_size` pays one dict lookup."""
        max_queue_size = spec.scheduling.policy(queueing.level).max_queue_size
        if not max_queue_size:
            return None
        key = (spec.name, version, queueing.level)
        depth = self._depths.get(key)
        if depth is None:
            level = queueing.subject_level
            subject = self._subjects.infer(spec.name, version, level)
            depth = self._depths[key] = _Depth(
                subject,
                self._subjects.consumer(spec.name, version, level),
                self._requester.published(subject)[1],
            )
        now_s = asyncio.get_running_loop().time()
        if depth.asking is None and now_s - depth.asked_s >= REFRESH_S:
            self._refresh(depth, now_s)
        if now_s - depth.answered_s <= STALE_S and (
            depth.queued < max_queue_size or now_s - depth.answered_asked_s <= REFUSE_ON_S
        ):
            _take(depth, max_queue_size, request_id)
            return None
        return self._admit_fresh(depth, max_queue_size, request_id)

    async def _admit_fresh(self, depth: _Depth, max_queue_size: int, request_id: str) -> None:
        """Decide on a fresh answer: the known one is stale, or would refuse the request while
        counting as queued some of this gateway's requests that may have been taken since."""
        asking = depth.asking
        if asking is None:
            self._refresh(depth, asyncio.get_running_loop().time())
            asking = depth.asking
        assert asking is not None
        # Shielded: a caller that goes away does not end the question for the others.
        await asyncio.shield(asking)
        _take(depth, max_queue_size, request_id)

    def _refresh(self, depth: _Depth, now_s: float) -> None:
        depth.asked_s = now_s
        task = depth.asking = asyncio.create_task(self._ask(depth), name=f"queue depth {depth.consumer}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, depth: _Depth) -> None:
        requester, loop = self._requester, asyncio.get_running_loop()
        # A PubAck takes a round trip: polled for a few of them (the requester's hot path keeps
        # no event per message for this), then asked anyway.
        for _ in range(_STORED_POLLS):
            if requester.stored(depth.subject):
                # Published and stored before the question: in the broker's answer.
                in_broker = requester.published(depth.subject)[1] - depth.baseline
                break
            await asyncio.sleep(_STORED_POLL_S)
        else:
            # Not all stored yet (a slow broker): those published since the last question stay
            # counted as this gateway's own, which may count some twice but never none.
            in_broker = depth.in_broker
        try:
            info = await self._nc.jetstream().consumer_info(
                self._subjects.stream, depth.consumer, timeout=_INFO_TIMEOUT_S
            )
        except NotFoundError:
            pending = 0  # not configured yet: nothing waits in it
        except (nats.errors.Error, TimeoutError) as exc:
            # The broker is away or slow: keep the last depth; the next request asks again.
            log.debug("queue depth of %s not known: %r", depth.consumer, exc)
            depth.asking = None
            return
        else:
            pending = int(info.num_pending or 0)
        messages, requests = self._requester.published(depth.subject)
        sent_messages = messages - depth.counted[0]
        if sent_messages > 0:
            depth.requests_per_message = (requests - depth.counted[1]) / sent_messages
        depth.counted = (messages, requests)
        depth.pending_messages = pending
        depth.in_broker = in_broker
        depth.answered_s, depth.answered_asked_s = loop.time(), depth.asked_s
        depth.asking = None


def _take(depth: _Depth, max_queue_size: int, request_id: str) -> None:
    if depth.queued >= max_queue_size:
        raise Unavailable(f"{log_request(request_id)}Exceeds maximum queue size")
    depth.admitted += 1


ADMISSION: web.AppKey[Admission] = web.AppKey("admission", Admission)


async def admission_ctx(app: web.Application) -> AsyncIterator[None]:
    """The gateway's admission, after its requester (whose publishes it counts)."""
    admission = Admission(app[NATS], app[OPTIONS].subjects, app[REQUESTER])
    app[ADMISSION] = admission
    try:
        yield
    finally:
        await admission.close()
