"""The request client: publish an inference into the work queue and await its answer.

One wildcard subscription on a private inbox carries every answer for this requester. Each
request gets a token; the response comes to `<inbox>.<token>` and JetStream's publish
acknowledgement to `<inbox>.<token>.a`. Both are awaited concurrently, so the broker's "queue
full" refusal fails the request at once, while a successful publish costs no extra round trip
before the worker's answer. The future is registered before publishing and removed in `finally`,
so no answer can arrive unmatched and no entry leaks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import codec
from broker.subjects import DEADLINE_NS, REPLY_TO, STATUS, Subjects
from natron.errors import DeadlineExceeded, InternalError, PayloadTooLarge, Unavailable
from natron.inference import InferRequest, InferResponse

log = logging.getLogger(__name__)

_NO_RESPONDERS = "503"
# NATS/1.0 line, Natron-Reply-To with an inbox of a few tokens, Natron-Deadline-Ns: well under.
_HEADER_ALLOWANCE_BYTES = 256


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[InferResponse]
    model: str
    version: str
    queued: bool = False


class Requester:
    """`async with Requester(nc, subjects) as requester: await requester.infer(...)`"""

    def __init__(self, nc: Client, subjects: Subjects, owner: str | None = None) -> None:
        self._nc = nc
        self._subjects = subjects
        self._inbox = subjects.inbox(owner or uuid.uuid4().hex[:12])
        self._prefix_len = len(self._inbox) + 1
        self._counter = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._sub: Subscription | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
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
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(Unavailable("requester closed"))

    async def __aenter__(self) -> Requester:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def infer(
        self, request: InferRequest, version: str, timeout_s: float, headers: dict[str, str] | None = None
    ) -> InferResponse:
        """Send `request` to `version` of its model; answer or raise a NatronError.

        `version` is already resolved (the gateway resolves "latest"). The deadline travels
        with the request so that a worker drops it unprocessed once it expires.
        """
        payload = codec.encode_request(request)
        max_payload = self._nc.max_payload
        # The server counts headers against max_payload too, and closes the connection (every
        # request in flight on it) over the limit: keep room for this request's headers.
        if len(payload) + _HEADER_ALLOWANCE_BYTES > max_payload:
            raise PayloadTooLarge(
                f"request of {len(payload)} bytes exceeds the broker's max_payload of {max_payload} bytes"
            )
        token = str(next(self._counter))
        reply = f"{self._inbox}.{token}"
        deadline_ns = time.time_ns() + int(timeout_s * 1e9)
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), request.model, version)
        self._pending[token] = pending
        try:
            try:
                await self._nc.publish(
                    self._subjects.infer(request.model, version),
                    payload,
                    reply=reply + ".a",
                    headers={REPLY_TO: reply, DEADLINE_NS: str(deadline_ns), **(headers or {})},
                )
            except nats.errors.Error as exc:  # closed connection, full reconnect buffer
                raise Unavailable(f"broker unavailable: {type(exc).__name__}: {exc}") from None
            # One timer on the future itself: cheaper than wait_for's wrapper on the hot path.
            timer = loop.call_later(timeout_s, self._expire, pending, request.model, version, timeout_s)
            try:
                return await pending.future
            finally:
                timer.cancel()
        finally:
            del self._pending[token]

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

    async def _on_message(self, msg: Msg) -> None:
        suffix = msg.subject[self._prefix_len :]
        is_ack = suffix.endswith(".a")
        token = suffix[:-2] if is_ack else suffix
        pending = self._pending.get(token)
        if pending is None or pending.future.done():
            return  # the caller gave up (deadline) or the answer was already decided
        if is_ack:
            self._on_publish_ack(pending, msg)
            return
        headers = msg.headers or {}
        status = int(headers.get(STATUS, "200"))
        if status == 200:
            try:
                pending.future.set_result(codec.decode_response(msg.data))
            except Exception as exc:  # a worker's malformed answer must still end the wait
                pending.future.set_exception(InternalError(f"undecodable response: {exc}"))
        else:
            pending.future.set_exception(codec.decode_error(status, msg.data))

    @staticmethod
    def _on_publish_ack(pending: _Pending, msg: Msg) -> None:
        headers = msg.headers or {}
        if headers.get("Status") == _NO_RESPONDERS:
            pending.future.set_exception(
                Unavailable(f"no inference queue for model '{pending.model}': is the router running?")
            )
            return
        try:
            ack = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            pending.future.set_exception(InternalError("undecodable JetStream publish acknowledgement"))
            return
        error = ack.get("error") if isinstance(ack, dict) else None
        if error:
            description = error.get("description", "") if isinstance(error, dict) else str(error)
            pending.future.set_exception(
                Unavailable(
                    f"queue of model '{pending.model}' version {pending.version} is full or "
                    f"unavailable: {description}"
                )
            )
            return
        pending.queued = True
