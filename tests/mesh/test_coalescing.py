"""Coalescing against a real `natron serve`: requests of one turn of the requester's event loop
share one broker message, and each still gets its own answer, error, deadline and cancellation;
a hand-built coalesced message (docs/wire-format.md) is answered request by request."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import msgpack
import nats
import numpy as np
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import codec, reply
from broker.requester import Requester
from broker.subjects import BATCH, DEADLINE_NS, REPLY_TO, Subjects
from natron.errors import DeadlineExceeded, InvalidArgument, NatronError, Unavailable
from natron.inference import InferRequest, InferResponse, Tensor
from tests.harness import Served

pytestmark = pytest.mark.timeout(90)

ANSWER_TIMEOUT_S = 20.0
SUBJECTS = Subjects()


@pytest.fixture(scope="module")
async def nc(served: Served) -> AsyncIterator[Client]:
    connection = await nats.connect(
        served.nats_url, connect_timeout=5, max_reconnect_attempts=3, **served.nats_options("client")
    )
    yield connection
    await connection.close()


# Request ids unique across the module: workers remember cancelled ids for two minutes, and one
# test here cancels a request.
_ids = itertools.count()


def tiny(i: int, rows: int = 1, datatype: str = "FP32") -> InferRequest:
    data = np.full((rows, 16), i, dtype=np.float32 if datatype == "FP32" else np.int32)
    return InferRequest(f"c{i}-{next(_ids)}", "tiny", "1", [Tensor("INPUT0", datatype, (rows, 16), data)])


def check(answer: InferResponse, i: int, rows: int = 1) -> None:
    assert answer.id.startswith(f"c{i}-")
    np.testing.assert_array_equal(answer.outputs[0].data, np.full((rows, 16), 2 * i + 1, np.float32))


async def test_requests_of_one_turn_share_a_message_and_each_gets_its_own_answer(nc: Client) -> None:
    async with Requester(nc, SUBJECTS) as requester:
        before = nc.stats["out_msgs"]
        answers = await asyncio.gather(
            *(requester.infer(tiny(i), "1", ANSWER_TIMEOUT_S, rows=1, max_rows=128) for i in range(20))
        )
        assert nc.stats["out_msgs"] - before == 1
        assert requester.in_flight == 0
    for i, answer in enumerate(answers):
        check(answer, i)


async def test_a_message_holds_at_most_max_rows_rows(nc: Client) -> None:
    async with Requester(nc, SUBJECTS) as requester:
        before = nc.stats["out_msgs"]
        answers = await asyncio.gather(
            *(requester.infer(tiny(i, rows=8), "1", ANSWER_TIMEOUT_S, rows=8, max_rows=64) for i in range(20))
        )
        assert nc.stats["out_msgs"] - before == 3  # 8 + 8 + 4 requests: 64, 64 and 32 rows
    for i, answer in enumerate(answers):
        check(answer, i, rows=8)


async def test_without_room_for_two_every_request_goes_alone(nc: Client) -> None:
    async with Requester(nc, SUBJECTS) as requester:
        before = nc.stats["out_msgs"]
        answers = await asyncio.gather(*(requester.infer(tiny(i), "1", ANSWER_TIMEOUT_S) for i in range(4)))
        assert nc.stats["out_msgs"] - before == 4
    for i, answer in enumerate(answers):
        check(answer, i)


async def test_a_bad_request_fails_alone_among_good_ones(nc: Client) -> None:
    async with Requester(nc, SUBJECTS) as requester:
        results = await asyncio.gather(
            *(
                requester.infer(
                    tiny(i, datatype="INT32" if i == 2 else "FP32"), "1", ANSWER_TIMEOUT_S, max_rows=128
                )
                for i in range(5)
            ),
            return_exceptions=True,
        )
    for i, result in enumerate(results):
        if i == 2:
            assert isinstance(result, InvalidArgument) and "datatype INT32" in result.message
        else:
            assert isinstance(result, InferResponse)
            check(result, i)


async def test_a_request_whose_caller_left_before_publishing_does_not_hold_back_the_others(
    nc: Client,
) -> None:
    async with Requester(nc, SUBJECTS) as requester:
        tasks = [
            asyncio.create_task(requester.infer(tiny(i), "1", ANSWER_TIMEOUT_S, max_rows=128))
            for i in range(6)
        ]
        await asyncio.sleep(0)  # every task ran up to its first wait: the first one opened the batch
        tasks[0].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert requester.in_flight == 0
    assert isinstance(results[0], asyncio.CancelledError)
    for i, result in enumerate(results[1:], start=1):
        assert isinstance(result, InferResponse), result
        check(result, i)


async def _send(nc: Client, payload: bytes, headers: dict[str, str]) -> list[Msg]:
    """Publish a hand-built message to tiny's queue; the answer messages until each of the
    announced requests has one (or one whole-message error)."""
    inbox = nc.new_inbox()
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        got.put_nowait(msg)

    sub = await nc.subscribe(inbox + ".>", cb=on_message)
    try:
        ack = await nc.request(
            "natron.infer.tiny.1",
            payload,
            timeout=ANSWER_TIMEOUT_S,
            headers={REPLY_TO: inbox + ".x", **headers},
        )
        assert reply.publish_ack_error(ack, "tiny", "1") is None
        expected = int(headers[BATCH]) if headers.get(BATCH, "").isdigit() else 1
        answered: set[int] = set()
        messages: list[Msg] = []
        while len(answered) < expected:
            msg = await asyncio.wait_for(got.get(), ANSWER_TIMEOUT_S)
            messages.append(msg)
            decoded = reply.decode_batch_reply(msg)
            if isinstance(decoded, NatronError):
                break
            answered.update(index for index, _ in decoded)
        return messages
    finally:
        await sub.unsubscribe()


async def test_a_hand_built_coalesced_message_is_answered_request_by_request(nc: Client) -> None:
    now_ns = time.time_ns()
    good = msgpack.unpackb(bytes(codec.encode_batch([(tiny(4), now_ns + 20 * 10**9, None)])))["requests"][0]
    expired = dict(good, id="late", deadline_ns=now_ns - 10**9)
    wrong_model = dict(good, id="elsewhere", model="simple")
    not_binary = dict(good, id="text", inputs=[dict(good["inputs"][0], data="abc")])
    payload = msgpack.packb({"v": 1, "requests": [good, expired, wrong_model, not_binary, good]})
    messages = await _send(nc, payload, {BATCH: "5", DEADLINE_NS: str(now_ns + 20 * 10**9)})
    answers: dict[int, InferResponse | NatronError] = {}
    for msg in messages:
        decoded = reply.decode_batch_reply(msg)
        assert not isinstance(decoded, NatronError), decoded
        for index, answer in decoded:
            assert index not in answers
            answers[index] = answer
    assert sorted(answers) == [0, 1, 2, 3, 4]
    for index in (0, 4):
        answer = answers[index]
        assert isinstance(answer, InferResponse)
        check(answer, 4)
    assert isinstance(answers[1], DeadlineExceeded)
    assert isinstance(answers[2], InvalidArgument) and "published to model 'tiny'" in answers[2].message
    assert isinstance(answers[3], InvalidArgument) and "must be binary" in answers[3].message


@pytest.mark.parametrize(
    ("count", "message"),
    [("3", "announces 3 requests but holds 2"), ("two", "Natron-Batch")],
)
async def test_a_coalesced_message_that_cannot_be_read_gets_one_error_for_all(
    nc: Client, count: str, message: str
) -> None:
    entries = [(tiny(0), time.time_ns() + 20 * 10**9, None), (tiny(1), time.time_ns() + 20 * 10**9, None)]
    (msg,) = await _send(nc, bytes(codec.encode_batch(entries)), {BATCH: count})
    assert BATCH not in (msg.headers or {})
    decoded = reply.decode_batch_reply(msg)
    assert isinstance(decoded, InvalidArgument) and message in decoded.message


async def test_a_short_deadline_fails_alone_among_requests_sharing_its_message(nc: Client) -> None:
    async with Requester(nc, SUBJECTS) as requester:
        before = nc.stats["out_msgs"]
        results = await asyncio.gather(
            *(
                requester.infer(tiny(i), "1", 1e-6 if i == 1 else ANSWER_TIMEOUT_S, max_rows=128)
                for i in range(4)
            ),
            return_exceptions=True,
        )
        assert nc.stats["out_msgs"] - before == 1
    assert isinstance(results[1], DeadlineExceeded)
    for i in (0, 2, 3):
        result = results[i]
        assert isinstance(result, InferResponse), result
        check(result, i)


async def test_a_batch_the_broker_cannot_take_fails_every_request_in_it_at_once(served: Served) -> None:
    connection = await nats.connect(
        served.nats_url, connect_timeout=5, max_reconnect_attempts=0, **served.nats_options("client")
    )
    requester = Requester(connection, SUBJECTS)
    await requester.start()
    await connection.close()
    results = await asyncio.wait_for(
        asyncio.gather(
            *(requester.infer(tiny(i), "1", ANSWER_TIMEOUT_S, max_rows=128) for i in range(5)),
            return_exceptions=True,
        ),
        ANSWER_TIMEOUT_S,
    )
    assert all(isinstance(r, Unavailable) for r in results), results
    assert requester.in_flight == 0


async def test_a_cancellation_names_its_request_so_a_later_one_with_the_same_id_still_runs(
    nc: Client,
) -> None:
    async with Requester(nc, SUBJECTS) as requester:
        first = tiny(3)
        # A caller that left: its cancellation names where its answer would have gone.
        await nc.publish("natron.cancel.tiny.1", first.id.encode(), headers={REPLY_TO: "_INBOX.gone.1"})
        await nc.flush()
        # A new request that reuses the id (clients choose ids) is answered, alone or coalesced.
        again = InferRequest(first.id, "tiny", "1", first.inputs)
        alone = await requester.infer(again, "1", ANSWER_TIMEOUT_S)
        together = await asyncio.gather(
            requester.infer(again, "1", ANSWER_TIMEOUT_S, max_rows=128),
            requester.infer(tiny(4), "1", ANSWER_TIMEOUT_S, max_rows=128),
        )
    check(alone, 3)
    check(together[0], 3)
    check(together[1], 4)
