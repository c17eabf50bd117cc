"""Surviving the broker: what each service does when its NATS connection comes back.

nats-py reconnects on its own (to the same server after a restart, or to another node of a
cluster), and resubscribes core subscriptions. What it does not bring back is the JetStream
state a service relies on: a broker that restarted with memory storage has lost the work queue,
its consumers and the KV buckets, and even one that kept them (file storage, a cluster) has
dropped the ephemeral consumers behind KV watches. So every reconnect starts a new *epoch*:

- each service re-asserts what it owns (`reassert_after_reconnects`): the router the stream,
  the consumers and every model record; a worker its report; everyone the buckets they use;
- each KV mirror watches its bucket again (broker/mirror.py), reconciling what it had with what
  it finds, so nothing loaded is reloaded when the records come back unchanged;
- the owner learns whether the state was lost (the streams are gone or were made anew), so the
  gateway can fail at once the requests the broker forgot instead of letting them wait out their
  deadlines.

No process restarts: a restart would throw away loaded models and every connection in flight.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import NoReturn

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from broker.subjects import Subjects

log = logging.getLogger(__name__)

# A re-assertion that fails (the broker is still coming back, a cluster still electing) is
# tried again after this, doubling up to _RETRY_MAX_S.
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 2.0


class Reconnects:
    """The epochs of one connection: `count` goes up on every reconnect; `wait_after(n)` returns
    once it is past `n`."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()
        self._listeners: set[Callable[[], None]] = set()

    def bump(self) -> None:
        self.count += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in list(self._listeners):
            listener()

    def listen(self, listener: Callable[[], None]) -> None:
        """Call `listener` (at once, in the loop, without awaiting) on every reconnect, until
        `unlisten`: for what must not wait for its next turn, like a pull the broker forgot."""
        self._listeners.add(listener)

    def unlisten(self, listener: Callable[[], None]) -> None:
        self._listeners.discard(listener)

    async def wait_after(self, count: int) -> None:
        while self.count <= count:
            await self._changed.wait()


# One per client made by broker.jetstream.connect, which bumps it from nats-py's reconnected
# callback. A client made elsewhere gets one that never moves: nothing is re-asserted for it.
_RECONNECTS: weakref.WeakKeyDictionary[Client, Reconnects] = weakref.WeakKeyDictionary()


def reconnects_of(nc: Client) -> Reconnects:
    found = _RECONNECTS.get(nc)
    if found is None:
        found = _RECONNECTS[nc] = Reconnects()
    return found


async def _stream_identities(nc: Client, subjects: Subjects) -> dict[str, datetime | None]:
    """Each state stream's creation time (None: missing): a stream made anew after a restart
    that lost it has a later one."""
    js = nc.jetstream()
    identities: dict[str, datetime | None] = {}
    for stream in subjects.state_streams:
        try:
            identities[stream] = (await asyncio.wait_for(js.stream_info(stream), 2.0)).created
        except NotFoundError:
            identities[stream] = None
    return identities


# reassert(lost): re-create and re-publish what the owner owns; `lost` says the broker came
# back without (some of) the mesh's state.
Reassert = Callable[[bool], Awaitable[None]]


async def reassert_after_reconnects(
    nc: Client, subjects: Subjects, owner: str, reassert: Reassert
) -> NoReturn:
    """An essential task of every service: after each reconnect, call `reassert` until it
    succeeds, telling it whether the state streams were lost meanwhile.

    The streams' identities are read at start and after each successful re-assertion (which
    may itself have made them anew); a reconnect that finds a stream missing or made anew since
    means the broker forgot the state, and requests it had queued."""
    reconnects = reconnects_of(nc)
    known = await _stream_identities(nc, subjects)
    seen = reconnects.count
    while True:
        await reconnects.wait_after(seen)
        seen = reconnects.count
        delay_s = _RETRY_FIRST_S
        lost: bool | None = None
        while True:
            try:
                if lost is None:
                    now = await _stream_identities(nc, subjects)
                    lost = any(now[stream] is None or now[stream] != known.get(stream) for stream in now)
                await reassert(lost)
                known = await _stream_identities(nc, subjects)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info(
                    "%s: state not re-asserted yet after reconnecting (%r); again in %.1f s",
                    owner,
                    exc,
                    delay_s,
                )
            await asyncio.sleep(delay_s)
            delay_s = min(_RETRY_MAX_S, delay_s * 2)
        log.info(
            "%s: broker state re-asserted after reconnect %d%s",
            owner,
            seen,
            " (the broker had lost it)" if lost else "",
        )
