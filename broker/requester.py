"""The request client: publish an inference into the work queue and await its answer.

One wildcard subscription on a private inbox carries every answer for this requester. Each
request gets a token; the response comes to `<inbox>.<token>` and JetStream's publish
acknowledgement to `<inbox>.<token>.a`. Both are awaited concurrently, so the broker's "queue
full" refusal fails the request at once, while a successful publish costs no extra round trip
before the worker's answer. The future is registered before publishing and removed in `finally`,
so no answer can arrive unmatched and no entry leaks.

Coalescing: requests for the same model version that arrive in the same turn of the event loop
(an HTTP server reads many connections' requests per turn under load) travel in one message,
and their answers come back together in one message. The first request of a turn opens the
batch and yields once; the others join it meanwhile, and the first then publishes it. So the
broker's, nats-py's and the worker's cost per message is shared by the batch, while a request
that comes alone waits for nobody and goes as a plain message. Each request keeps its own
deadline, timer, cancellation and answer; the batch's token maps an answer's position back to
its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import codec, reply
from broker.recovery import reconnects_of
from broker.subjects import BATCH, DEADLINE_NS, REPLY_TO, TIMESTAMPS, TRACE, Subjects
from natron.errors import DeadlineExceeded, NatronError, PayloadTooLarge, Unavailable
from natron.inference import InferRequest, InferResponse

log = logging.getLogger(__name__)

# NATS/1.0 line, Natron-Reply-To with an inbox of a few tokens, Natron-Deadline-Ns: well under.
_HEADER_ALLOWANCE_BYTES = 256
# A message JetStream had nobody to store (a cluster electing a stream leader: 4.5-6 s measured
# after the leader's node was killed) is published again every _FAILOVER_PAUSE_S for this long.
FAILOVER_RETRY_S = 10.0
_FAILOVER_PAUSE_S = 0.25
# A publish JetStream has not acknowledged within this long is published again (should both
# copies be stored, the first answer is taken and the second dropped: answered once).
_PUBACK_TIMEOUT_S = 3.0
_SWEEP_S = 1.0
# A request with more tensor data than this goes alone: its bytes would dominate the message
# anyway, and alone it keeps the encoder's zero-copy path.
COALESCE_MAX_REQUEST_BYTES = 64 * 1024
# A coalesced message stays under this much tensor data (and under the broker's max_payload).
_COALESCE_MAX_MESSAGE_BYTES = 1024 * 1024
# What a request's map costs in a coalesced message beside its tensor data (names, shapes, ids).
_COALESCE_ENTRY_BYTES = 256


@dataclass(slots=True)
class _Stream:
    """A request answered 0..N times (a decoupled model): answers queue up in order."""

    queue: asyncio.Queue[tuple[InferResponse | NatronError, bool]]
    model: str
    version: str
    queued: bool = False
    epoch: int = 0  # the connection's reconnect count when it was made
    # A traced request's: filled with the worker's timestamps from its final answer.
    timestamps: list[int] | None = None


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[InferResponse]
    model: str
    version: str
    queued: bool = False
    epoch: int = 0  # the connection's reconnect count when it was made
    # A traced request's: filled with the worker's timestamps from its answer (TIMESTAMPS).
    timestamps: list[int] | None = None


@dataclass(slots=True)
class _Sent:
    """A message published and not yet answered whole: what it takes to publish it again after
    a reconnect, and the requests it carries."""

    subject: str
    payload: bytes | memoryview
    headers: dict[str, str]
    deadline_ns: int
    pendings: list[_Pending]
    epoch: int  # the reconnect count when it was last published
    refused_since_ns: int = 0  # when the broker first had no one to store it (0: never)
    published_ns: int = 0  # when it was last published


def _fail_unless_done(future: asyncio.Future[InferResponse], error: NatronError) -> None:
    if not future.done():
        future.set_exception(error)


@dataclass(slots=True)
class _Batch:
    """The requests for one model version gathered in one turn of the event loop."""

    model: str
    version: str
    max_rows: int
    level: int = 0  # the priority level's subject (0: the plain one)
    entries: list[tuple[InferRequest, int, dict[str, str] | None]] = field(default_factory=list)
    pendings: list[_Pending] = field(default_factory=list)
    rows: int = 0
    data_bytes: int = 0
    token: str = ""  # given when it is published
    # Requests whose `infer` has not returned yet: the token is forgotten when none is left.
    remaining: int = 0

    def fits(self, rows: int, data_bytes: int) -> bool:
        return (
            self.rows + rows <= self.max_rows
            and self.data_bytes + data_bytes <= _COALESCE_MAX_MESSAGE_BYTES
            and len(self.entries) < codec.MAX_BATCH_ENTRIES
        )


class Requester:
    """`async with Requester(nc, subjects) as requester: await requester.infer(...)`"""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        owner: str | None = None,
        failover_retry_s: float = FAILOVER_RETRY_S,
    ) -> None:
        self._nc = nc
        self._failover_retry_s = failover_retry_s
        self._reconnects = reconnects_of(nc)
        self._subjects = subjects
        # By default under the connection's own inbox prefix (broker/auth.py: only this role may
        # subscribe there) with nats-py's random suffix: nobody can guess it to forge answers.
        self._inbox = subjects.inbox(owner) if owner else nc.new_inbox()
        self._prefix_len = len(self._inbox) + 1
        self._counter = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._batches: dict[str, _Batch] = {}
        # (model, version, priority level) -> the batch still taking requests this turn.
        self._open: dict[tuple[str, str, int], _Batch] = {}
        self._streams: dict[str, _Stream] = {}
        # token -> the message behind it, while any of its requests waits (not for streams: a
        # stream published twice could interleave two answer sequences).
        self._sent: dict[str, _Sent] = {}
        self._retries: set[asyncio.Future[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sub: Subscription | None = None
        # subject -> [messages, requests] published to it, and the requests of the last message
        # published to it: for the gateway's admission (gateway/admission.py), how many requests
        # a queued message holds, and whether the broker has stored all it was sent.
        self._published: dict[str, list[int]] = {}
        self._last_published: dict[str, list[_Pending]] = {}

    def published(self, subject: str) -> tuple[int, int]:
        """(messages, requests) this requester has published to `subject` since it started
        (streams not counted)."""
        counts = self._published.get(subject)
        return (counts[0], counts[1]) if counts is not None else (0, 0)

    def stored(self, subject: str) -> bool:
        """Whether the broker has acknowledged the last message published to `subject` (or its
        requests are over): JetStream stores a stream's messages in order, so then it holds
        every one published to it before."""
        last = self._last_published.get(subject)
        return last is None or all(pending.queued or pending.future.done() for pending in last)

    @property
    def in_flight(self) -> int:
        return len(self._pending) + sum(batch.remaining for batch in self._batches.values())

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_S, self._sweep)
        # pending_msgs_limit: answers are consumed as fast as they come; a burst of a few
        # thousand concurrent answers must not be dropped as a slow consumer.
        self._sub = await self._nc.subscribe(
            self._inbox + ".>",
            cb=self._on_message,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1024 * 1024 * 1024,
        )

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed: nothing left to unsubscribe
                pass
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for retry in list(self._retries):
            retry.cancel()
        self.fail_in_flight(Unavailable("requester closed"))

    def fail_in_flight(self, error: NatronError) -> int:
        """End every request and stream in flight with `error`; how many ended."""
        ended = 0
        for pending in [*self._pending.values(), *(p for b in self._batches.values() for p in b.pendings)]:
            if not pending.future.done():
                pending.future.set_exception(error)
                ended += 1
        for stream in self._streams.values():
            stream.queue.put_nowait((error, True))
            ended += 1
        return ended

    async def recover_in_flight(self, before: int, lost: bool, answer_within_s: float) -> tuple[int, int]:
        """After reconnect `before`, what was in flight on the broken connection; (requests
        published again, streams ended).

        A message the broker never acknowledged may never have reached it, and one it held is
        gone when it lost its state (`lost`): both are published again, so the client gets its
        answer as if nothing happened (should the first copy run after all, its answer is the
        one taken and the second is dropped: a request is answered once). A message the broker
        kept may still be answered, but an answer sent while this connection was down went
        nowhere: it ends with 503 unless answered within `answer_within_s`. A stream is never
        published twice (two answer sequences would interleave): it ends with 503 in both
        cases where a request would be published again."""
        loop = asyncio.get_running_loop()
        now_ns, epoch = time.time_ns(), self._reconnects.count
        maybe_lost = Unavailable(
            "the connection to the broker broke while this request ran; its answer may be lost; retry"
        )
        resent = 0
        for sent in list(self._sent.values()):
            live = [p for p in sent.pendings if not p.future.done()]
            if sent.epoch >= before or not live or sent.deadline_ns <= now_ns:
                continue
            if lost or not all(p.queued for p in live):
                for pending in live:
                    pending.queued, pending.epoch = False, epoch
                sent.epoch, sent.published_ns = epoch, time.time_ns()
                await self._nc.publish(
                    sent.subject,
                    sent.payload,  # type: ignore[arg-type]  # nats-py sends any buffer
                    reply=sent.headers[REPLY_TO] + ".a",
                    headers=sent.headers,
                )
                resent += len(live)
            else:
                for pending in live:
                    loop.call_later(answer_within_s, _fail_unless_done, pending.future, maybe_lost)
        ended = 0
        for stream in self._streams.values():
            if stream.epoch < before and (lost or not stream.queued):
                stream.queue.put_nowait(
                    (
                        Unavailable(
                            "the connection to the broker broke before this stream was answered; retry"
                        ),
                        True,
                    )
                )
                ended += 1
        return resent, ended

    async def __aenter__(self) -> Requester:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def infer(
        self,
        request: InferRequest,
        version: str,
        timeout_s: float,
        headers: dict[str, str] | None = None,
        *,
        rows: int = 1,
        max_rows: int = 1,
        level: int = 0,
        timestamps: list[int] | None = None,
    ) -> InferResponse:
        """Send `request` to `version` of its model; answer or raise a NatronError.

        `version` is already resolved (the gateway resolves "latest"). The deadline travels
        with the request so that a worker drops it unprocessed once it expires. A request of
        `rows` rows may share its message with others of the same turn up to `max_rows` rows
        in all (the model's max_batch_size; 1 keeps every request in a message of its own).
        `level`: the priority level's subject of a model with priority levels (0: the plain
        subject); only requests of one level share a message.
        `timestamps`: the request is traced (the trace extension's triton mode): the worker's
        timestamps are appended to this list when its answer carries them.
        """
        deadline_ns = time.time_ns() + int(timeout_s * 1e9)
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), request.model, version, epoch=self._reconnects.count)
        if timestamps is not None:
            pending.timestamps = timestamps
            headers = {**(headers or {}), TRACE: "1"}
        data_bytes = 0
        for tensor in request.inputs:
            data_bytes += tensor.data.nbytes
        if max_rows <= 1 or data_bytes > COALESCE_MAX_REQUEST_BYTES:
            return await self._infer_alone(request, version, timeout_s, deadline_ns, pending, headers, level)
        key = (request.model, version, level)
        # The first request of the turn (or the first that no longer fits) opens a batch and
        # publishes it; the others join it.
        open_batch = self._open.get(key)
        leader = open_batch is None or not open_batch.fits(rows, data_bytes + _COALESCE_ENTRY_BYTES)
        if open_batch is None or leader:
            batch = self._open[key] = _Batch(request.model, version, max_rows, level)
        else:
            batch = open_batch
        batch.entries.append((request, deadline_ns, headers))
        batch.pendings.append(pending)
        batch.rows += rows
        batch.data_bytes += data_bytes + _COALESCE_ENTRY_BYTES
        batch.remaining += 1
        try:
            if leader:
                try:
                    # One turn: the requests already read from other connections join.
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    # This caller went away meanwhile (a client that reset its connection while
                    # the gateway was busy): its request stays out of the message, so no worker
                    # runs it; the others still go.
                    pending.future.cancel()
                    await self._publish_batch(key, batch)
                    raise
                await self._publish_batch(key, batch)
            return await self._await(
                pending, request, version, timeout_s, lambda: self._reply_to(batch.token)
            )
        finally:
            batch.remaining -= 1
            if batch.remaining == 0 and batch.token:
                self._batches.pop(batch.token, None)
                self._pending.pop(batch.token, None)
                self._sent.pop(batch.token, None)

    async def _infer_alone(
        self,
        request: InferRequest,
        version: str,
        timeout_s: float,
        deadline_ns: int,
        pending: _Pending,
        headers: dict[str, str] | None,
        level: int = 0,
    ) -> InferResponse:
        payload = self._payload(request)
        token = str(next(self._counter))
        self._pending[token] = pending
        try:
            await self._publish(
                request.model,
                version,
                payload,
                f"{self._inbox}.{token}",
                deadline_ns,
                headers,
                [pending],
                level,
            )
            return await self._await(pending, request, version, timeout_s, lambda: self._reply_to(token))
        finally:
            del self._pending[token]
            self._sent.pop(token, None)

    async def _await(
        self,
        pending: _Pending,
        request: InferRequest,
        version: str,
        timeout_s: float,
        reply_to: Callable[[], str],
    ) -> InferResponse:
        loop = asyncio.get_running_loop()
        # One timer on the future itself: cheaper than wait_for's wrapper on the hot path.
        timer = loop.call_later(timeout_s, self._expire, pending, request.model, version, timeout_s)
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away (a closed HTTP connection): its queued work is dropped. One
            # whose batch is not published yet is left out of it (its future is cancelled).
            target = reply_to()
            if target:
                await self._cancel(request, version, target)
            raise
        finally:
            timer.cancel()

    async def _publish_batch(self, key: tuple[str, str, int], batch: _Batch) -> None:
        """Close the batch and publish it: one message (a plain one when it holds one
        request); a failure to publish is every request's answer. Requests whose callers went
        away before it (or whose time ran out) stay out: nobody would take their answers."""
        if self._open.get(key) is batch:
            del self._open[key]
        if any(pending.future.done() for pending in batch.pendings):
            kept = [i for i, pending in enumerate(batch.pendings) if not pending.future.done()]
            batch.entries = [batch.entries[i] for i in kept]
            batch.pendings = [batch.pendings[i] for i in kept]
            if not kept:
                return
        token = batch.token = str(next(self._counter))
        reply_to = f"{self._inbox}.{token}"
        try:
            if len(batch.entries) == 1:
                self._pending[token] = batch.pendings[0]
                request, deadline_ns, headers = batch.entries[0]
                payload = self._payload(request)
                await self._publish(
                    batch.model,
                    batch.version,
                    payload,
                    reply_to,
                    deadline_ns,
                    headers,
                    batch.pendings,
                    batch.level,
                )
                return
            self._batches[token] = batch
            payload = codec.encode_batch(batch.entries)
            deadline_ns = max(deadline for _, deadline, _ in batch.entries)
            await self._publish(
                batch.model,
                batch.version,
                payload,
                reply_to,
                deadline_ns,
                {BATCH: str(len(batch.entries))},
                batch.pendings,
                batch.level,
            )
        except NatronError as exc:
            for pending in batch.pendings:
                if not pending.future.done():
                    pending.future.set_exception(exc)

    async def stream(
        self,
        request: InferRequest,
        version: str,
        idle_timeout_s: float,
        headers: dict[str, str] | None = None,
        level: int = 0,
    ) -> AsyncIterator[InferResponse]:
        """Send `request` to a decoupled model (at priority `level`'s subject) and yield its
        answers as they come.

        `idle_timeout_s` bounds the wait for each next answer (a stream may run long). An error
        answer raises its NatronError. A consumer that stops early (a client gone) cancels the
        request: the worker stops sending, and a model that checks `is_cancelled()` stops.
        """
        # Closed with this generator, so a consumer that stops early cancels at once.
        async with contextlib.aclosing(
            self.stream_marked(request, version, idle_timeout_s, headers, level)
        ) as answers:
            async for answer, final in answers:
                if answer.outputs or not final:
                    yield answer

    async def stream_marked(
        self,
        request: InferRequest,
        version: str,
        idle_timeout_s: float,
        headers: dict[str, str] | None = None,
        level: int = 0,
        timestamps: list[int] | None = None,
    ) -> AsyncGenerator[tuple[InferResponse, bool], None]:
        """`stream`, with each answer's final flag, and the final flag alone as an answer with
        no outputs: what Triton's gRPC stream tells its clients (`triton_final_response`).
        `timestamps`: the request is traced; the worker's timestamps are appended to this list
        when its final answer carries them."""
        payload = self._payload(request)
        token = str(next(self._counter))
        reply_to = f"{self._inbox}.{token}"
        state = _Stream(asyncio.Queue(), request.model, version, epoch=self._reconnects.count)
        if timestamps is not None:
            state.timestamps = timestamps
            headers = {**(headers or {}), TRACE: "1"}
        self._streams[token] = state
        finished = False
        try:
            deadline_ns = time.time_ns() + int(idle_timeout_s * 1e9)
            await self._publish(request.model, version, payload, reply_to, deadline_ns, headers, None, level)
            while True:
                try:
                    item, final = await asyncio.wait_for(state.queue.get(), idle_timeout_s)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"stream from model '{request.model}' version {version} sent nothing for "
                        f"{idle_timeout_s:.3f} s"
                    ) from None
                if isinstance(item, NatronError):
                    finished = True
                    raise item
                if final:
                    finished = True
                yield item, final
                if final:
                    return
        finally:
            del self._streams[token]
            if not finished:
                await self._cancel(request, version, reply_to)

    async def _publish(
        self,
        model: str,
        version: str,
        payload: bytes | memoryview,
        reply_to: str,
        deadline_ns: int,
        headers: dict[str, str] | None,
        pendings: list[_Pending] | None = None,
        level: int = 0,
    ) -> None:
        """Into the work queue; JetStream acknowledges to `<reply_to>.a`, the worker answers to
        `reply_to` (a header, since JetStream owns the message's reply subject).

        While the connection is down nothing is published: nats-py would hold the message in
        its reconnect buffer and the caller would wait out its whole deadline for a broker that
        may not come back. Refused at once, the client can retry elsewhere."""
        if not self._nc.is_connected:
            raise Unavailable("the broker is unavailable (the connection to NATS is down); retry shortly")
        subject = self._subjects.infer(model, version, level)
        all_headers = {REPLY_TO: reply_to, DEADLINE_NS: str(deadline_ns), **(headers or {})}
        if pendings is not None:
            token = reply_to[self._prefix_len :]
            self._sent[token] = _Sent(
                subject,
                payload,
                all_headers,
                deadline_ns,
                pendings,
                self._reconnects.count,
                0,
                time.time_ns(),
            )
        try:
            await self._nc.publish(
                subject,
                payload,  # type: ignore[arg-type]  # nats-py sends any buffer
                reply=reply_to + ".a",
                headers=all_headers,
            )
        except nats.errors.Error as exc:  # closed connection, full reconnect buffer
            raise Unavailable(f"broker unavailable: {type(exc).__name__}: {exc}") from None
        if pendings is not None:
            counts = self._published.get(subject)
            if counts is None:
                counts = self._published[subject] = [0, 0]
            counts[0] += 1
            counts[1] += len(pendings)
            self._last_published[subject] = pendings

    def _reply_to(self, token: str) -> str:
        """Where the answers to `token` go; "" while it has none (a batch not yet published)."""
        return f"{self._inbox}.{token}" if token else ""

    async def _cancel(self, request: InferRequest, version: str, reply_to: str) -> None:
        """Tell the workers the caller left. The reply subject names this request alone: a
        request id may come again (clients choose them), and a later request with the same id
        must not be dropped as cancelled."""
        try:
            await self._nc.publish(
                self._subjects.cancel(request.model, version),
                request.id.encode(),
                headers={REPLY_TO: reply_to} if reply_to else None,
            )
        except Exception:  # best effort: the deadline still bounds the work
            pass

    def _payload(self, request: InferRequest) -> bytes | memoryview:
        payload = codec.encode_request(request)
        # The server counts headers against max_payload too, and closes the connection (every
        # request in flight on it) over the limit: keep room for this request's headers.
        max_payload = self._nc.max_payload
        if len(payload) + _HEADER_ALLOWANCE_BYTES > max_payload:
            raise PayloadTooLarge(
                f"request of {len(payload)} bytes exceeds the broker's max_payload of {max_payload} bytes"
            )
        return payload

    @staticmethod
    def _expire(pending: _Pending, model: str, version: str, timeout_s: float) -> None:
        if not pending.future.done():
            where = "queued or running" if pending.queued else "not yet queued"
            pending.future.set_exception(
                DeadlineExceeded(
                    f"request to model '{model}' version {version} timed out after "
                    f"{timeout_s:.3f} s ({where})"
                )
            )

    def _publish_later(self, token: str) -> bool:
        """JetStream had nobody to store message `token`: in a cluster, the stream's leader
        died and the next is being elected (a few seconds). Publish it again shortly, for up to
        FAILOVER_RETRY_S and within its deadline; False when that is over, and the refusal is
        the answer. (A ready model's stream exists: no-one-to-store is a passing state.)"""
        sent = self._sent.get(token)
        now_ns = time.time_ns()
        if sent is None or now_ns >= sent.deadline_ns:
            return False
        if not sent.refused_since_ns:
            sent.refused_since_ns = now_ns
        if now_ns - sent.refused_since_ns >= self._failover_retry_s * 1e9:
            return False
        retry = asyncio.ensure_future(self._publish_again(sent, _FAILOVER_PAUSE_S))
        self._retries.add(retry)
        retry.add_done_callback(self._retries.discard)
        return True

    def _sweep(self) -> None:
        """Every _SWEEP_S: a message JetStream has not acknowledged within _PUBACK_TIMEOUT_S was
        lost on its way to the stream's leader (a cluster peer dying) or the broker stalled. It
        is published again, until it is stored or its requests are over. `_sent` holds only
        what is in flight, so a sweep costs little; one timer, not one per request."""
        now_ns = time.time_ns()
        for sent in list(self._sent.values()):
            if now_ns - sent.published_ns < _PUBACK_TIMEOUT_S * 1e9 or now_ns >= sent.deadline_ns:
                continue
            live = [p for p in sent.pendings if not p.future.done()]
            if not live or all(p.queued for p in live):
                continue
            sent.published_ns = now_ns
            retry = asyncio.ensure_future(self._publish_again(sent, 0.0))
            self._retries.add(retry)
            retry.add_done_callback(self._retries.discard)
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_S, self._sweep)

    async def _publish_again(self, sent: _Sent, after_s: float) -> None:
        await asyncio.sleep(after_s)
        if all(p.future.done() for p in sent.pendings):
            return
        sent.published_ns = time.time_ns()
        try:
            await self._nc.publish(
                sent.subject,
                sent.payload,  # type: ignore[arg-type]  # nats-py sends any buffer
                reply=sent.headers[REPLY_TO] + ".a",
                headers=sent.headers,
            )
        except nats.errors.Error as exc:  # the connection broke meanwhile: the reconnect resends
            log.info("publish again deferred to the reconnect: %r", exc)

    async def _on_message(self, msg: Msg) -> None:
        suffix = msg.subject[self._prefix_len :]
        is_ack = suffix.endswith(".a")
        token = suffix[:-2] if is_ack else suffix
        if is_ack and reply.nobody_stored(msg) and self._publish_later(token):
            return
        stream = self._streams.get(token)
        if stream is not None:
            self._on_stream_message(stream, msg, is_ack)
            return
        pending = self._pending.get(token)
        if pending is None:
            batch = self._batches.get(token)
            if batch is not None:
                self._on_batch_message(batch, msg, is_ack)
            return  # else the caller gave up (deadline) or the answer was already decided
        if pending.future.done():
            return
        if is_ack:
            error = reply.publish_ack_error(msg, pending.model, pending.version)
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.queued = True
            return
        # An ordinary request has one answer: the message's first (and only) one.
        answer, _ = reply.decode_reply(msg)[0]
        if pending.timestamps is not None:
            _take_timestamps(msg, pending.timestamps)
        if isinstance(answer, NatronError):
            pending.future.set_exception(answer)
        else:
            pending.future.set_result(answer)

    @staticmethod
    def _on_batch_message(batch: _Batch, msg: Msg, is_ack: bool) -> None:
        if is_ack:
            error = reply.publish_ack_error(msg, batch.model, batch.version)
            for pending in batch.pendings:
                if error is None:
                    pending.queued = True
                elif not pending.future.done():
                    pending.future.set_exception(error)
            return
        answers = reply.decode_batch_reply(msg)
        if isinstance(answers, NatronError):
            for pending in batch.pendings:
                if not pending.future.done():
                    pending.future.set_exception(answers)
            return
        pendings = batch.pendings
        for index, answer in answers:
            if index >= len(pendings):
                continue  # not a position of this batch: a broken worker, nobody to tell
            future = pendings[index].future
            if future.done():
                continue  # settled already (a redelivery's second answer, a timeout)
            traced = pendings[index].timestamps
            if traced is not None:
                _take_timestamps(msg, traced)
            if isinstance(answer, NatronError):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    @staticmethod
    def _on_stream_message(stream: _Stream, msg: Msg, is_ack: bool) -> None:
        if is_ack:
            error = reply.publish_ack_error(msg, stream.model, stream.version)
            if error is not None:
                stream.queue.put_nowait((error, True))
            else:
                stream.queued = True
            return
        answers = reply.decode_reply(msg)
        if stream.timestamps is not None and answers[-1][1]:
            _take_timestamps(msg, stream.timestamps)
        for answer in answers:
            stream.queue.put_nowait(answer)


def _take_timestamps(msg: Msg, into: list[int]) -> None:
    """A traced request's worker timestamps (TIMESTAMPS), when its answer carries them; a
    malformed value is left out rather than failing the answer."""
    value = (msg.headers or {}).get(TIMESTAMPS)
    if value and not into:
        try:
            into.extend(int(part) for part in value.split(","))
        except ValueError:
            into.clear()
