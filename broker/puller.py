"""Pull by capacity: keep exactly as much work requested from a JetStream consumer as this
model instance can batch now, so that a fast device takes more work than a slow one and a busy
one takes none, with no central scheduler.

The puller keeps a credit count: messages asked for with pull requests and not yet delivered.
It asks for more only while `credits + queued < capacity`, where capacity is one batch: while a
batch executes, at most one further batch is prefetched and waits here, and every other message
stays in the shared consumer for the fleet's other instances. A pull request expires after
`expires_s`; the broker then answers with a 408 status whose `Nats-Pending-Messages` header says
how many of its messages it never delivered, and those credits are returned. A puller that hears
nothing at all for two expiry periods (a broker restart forgets pull requests silently) resets
its credits and asks again.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.subjects import PENDING_MESSAGES

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_NAK = b"-NAK"
_IN_PROGRESS = b"+WPI"


class CapacityPuller:
    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        capacity: int,
        *,
        expires_s: float = 5.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be at least 1")
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._capacity = capacity
        self._expires_s = expires_s
        self._credits = 0
        self._queue: collections.deque[Msg] = collections.deque()
        # Arrival time (loop clock) of each queued message, in step with _queue.
        self._arrivals: collections.deque[float] = collections.deque()
        self._arrived = asyncio.Event()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._last_event_s = 0.0
        self._closed = False

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._on_message, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        self._last_event_s = asyncio.get_running_loop().time()

    async def close(self) -> None:
        """Stop asking; messages delivered but not taken go back to the consumer (NAK)."""
        self._closed = True
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # already closed connection
                pass
        while self._queue:
            msg = self._queue.popleft()
            await self.nak(msg)
        self._arrivals.clear()
        self._arrived.set()

    async def _on_message(self, msg: Msg) -> None:
        now_s = self._last_event_s = asyncio.get_running_loop().time()
        headers = msg.headers
        if headers and "Status" in headers and not msg.data:
            self._on_status(headers)
            return
        self._credits = max(0, self._credits - 1)
        if self._closed:
            await self.nak(msg)
            return
        self._queue.append(msg)
        self._arrivals.append(now_s)
        self._arrived.set()

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers.get("Status", "")
        if status == "100":
            return  # idle heartbeat
        pending = headers.get(PENDING_MESSAGES)
        if pending is not None:
            # 408 Request Timeout (expired pull request) or 409 (e.g. consumer deleted):
            # the undelivered part of that request is returned.
            self._credits = max(0, self._credits - int(pending))
        elif status == "409":
            log.warning("pull request refused: %s", headers.get("Description", ""))
            self._credits = 0
        self._arrived.set()

    async def _refill(self) -> None:
        if self._closed:
            return
        have = self._credits + len(self._queue)
        # Ask again only once half the capacity is used up, for the whole difference: one pull
        # request per half batch instead of one per message keeps the broker's list of waiting
        # pull requests short, while credit never runs dry under steady load.
        if have > self._capacity // 2:
            return
        want = self._capacity - have
        request = orjson.dumps({"batch": want, "expires": int(self._expires_s * 1e9)})
        self._credits += want
        # The answer is the messages themselves, or a 408 status at expiry.
        try:
            await self._nc.publish(self._next_subject, request, reply=self._inbox)
        except Exception as exc:  # disconnected: the credits were never asked for
            self._credits = max(0, self._credits - want)
            log.warning("pull request not sent: %s", exc)

    async def take(self, max_items: int, linger_s: float = 0.0, enough: int | None = None) -> list[Msg]:
        """Wait for at least one message, then up to `linger_s` for `enough` (default
        `max_items`) messages; return at most `max_items`.

        The linger timer starts when the oldest message arrived here, as Triton's
        max_queue_delay counts from the oldest request's enqueue time: messages that already
        waited while the previous batch ran are dispatched without further delay.
        """
        loop = asyncio.get_running_loop()
        await self._refill()
        while not self._queue:
            if self._closed:
                return []
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), self._expires_s * 2)
            except TimeoutError:
                if loop.time() - self._last_event_s > self._expires_s * 2:
                    self._credits = 0  # the broker forgot our pull requests
            await self._refill()
        target = min(enough or max_items, max_items)
        if linger_s > 0 and len(self._queue) < target:
            deadline = self._arrivals[0] + linger_s
            while len(self._queue) < target and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
        count = min(max_items, len(self._queue))
        batch = [self._queue.popleft() for _ in range(count)]
        for _ in range(count):
            self._arrivals.popleft()
        await self._refill()
        return batch

    async def ack(self, msg: Msg) -> None:
        if msg.reply:
            await self._nc.publish(msg.reply, _ACK)

    async def in_progress(self, msg: Msg) -> None:
        """Reset the message's ack timer: its work goes on."""
        if msg.reply:
            await self._nc.publish(msg.reply, _IN_PROGRESS)

    async def nak(self, msg: Msg) -> None:
        """Hand a message back for redelivery now (to this or another instance)."""
        if msg.reply and not self._nc.is_closed:
            try:
                await self._nc.publish(msg.reply, _NAK)
            except Exception:  # closing connection: ack wait will redeliver it anyway
                pass
