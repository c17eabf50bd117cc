"""One model instance: take requests by capacity, admit them, hand them to its runner, and
acknowledge each once answered.

The parts, each with one owner:

* taking, and which requests run together: the batcher (workers/batcher.py), over the
  capacity puller (broker/puller.py);
* admission, here: decode, drop what expired in the queue (answered 504 without running) and
  what was cancelled (its caller went away), validate against the model's interface, and
  apply the model's queue policy: a request that waited longer than its level's queue timeout
  is answered Triton's 503 "Request timeout expired" without running (REJECT), or runs after
  the round's punctual requests (DELAY);
* execution: one runner per backend shape (workers/runners.py), chosen when the instance is
  built: whole batches, requests through a sink, or concurrent requests on the event loop;
* the answer's framing: broker/reply.py.

Each request is answered exactly once: with its outputs, or with an error that names the cause
(a decoupled model's: 0..N stream frames, then the end or an error). The broker message is
acknowledged only after the answer is published (a decoupled one when its execution starts),
so a worker that dies mid-batch leaves its messages to be delivered again to another instance;
meanwhile the instance tells the broker that requests held long are still being worked on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import codec
from broker.puller import Puller, stored_ns
from broker.reply import Replier
from broker.subjects import BATCH, DEADLINE_NS, REPLY_TO, TRACE
from natron.errors import DeadlineExceeded, InvalidArgument, NatronError, Unavailable
from natron.inference import InferRequest
from natron.spec import ModelSpec
from natron.stats import ModelStats
from natron.tracing import ProcessSpans, end_span
from workers.backends import AnyBackend
from workers.batcher import Admitted, Batcher
from workers.runners import Answers, runner_for
from workers.sharedmemory import WorkerSharedMemory

log = logging.getLogger(__name__)

CANCEL_MEMORY_S = 120.0


class _Held:
    """A message taken and not yet acknowledged: when, and how many of its requests (several
    in a coalesced message) still await their answers."""

    __slots__ = ("msg", "remaining", "spans", "taken_s")

    def __init__(self, msg: Msg, taken_s: float) -> None:
        self.msg = msg
        self.taken_s = taken_s
        self.remaining = 1
        # Spans of its traced requests, ended when the message is acknowledged.
        self.spans: list[Any] = []


class ModelInstance:
    def __init__(
        self,
        nc: Client,
        puller: Puller,
        spec: ModelSpec,
        version: str,
        backend: AnyBackend,
        name: str,
        *,
        throttle_s: float = 0.0,
        stats: ModelStats | None = None,
        spans: ProcessSpans | None = None,
        shm: WorkerSharedMemory | None = None,
    ) -> None:
        self._puller = puller
        # Tensors by reference (workers/sharedmemory.py); None: refused with a 400.
        self._shm = shm
        self._spans = spans
        self._spec = spec
        self.name = name
        # Shared by the instances of a version on this worker; reported with the heartbeat.
        self.stats = stats or ModelStats()
        # Messages taken and not yet acknowledged, by id (Msg is unhashable).
        self._in_hand: dict[int, _Held] = {}
        # Request ids whose clients went away, with when the cancellation came (loop clock).
        # Cancelled requests (their callers went away), with when the cancellation came (loop
        # clock): by (request id, reply subject), or (request id, "") when the canceller did
        # not say where the answers go and every request with that id is meant.
        self._cancelled: dict[tuple[str, str], float] = {}
        self._stopping = False
        # Only a model whose config names a queue policy pays for checking one.
        self._queue_policy = spec.scheduling.configured
        self._answers = Answers(
            Replier(nc, decoupled=spec.decoupled), spec, version, self.stats, self._ack, shm=shm
        )
        self._runner = runner_for(
            backend,
            spec,
            version,
            self._answers,
            self.stats,
            name,
            cancelled=self.is_cancelled,
            throttle_s=throttle_s,
            waiting=lambda: puller.held,
        )
        self._batcher = Batcher(puller, self._runner.policy())

    async def run(self) -> None:
        """Serve until `stop()`; a failing batch never ends the loop."""
        await self._runner.serve(self._intake, lambda: not self._stopping)

    def cancel(self, request_id: str, reply_to: str = "") -> None:
        """The client of `request_id` (answered at `reply_to`; "": wherever) went away: drop
        the request if queued, stop streaming it if running."""
        now_s = asyncio.get_running_loop().time()
        self._cancelled[(request_id, reply_to)] = now_s
        # Remember a cancellation long enough for a request still in the queue to be dropped.
        for old in [key for key, at in self._cancelled.items() if now_s - at > CANCEL_MEMORY_S]:
            del self._cancelled[old]
        self._runner.cancel(request_id)

    def is_cancelled(self, request_id: str, reply_to: str) -> bool:
        cancelled = self._cancelled
        return bool(cancelled) and ((request_id, reply_to) in cancelled or (request_id, "") in cancelled)

    def stop(self) -> None:
        """Stop taking new work; the batch in hand completes."""
        self._stopping = True

    async def close_intake(self) -> None:
        """Stop pulling: undelivered credit lapses, prefetched messages go back (NAK)."""
        await self._puller.close()

    def release(self) -> None:
        """Free the model once no batch runs (blocking: call off the event loop)."""
        self._runner.close()

    async def keep_alive(self, older_than_s: float) -> None:
        """+WPI for requests held longer than `older_than_s`: still working, do not redeliver."""
        now_s = asyncio.get_running_loop().time()
        for held in list(self._in_hand.values()):
            if now_s - held.taken_s >= older_than_s:
                await self._puller.in_progress(held.msg)

    # -- admission ---------------------------------------------------------------------------

    async def _intake(self) -> list[Admitted]:
        """The next round's requests that passed admission; the others are answered (or, when
        nobody waits for them, dropped) and acknowledged here."""
        deliveries = await self._batcher.next()
        now_ns = time.time_ns()
        now_s = asyncio.get_running_loop().time()
        for delivery in deliveries:
            self._in_hand[id(delivery.msg)] = _Held(delivery.msg, now_s)
        admitted: list[Admitted] = []
        for delivery in deliveries:
            msg = delivery.msg
            if msg.headers and BATCH in msg.headers:
                admitted.extend(await self._admit_coalesced(msg, now_ns, delivery.level))
                continue
            item = await self._admit(msg, now_ns, delivery.level)
            if item is not None:
                admitted.append(item)
        if self._queue_policy and any(item.delayed for item in admitted):
            # DELAY: requests that waited past their queue timeout go after the punctual ones
            # of the round (Triton moves them behind the unexpired requests of their level).
            admitted.sort(key=lambda item: item.delayed)
        return admitted

    async def _admit(self, msg: Msg, now_ns: int, level: int = 0) -> Admitted | None:
        headers = msg.headers or {}
        reply_to = headers.get(REPLY_TO)
        if not reply_to:
            log.warning("dropping a request without a %s header on %s", REPLY_TO, msg.subject)
            await self._ack(msg)
            return None
        request_id = ""
        try:
            request = codec.decode_request(msg.data, self._shm)
            request_id = request.id
            raw_deadline = headers.get(DEADLINE_NS)
            deadline_ns = int(raw_deadline) if raw_deadline is not None else 0
            batch_size = self._check(request, reply_to, deadline_ns, now_ns, msg, level)
        except NatronError as exc:
            await self._answers.error(msg, reply_to, request_id, exc)
            return None
        except ValueError as exc:  # a malformed deadline header
            await self._answers.error(msg, reply_to, request_id, InvalidArgument(str(exc)))
            return None
        if batch_size is None:
            await self._drop_cancelled(msg)
            return None
        self._trace(msg, request, headers)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request id=%s model=%s traceparent=%s",
                request.id,
                request.model,
                headers.get("traceparent", "-"),
            )
        return Admitted(
            msg,
            reply_to,
            request,
            abs(batch_size),
            deadline_ns,
            delayed=batch_size < 0,
            timestamps=_queued(msg, now_ns) if TRACE in headers else None,
        )

    async def _admit_coalesced(self, msg: Msg, now_ns: int, level: int = 0) -> list[Admitted]:
        """The requests of a coalesced message; each that fails admission is answered alone,
        by its position. A message that cannot be read as a whole gets one error answer, which
        its requester takes as every request's."""
        headers = msg.headers or {}
        reply_to = headers.get(REPLY_TO)
        if not reply_to:
            log.warning("dropping coalesced requests without a %s header on %s", REPLY_TO, msg.subject)
            await self._ack(msg)
            return []
        try:
            if self._spec.decoupled:
                raise InvalidArgument(
                    f"model '{self._spec.name}' is decoupled: its requests cannot share a message"
                )
            entries = codec.decode_batch(msg.data, int(headers[BATCH]), self._shm)
        except NatronError as exc:
            await self._answers.error(msg, reply_to, "", exc)
            return []
        except ValueError as exc:  # a malformed count header
            await self._answers.error(msg, reply_to, "", InvalidArgument(f"{BATCH}: {exc}"))
            return []
        self._in_hand[id(msg)].remaining = len(entries)
        admitted: list[Admitted] = []
        for index, entry in enumerate(entries):
            try:
                if entry.error is not None:
                    raise entry.error
                assert entry.request is not None
                batch_size = self._check(entry.request, reply_to, entry.deadline_ns, now_ns, msg, level)
            except NatronError as exc:
                await self._answers.error(msg, reply_to, entry.request_id, exc, index=index)
                continue
            if batch_size is None:
                await self._drop_cancelled(msg)
                continue
            self._trace(msg, entry.request, entry.trace)
            admitted.append(
                Admitted(
                    msg,
                    reply_to,
                    entry.request,
                    abs(batch_size),
                    entry.deadline_ns,
                    index,
                    delayed=batch_size < 0,
                    timestamps=_queued(msg, now_ns) if TRACE in entry.trace else None,
                )
            )
        return admitted

    def _trace(self, msg: Msg, request: InferRequest, headers: Mapping[str, str]) -> None:
        """A span for a request its gateway traces (a sampled `traceparent`), from admission to
        the acknowledgement of its message, after its answer went out."""
        if self._spans is None or self._spans.export is None:
            return
        attributes = {"model.name": request.model, "model.instance": self.name, "request.id": request.id}
        span = self._spans.child("compute", headers, attributes)
        if span is not None:
            self._in_hand[id(msg)].spans.append(span)

    def _check(
        self, request: InferRequest, reply_to: str, deadline_ns: int, now_ns: int, msg: Msg, level: int
    ) -> int | None:
        """Admission of a decoded request: its batch size (negated when the queue policy
        DELAYs it), None when its client went away (nobody waits for it), or the NatronError
        that is its answer."""
        if deadline_ns and now_ns > deadline_ns:
            raise DeadlineExceeded(f"request to model '{self._spec.name}' expired in the queue before it ran")
        if request.model != self._spec.name:
            raise InvalidArgument(
                f"request for model '{request.model}' published to model '{self._spec.name}'"
            )
        if request.output_refs and self._spec.decoupled:
            raise InvalidArgument(
                f"model '{self._spec.name}' is decoupled: its outputs cannot be written to shared memory"
            )
        batch_size = self._spec.validate(request)
        if self.is_cancelled(request.id, reply_to):
            return None
        if self._queue_policy and self._waited_too_long(request, level, msg, now_ns):
            if not self._spec.scheduling.policy(level).delay:
                # Triton's answer to a request its queue policy rejects (UNAVAILABLE).
                raise Unavailable("Request timeout expired")
            return -batch_size
        return batch_size

    def _waited_too_long(self, request: InferRequest, level: int, msg: Msg, now_ns: int) -> bool:
        """Whether the request waited in the queue, from when JetStream stored it until now,
        longer than its level's queue timeout (the request's `timeout` parameter, in µs, when
        the policy lets it shorten the default)."""
        requested = request.parameters.get("timeout", 0)
        timeout_us = self._spec.scheduling.policy(level).timeout_us(
            requested if type(requested) is int else 0
        )
        if not timeout_us:
            return False
        enqueued_ns = stored_ns(msg)
        return bool(enqueued_ns) and now_ns > enqueued_ns + timeout_us * 1000

    async def _drop_cancelled(self, msg: Msg) -> None:
        """A request whose client went away is dropped unrun, acknowledged and counted."""
        await self._ack(msg)
        self.stats.failed("CANCELED", 0)

    async def _ack(self, msg: Msg) -> None:
        """One request of `msg` is done; the message is acknowledged when all of its are."""
        held = self._in_hand.get(id(msg))
        if held is not None:
            held.remaining -= 1
            if held.remaining > 0:
                return
            del self._in_hand[id(msg)]
        await self._puller.ack(msg)
        if held is not None:
            for span in held.spans:
                end_span(span, None)


def _queued(msg: Msg, now_ns: int) -> list[int]:
    """A traced request's QUEUE_START: when JetStream stored it (its queue is the stream, and
    the queue statistics start there too), else when this worker took it."""
    return [stored_ns(msg) or now_ns]
