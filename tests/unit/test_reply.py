"""The reply protocol's two sides against each other (broker/reply.py): whatever the worker side
frames, the requester side reads back as the same answers, errors and final flags. The frames
become the messages nats-py would deliver, without a server."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from nats.aio.msg import Msg

from broker import reply
from broker.subjects import COUNT, FINAL, SEQUENCE, STATUS
from natron.errors import DeadlineExceeded, InternalError, InvalidArgument, PayloadTooLarge, Unavailable
from natron.inference import InferResponse, Tensor

BIG = 1 << 20


def delivered(frame: reply.Frame) -> Msg:
    """The message a subscriber gets for `frame`: nats-py hands over the body as bytes."""
    return Msg(None, subject="_INBOX.t.1", data=bytes(frame.payload), headers=frame.headers)  # type: ignore[arg-type]


def response(value: float, rows: int = 1, request_id: str = "r1") -> InferResponse:
    data = np.full((rows, 4), value, dtype=np.float32)
    return InferResponse(request_id, "m", "1", [Tensor("OUT", "FP32", (rows, 4), data)])


def read(frames: list[reply.Frame]) -> list[reply.Answer]:
    return [answer for frame in frames for answer in reply.decode_reply(delivered(frame))]


def values(answer: reply.Answer) -> tuple[Any, bool]:
    item, final = answer
    assert isinstance(item, InferResponse), item
    return float(item.outputs[0].data[0, 0]), final


def test_an_ordinary_answer_reads_back_as_the_one_final_answer() -> None:
    frames, error = reply.answer_frames(response(2.5, rows=3), BIG)
    assert error is None
    assert [f.headers for f in frames] == [None]  # status 200 is the absent header
    ((item, final),) = read(frames)
    assert final
    assert isinstance(item, InferResponse)
    assert (item.id, item.model, item.version) == ("r1", "m", "1")
    np.testing.assert_array_equal(item.outputs[0].data, np.full((3, 4), 2.5, np.float32))


@pytest.mark.parametrize("decoupled", [False, True])
def test_an_error_reads_back_as_the_same_error_and_ends_the_request(decoupled: bool) -> None:
    frame = reply.error_frame("r1", DeadlineExceeded("too late"), decoupled=decoupled)
    assert frame.headers is not None and frame.headers[STATUS] == "504"
    assert (FINAL in frame.headers) is decoupled
    ((item, final),) = read([frame])
    assert isinstance(item, DeadlineExceeded) and item.message == "too late"
    assert final


def test_stream_frames_read_back_in_order_with_the_final_flag_on_the_last() -> None:
    first, _ = reply.stream_frames([response(0.0)], 0, False, BIG)
    rest, _ = reply.stream_frames([response(1.0), response(2.0), response(3.0)], 1, True, BIG)
    (single,) = first
    (coalesced,) = rest
    assert single.headers == {SEQUENCE: "0"}
    assert coalesced.headers == {SEQUENCE: "1", FINAL: "1", COUNT: "3"}
    assert [values(a) for a in read(first + rest)] == [(0.0, False), (1.0, False), (2.0, False), (3.0, True)]


def test_a_stream_frame_without_the_final_marker_leaves_the_stream_open() -> None:
    frames, _ = reply.stream_frames([response(1.0), response(2.0)], 4, False, BIG)
    assert [values(a) for a in read(frames)] == [(1.0, False), (2.0, False)]


def test_an_answer_over_max_payload_becomes_a_413_error_answer() -> None:
    frames, error = reply.answer_frames(response(1.0, rows=64), 512)
    assert isinstance(error, PayloadTooLarge)
    ((item, final),) = read(frames)
    assert isinstance(item, PayloadTooLarge) and item.status == 413
    assert "max_payload of 512 bytes" in item.message
    assert final


def test_coalesced_frames_over_max_payload_go_one_by_one() -> None:
    answers = [response(float(i), rows=4) for i in range(3)]
    one_size = reply.stream_frames(answers[:1], 0, False, BIG)[0][0].size
    frames, error = reply.stream_frames(answers, 7, True, one_size + 100)
    assert error is None
    assert [f.headers for f in frames] == [{SEQUENCE: "7"}, {SEQUENCE: "8"}, {SEQUENCE: "9", FINAL: "1"}]
    assert all(f.size <= one_size + 100 for f in frames)
    assert [values(a) for a in read(frames)] == [(0.0, False), (1.0, False), (2.0, True)]


def test_a_stream_frame_over_max_payload_ends_the_stream_with_a_413() -> None:
    frames, error = reply.stream_frames([response(1.0, rows=64)], 0, False, 512)
    assert isinstance(error, PayloadTooLarge)
    ((item, final),) = read(frames)
    assert isinstance(item, PayloadTooLarge) and final


def test_a_frame_counts_its_header_block_as_the_broker_does() -> None:
    frame = reply.Frame({SEQUENCE: "12", FINAL: "1"}, b"abc")
    block = b"NATS/1.0\r\nNatron-Seq: 12\r\nNatron-Final: 1\r\n\r\n"
    assert frame.size == len(block) + 3


def test_an_undecodable_answer_still_ends_the_request() -> None:
    ((item, final),) = reply.decode_reply(Msg(None, data=b"\xc1garbage", headers={SEQUENCE: "0"}))  # type: ignore[arg-type]
    assert isinstance(item, InternalError) and "undecodable response" in item.message
    assert final


def test_an_unreadable_status_is_a_server_error() -> None:
    ((item, final),) = reply.decode_reply(Msg(None, data=b"", headers={STATUS: "teapot"}))  # type: ignore[arg-type]
    assert isinstance(item, InternalError) and final


def test_an_error_body_that_does_not_decode_still_gives_its_status() -> None:
    ((item, _),) = reply.decode_reply(Msg(None, data=b"nonsense", headers={STATUS: "400"}))  # type: ignore[arg-type]
    assert isinstance(item, InvalidArgument)


@pytest.mark.parametrize(
    ("headers", "data", "expected"),
    [
        (None, b'{"stream":"NATRON_INFER","seq":17}', None),
        (None, b'{"stream":"NATRON_INFER","seq":17,"duplicate":true}', None),
        (
            None,
            b'{"error":{"code":503,"err_code":10077,"description":"maximum messages per subject exceeded"},'
            b'"stream":"NATRON_INFER","seq":0}',
            "full or unavailable: maximum messages per subject exceeded",
        ),
        ({"Status": "503"}, b"", "no inference queue for model 'm'"),
        (None, b"not json", "undecodable JetStream publish acknowledgement"),
    ],
)
def test_the_publish_acknowledgement_says_whether_the_request_was_queued(
    headers: dict[str, str] | None, data: bytes, expected: str | None
) -> None:
    error = reply.publish_ack_error(Msg(None, data=data, headers=headers), "m", "1")  # type: ignore[arg-type]
    if expected is None:
        assert error is None
    else:
        assert error is not None and expected in error.message
        assert isinstance(error, Unavailable | InternalError)
