"""The broker layer against a real nats-server: queue bounds, deadlines, sizes, and pulling
by capacity."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from broker import jetstream
from broker.puller import CapacityPuller
from broker.requester import Requester
from broker.server import EmbeddedNatsServer
from broker.subjects import Subjects
from natron.errors import DeadlineExceeded, PayloadTooLarge, Unavailable
from natron.inference import InferRequest, Tensor
from tests.harness import wait_until_async
from workers.batcher import Batcher, BatchPolicy


@pytest.fixture
async def nc(nats_server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    client = await jetstream.connect(nats_server.url, name="test")
    yield client
    await client.close()


@pytest.fixture
def subjects() -> Subjects:
    # A prefix per test keeps streams and consumers of different tests apart on one server.
    return Subjects(f"t{uuid.uuid4().hex[:8]}")


def request(i: int, size: int = 4) -> InferRequest:
    data = np.full((1, size), i, dtype=np.float32)
    return InferRequest(str(i), "m", "1", [Tensor("INPUT0", "FP32", (1, size), data)])


async def _queued(js: JetStreamContext, subjects: Subjects, count: int) -> bool:
    return (await js.stream_info(subjects.stream)).state.messages == count


async def test_a_full_queue_is_refused_at_once_with_503(nc: Client, subjects: Subjects) -> None:
    js = nc.jetstream()
    await jetstream.configure_stream(js, subjects, jetstream.QueuePolicy(max_queued_per_version=2))
    async with Requester(nc, subjects) as requester:
        # Two requests fill the queue (nobody consumes); they stay waiting for an answer.
        waiting = [asyncio.create_task(requester.infer(request(i), "1", 30.0)) for i in range(2)]
        await wait_until_async(lambda: _queued(js, subjects, 2), 5, "both requests queued")
        with pytest.raises(Unavailable, match="full"):
            await requester.infer(request(3), "1", 30.0)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert requester.in_flight == 0


async def test_a_request_without_a_stream_is_503_once_the_failover_window_is_over(
    nc: Client, subjects: Subjects
) -> None:
    """Nobody to store it is passing in a cluster electing a leader, so the requester publishes
    again for a while (FAILOVER_RETRY_S), then answers 503 with the reason."""
    async with Requester(nc, subjects, failover_retry_s=0.5) as requester:
        with pytest.raises(Unavailable, match="no inference queue"):
            await requester.infer(request(1), "1", 30.0)
        assert requester.in_flight == 0


async def test_a_request_nobody_takes_ends_at_its_deadline(nc: Client, subjects: Subjects) -> None:
    await jetstream.configure_stream(nc.jetstream(), subjects, jetstream.QueuePolicy())
    async with Requester(nc, subjects) as requester:
        with pytest.raises(DeadlineExceeded, match="timed out"):
            await requester.infer(request(1), "1", 0.3)
        assert requester.in_flight == 0


async def test_a_request_over_max_payload_is_413_before_publishing(nc: Client, subjects: Subjects) -> None:
    async with Requester(nc, subjects) as requester:
        too_big = request(1, size=nc.max_payload // 4 + 16)
        with pytest.raises(PayloadTooLarge, match="max_payload"):
            await requester.infer(too_big, "1", 5.0)


async def test_a_puller_takes_no_more_than_its_capacity(nc: Client, subjects: Subjects) -> None:
    js = nc.jetstream()
    policy = jetstream.QueuePolicy()
    await jetstream.configure_stream(js, subjects, policy)
    consumer = await jetstream.configure_consumer(js, subjects, "m", "1", policy)
    for i in range(20):
        await js.publish(subjects.infer("m", "1"), str(i).encode())
    puller = CapacityPuller(nc, subjects.stream, consumer, capacity=4)
    await puller.start()
    batcher = Batcher(puller, BatchPolicy(max_items=4, enough=4, max_queue_delay_s=0.0, max_rows=4))
    try:
        batch = [d.msg for d in await batcher.next()]
        assert 1 <= len(batch) <= 4
        await asyncio.sleep(0.3)  # let any over-delivery arrive, were there any
        info = await js.consumer_info(subjects.stream, consumer)
        # A busy instance takes none: only the batch in hand left the shared consumer.
        assert info.num_pending == 20 - len(batch)
        assert info.num_ack_pending == len(batch)
        for msg in batch:
            await puller.ack(msg)
        # Everything is eventually taken, in order, each message once.
        seen = [int(m.data) for m in batch]
        while len(seen) < 20:
            more = [d.msg for d in await asyncio.wait_for(batcher.next(), 5)]
            for msg in more:
                await puller.ack(msg)
            seen += [int(m.data) for m in more]
        assert seen == list(range(20))
    finally:
        await puller.close()


async def test_a_closed_puller_hands_back_what_it_was_delivered_but_did_not_hand_over(
    nc: Client, subjects: Subjects
) -> None:
    js = nc.jetstream()
    # Redelivery after the ack wait would take 30 s: only a NAK brings the messages back within
    # the few seconds the second puller waits.
    policy = jetstream.QueuePolicy(ack_wait_s=30.0)
    await jetstream.configure_stream(js, subjects, policy)
    consumer = await jetstream.configure_consumer(js, subjects, "m", "1", policy)
    for i in range(3):
        await js.publish(subjects.infer("m", "1"), str(i).encode())
    first = CapacityPuller(nc, subjects.stream, consumer, capacity=8)
    await first.start()
    # The long-poll brings the first message, and a pull for those it says wait brings the rest:
    # all three delivered to the first puller, none handed over to an instance.
    assert await first.wait_first()
    await first.collect_waiting(8)
    assert first.held == 3
    info = await js.consumer_info(subjects.stream, consumer)
    assert (info.num_pending, info.num_ack_pending) == (0, 3)
    await first.close()
    second = CapacityPuller(nc, subjects.stream, consumer, capacity=8)
    await second.start()
    batcher = Batcher(second, BatchPolicy(max_items=8, enough=8, max_queue_delay_s=0.0, max_rows=8))
    try:
        seen: list[int] = []
        while len(seen) < 3:
            deliveries = await asyncio.wait_for(batcher.next(), 5)
            seen += [int(d.msg.data) for d in deliveries]
            for delivery in deliveries:
                await second.ack(delivery.msg)
        assert sorted(seen) == [0, 1, 2]
    finally:
        await second.close()


async def test_a_caller_that_goes_away_cancels_its_request(nc: Client, subjects: Subjects) -> None:
    await jetstream.configure_stream(nc.jetstream(), subjects, jetstream.QueuePolicy())
    cancellations = await nc.subscribe(subjects.cancel("m", "1"))
    async with Requester(nc, subjects) as requester:
        waiting = asyncio.create_task(requester.infer(request(7), "1", 30.0))
        await wait_until_async(lambda: _queued(nc.jetstream(), subjects, 1), 5, "the request queued")
        waiting.cancel()  # what aiohttp does when the HTTP client closes its connection
        with pytest.raises(asyncio.CancelledError):
            await waiting
        message = await cancellations.next_msg(timeout=5)
        assert message.data == b"7"
        assert requester.in_flight == 0


async def test_an_embedded_server_whose_log_outgrows_a_pipe_keeps_serving_and_stops_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each garbage connection makes nats-server log an [ERR] line of about 170 bytes: 1,500 of
    # them are several times the 64 KiB a pipe holds. Unread, the server would block on its
    # next log line; at the latest its shutdown would, and stop() would have to kill it.
    caplog.set_level(logging.DEBUG, logger="broker.server")
    server = EmbeddedNatsServer()
    await server.start()
    try:
        for _ in range(1500):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GARBAGE\r\n")
            await writer.drain()
            writer.close()
        client = await jetstream.connect(server.url, name="after-the-flood")
        await asyncio.wait_for(client.flush(), 5)
        await jetstream.close_connection(client)
    finally:
        await server.stop()
    messages = [record.getMessage() for record in caplog.records if record.name == "broker.server"]
    assert not any("killed" in message for message in messages), messages[-3:]
    assert any("[ERR]" in message and "parser ERROR" in message for message in messages)


async def test_a_worker_binds_to_a_consumer_the_router_configures_after_it_asked(
    nc: Client, subjects: Subjects
) -> None:
    js = nc.jetstream()
    policy = jetstream.QueuePolicy(ack_wait_s=7.0)
    await jetstream.configure_stream(js, subjects, policy)
    binding = asyncio.create_task(jetstream.bind_consumer(js, subjects, "m", "1", timeout_s=10))
    # A pause to prove something does not happen: the bind asks several times (50, 100, 200 ms
    # apart) and finds nothing, and neither returns nor gives up.
    await asyncio.sleep(0.4)
    assert not binding.done()
    await jetstream.configure_consumer(js, subjects, "m", "1", policy)
    queue = await asyncio.wait_for(binding, 10)
    assert queue == jetstream.Queue(subjects.consumer("m", "1"), 7.0)


async def test_a_consumer_nobody_configures_is_unavailable_after_the_bind_timeout(
    nc: Client, subjects: Subjects
) -> None:
    await jetstream.configure_stream(nc.jetstream(), subjects, jetstream.QueuePolicy())
    with pytest.raises(Unavailable, match=r"no queue for model 'm' version 1 .* not configured it"):
        await jetstream.bind_consumer(nc.jetstream(), subjects, "m", "1", timeout_s=0.5)
