"""Streams: decoupled models through the NATS client, Server-Sent Events and the WebSocket;
Triton's generate extension; cancellation."""

from __future__ import annotations

import asyncio
import json
import struct

import aiohttp
import numpy as np
import pytest
import requests
from nats.aio.client import Client

from broker import codec, reply
from broker.requester import Requester
from broker.subjects import BATCH, REPLY_TO
from natron.errors import InvalidArgument, NatronError
from natron.inference import InferRequest, Tensor
from tests.harness import Served

pytest_plugins = ["tests.backend_fixtures"]


def repeat_request(values: list[int], delay_ms: int = 0, request_id: str = "r") -> InferRequest:
    inputs = [Tensor("IN", "INT32", (len(values),), np.array(values, dtype=np.int32))]
    if delay_ms:
        inputs.append(Tensor("DELAY_MS", "UINT32", (1,), np.array([delay_ms], dtype=np.uint32)))
    return InferRequest(request_id, "repeat", "1", inputs)


async def test_a_stream_over_nats_arrives_in_order_and_ends(backend_requester: Requester) -> None:
    answers = [a async for a in backend_requester.stream(repeat_request([5, 6, 7, 8]), "1", 30.0)]
    got = [(int(a.outputs[0].data[0]), int(a.outputs[1].data[0])) for a in answers]
    assert got == [(5, 0), (6, 1), (7, 2), (8, 3)]


async def test_a_stream_error_raises_its_status(backend_requester: Requester) -> None:
    bad = InferRequest("r", "repeat", "1", [Tensor("IN", "FP32", (1,), np.ones(1, dtype=np.float32))])
    with pytest.raises(NatronError) as info:
        async for _ in backend_requester.stream(bad, "1", 30.0):
            pass
    assert info.value.status == 400


async def test_requests_to_a_decoupled_model_cannot_share_a_message(backend_nc: Client) -> None:
    # Stream frames carry no position, so a coalesced message to a decoupled model is refused
    # as a whole: one error answer without Natron-Batch, which is every request's.
    inbox = backend_nc.new_inbox()
    sub = await backend_nc.subscribe(inbox)
    try:
        entries = [(repeat_request([1], request_id=f"b{i}"), 0, None) for i in range(2)]
        await backend_nc.publish(
            "natron.infer.repeat.1",
            bytes(codec.encode_batch(entries)),
            headers={REPLY_TO: inbox, BATCH: "2"},
        )
        msg = await sub.next_msg(timeout=30)
    finally:
        await sub.unsubscribe()
    assert BATCH not in (msg.headers or {})
    answer = reply.decode_batch_reply(msg)
    assert isinstance(answer, InvalidArgument) and "decoupled" in answer.message


