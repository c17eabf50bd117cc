"""broker.mirror.BucketMirror against a real bucket: what the gateway, router and workers see."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from broker import jetstream
from broker.mirror import BucketMirror
from broker.server import EmbeddedNatsServer


async def test_a_mirror_holds_current_values_reports_each_change_and_skips_malformed_ones(
    nats_server: EmbeddedNatsServer,
) -> None:
    nc = await jetstream.connect(nats_server.url, name="test-mirror")
    try:
        kv = await jetstream.ensure_bucket(nc.jetstream(), f"mirror_{uuid.uuid4().hex[:8]}")
        await kv.put("a", b"1")
        mirror: BucketMirror[int] = BucketMirror("number", lambda data: int(data.decode()))
        changes: asyncio.Queue[tuple[str, int | None, int | None]] = asyncio.Queue()

        async def on_change(key: str, before: int | None, after: int | None) -> None:
            await changes.put((key, before, after))

        follow = asyncio.create_task(mirror.follow(kv, on_change))
        try:
            await asyncio.wait_for(mirror.synced.wait(), 5)
            assert mirror.values == {"a": 1}
            assert await asyncio.wait_for(changes.get(), 5) == ("a", None, 1)
            await kv.put("a", b"2")
            assert await asyncio.wait_for(changes.get(), 5) == ("a", 1, 2)
            # A malformed value is skipped: the watch goes on, and the old value stays.
            await kv.put("a", b"not a number")
            await kv.put("b", b"3")
            assert await asyncio.wait_for(changes.get(), 5) == ("b", None, 3)
            assert mirror.values == {"a": 2, "b": 3}
            await kv.delete("a")
            assert await asyncio.wait_for(changes.get(), 5) == ("a", 2, None)
            assert mirror.values == {"b": 3}
            assert changes.empty()
        finally:
            follow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follow
    finally:
        await jetstream.close_connection(nc)
