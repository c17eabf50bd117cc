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

from broker.jetstream import follow_bucket

log = logging.getLogger(__name__)

T = TypeVar("T")

# key, the value before (None: new key), the value now (None: deleted)
OnChange = Callable[[str, T | None, T | None], Awaitable[None]]


class BucketMirror(Generic[T]):
    """`mirror.values` after `await mirror.follow(kv)` has delivered `mirror.synced`."""

    def __init__(self, what: str, decode: Callable[[bytes], T]) -> None:
        self._what = what
        self._decode = decode
        self.values: dict[str, T] = {}
        # Set once the bucket's values at the start of the watch are all in.
        self.synced = asyncio.Event()

    async def follow(self, kv: KeyValue, on_change: OnChange[T] | None = None) -> None:
        """Follow `kv` until cancelled (an essential task of the owner: a mirror that stopped
        following would answer from a stale picture for ever)."""
        async for change in follow_bucket(kv):
            if change is None:
                self.synced.set()
                continue
            before = self.values.get(change.key)
            if change.value is None:
                self.values.pop(change.key, None)
                after = None
            else:
                try:
                    after = self._decode(change.value)
                except (KeyError, ValueError, TypeError) as exc:
                    log.warning("ignoring malformed %s %s: %s", self._what, change.key, exc)
                    continue
                self.values[change.key] = after
            if on_change is not None:
                await on_change(change.key, before, after)
