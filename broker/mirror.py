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

from nats.js.errors import KeyNotFoundError
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
# How often a watch is checked against its bucket. A watch's consumer can die without the
# connection noticing (in a cluster, with the node that held it, while this client stays on
# another node); nats-py replaces it only after two missed idle heartbeats (10 s), and once
# only, however the replacement fares. A watch that has not delivered, a whole check later, a
# change the bucket already held is opened again instead.
LAG_CHECK_S = 2.0
_PROBE_TIMEOUT_S = 2.0


class BucketMirror(Generic[T]):
    """`mirror.values` after `await mirror.follow(kv)` has delivered `mirror.synced`."""

    def __init__(
        self,
        what: str,
        decode: Callable[[bytes], T],
        grace_s: float = RESYNC_GRACE_S,
        lag_check_s: float = LAG_CHECK_S,
    ) -> None:
        self._what = what
        self._decode = decode
        self._grace_s = grace_s
        self._lag_check_s = lag_check_s
        self.values: dict[str, T] = {}
        # The bytes behind each value: a watch opened again after a reconnect re-delivers every
        # key, and only a key whose bytes differ is a change.
        self._raw: dict[str, bytes] = {}
        # The revision of each key as last delivered, and the highest delivered by this watch.
        self._revisions: dict[str, int] = {}
        self._delivered = 0
        # Set once the bucket's values at the start of the watch are all in.
        self.synced = asyncio.Event()
        # True while a watch is open and has caught up with the bucket: what the mirror lacks
        # then is truly missing, not only not seen yet.
        self.live = False
        # Changes reach the owner one at a time, from the watch or from a delayed deletion.
        self._lock = asyncio.Lock()
        self.rewatches = 0
        self.lagged = 0

    async def follow(
        self, kv: KeyValue, on_change: OnChange[T] | None = None, reconnects: Reconnects | None = None
    ) -> None:
        """Follow `kv` until cancelled (an essential task of the owner: a mirror that stopped
        following would answer from a stale picture for ever). The watch is opened again, and
        the mirror reconciled with what the bucket holds then, when it falls behind the bucket
        and, with `reconnects`, after each reconnect of the connection."""
        epoch = reconnects.count if reconnects is not None else 0
        rewatch = False
        while True:
            self.live = False
            watching = asyncio.ensure_future(self._watch(kv, on_change, rewatch))
            lagging = asyncio.ensure_future(self._lagging(kv))
            waits = [watching, lagging]
            if reconnects is not None:
                waits.append(asyncio.ensure_future(reconnects.wait_after(epoch)))
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.live = False
                await cancel_and_wait(waits, 2.0)
            reconnected = reconnects is not None and waits[2] in done
            if watching in done and not reconnected:
                exc = watching.exception()
                if reconnects is None:
                    raise exc or RuntimeError(f"the {self._what} watch ended")
                # The watch ended by itself. Around a disconnect that is the connection's doing,
                # and the reconnect follows: wait a little for it. Otherwise the owner must see.
                try:
                    await asyncio.wait_for(reconnects.wait_after(epoch), _ENDED_WATCH_WAIT_S)
                except TimeoutError:
                    raise (exc or RuntimeError(f"the {self._what} watch ended")) from None
            elif lagging in done and not reconnected:
                self.lagged += 1
            if reconnects is not None:
                epoch = reconnects.count
            rewatch = True
            self.rewatches += 1

    async def _lagging(self, kv: KeyValue) -> None:
        """Return once the watch has missed a change: the bucket held it a whole check ago, and
        the watch has still not delivered it. A check that cannot reach the bucket tells nothing;
        one after a watch that delivered since the last check and is not behind does not ask
        (the workers bucket, written every heartbeat, costs the broker nothing while it flows)."""
        behind_at: int | None = None
        seen = self._delivered
        while True:
            await asyncio.sleep(self._lag_check_s)
            moving, seen = self._delivered > seen, self._delivered
            if not self.live or (moving and (behind_at is None or self._delivered >= behind_at)):
                behind_at = None
                continue
            try:
                status = await asyncio.wait_for(kv.status(), _PROBE_TIMEOUT_S)
                last = status.stream_info.state.last_seq
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker is away or a cluster is electing: nothing to compare
                behind_at = None
                continue
            if behind_at is not None and self._delivered < behind_at:
                log.warning(
                    "%s watch fell behind its bucket (revision %d delivered, %d stored): opening it again",
                    self._what,
                    self._delivered,
                    behind_at,
                )
                return
            behind_at = last if last > self._delivered else None

    async def written_since_seen(self, kv: KeyValue, key: str) -> bool | None:
        """Whether the bucket holds a newer revision of `key` than the mirror last saw (a watch
        behind its bucket); None when the bucket cannot be read now."""
        try:
            entry = await asyncio.wait_for(kv.get(key), _PROBE_TIMEOUT_S)
        except KeyNotFoundError:
            return False
        except asyncio.CancelledError:
            raise
        except Exception:
            return None
        return (entry.revision or 0) != self._revisions.get(key, 0)

    async def _watch(self, kv: KeyValue, on_change: OnChange[T] | None, rewatch: bool) -> None:
        # A broker that came back empty numbers its revisions from 1 again.
        self._delivered = 0
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
                    self.live = synced
                    change = await anext(stream)
            finally:
                if drops is not None:
                    await cancel_and_wait([drops], 2.0)
                await stream.aclose()
        async for change in follow_bucket(kv):
            if change is None:
                self.synced.set()
                self.live = True
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
            self._delivered = max(self._delivered, change.revision)
            before = self.values.get(change.key)
            if change.value is None:
                self.values.pop(change.key, None)
                self._raw.pop(change.key, None)
                self._revisions.pop(change.key, None)
                after = None
                if before is None:
                    return
            else:
                self._revisions[change.key] = change.revision
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