def test_infer_on_a_decoupled_model_is_501(backend_served: Served) -> None:
    body = {"inputs": [{"name": "IN", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}
    response = requests.post(f"{backend_served.url}/v2/models/repeat/infer", json=body, timeout=30)
    assert response.status_code == 501
    assert "decoupled" in response.json()["error"]


def test_generate_stream_sends_one_event_per_response(backend_served: Served) -> None:
    response = requests.post(
        f"{backend_served.url}/v2/models/repeat/generate_stream",
        json={"IN": [3, 1, 4]},
        stream=True,
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [
        json.loads(line[len(b"data: ") :]) for line in response.iter_lines() if line.startswith(b"data: ")
    ]
    assert [(e["OUT"], e["IDX"]) for e in events] == [(3, 0), (1, 1), (4, 2)]
    assert all(e["model_name"] == "repeat" for e in events)


def test_generate_stream_reports_a_bad_request_as_http_400(backend_served: Served) -> None:
    response = requests.post(
        f"{backend_served.url}/v2/models/repeat/generate_stream", json={"NOPE": 1}, timeout=30
    )
    assert response.status_code == 400
    assert "NOPE" in response.json()["error"]


def test_generate_answers_a_flat_object(backend_served: Served) -> None:
    body = {"INPUT0": list(range(16)), "INPUT1": [1] * 16, "id": "g1"}
    response = requests.post(f"{backend_served.url}/v2/models/simple/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["OUTPUT0"] == [i + 1 for i in range(16)]
    assert answer["OUTPUT1"] == [i - 1 for i in range(16)]
    assert answer["id"] == "g1"
    many = requests.post(f"{backend_served.url}/v2/models/repeat/generate", json={"IN": [1, 2]}, timeout=30)
    assert many.status_code == 400 and "generate_stream" in many.json()["error"]


async def test_one_websocket_carries_many_requests_matched_by_id(backend_served: Served) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{backend_served.url}/v2/ws") as ws:
        for i in range(5):
            await ws.send_json({"id": f"s{i}", "model": "repeat", "inputs": [
                {"name": "IN", "shape": [3], "datatype": "INT32", "data": [i, i, i]}]})  # fmt: skip
            await ws.send_json({"id": f"a{i}", "model": "simple", "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [i] * 16},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}]})  # fmt: skip
        await ws.send_json({"id": "bad", "model": "nope", "inputs": [
            {"name": "X", "shape": [1], "datatype": "INT32", "data": [1]}]})  # fmt: skip
        frames: dict[str, list[dict]] = {}
        finals = 0
        while finals < 11:
            frame = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
            frames.setdefault(frame["id"], []).append(frame)
            finals += frame["final"]
        assert frames["bad"] == [{"id": "bad", "error": "unknown model 'nope'", "status": 404, "final": True}]
        for i in range(5):
            stream = frames[f"s{i}"]
            assert [f["sequence"] for f in stream] == [0, 1, 2, 3]
            assert [f["outputs"][0]["data"] for f in stream[:3]] == [[i]] * 3
            assert stream[-1] == {"id": f"s{i}", "sequence": 3, "final": True}
            single = frames[f"a{i}"]
            assert single[0]["outputs"][0]["data"] == [i + 1] * 16 and single[1]["final"]
        assert not ws.closed  # errors arrive in-band


async def test_binary_frames_and_cancellation_over_the_websocket(backend_served: Served) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{backend_served.url}/v2/ws") as ws:
        binary_input = {"shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}}
        head = json.dumps({
            "id": "b", "model": "simple", "parameters": {"binary_data_output": True},
            "inputs": [{"name": "INPUT0", **binary_input}, {"name": "INPUT1", **binary_input}],
        }).encode()  # fmt: skip
        data = np.arange(16, dtype=np.int32).tobytes() + np.ones(16, dtype=np.int32).tobytes()
        await ws.send_bytes(struct.pack("<I", len(head)) + head + data)
        frame = await asyncio.wait_for(ws.receive(), 30)
        assert frame.type == aiohttp.WSMsgType.BINARY
        (length,) = struct.unpack_from("<I", frame.data)
        header = json.loads(frame.data[4 : 4 + length])
        assert header["id"] == "b" and header["outputs"][0]["parameters"]["binary_data_size"] == 64
        sums = np.frombuffer(frame.data[4 + length : 4 + length + 64], dtype=np.int32)
        np.testing.assert_array_equal(sums, np.arange(16) + 1)
        assert json.loads((await ws.receive()).data)["final"]

        # A slow stream, cancelled after its first answer: it ends at once, marked cancelled.
        await ws.send_json({"id": "slow", "model": "repeat", "inputs": [
            {"name": "IN", "shape": [50], "datatype": "INT32", "data": list(range(50))},
            {"name": "DELAY_MS", "shape": [1], "datatype": "UINT32", "data": [100]}]})  # fmt: skip
        first = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
        assert first["id"] == "slow" and first["sequence"] == 0
        await ws.send_json({"id": "slow", "cancel": True})
        last = first
        while not last["final"]:
            last = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
        assert last["status"] == 499 and last["error"] == "cancelled"


async def test_a_long_fast_stream_keeps_every_answer_in_order(backend_requester: Requester) -> None:
    """Answers that queue up on the worker travel coalesced; none is lost or reordered."""
    values = list(range(600))
    answers = [
        a async for a in backend_requester.stream(repeat_request(values, request_id="long"), "1", 30.0)
    ]
    assert [int(a.outputs[0].data[0]) for a in answers] == values
    assert [int(a.outputs[1].data[0]) for a in answers] == values
    assert {a.id for a in answers} == {"long"}


async def test_a_streaming_step_streams_through_its_ensemble(backend_served: Served) -> None:
    """Each answer of the decoupled step flows through the next step and out as it comes."""
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{backend_served.url}/v2/ws") as ws:
        await ws.send_json({"id": "e", "model": "ens_repeat", "inputs": [
            {"name": "IN", "shape": [4], "datatype": "INT32", "data": [9, 8, 7, 6]}]})  # fmt: skip
        frames = []
        while not frames or not frames[-1]["final"]:
            frames.append(json.loads((await asyncio.wait_for(ws.receive(), 30)).data))
    answers = {f["sequence"]: {o["name"]: o["data"] for o in f["outputs"]} for f in frames if "outputs" in f}
    assert [answers[i]["OUT"] for i in range(4)] == [[9], [8], [7], [6]]
    assert [answers[i]["IDX"] for i in range(4)] == [[0], [1], [2], [3]]
    assert "error" not in frames[-1]
