"""The reply protocol, both sides: how a worker frames an answer, and how a requester reads it.

An answer is a core NATS message to the request's `Natron-Reply-To` subject (docs/wire-format.md):

* an ordinary model's answer: a response body, no header (status 200);
* an error: `Natron-Status: <HTTP status>` and an error body; on a decoupled model's request
  also `Natron-Final: 1`, since an error ends the stream;
* a decoupled model's stream frame: `Natron-Seq: <n>` and a response body, `Natron-Final: 1`
  on the last one;
* a coalesced run of frames (the worker fell behind the model): `Natron-Seq` of the first,
  `Natron-Count: <k>` and a body whose `responses` list holds them in order;
* answers to requests of a coalesced request message: `Natron-Batch: <k>` and a body whose
  `answers` list holds k of them, each with its request's position; an error answer without
  `Natron-Batch` to such a message is every one of its requests' answer.

JetStream's publish acknowledgement, which comes to `<reply>.a`, is read here as well, since the
requester awaits it beside the answer.

The broker refuses a message larger than its max_payload (headers count) and closes the
publisher's connection, failing everything in flight on it. So the worker side checks the size
before publishing: an answer that does not fit becomes a 413 error answer, and a coalesced run
of frames that does not fit goes out frame by frame.

The framing is pure (`answer_frames`, `stream_frames`, `error_frame` build `Frame`s; the
`Replier` only publishes them), so both sides can be tested against each other without a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import codec
from broker.subjects import BATCH, COUNT, FINAL, SEQUENCE, STATUS
from natron.errors import InternalError, NatronError, PayloadTooLarge, Unavailable
from natron.inference import InferResponse

_NO_RESPONDERS = "503"
_HEADER_LINE = len(b"NATS/1.0\r\n") + len(b"\r\n")

# One decoded answer, and whether it is the last the request will get.
Answer = tuple[InferResponse | NatronError, bool]
# An answer to one request of a coalesced message: its position there, its id, the answer.
Indexed = tuple[int, str, InferResponse | NatronError]
# Told, before an answer is published, the error that replaces it (None: it goes as asked).
Counted = Callable[[NatronError | None], None]


# -- the worker's side -------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Frame:
    """One reply message as it goes on the wire: its headers and its body."""

    headers: dict[str, str] | None
    payload: bytes | memoryview

    @property
    def size(self) -> int:
        """What the broker counts against max_payload: the header block and the body."""
        headers = self.headers
        if not headers:
            return len(self.payload)
        block = _HEADER_LINE + sum(len(k) + len(v) + 4 for k, v in headers.items())
        return block + len(self.payload)


def error_frame(request_id: str, error: NatronError, *, decoupled: bool) -> Frame:
    """An error answer; on a decoupled model's request it also ends the stream."""
    headers = {STATUS: str(error.status)}
    if decoupled:
        headers[FINAL] = "1"
    return Frame(headers, codec.encode_error(request_id, error.message))


def answer_frames(response: InferResponse, max_payload: int) -> tuple[list[Frame], NatronError | None]:
    """An ordinary model's answer; when it does not fit the broker, a 413 error answer instead,
    and that error (so the caller counts a failure)."""
    frame = Frame(None, codec.encode_response(response))
    if frame.size <= max_payload:
        return [frame], None
    error = PayloadTooLarge(
        f"response of {frame.size} bytes exceeds the broker's max_payload of "
        f"{max_payload} bytes: ask for fewer outputs or a smaller batch"
    )
    return [error_frame(response.id, error, decoupled=False)], error


