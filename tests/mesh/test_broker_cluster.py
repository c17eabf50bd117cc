"""broker.cluster.EmbeddedNatsCluster: three real nats-servers forming one JetStream cluster,
replicated streams and buckets, a node SIGKILLed under load losing no acknowledged message, and
the node restarted catching up on what it missed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator, Iterable

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType

from broker.cluster import EmbeddedNatsCluster
from broker.server import BrokerPortInUse, ServerOptions, port_answers
from tests.harness import wait_until_async

pytestmark = pytest.mark.mesh

# Failing over a stream leader takes a few seconds (an election among the replicas left), in
# which publishes time out or find no stream: a publisher retries, under the same message id
# so that JetStream's dedupe window stores a retried message once.
PUBLISH_TIMEOUT_S = 1.0
RETRY_PAUSE_S = 0.1
PUBLISH_DEADLINE_S = 20.0


@pytest.fixture
async def cluster() -> AsyncIterator[EmbeddedNatsCluster]:
    async with EmbeddedNatsCluster(3) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def connected(servers: str | list[str]) -> AsyncIterator[Client]:
    nc = await nats.connect(
        servers,
        connect_timeout=2,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        dont_randomize=True,  # the first server named is the one connected to
    )
    try:
        yield nc
    finally:
        await nc.close()


async def publish_acked(js: JetStreamContext, subject: str, ids: Iterable[int], acked: set[int]) -> None:
    """Publish each id until JetStream acknowledges it, adding it to `acked` then."""
    loop = asyncio.get_running_loop()
    for i in ids:
        deadline = loop.time() + PUBLISH_DEADLINE_S
        while True:
            try:
                await js.publish(
                    f"{subject}.{i}",
                    str(i).encode(),
                    timeout=PUBLISH_TIMEOUT_S,
                    headers={"Nats-Msg-Id": str(i)},
                )
            except (nats.errors.Error, TimeoutError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S)
            else:
                acked.add(i)
                break


async def read_all(js: JetStreamContext, stream: str, subject: str, count: int) -> set[int]:
    """The ids of the first `count` messages of `stream`, through a pull consumer. The
    consumer's creation, and a fetch, may wait out an election (after a node's death, and for
    a new replicated consumer's first leader, when a fetch finds no responder: a 503): both
    are asked again (a durable's creation is idempotent)."""
    reader = await wait_until_async(
        lambda: js.pull_subscribe(f"{subject}.>", durable="reader", stream=stream), 20, "a consumer"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    seen: set[int] = set()
    read = 0
    while read < count:
        try:
            messages = await reader.fetch(min(100, count - read), timeout=2)
        except (TimeoutError, nats.js.errors.ServiceUnavailableError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        for message in messages:
            seen.add(int(message.data))
            read += 1
            await message.ack()
    await reader.unsubscribe()
    return seen


async def leader_index(js: JetStreamContext, cluster: EmbeddedNatsCluster, stream: str) -> int:
    info = await js.stream_info(stream)
    assert info.cluster is not None and info.cluster.leader is not None
    return cluster.server_names.index(info.cluster.leader)


async def test_a_three_node_cluster_serves_an_r3_memory_stream_and_an_r3_bucket(
    cluster: EmbeddedNatsCluster,
) -> None:
    assert len(cluster.urls) == 3 and cluster.url == ",".join(cluster.urls)
    async with connected(cluster.urls) as nc:
        js = nc.jetstream()
        await js.add_stream(name="R3", subjects=["r3.>"], storage=StorageType.MEMORY, num_replicas=3)
        # Retried: a stream just created may find no responder for a moment, while its
        # leader's interest in its subjects reaches the node this connection is on.
        await publish_acked(js, "r3", range(20), set())
        info = await js.stream_info("R3")
        assert info.state.messages == 20
        assert info.cluster is not None and info.cluster.leader in cluster.server_names
        assert len(info.cluster.replicas or []) == 2  # beside the leader
        assert await read_all(js, "R3", "r3", 20) == set(range(20))

        kv = await js.create_key_value(bucket="SETTINGS", replicas=3, storage=StorageType.MEMORY)
        first = await wait_until_async(lambda: kv.put("log.level", b"info"), 10, "a first put")
        await kv.update("log.level", b"debug", last=first)
        entry = await kv.get("log.level")
        assert entry.value == b"debug" and entry.revision == first + 1
        assert len((await js.stream_info("KV_SETTINGS")).cluster.replicas or []) == 2  # type: ignore[union-attr]

    # Each node on its own serves the same data: JetStream answers through any of them.
    for url in cluster.urls:
        async with connected(url) as nc:
            assert (await nc.jetstream().stream_info("R3")).state.messages == 20
            assert (await (await nc.jetstream().key_value("SETTINGS")).get("log.level")).value == b"debug"


async def test_acked_messages_survive_the_stream_leader_sigkilled_under_load(
    cluster: EmbeddedNatsCluster,
) -> None:
    total, publishers = 300, 6
    async with connected(cluster.urls) as nc:
        js = nc.jetstream()
        await js.add_stream(name="LOAD", subjects=["load.>"], storage=StorageType.MEMORY, num_replicas=3)
        victim = await leader_index(js, cluster, "LOAD")
    others = [url for i, url in enumerate(cluster.urls) if i != victim]
    # Connected to the leader's node: its death takes the connection and the stream leader.
    async with connected([cluster.urls[victim], *others]) as nc:
        js = nc.jetstream()
        acked: set[int] = set()
        tasks = [
            asyncio.create_task(publish_acked(js, "load", range(k, total, publishers), acked))
            for k in range(publishers)
        ]
        try:
            await wait_until_async(lambda: len(acked) >= total // 3, 20, "a third of the messages acked")
            assert await cluster.kill(victim) == -signal.SIGKILL
            await asyncio.wait_for(asyncio.gather(*tasks), PUBLISH_DEADLINE_S + 5)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert acked == set(range(total))
        stored = (await js.stream_info("LOAD")).state.messages
        seen = await read_all(js, "LOAD", "load", stored)
    assert not acked - seen, f"acked but lost: {sorted(acked - seen)[:20]}"


async def test_a_restarted_node_rejoins_and_catches_up_on_what_it_missed(
    cluster: EmbeddedNatsCluster,
) -> None:
    async with connected(cluster.urls) as nc:
        js = nc.jetstream()
        await js.add_stream(name="CATCH", subjects=["catch.>"], storage=StorageType.MEMORY, num_replicas=3)
        acked: set[int] = set()
        await publish_acked(js, "catch", range(100), acked)
        victim = await leader_index(js, cluster, "CATCH")
        name = cluster.server_names[victim]

        exited = asyncio.create_task(cluster.wait_any_exit())
        await cluster.kill(victim)
        assert await asyncio.wait_for(exited, 10) == (victim, -signal.SIGKILL)
        await publish_acked(js, "catch", range(100, 300), acked)  # while it is down
        stored = (await js.stream_info("CATCH")).state.messages
        assert stored >= 300

        await cluster.restart(victim)
        await cluster.wait_jetstream()

        async def caught_up() -> bool:
            info = await js.stream_info("CATCH")
            assert info.cluster is not None
            peers = {peer.name: peer for peer in info.cluster.replicas or []}
            return info.cluster.leader == name or (
                name in peers and bool(peers[name].current) and not peers[name].offline
            )

        await wait_until_async(caught_up, 20, f"{name} current on CATCH", interval_s=0.2)

        # Stream info is answered by the stream's leader, wherever it is asked: only with the
        # restarted node as leader does its own copy answer.
        async def led_by_the_restarted_node() -> bool:
            if await leader_index(js, cluster, "CATCH") == victim:
                return True
            await nc.request(
                "$JS.API.STREAM.LEADER.STEPDOWN.CATCH",
                json.dumps({"placement": {"preferred": name}}).encode(),
                timeout=5,
            )
            return False

        await wait_until_async(led_by_the_restarted_node, 20, f"{name} leading CATCH", interval_s=0.5)

    async with connected(cluster.urls[victim]) as nc:
        js = nc.jetstream()
        assert (await js.stream_info("CATCH")).state.messages == stored
        assert acked <= await read_all(js, "CATCH", "catch", stored)


def _three_free_ports_in_a_row() -> int:
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            try:
                for offset in (1, 2):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", base + offset))
            except OSError:
                continue
            return int(base)
    raise RuntimeError("no three free ports in a row")


async def test_a_cluster_whose_port_is_taken_is_refused_naming_it_and_leaves_no_node() -> None:
    base = _three_free_ports_in_a_row()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base))
        squatter.listen()
        cluster = EmbeddedNatsCluster(3, ServerOptions(port=base))
        with pytest.raises(BrokerPortInUse, match=str(base)):
            await cluster.start()
        assert cluster.urls == []
    assert not await port_answers("127.0.0.1", base + 1)
    assert not await port_answers("127.0.0.1", base + 2)
