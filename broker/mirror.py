"""A KV bucket mirrored into a dict: every key's current value, decoded, kept current by a watch.

The gateway's model view and fleet view, the router's view of the workers and a worker's view of
the models all read a bucket this way. The mirror decodes each value once, skips (and logs) a
malformed one instead of ending the watch, and calls the owner back with the old and new value
of each change, so an owner that acts on changes (the router placing models, a worker loading
them) needs no dict of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.js.kv import KeyValue

from broker.jetstream import BucketChange, follow_bucket
from broker.recovery import Reconnects
from natron.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

# key, the value before (None: new key), the value now (None: deleted)
OnChange = Callable[[str, T | None, T | None], Awaitable[None]]


# After a reconnect, a key the new watch does not find is kept this long before it counts as
# deleted: a broker that lost its state is empty until the owners re-publish (the router its
# records at once, the workers their reports within a heartbeat), and a worker must not unload
# a model only because its record was briefly missing.
RESYNC_GRACE_S = 10.0
# A watch that cannot be opened again yet (the broker still coming back) is retried after this.
_REWATCH_S = 0.5
# A watch that ends by itself is an error, unless a reconnect follows within this long.
_ENDED_WATCH_WAIT_S = 10.0


class BucketMirror(Generic[T]):
    """`mirror.values` after `await mirror.follow(kv)` has delivered `mirror.synced`."""

    def __init__(self, what: str, decode: Callable[[bytes], T], grace_s: float = RESYNC_GRACE_S) -> None:
        self._what = what
        self._decode = decode
        self._grace_s = grace_s
        self.values: dict[str, T] = {}
        # The bytes behind each value: a watch opened again after a reconnect re-delivers every
        # key, and only a key whose bytes differ is a change.
        self._raw: dict[str, bytes] = {}
        # Set once the bucket's values at the start of the watch are all in.
        self.synced = asyncio.Event()
        # Changes reach the owner one at a time, from the watch or from a delayed deletion.
        self._lock = asyncio.Lock()
        self.rewatches = 0

    async def follow(
        self, kv: KeyValue, on_change: OnChange[T] | None = None, reconnects: Reconnects | None = None
    ) -> None:
        """Follow `kv` until cancelled (an essential task of the owner: a mirror that stopped
        following would answer from a stale picture for ever). With `reconnects`, the watch is
        opened again after each reconnect of the connection, and the mirror reconciled with
        what the bucket holds then."""
        epoch = reconnects.count if reconnects is not None else 0
        rewatch = False
        while True:
            watching = asyncio.ensure_future(self._watch(kv, on_change, rewatch))
            if reconnects is None:
                await watching
                raise RuntimeError(f"the {self._what} watch ended")
            reconnected = asyncio.ensure_future(reconnects.wait_after(epoch))
            try:
                await asyncio.wait((watching, reconnected), return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait([watching, reconnected], 2.0)
            if reconnected.cancelled():
                # The watch ended by itself. Around a disconnect that is the connection's doing,
                # and the reconnect follows: wait a little for it. Otherwise the owner must see.
                exc = watching.exception() if not watching.cancelled() else None
                try:
                    await asyncio.wait_for(reconnects.wait_after(epoch), _ENDED_WATCH_WAIT_S)
                except TimeoutError:
                    raise (exc or RuntimeError(f"the {self._what} watch ended")) from None
            epoch = reconnects.count
            rewatch = True
            self.rewatches += 1

    async def _watch(self, kv: KeyValue, on_change: OnChange[T] | None, rewatch: bool) -> None:
        if rewatch:
            while True:  # the bucket may not be back yet: its owner re-creates it
                try:
                    stream = follow_bucket(kv)
                    first = await anext(stream)
                    break
                except (asyncio.CancelledError, StopAsyncIteration):
                    raise
                except Exception as exc:
                    log.info("%s watch not opened again yet: %r", self._what, exc)
                    await asyncio.sleep(_REWATCH_S)
            seen: set[str] = set()
            drops: asyncio.Task[None] | None = None
            synced = False
            try:
                change: BucketChange | None = first
                while True:
                    if change is None:
                        missing = set(self.values) - seen
                        if missing and drops is None:
                            drops = asyncio.ensure_future(self._drop_later(missing, seen, on_change))
                    else:
                        seen.add(change.key)
                        # Until the watch has caught up, the same bytes again are no change.
                        await self._apply(change, on_change, same_is_no_change=not synced)
                    synced = synced or change is None
                    change = await anext(stream)
            finally:
                if drops is not None:
                    await cancel_and_wait([drops], 2.0)
                await stream.aclose()
        async for change in follow_bucket(kv):
            if change is None:
                self.synced.set()
                continue
            await self._apply(change, on_change)

    async def _drop_later(self, missing: set[str], seen: set[str], on_change: OnChange[T] | None) -> None:
        """Keys the watch opened again did not find: deleted, unless they come back within the
        grace period."""
        await asyncio.sleep(self._grace_s)
        for key in sorted(missing - seen):
            if key in self.values:
                log.info("%s %s is gone from the bucket since the broker came back", self._what, key)
                await self._apply(BucketChange(key, None), on_change)

    async def _apply(
        self, change: BucketChange, on_change: OnChange[T] | None, same_is_no_change: bool = False
    ) -> None:
        async with self._lock:
            before = self.values.get(change.key)
            if change.value is None:
                self.values.pop(change.key, None)
                self._raw.pop(change.key, None)
                after = None
                if before is None:
                    return
            else:
                if same_is_no_change and self._raw.get(change.key) == change.value:
                    return  # what the mirror had before the reconnect
                try:
                    after = self._decode(change.value)
                except (KeyError, ValueError, TypeError) as exc:
                    log.warning("ignoring malformed %s %s: %s", self._what, change.key, exc)
                    return
                self.values[change.key] = after
                self._raw[change.key] = change.value
            if on_change is not None:
                await on_change(change.key, before, after)
