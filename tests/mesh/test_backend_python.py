"""Models written for Triton's Python backend, served unchanged by a real `natron serve`: the
documented add_sub example, BLS through the mesh, a decoupled stream read straight off NATS,
every datatype, and every way a model can fail."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import nats
import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from nats.aio.client import Client
from nats.aio.msg import Msg
from tritonclient.grpc import model_config_pb2 as pb

from broker import codec
from broker.requester import Requester
from broker.subjects import COUNT, DEADLINE_NS, FINAL, REPLY_TO, SEQUENCE, STATUS, Subjects
from examples import build_backend_models
from natron import config as cfg
from natron import datatypes
from natron.errors import NatronError
from natron.inference import InferRequest, InferResponse, Tensor
from pystub.process import complete_config
from tests.harness import Served, wait_until, wait_until_async
from workers.backends import BackendContext
from workers.backends.python import PythonBackend
from workers.devices import CPU

# The shared server and its helpers come as fixtures; importing that module here would keep
# pytest from rewriting its asserts.
pytest_plugins = ["tests.backend_fixtures"]
pytestmark = pytest.mark.timeout(120)

ANSWER_TIMEOUT_S = 30.0  # generous for a loaded 2-core machine; a hang still ends


async def infer(requester: Requester, request: InferRequest, version: str = "1") -> InferResponse:
    return await requester.infer(request, version, ANSWER_TIMEOUT_S)


def post_infer(served: Served, model: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{served.url}/v2/models/{model}/infer", data=json.dumps(body), timeout=ANSWER_TIMEOUT_S
    )


def faults(mode: int) -> InferRequest:
    return InferRequest(
        uuid.uuid4().hex, "py_faults", "", [Tensor("MODE", "INT32", (1,), np.array([mode], np.int32))]
    )


# -- the happy paths ---------------------------------------------------------------------------


def test_tritons_add_sub_example_runs_unchanged(backend_served: Served) -> None:
    client = httpclient.InferenceServerClient(backend_served.host_port)
    a = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    b = np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_only_the_requested_outputs_come_back(backend_served: Served) -> None:
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "INPUT1", "shape": [4], "datatype": "FP32", "data": [1, 1, 1, 1]},
        ],
        "outputs": [{"name": "OUTPUT1"}],
    }
    response = post_infer(backend_served, "add_sub", body)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["OUTPUT1"]
    assert response.json()["outputs"][0]["data"] == [0, 1, 2, 3]


async def test_every_datatype_goes_through_a_python_model_and_back(backend_requester: Requester) -> None:
    inputs = []
    expected = {}
    for datatype in build_backend_models.PYTHON_DATATYPES:
        if datatype == "BYTES":
            array = np.array([b"", b"\x00\xffnot utf-8", "héllo".encode()], dtype=np.object_)
        elif datatype == "BOOL":
            array = np.array([True, False, True])
        else:
            array = np.array([0, 1, 127], dtype=np.float64).astype(datatypes.to_numpy_dtype(datatype))
        inputs.append(Tensor(f"INPUT_{datatype}", datatype, (3,), array))
        expected[f"OUTPUT_{datatype}"] = (datatype, array)
    response = await infer(backend_requester, InferRequest("all-types", "py_identity", "", inputs))
    got = {t.name: t for t in response.outputs}
    assert set(got) == set(expected)
    for name, (datatype, array) in expected.items():
        assert got[name].datatype == datatype
        assert got[name].data.dtype == array.dtype
        np.testing.assert_array_equal(got[name].data, array)
    assert got["OUTPUT_BF16"].data.dtype == ml_dtypes.bfloat16


def test_bytes_and_bool_cross_the_http_protocol_through_a_python_model(backend_served: Served) -> None:
    client = httpclient.InferenceServerClient(backend_served.host_port)
    text = np.array([b"alpha", b"", b"\xe2\x82\xac"], dtype=np.object_)
    flags = np.array([True, False, False])
    inputs = [
        httpclient.InferInput("INPUT_BYTES", [3], "BYTES"),
        httpclient.InferInput("INPUT_BOOL", [3], "BOOL"),
    ]
    inputs[0].set_data_from_numpy(text)
    inputs[1].set_data_from_numpy(flags)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT_BYTES"),
        httpclient.InferRequestedOutput("OUTPUT_BOOL"),
    ]
    result = client.infer("py_identity", inputs, outputs=outputs)
    assert list(result.as_numpy("OUTPUT_BYTES")) == list(text)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT_BOOL"), flags)


def test_bls_calls_an_onnx_model_through_the_mesh(backend_served: Served) -> None:
    body = {
        "inputs": [
            {"name": "MODEL_NAME", "shape": [1], "datatype": "BYTES", "data": ["simple"]},
            {"name": "INPUT0", "shape": [16], "datatype": "INT32", "data": list(range(16))},
            {"name": "INPUT1", "shape": [16], "datatype": "INT32", "data": [3] * 16},
        ]
    }
    response = post_infer(backend_served, "bls", body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["OUTPUT0"] == [i + 3 for i in range(16)]
    assert outputs["OUTPUT1"] == [i - 3 for i in range(16)]


def test_async_bls_runs_its_calls_concurrently_on_the_mesh(backend_served: Served) -> None:
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [16], "datatype": "INT32", "data": list(range(16))},
            {"name": "INPUT1", "shape": [16], "datatype": "INT32", "data": [10] * 16},
        ]
    }
    response = post_infer(backend_served, "bls_async", body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["OUTPUT0"] == [i + 10 for i in range(16)]
    assert outputs["OUTPUT1"] == [10 - i for i in range(16)]


def test_bls_collects_the_stream_of_a_decoupled_model(backend_served: Served) -> None:
    body = {"inputs": [{"name": "IN", "shape": [5], "datatype": "INT32", "data": [5, 4, 3, 2, 1]}]}
    response = post_infer(backend_served, "bls_decoupled", body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [5, 4, 3, 2, 1]


def test_bls_to_an_unknown_model_fails_the_request_with_the_reason(backend_served: Served) -> None:
    body = {
        "inputs": [
            {"name": "MODEL_NAME", "shape": [1], "datatype": "BYTES", "data": ["no_such_model"]},
            {"name": "INPUT0", "shape": [16], "datatype": "INT32", "data": [0] * 16},
            {"name": "INPUT1", "shape": [16], "datatype": "INT32", "data": [0] * 16},
        ]
    }
    response = post_infer(backend_served, "bls", body)
    assert response.status_code == 500, response.text
    assert "unknown model 'no_such_model'" in response.json()["error"]


# -- a decoupled model, read straight off NATS -------------------------------------------------


async def stream(
    nc: Client, model: str, request: InferRequest, timeout_s: float = ANSWER_TIMEOUT_S
) -> list[tuple[float, Msg]]:
    """Publish as broker.requester does; every answer message until the final one, with the
    seconds from the publish to its arrival."""
    subjects = Subjects()
    inbox = nc.new_inbox()  # a client's own (the services' inboxes are theirs alone)
    messages: list[tuple[float, Msg]] = []
    finished = asyncio.Event()
    started = time.monotonic()

    async def on_message(msg: Msg) -> None:
        if msg.subject.endswith(".a"):
            assert b'"error"' not in msg.data, msg.data
            return
        messages.append((time.monotonic() - started, msg))
        if (msg.headers or {}).get(FINAL) == "1":
            finished.set()

    subscription = await nc.subscribe(inbox + ".>", cb=on_message)
    try:
        await nc.publish(
            subjects.infer(model, "1"),
            codec.encode_request(request),
            reply=inbox + ".1.a",
            headers={REPLY_TO: inbox + ".1", DEADLINE_NS: str(time.time_ns() + int(timeout_s * 1e9))},
        )
        await asyncio.wait_for(finished.wait(), timeout_s)
    finally:
        await subscription.unsubscribe()
    return messages


def answers_of(messages: list[tuple[float, Msg]]) -> list[tuple[int, bool, InferResponse]]:
    """(sequence number, final, response) of every answer, whether each came in a message of its
    own or coalesced with others that queued up meanwhile (the Natron-Count header)."""
    answers = []
    for _, msg in messages:
        headers = msg.headers or {}
        assert headers.get(STATUS, "200") == "200", msg.data
        first, final = int(headers[SEQUENCE]), headers.get(FINAL) == "1"
        responses = (
            codec.decode_responses(msg.data) if COUNT in headers else [codec.decode_response(msg.data)]
        )
        for offset, response in enumerate(responses):
            answers.append((first + offset, final and offset == len(responses) - 1, response))
    return answers


async def test_a_decoupled_model_streams_its_responses_then_the_final_flag(backend_nc: Client) -> None:
    values = np.array([7, 8, 9, 10], dtype=np.int32)
    request = InferRequest("stream-1", "repeat", "1", [Tensor("IN", "INT32", (4,), values)])
    answers = answers_of(await stream(backend_nc, "repeat", request))
    assert [sequence for sequence, _, _ in answers] == [0, 1, 2, 3, 4]
    assert [final for _, final, _ in answers] == [False, False, False, False, True]
    for index, (_, _, response) in enumerate(answers[:4]):
        assert response.id == "stream-1"
        outputs = {t.name: t.data for t in response.outputs}
        assert outputs["OUT"].tolist() == [values[index]]
        assert outputs["IDX"].tolist() == [index]
    assert answers[4][2].outputs == []


async def test_decoupled_responses_arrive_as_they_are_sent(backend_nc: Client) -> None:
    """300 ms apart, each response is a message of its own, long before the stream ends."""
    request = InferRequest(
        "stream-2",
        "repeat",
        "1",
        [
            Tensor("IN", "INT32", (3,), np.array([1, 2, 3], np.int32)),
            Tensor("DELAY_MS", "UINT32", (1,), np.array([300], np.uint32)),
        ],
    )
    messages = await stream(backend_nc, "repeat", request)
    assert [sequence for sequence, _, _ in answers_of(messages)] == [0, 1, 2, 3]
    first_s, last_s = messages[0][0], messages[-1][0]
    assert last_s - first_s >= 0.5


async def test_a_decoupled_request_with_nothing_to_send_gets_only_the_final_flag(backend_nc: Client) -> None:
    request = InferRequest("stream-3", "repeat", "1", [Tensor("IN", "INT32", (0,), np.zeros(0, np.int32))])
    answers = answers_of(await stream(backend_nc, "repeat", request))
    assert [(sequence, final) for sequence, final, _ in answers] == [(0, True)]
    assert answers[0][2].outputs == []


def test_a_cancelled_stream_reaches_the_models_is_cancelled_and_it_stops_early(tmp_path: Path) -> None:
    """The instance forwards a client's cancellation to its backend; the stub hands it to
    `is_cancelled()` while the model streams, and repeat stops after what it had sent."""
    build_backend_models.build(tmp_path, ["repeat"], quiet=True)
    config = cfg.read_config(tmp_path / "repeat")
    cfg.fill_defaults(config)
    backend = PythonBackend.load(config, tmp_path / "repeat" / "1", BackendContext(CPU))
    answers: list[tuple[object, bool]] = []
    finished = threading.Event()

    def sink(index: int, outputs: object, final: bool) -> None:
        answers.append((outputs, final))
        if final:
            finished.set()

    values = np.arange(100, dtype=np.int32)
    request = InferRequest(
        "to-cancel",
        "repeat",
        "1",
        [
            Tensor("IN", "INT32", (100,), values),
            Tensor("DELAY_MS", "UINT32", (1,), np.array([20], np.uint32)),
        ],
    )
    try:
        backend.execute_requests([request], sink)
        wait_until(lambda: len(answers) >= 2, 10, "the stream under way")
        backend.cancel("to-cancel")
        assert finished.wait(10)
        assert 1 < len(answers) < 50
        assert answers[-1] == (None, True)
    finally:
        backend.close()


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        ("py_bad_import", ["failed to import model.py", "No module named 'natron_no_such_module'", "line 3"]),
        (
            "py_init_fails",
            ["initialize() raised RuntimeError", "no weights found for py_init_fails version 1"],
        ),
    ],
)
def test_a_model_that_cannot_load_is_unavailable_with_the_reason(
    backend_served: Served,
    repository_state: Callable[[str], dict[str, Any]],
    model: str,
    fragments: list[str],
) -> None:
    entry = repository_state(model)
    assert entry["state"] == "UNAVAILABLE"
    for fragment in fragments:
        assert fragment in entry["reason"], entry["reason"]
    ready = requests.get(f"{backend_served.url}/v2/models/{model}/ready", timeout=5)
    assert ready.status_code == 503
    # ...and the worker goes on serving every other model.
    assert requests.get(f"{backend_served.url}/v2/models/add_sub/ready", timeout=5).status_code == 200


async def test_execute_raising_answers_an_error_that_names_it_and_the_next_request_works(
    backend_requester: Requester,
) -> None:
    with pytest.raises(NatronError) as caught:
        await infer(backend_requester, faults(1))
    assert caught.value.status == 500
    assert (
        "execute() raised ValueError: mode 1 asks execute() to fail (model.py, line" in caught.value.message
    )
    response = await infer(backend_requester, faults(0))
    assert response.outputs[0].data[0] > 0


@pytest.mark.parametrize(("mode", "status"), [(2, 400), (3, 404), (4, 501), (5, 503), (6, 500)])
async def test_a_triton_error_in_a_response_answers_with_the_status_of_its_code(
    backend_requester: Requester, mode: int, status: int
) -> None:
    with pytest.raises(NatronError) as caught:
        await infer(backend_requester, faults(mode))
    assert caught.value.status == status
    assert f"mode {mode}" in caught.value.message


async def test_returning_the_wrong_number_of_responses_is_an_error_that_says_so(
    backend_requester: Requester,
) -> None:
    with pytest.raises(NatronError) as caught:
        await infer(backend_requester, faults(8))
    assert caught.value.status == 500
    assert "returned 0 response(s) for 1 request(s)" in caught.value.message


async def test_a_response_that_is_not_made_of_tensors_is_an_error(backend_requester: Requester) -> None:
    with pytest.raises(NatronError) as caught:
        await infer(backend_requester, faults(9))
    assert "not a pb_utils.Tensor" in caught.value.message


async def test_a_killed_stub_fails_its_request_at_once_and_a_new_stub_serves_the_next(
    backend_requester: Requester, backend_served: Served
) -> None:
    subjects = Subjects()
    # The queue's state is an operator's to read, not a client's.
    admin = await nats.connect(backend_served.nats_url, **backend_served.nats_options("admin"))
    js = admin.jetstream()
    try:

        async def in_worker(count: int) -> bool:
            """Nothing waits in the consumer and `count` requests are delivered, not yet answered."""
            info = await js.consumer_info(subjects.stream, subjects.consumer("py_faults", "1"))
            return info.num_pending == 0 and info.num_ack_pending == count

        first = await infer(backend_requester, faults(0))
        pid = int(first.outputs[0].data[0])
        # The answer can arrive before its acknowledgement: wait for that, so the count below is
        # the slow request's alone.
        await wait_until_async(lambda: in_worker(0), ANSWER_TIMEOUT_S, "the first request acknowledged")
        slow = asyncio.create_task(infer(backend_requester, faults(7)))  # sleeps 60 s in the model
        try:
            # Delivered to the worker, which hands it to its stub in the same breath (a thread
            # hop): the delivery is what can be observed from here.
            await wait_until_async(lambda: in_worker(1), ANSWER_TIMEOUT_S, "the slow request delivered")
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(NatronError) as caught:
                await slow
            assert time.monotonic() - started < 10
        finally:
            slow.cancel()  # a no-op once it ended; else no task outlives the test
            await asyncio.gather(slow, return_exceptions=True)
        assert caught.value.status == 500
        assert "killed by SIGKILL" in caught.value.message
        assert f"pid {pid}" in caught.value.message
        second = await infer(backend_requester, faults(0))
        assert int(second.outputs[0].data[0]) not in (0, pid)
    finally:
        await admin.close()


def test_auto_complete_config_fills_in_what_config_pbtxt_leaves_out(tmp_path: Path) -> None:
    build_backend_models.build(tmp_path, ["py_autocomplete"], quiet=True)
    config = cfg.read_config(tmp_path / "py_autocomplete")
    complete_config(config, tmp_path / "py_autocomplete" / "1")
    assert [(i.name, datatypes.config_to_datatype(pb.DataType.Name(i.data_type))) for i in config.input] == [
        ("TEXT", "BYTES")
    ]
    assert [o.name for o in config.output] == ["LENGTH"]
    assert config.max_batch_size == 8
    assert config.HasField("dynamic_batching")


def test_auto_complete_config_that_raises_is_a_config_error_with_the_reason(tmp_path: Path) -> None:
    model_dir = tmp_path / "bad_complete"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    @staticmethod\n"
        "    def auto_complete_config(config):\n"
        "        config.add_input({'name': 'X'})\n"
        "        return config\n"
        "    def execute(self, requests):\n"
        "        return []\n"
    )
    config = pb.ModelConfig(name="bad_complete", backend="python")
    with pytest.raises(cfg.ConfigError) as caught:
        complete_config(config, model_dir / "1")
    assert "auto_complete_config() raised ValueError" in caught.value.message
    assert "missing 'data_type' property" in caught.value.message
