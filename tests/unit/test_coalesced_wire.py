"""Coalesced messages (broker/codec.py, broker/reply.py, broker/puller.py): several requests in
one message and their answers in one answer message, each request keeping its own position,
deadline, trace and error."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from broker import codec, reply
from broker.puller import entries_of
from broker.subjects import BATCH, STATUS
from natron.errors import DeadlineExceeded, InternalError, InvalidArgument, NatronError, PayloadTooLarge
from natron.inference import InferRequest, InferResponse, Tensor

BIG = 1 << 20


def request(i: int, rows: int = 1) -> InferRequest:
    data = np.full((rows, 4), i, dtype=np.float32)
    return InferRequest(f"r{i}", "m", "1", [Tensor("IN", "FP32", (rows, 4), data)], ["OUT"])


def response(i: int, rows: int = 1) -> InferResponse:
    data = np.full((rows, 4), 2 * i + 1, dtype=np.float32)
    return InferResponse(f"r{i}", "m", "1", [Tensor("OUT", "FP32", (rows, 4), data)])


def delivered(frame: reply.Frame) -> Msg:
    return Msg(None, subject="_INBOX.t.1", data=bytes(frame.payload), headers=frame.headers)  # type: ignore[arg-type]


def test_requests_of_a_coalesced_message_decode_in_order_with_their_own_deadline_and_trace() -> None:
    entries = [
        (request(i, rows=i + 1), 1_000 + i, {"traceparent": f"t{i}"} if i % 2 else None) for i in range(5)
    ]
    decoded = codec.decode_batch(codec.encode_batch(entries), 5)
    assert len(decoded) == 5
    for i, entry in enumerate(decoded):
        assert entry.error is None and entry.request is not None
        assert (entry.request.id, entry.request.model, entry.request.outputs) == (f"r{i}", "m", ["OUT"])
        assert entry.deadline_ns == 1_000 + i
        assert entry.trace == ({"traceparent": f"t{i}"} if i % 2 else {})
        np.testing.assert_array_equal(entry.request.inputs[0].data, np.full((i + 1, 4), i, np.float32))


def test_a_malformed_request_fails_alone_and_keeps_its_id() -> None:
    good = codec.encode_batch([(request(0), 0, None)])
    body = msgpack.unpackb(good)
    bad = dict(
        body["requests"][0],
        id="bad",
        inputs=[{"name": "IN", "datatype": "FP32", "shape": [1, 4], "data": "x"}],
    )
    expired = dict(body["requests"][0], id="late", deadline_ns=-1)
    data = msgpack.packb({"v": 1, "requests": [body["requests"][0], bad, expired, 7]})
    first, second, third, fourth = codec.decode_batch(data, 4)
    assert first.request is not None and first.error is None
    assert second.request is None and second.request_id == "bad"
    assert isinstance(second.error, InvalidArgument) and "'data' must be binary" in second.error.message
    assert third.request_id == "late" and isinstance(third.error, InvalidArgument)
    assert "deadline_ns" in third.error.message
    assert fourth.request is None and isinstance(fourth.error, InvalidArgument)


@pytest.mark.parametrize(
    ("body", "expected", "message"),
    [
        ({"v": 1, "requests": []}, 0, "non-empty list"),
        ({"v": 1, "requests": {"a": 1}}, 1, "non-empty list"),
        ({"v": 1}, 1, "non-empty list"),
        ({"v": 2, "requests": [{}]}, 1, "unsupported wire format version"),
        ({"v": 1, "requests": [{}, {}]}, 3, "announces 3 requests but holds 2"),
        ({"v": 1, "requests": [{}] * (codec.MAX_BATCH_ENTRIES + 1)}, 1, "at most 1024"),
    ],
)
def test_a_malformed_envelope_fails_as_a_whole(body: dict[str, Any], expected: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_batch(msgpack.packb(body), expected)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_fail_to_decode_as_a_batch_only_with_invalid_argument(data: bytes) -> None:
    try:
        entries = codec.decode_batch(data, 1)
    except InvalidArgument:
        return
    assert all(e.request is not None or isinstance(e.error, InvalidArgument) for e in entries)


def test_an_empty_or_oversized_batch_is_not_encoded() -> None:
    with pytest.raises(ValueError):
        codec.encode_batch([])
    with pytest.raises(ValueError):
        codec.encode_batch([(request(0), 0, None)] * (codec.MAX_BATCH_ENTRIES + 1))


def test_answers_and_errors_read_back_by_position() -> None:
    answers: list[reply.Indexed] = [
        (3, "r3", response(3)),
        (0, "r0", DeadlineExceeded("expired in the queue")),
        (1, "r1", response(1, rows=2)),
    ]
    frames, replaced = reply.batch_frames(answers, BIG)
    assert replaced == []
    assert len(frames) == 1 and frames[0].headers == {BATCH: "3"}
    decoded = reply.decode_batch_reply(delivered(frames[0]))
    assert not isinstance(decoded, NatronError)
    assert [index for index, _ in decoded] == [3, 0, 1]
    three, zero, one = (answer for _, answer in decoded)
    assert isinstance(three, InferResponse) and three.id == "r3"
    np.testing.assert_array_equal(three.outputs[0].data, np.full((1, 4), 7, np.float32))
    assert (
        isinstance(zero, DeadlineExceeded) and zero.status == 504 and zero.message == "expired in the queue"
    )
    assert isinstance(one, InferResponse) and one.outputs[0].shape == (2, 4)


def test_answers_too_large_together_go_one_by_one_and_one_too_large_alone_becomes_a_413() -> None:
    small = response(1)
    huge = InferResponse("r2", "m", "1", [Tensor("OUT", "FP32", (1, 4096), np.zeros((1, 4096), np.float32))])
    answers: list[reply.Indexed] = [(0, "r0", small), (1, "r1", small), (2, "r2", huge)]
    limit = 4096  # room for a small answer, not for 16 KiB of data
    frames, replaced = reply.batch_frames(answers, limit)
    assert len(frames) == 3
    assert all(frame.size <= limit and frame.headers == {BATCH: "1"} for frame in frames)
    assert [(index, request_id) for index, request_id, _ in replaced] == [(2, "r2")]
    assert isinstance(replaced[0][2], PayloadTooLarge)
    read = [answer for frame in frames for answer in reply.decode_batch_reply(delivered(frame))]  # type: ignore[union-attr]
    assert [index for index, _ in read] == [0, 1, 2]
    assert isinstance(read[0][1], InferResponse) and isinstance(read[1][1], InferResponse)
    assert isinstance(read[2][1], PayloadTooLarge) and read[2][1].status == 413


def test_an_error_answer_without_the_batch_header_is_every_requests_answer() -> None:
    frame = reply.error_frame(
        "", InvalidArgument("the message announces 3 requests but holds 2"), decoupled=False
    )
    decoded = reply.decode_batch_reply(delivered(frame))
    assert isinstance(decoded, InvalidArgument) and "announces 3" in decoded.message
    # A 200 answer without it cannot be matched to any request: an internal error for all.
    plain = reply.answer_frames(response(0), BIG)[0][0]
    assert isinstance(reply.decode_batch_reply(delivered(plain)), InternalError)


def test_an_undecodable_answer_message_is_an_internal_error_for_all() -> None:
    msg = Msg(None, subject="_INBOX.t.1", data=b"\xc1garbage", headers={BATCH: "2"})  # type: ignore[arg-type]
    decoded = reply.decode_batch_reply(msg)
    assert isinstance(decoded, InternalError) and "undecodable" in decoded.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, 1),
        ({}, 1),
        ({BATCH: "7"}, 7),
        ({BATCH: "0"}, 1),
        ({BATCH: "x"}, 1),
        ({BATCH: "99999"}, 1024),
        ({STATUS: "200"}, 1),
    ],
)
def test_a_message_counts_as_as_many_requests_as_its_header_says_within_bounds(
    headers: dict[str, str] | None, expected: int
) -> None:
    msg = Msg(None, subject="natron.infer.m.1", data=b"", headers=headers)  # type: ignore[arg-type]
    assert entries_of(msg) == expected