def batch_frames(answers: list[Indexed], max_payload: int) -> tuple[list[Frame], list[Indexed]]:
    """Answers to requests of one coalesced message: one message when they fit the broker
    together, else one message each; an answer that alone does not fit becomes a 413 error
    answer. Returns the frames and the answers replaced by errors."""
    frame = Frame({BATCH: str(len(answers))}, codec.encode_answers(answers))
    if frame.size <= max_payload:
        return [frame], []
    frames: list[Frame] = []
    replaced: list[Indexed] = []
    for index, request_id, answer in answers:
        one = Frame({BATCH: "1"}, codec.encode_answers([(index, request_id, answer)]))
        if one.size > max_payload:
            error = PayloadTooLarge(
                f"response of {one.size} bytes exceeds the broker's max_payload of "
                f"{max_payload} bytes: ask for fewer outputs or a smaller batch"
            )
            replaced.append((index, request_id, error))
            one = Frame({BATCH: "1"}, codec.encode_answers([(index, request_id, error)]))
        frames.append(one)
    return frames, replaced


def stream_frames(
    responses: list[InferResponse], sequence: int, final: bool, max_payload: int
) -> tuple[list[Frame], NatronError | None]:
    """Answers `sequence`, `sequence + 1`, ... of a decoupled request: one message, coalesced
    when there are several; `final` marks the last of them as the stream's end.

    When together they do not fit the broker, they go frame by frame; a single answer that does
    not fit ends the stream with a 413 error answer, and that error is returned.
    """
    frame = _stream_frame(responses, sequence, final)
    if frame.size <= max_payload:
        return [frame], None
    frames: list[Frame] = []
    last = len(responses) - 1
    for offset, response in enumerate(responses):
        one = frame if last == 0 else _stream_frame([response], sequence + offset, final and offset == last)
        if one.size > max_payload:
            error = PayloadTooLarge(
                f"stream response of {one.size} bytes exceeds the broker's max_payload of {max_payload} bytes"
            )
            frames.append(error_frame(response.id, error, decoupled=True))
            return frames, error
        frames.append(one)
    return frames, None


def _stream_frame(responses: list[InferResponse], sequence: int, final: bool) -> Frame:
    headers = {SEQUENCE: str(sequence)}
    if final:
        headers[FINAL] = "1"
    if len(responses) == 1:
        return Frame(headers, codec.encode_response(responses[0]))
    headers[COUNT] = str(len(responses))
    return Frame(headers, codec.encode_responses(responses))


