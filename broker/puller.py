"""Pull by capacity: an instance takes from its model version's shared JetStream consumer only
what it can batch now, so a fast device takes more work than a slow one and a busy one takes
none, with no central scheduler.

This module is the transport; when to ask for how much is the batcher's policy
(workers/batcher.py). At most one pull request is outstanding per instance, and only while the
instance is taking. The batcher asks in three ways, in this order:

1. Idle, it keeps one long-poll for a single message (`wait_first`: `batch: 1`, expiring after
   `expires_s`), so the first request of a quiet period starts at once.
2. With a message in hand, the broker has told it (in the message's ack metadata) how many more
   wait in the consumer. If any do, a `no_wait` pull for as many as fit the batch
   (`collect_waiting`) collects them and ends at once, with nothing left outstanding.
3. With `max_queue_delay` configured and the batch not yet at its target, a pull for what the
   batch lacks, expiring at the linger deadline (`pull_until`), gathers what arrives meanwhile;
   `wait_delivery` wakes the batcher at each arrival.

Capacity is counted in requests: a coalesced message (header `Natron-Batch: k`) holds k of
them, so a pull asks for as many messages as the room divided by the size of the last message
delivered, and `hand_over` stops at the room the batch has.

Then it hands the deliveries over (`hand_over`), each with its arrival time. So while a batch
executes no credit is outstanding, and everything else in the queue stays available to the
fleet's other instances; the work an instance gets is exactly what it asked for when it was
free. A request the broker forgets silently (a restart) is given up after its expiry plus a
grace period. When the puller closes, the messages delivered and not handed over go back to
the consumer (NAK) for the fleet's other instances, as does one already on its way to it.

Priority levels (`LevelPuller`): a model with Triton's `priority_levels` has one consumer per
level, and an instance takes from them highest level first, so priorities hold across the
fleet (every instance prefers the same requests) rather than per instance:

1. First, each level above the highest one it holds a message of is asked (`no_wait`, one
   message) whether anything waits there, highest first: after an execution, what waits at a
   higher level goes before anything else, even before a message a lower level delivered
   meanwhile. A level whose long-poll is still outstanding is empty (a request there would
   have been delivered to it) and is not asked.
2. With nothing anywhere, it keeps a long-poll for one message on every level.
3. With a message in hand, it asks each level, highest first, for as many as the room left
   (`no_wait`; not those found empty this round), so the room fills from the top.
4. Lingering (`max_queue_delay`), each level without a request outstanding is asked for the
   room until the linger deadline.
5. It hands over what it holds highest level first; what does not fit waits for the next round.

The price, paid only by models with levels: a round asks each level once (a round trip each),
and the long-polls of the levels that stayed empty while the instance took work remain
outstanding while it executes, so such an instance may be handed one message per level that
another, idle instance could have taken; it runs them in its next round, first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.codec import MAX_BATCH_ENTRIES
from broker.recovery import reconnects_of
from broker.subjects import BATCH
from natron.timers import LOOP_TIMER_RESOLUTION_S, PRECISE

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_NAK = b"-NAK"
_IN_PROGRESS = b"+WPI"
_GRACE_S = 2.0


@dataclass(slots=True, frozen=True)
class Delivery:
    """A message the consumer delivered, and when it arrived (loop clock)."""

    msg: Msg
    arrival_s: float
    level: int = 0  # the priority level whose consumer delivered it (0: the model has none)


def entries_of(msg: Msg) -> int:
    """How many requests a message holds: its `Natron-Batch` header, else 1 (clamped to what a
    coalesced message may hold; the decoder checks the body against the header)."""
    headers = msg.headers
    if headers:
        raw = headers.get(BATCH)
        if raw is not None:
            try:
                return min(max(int(raw), 1), MAX_BATCH_ENTRIES)
            except ValueError:
                return 1
    return 1


def _metadata(msg: Msg) -> Msg.Metadata | None:
    """The delivery's JetStream metadata (both ack-subject formats), parsed once: nats.py
    caches it on the message, so the puller and the statistics share one parse."""
    try:
        return msg.metadata
    except Exception:  # not a JetStream delivery (no or foreign reply subject)
        return None


def pending_after(msg: Msg) -> int:
    """Messages left in the consumer after this one."""
    metadata = _metadata(msg)
    return metadata.num_pending if metadata is not None else 0


def stored_ns(msg: Msg) -> int:
    """When JetStream stored the message (unix ns, to the microsecond); 0 if unknown."""
    metadata = _metadata(msg)
    return int(metadata.timestamp.timestamp() * 1_000_000) * 1000 if metadata is not None else 0


class Puller(Protocol):
    """What the batcher and the instance use of a puller: `CapacityPuller` for one consumer,
    `LevelPuller` for the consumers of a model's priority levels."""

    @property
    def capacity(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def held(self) -> int: ...
    @property
    def oldest_arrival_s(self) -> float: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def wait_first(self) -> bool: ...
    async def collect_waiting(self, room: int) -> None: ...
    async def pull_until(self, room: int, until_s: float) -> None: ...
    async def wait_delivery(self, until_s: float) -> None: ...
    def hand_over(self, room: int) -> list[Delivery]: ...
    async def ack(self, msg: Msg) -> None: ...
    async def in_progress(self, msg: Msg) -> None: ...
    async def nak(self, msg: Msg) -> None: ...


class CapacityPuller:
    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        capacity: int,
        *,
        expires_s: float = 5.0,
        level: int = 0,
        event: asyncio.Event | None = None,
    ) -> None:
        """`level`: the priority level the consumer serves, given to its deliveries; `event`:
        one shared with the pullers of the other levels, set by every delivery."""
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be at least 1")
        self.level = level
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._capacity = capacity
        self._expires_s = expires_s
        self._queue: collections.deque[Msg] = collections.deque()
        # Arrival time (loop clock) and requests of each queued message, in step with _queue.
        self._arrivals: collections.deque[float] = collections.deque()
        self._entries: collections.deque[int] = collections.deque()
        self._held_entries = 0
        self._last_entries = 1  # requests in the last message delivered
        self._event = event if event is not None else asyncio.Event()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._closed = False
        # The one outstanding pull request: messages it may still deliver, and when it is
        # given up if the broker says nothing more.
        self._outstanding = 0
        self._outstanding_until_s = 0.0
        self._pending = 0  # messages waiting in the consumer, as of the last delivery

    async def start(self) -> None:
        reconnects_of(self._nc).listen(self._on_reconnect)
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._on_message, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def close(self) -> None:
        """Stop asking; messages delivered but not taken go back to the consumer (NAK)."""
        self._closed = True
        reconnects_of(self._nc).unlisten(self._on_reconnect)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # already closed connection
                pass
        while self._queue:
            await self.nak(self._queue.popleft())
        self._arrivals.clear()
        self._entries.clear()
        self._held_entries = 0
        self._event.set()

    def _on_reconnect(self) -> None:
        """A pull sent on the broken connection died with it (a restarted broker forgot it; one
        on another node of a cluster never heard of it): ask again now, not after its expiry."""
        self._outstanding = 0
        self._event.set()

    # -- deliveries --------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and "Status" in headers and not msg.data:
            if headers.get("Status") != "100":  # 100 is an idle heartbeat
                # 404 no messages (no_wait), 408 expired, 409 refused: the request is over.
                self._outstanding = 0
                self._event.set()
            return
        self._outstanding = max(0, self._outstanding - 1)
        self._pending = pending_after(msg)
        if self._closed:
            await self.nak(msg)
            return
        entries = self._last_entries = entries_of(msg)
        self._queue.append(msg)
        self._arrivals.append(asyncio.get_running_loop().time())
        self._entries.append(entries)
        self._held_entries += entries
        self._event.set()

    async def _pull(self, batch: int, *, expires_s: float | None = None, no_wait: bool = False) -> None:
        request: dict[str, object] = {"batch": batch}
        if no_wait:
            request["no_wait"] = True
        if expires_s is not None:
            request["expires"] = max(1_000_000, int(expires_s * 1e9))
        loop = asyncio.get_running_loop()
        self._outstanding = batch
        self._outstanding_until_s = loop.time() + (expires_s or 0.0) + _GRACE_S
        try:
            await self._nc.publish(self._next_subject, orjson.dumps(request), reply=self._inbox)
        except Exception as exc:  # disconnected: nothing was asked
            self._outstanding = 0
            log.warning("pull request not sent: %s", exc)

    async def _wait(self, timeout_s: float) -> None:
        """Until the next event (a delivery, the end of a request) or `timeout_s`. A linger of
        a fraction of a millisecond is timed by the precise timers: the loop's own would end
        it at once (every caller would spin) or a millisecond late."""
        self._event.clear()
        if timeout_s <= 0:
            return
        timer = None
        if timeout_s < LOOP_TIMER_RESOLUTION_S:
            timer = PRECISE.call_later(timeout_s, asyncio.get_running_loop(), self._event.set)
            timeout_s += LOOP_TIMER_RESOLUTION_S  # the loop's own timer only as a fallback
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            if timer is not None:
                timer.cancel()

    def _expire_lost_request(self) -> None:
        if self._outstanding and asyncio.get_running_loop().time() > self._outstanding_until_s:
            self._outstanding = 0  # the broker forgot it (restart): ask again

    async def _settle(self, until_s: float) -> None:
        """Wait, at most until `until_s`, for the outstanding request to end."""
        loop = asyncio.get_running_loop()
        while self._outstanding and not self._closed and loop.time() < until_s:
            await self._wait(until_s - loop.time())
            self._expire_lost_request()

    # -- taking: the batcher calls these ----------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held(self) -> int:
        """Requests delivered and not yet handed over (a coalesced message holds several)."""
        return self._held_entries

    def _messages_for(self, room: int) -> int:
        """Messages to ask for to fill `room` requests, judged by the last message's size."""
        return max(1, room // self._last_entries)

    @property
    def oldest_arrival_s(self) -> float:
        """Arrival (loop clock) of the oldest message held; only while one is held."""
        return self._arrivals[0]

    async def wait_first(self) -> bool:
        """Hold at least one message: a single-message long-poll, unless one is still
        outstanding. False once the puller is closed."""
        while not self._queue and not self._closed:
            self._expire_lost_request()
            if not self._outstanding:
                await self._pull(1, expires_s=self._expires_s)
            await self._wait(self._expires_s + _GRACE_S)
        return not self._closed

    async def collect_waiting(self, room: int) -> None:
        """Take up to `room` of the messages that already wait, without waiting for more; the
        request has ended when this returns (or was given up after a grace period)."""
        if room <= 0 or self._pending <= 0:
            return
        loop = asyncio.get_running_loop()
        await self._settle(loop.time() + _GRACE_S)
        if not self._outstanding:
            await self._pull(min(self._messages_for(room), self._pending), no_wait=True)
            await self._settle(loop.time() + _GRACE_S)

    async def pull_until(self, room: int, until_s: float) -> None:
        """Ask for up to `room` messages arriving until `until_s` (loop clock), unless a
        request is still outstanding or the time has passed."""
        remaining_s = until_s - asyncio.get_running_loop().time()
        if room > 0 and remaining_s > 0 and not self._outstanding and not self._closed:
            await self._pull(self._messages_for(room), expires_s=remaining_s)

    async def wait_delivery(self, until_s: float) -> None:
        """Wait until the next delivery, the end of the outstanding request, or `until_s`."""
        await self._wait(until_s - asyncio.get_running_loop().time())

    def hand_over(self, room: int, *, at_least_one: bool = True) -> list[Delivery]:
        """The oldest messages held, in arrival order, as many as hold at most `room` requests
        in all (but at least one message, whatever it holds, unless not `at_least_one`)."""
        handed: list[Delivery] = []
        taken = 0
        while self._queue and ((at_least_one and not handed) or taken + self._entries[0] <= room):
            entries = self._entries.popleft()
            taken += entries
            self._held_entries -= entries
            handed.append(Delivery(self._queue.popleft(), self._arrivals.popleft(), self.level))
        return handed

    # -- acknowledgements --------------------------------------------------------------------

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


class LevelPuller:
    """Pull by capacity from the consumers of a model version's priority levels, highest
    level first (the policy is in this module's docstring). `consumers`: (level, consumer
    name), highest priority first."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumers: Sequence[tuple[int, str]],
        capacity: int,
        *,
        expires_s: float = 5.0,
    ) -> None:
        if not consumers:
            raise ValueError("a LevelPuller needs at least one consumer")
        self._event = asyncio.Event()
        self._expires_s = expires_s
        self._levels = [
            CapacityPuller(nc, stream, name, capacity, expires_s=expires_s, level=level, event=self._event)
            for level, name in consumers
        ]
        # The levels asked this round that had nothing waiting.
        self._empty: set[int] = set()

    async def start(self) -> None:
        for puller in self._levels:
            await puller.start()

    async def close(self) -> None:
        for puller in self._levels:
            await puller.close()

    @property
    def capacity(self) -> int:
        return self._levels[0].capacity

    @property
    def closed(self) -> bool:
        return self._levels[0].closed

    @property
    def held(self) -> int:
        return sum(puller.held for puller in self._levels)

    @property
    def oldest_arrival_s(self) -> float:
        return min(puller.oldest_arrival_s for puller in self._levels if puller.held)

    async def _probe(self, index: int, messages: int) -> bool:
        """Ask level `index` for up to `messages` that wait (no_wait); whether any came."""
        puller = self._levels[index]
        before = puller.held
        await puller._pull(messages, no_wait=True)
        await puller._settle(asyncio.get_running_loop().time() + _GRACE_S)
        if puller.held > before:
            return True
        self._empty.add(index)
        return False

    async def wait_first(self) -> bool:
        """Hold at least one message, of the highest level that has one waiting; with none
        anywhere, a long-poll on each level that has none outstanding. False once closed."""
        self._empty.clear()
        while not self.closed:
            for index, puller in enumerate(self._levels):
                if puller.held:
                    break  # nothing below it goes first
                puller._expire_lost_request()
                if not puller._outstanding and await self._probe(index, 1):
                    break
            if self.held:
                return True
            for puller in self._levels:
                if not puller._outstanding:
                    await puller._pull(1, expires_s=self._expires_s)
            await self._levels[0]._wait(self._expires_s + _GRACE_S)
        return False

    async def collect_waiting(self, room: int) -> None:
        """Fill `room` requests from the levels in order, each asked (no_wait) for what is left;
        a level with a pull outstanding has nothing waiting (it would have been delivered), nor
        one found empty this round."""
        limit = room + self.held  # the room counts from what was held when asked
        for index, puller in enumerate(self._levels):
            left = limit - self.held
            if left <= 0 or self.closed:
                return
            puller._expire_lost_request()
            if puller._outstanding or index in self._empty:
                continue
            await self._probe(index, puller._messages_for(left))

    async def pull_until(self, room: int, until_s: float) -> None:
        for puller in self._levels:
            await puller.pull_until(room, until_s)

    async def wait_delivery(self, until_s: float) -> None:
        await self._levels[0].wait_delivery(until_s)

    def hand_over(self, room: int) -> list[Delivery]:
        """What is held, highest level first, as many as hold at most `room` requests (but at
        least one message)."""
        handed: list[Delivery] = []
        taken = 0
        for puller in self._levels:
            part = puller.hand_over(room - taken, at_least_one=not handed)
            taken += sum(entries_of(delivery.msg) for delivery in part)
            handed.extend(part)
        return handed

    async def ack(self, msg: Msg) -> None:
        await self._levels[0].ack(msg)

    async def in_progress(self, msg: Msg) -> None:
        await self._levels[0].in_progress(msg)

    async def nak(self, msg: Msg) -> None:
        await self._levels[0].nak(msg)
