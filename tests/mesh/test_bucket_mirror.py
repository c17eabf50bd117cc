"""broker.mirror.BucketMirror against a real bucket: what the gateway, router and workers see."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from broker import jetstream
from broker.mirror import LAG_CHECK_S, BucketMirror, OnChange
from broker.server import EmbeddedNatsServer
from tests.harness import wait_until_async


@contextlib.asynccontextmanager
async def followed(
    nats_server: EmbeddedNatsServer, mirror: BucketMirror[int], on_change: OnChange[int] | None = None
) -> AsyncIterator[tuple[Client, str, KeyValue]]:
    """A connection, a fresh bucket holding a=1, and `mirror` following it once synced; the
    follow is cancelled, and the connection closed, at the end."""
    nc = await jetstream.connect(nats_server.url, name="test-mirror")
    try:
        bucket = f"mirror_{uuid.uuid4().hex[:8]}"
        kv = await jetstream.ensure_bucket(nc.jetstream(), bucket)
        await kv.put("a", b"1")
        follow = asyncio.create_task(mirror.follow(kv, on_change))
        try:
            await asyncio.wait_for(mirror.synced.wait(), 5)
            yield nc, bucket, kv
        finally:
            follow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follow
    finally:
        await jetstream.close_connection(nc)


def numbers(lag_check_s: float = LAG_CHECK_S) -> BucketMirror[int]:
    return BucketMirror("number", lambda data: int(data.decode()), lag_check_s=lag_check_s)


async def test_a_mirror_holds_current_values_reports_each_change_and_skips_malformed_ones(
    nats_server: EmbeddedNatsServer,
) -> None:
    changes: asyncio.Queue[tuple[str, int | None, int | None]] = asyncio.Queue()

    async def on_change(key: str, before: int | None, after: int | None) -> None:
        await changes.put((key, before, after))

    mirror = numbers()
    async with followed(nats_server, mirror, on_change) as (_, _, kv):
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


async def _drop_watch_consumers(nc: Client, bucket: str) -> int:
    """Delete the bucket's watch consumers behind their clients' backs, as a cluster node that
    dies with them does while the clients stay connected to other nodes."""
    jsm = nc.jsm()
    consumers = await jsm.consumers_info(f"KV_{bucket}")
    for consumer in consumers:
        await jsm.delete_consumer(f"KV_{bucket}", consumer.name)
    return len(consumers)


async def test_a_watch_that_falls_behind_its_bucket_is_opened_again(nats_server: EmbeddedNatsServer) -> None:
    """The watch's consumer is gone and the connection never noticed: the mirror sees the
    bucket move on without it and watches again, long before nats-py's own replacement (two
    missed idle heartbeats, 10 s) would."""
    mirror = numbers(lag_check_s=0.3)
    async with followed(nats_server, mirror) as (nc, bucket, kv):
        # Changes the watch delivers are no lag, however many the checks see.
        for n in range(2, 12):
            await kv.put("a", str(n).encode())
            await asyncio.sleep(0.1)
        await wait_until_async(lambda: mirror.values == {"a": 11}, 5, "the puts delivered")
        assert (mirror.lagged, mirror.rewatches) == (0, 0)
        assert mirror.live

        assert await _drop_watch_consumers(nc, bucket) == 1
        await kv.put("b", b"2")
        await kv.put("a", b"12")
        # Within a few checks, far sooner than nats-py's 10 s.
        await wait_until_async(lambda: mirror.values == {"a": 12, "b": 2}, 5, "the watch opened again")
        assert mirror.lagged == mirror.rewatches == 1


async def test_the_bucket_says_whether_a_key_was_written_since_the_mirror_saw_it(
    nats_server: EmbeddedNatsServer,
) -> None:
    """What the router asks before it counts a worker dead whose heartbeats it has not seen."""
    # Checks far apart: the watch stays behind for the whole test.
    mirror = numbers(lag_check_s=600)
    async with followed(nats_server, mirror) as (nc, bucket, kv):
        await kv.put("quiet", b"1")
        await wait_until_async(lambda: "quiet" in mirror.values, 5, "quiet seen")
        await _drop_watch_consumers(nc, bucket)
        await kv.put("a", b"2")
        await asyncio.sleep(0.3)
        assert mirror.values == {"a": 1, "quiet": 1}, "the watch should be behind"
        assert await mirror.written_since_seen(kv, "a") is True
        assert await mirror.written_since_seen(kv, "quiet") is False
        assert await mirror.written_since_seen(kv, "never") is False
        await kv.delete("quiet")
        assert await mirror.written_since_seen(kv, "quiet") is False