class Replier:
    """Publishes a worker's answers, framed as above; one per model instance.

    `decoupled` is the model's transaction policy: its error answers carry the final marker.
    Each method returns the error that went out instead of what was asked, if one did, and
    calls `counted` with it once the answer is framed and before it is published: a worker
    counts its statistics there, so a client that has its answer and then asks for statistics
    finds it counted.
    """

    def __init__(self, nc: Client, *, decoupled: bool) -> None:
        self._nc = nc
        self._decoupled = decoupled

    async def answer(
        self,
        reply_to: str,
        response: InferResponse,
        counted: Counted | None = None,
        headers: dict[str, str] | None = None,
    ) -> NatronError | None:
        """`headers`: more headers for the answer (a traced request's timestamps)."""
        frames, error = answer_frames(response, self._nc.max_payload - _room(headers))
        if counted is not None:
            counted(error)
        await self._publish(reply_to, frames, headers)
        return error

    async def error(
        self, reply_to: str, request_id: str, error: NatronError, counted: Counted | None = None
    ) -> None:
        frame = error_frame(request_id, error, decoupled=self._decoupled)
        if counted is not None:
            counted(error)
        await self._publish(reply_to, [frame])

    async def batch(
        self,
        reply_to: str,
        answers: list[Indexed],
        counted: Callable[[list[Indexed]], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> list[Indexed]:
        """Answers to requests of one coalesced message; returns those that went out as 413
        errors instead (`counted` gets them too). `headers`: more headers for every frame."""
        frames, replaced = batch_frames(answers, self._nc.max_payload - _room(headers))
        if counted is not None:
            counted(replaced)
        await self._publish(reply_to, frames, headers)
        return replaced

    async def frames(
        self,
        reply_to: str,
        responses: list[InferResponse],
        sequence: int,
        final: bool,
        counted: Counted | None = None,
        headers: dict[str, str] | None = None,
    ) -> NatronError | None:
        """`headers`: more headers for the frames (a traced request's timestamps, with its
        final frames)."""
        frames, error = stream_frames(responses, sequence, final, self._nc.max_payload - _room(headers))
        if counted is not None:
            counted(error)
        await self._publish(reply_to, frames, headers)
        return error

    async def _publish(self, reply_to: str, frames: list[Frame], extra: dict[str, str] | None = None) -> None:
        for frame in frames:
            headers = frame.headers if not extra else {**(frame.headers or {}), **extra}
            # nats-py sends any buffer; its annotation says bytes.
            await self._nc.publish(reply_to, frame.payload, headers=headers)  # type: ignore[arg-type]


def _room(headers: dict[str, str] | None) -> int:
    """What `headers` add to a frame's size: kept free under max_payload for them."""
    if not headers:
        return 0
    return _HEADER_LINE + sum(len(k) + len(v) + 4 for k, v in headers.items())


# -- the requester's side ----------------------------------------------------------------------


def decode_reply(msg: Msg) -> list[Answer]:
    """The answers one reply message carries, in order, each with its final flag.

    An error is always final. A message without `Natron-Seq` (an ordinary model's answer) is
    its request's only answer, so it is final too; a stream frame is final when it carries
    `Natron-Final: 1`, and of a coalesced run only the last answer can be. A body that does not
    decode still yields an answer: an InternalError that ends the request.
    """
    headers = msg.headers or {}
    status_text = headers.get(STATUS)
    if status_text is not None and status_text != "200":
        try:
            status = int(status_text)
        except ValueError:
            status = 500
        return [(codec.decode_error(status, msg.data), True)]
    final = headers.get(FINAL) == "1" or SEQUENCE not in headers
    try:
        if COUNT in headers:
            answers = codec.decode_responses(msg.data)
            last = len(answers) - 1
            return [(answer, final and position == last) for position, answer in enumerate(answers)]
        return [(codec.decode_response(msg.data), final)]
    except Exception as exc:  # a worker's malformed answer must still end the wait
        return [(InternalError(f"undecodable response: {exc}"), True)]


def decode_batch_reply(msg: Msg) -> list[tuple[int, InferResponse | NatronError]] | NatronError:
    """The answers an answer message to a coalesced request message carries, by position; a
    single error when it answers the whole message (no `Natron-Batch`), or is undecodable."""
    headers = msg.headers or {}
    if BATCH not in headers:
        status_text = headers.get(STATUS)
        try:
            status = int(status_text) if status_text is not None else 500
        except ValueError:
            status = 500
        if status == 200:
            return InternalError("an answer to coalesced requests without Natron-Batch")
        return codec.decode_error(status, msg.data)
    try:
        return codec.decode_answers(msg.data)
    except Exception as exc:  # a worker's malformed answer must still end the wait
        return InternalError(f"undecodable response: {exc}")


def nobody_stored(msg: Msg) -> bool:
    """JetStream's answer to a publish says no server took it (no stream, or none with a leader
    now)."""
    return bool(msg.headers) and msg.headers.get("Status") == _NO_RESPONDERS  # type: ignore[union-attr]


def publish_ack_error(msg: Msg, model: str, version: str) -> NatronError | None:
    """The error in JetStream's answer to a publish, or None when the request is queued."""
    headers = msg.headers or {}
    if headers.get("Status") == _NO_RESPONDERS:
        return Unavailable(f"no inference queue for model '{model}': is the router running?")
    try:
        ack = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return InternalError("undecodable JetStream publish acknowledgement")
    error = ack.get("error") if isinstance(ack, dict) else None
    if error:
        description = error.get("description", "") if isinstance(error, dict) else str(error)
        return Unavailable(
            f"queue of model '{model}' version {version} is full or unavailable: {description}"
        )
    return None
