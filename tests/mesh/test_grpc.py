"""The real Triton gRPC client, `tritonclient.grpc` (sync, asyncio and streaming), used unchanged
against `natron serve`, and the service's raw messages where tritonclient cannot send them."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.harness import Served

pytest_plugins = ["tests.backend_fixtures"]

ALL_DATATYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
                 "FP16", "FP32", "FP64", "BF16", "BYTES"]  # fmt: skip


@pytest.fixture(scope="module")
def client(served: Served) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(served.grpc_url)


@pytest.fixture(scope="module")
def stub(served: Served) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.grpc_url))


def simple_inputs(first: np.ndarray, second: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput(name, list(first.shape), "INT32") for name in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(first)
    inputs[1].set_data_from_numpy(second)
    return inputs


def status_of(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


# -- health, metadata, config, repository ---------------------------------------------------


def test_health_and_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("broken")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "natron"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_and_config_match_http(
    served: Served, client: grpcclient.InferenceServerClient
) -> None:
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(served.host_port)
    metadata = client.get_model_metadata("simple", as_json=True)
    assert metadata["name"] == "simple" and metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [
        {"name": "INPUT0", "datatype": "INT32", "shape": ["-1", "16"]},  # int64 in JSON: strings
        {"name": "INPUT1", "datatype": "INT32", "shape": ["-1", "16"]},
    ]
    config = client.get_model_config("simple").config
    assert config.name == "simple" and config.max_batch_size == 8
    assert [i.name for i in config.input] == [i["name"] for i in http.get_model_config("simple")["input"]]
    assert config.HasField("dynamic_batching")
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert status_of(info) == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()


def test_repository_index_shows_states_and_reasons(client: grpcclient.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["simple"].state == "READY" and index["simple"].version == "1"
    assert index["broken"].state == "UNAVAILABLE" and index["broken"].reason
    ready = {m.name for m in client.get_model_repository_index().models if m.state == "READY"}
    assert ready >= {"simple", "tiny"}


def test_load_is_refused_outside_explicit_mode(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple")
    assert status_of(info) in ("StatusCode.INVALID_ARGUMENT", "StatusCode.UNIMPLEMENTED")
    assert "explicit" in info.value.message()


# -- inference --------------------------------------------------------------------------------


def test_infer_with_raw_contents(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", simple_inputs(a, b), request_id="r1", outputs=outputs)
    assert result.get_response().id == "r1"
    assert result.get_response().model_name == "simple" and result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None  # not asked for
    everything = client.infer("simple", simple_inputs(a, b), compression_algorithm="gzip")
    np.testing.assert_array_equal(everything.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(everything.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_every_datatype_round_trips(client: grpcclient.InferenceServerClient, datatype: str) -> None:
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        data = np.array([[b"a", b"\x00\x01", b""], [b"xyz", "é".encode(), b"q"]], dtype=np.object_)
    elif datatype == "BOOL":
        data = rng.integers(0, 2, (2, 3)).astype(np.bool_)
    elif datatype == "BF16":
        data = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    elif datatype.startswith("FP"):
        data = rng.standard_normal((2, 3)).astype(
            {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[datatype]
        )
    else:
        info = np.iinfo(np.dtype(datatype.lower()))
        data = rng.integers(info.min, info.max, (2, 3), dtype=np.dtype(datatype.lower()), endpoint=True)
    inp = grpcclient.InferInput("INPUT0", [2, 3], datatype)
    inp.set_data_from_numpy(data)
    got = client.infer(f"identity_{datatype.lower()}", [inp]).as_numpy("OUTPUT0")
    assert got.shape == (2, 3)
    if datatype == "BYTES":
        assert got.tolist() == data.tolist()
    else:
        np.testing.assert_array_equal(got.astype(data.dtype), data)


def test_typed_contents_are_read_as_triton_reads_them(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name="simple", id="typed")
    for name, values in (("INPUT0", range(16)), ("INPUT1", [2] * 16)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(values)
    response = stub.ModelInfer(request)
    assert response.id == "typed" and len(response.raw_output_contents) == 2
    names = [o.name for o in response.outputs]
    total = np.frombuffer(response.raw_output_contents[names.index("OUTPUT0")], dtype=np.int32)
    assert total.tolist() == [i + 2 for i in range(16)]

    strings = service_pb2.ModelInferRequest(model_name="identity_bytes")
    tensor = strings.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    tensor.contents.bytes_contents.extend([b"\x00\x01", b"two"])
    answer = stub.ModelInfer(strings)
    from tritonclient.utils import deserialize_bytes_tensor

    assert deserialize_bytes_tensor(answer.raw_output_contents[0]).tolist() == [b"\x00\x01", b"two"]


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda t: t.contents.fp32_contents.extend([1.0] * 16), "int_contents"),  # wrong field
        (lambda t: t.contents.int_contents.extend([1] * 15), "16"),  # too few elements
    ],
)
def test_malformed_typed_contents_are_invalid_argument(stub: Any, build: Any, needle: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="simple")
    first = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    build(first)
    second = request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    second.contents.int_contents.extend([1] * 16)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def test_typed_contents_must_fit_the_datatype(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_int8")
    request.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 2]).contents.int_contents.extend([1, 300])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "300" in info.value.details() and "outside" in info.value.details()


def test_raw_and_typed_contents_cannot_mix(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name="simple")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16]).contents.int_contents.extend([1] * 16)
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    request.raw_input_contents.append(np.ones(16, dtype=np.int32).tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in info.value.details()

    short = service_pb2.ModelInferRequest(model_name="simple")
    short.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    short.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    short.raw_input_contents.append(np.ones(16, dtype=np.int32).tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(short)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT1" in info.value.details()


def test_errors_map_to_tritons_codes(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    cases = [
        ("no_such_model", simple_inputs(a, a), "StatusCode.NOT_FOUND", "no_such_model"),
        ("broken", simple_inputs(a, a), "StatusCode.UNAVAILABLE", "broken"),
        ("simple", simple_inputs(np.ones((1, 15), np.int32), np.ones((1, 15), np.int32)),
         "StatusCode.INVALID_ARGUMENT", "shape"),
        ("simple", simple_inputs(np.ones((9, 16), np.int32), np.ones((9, 16), np.int32)),
         "StatusCode.INVALID_ARGUMENT", "max_batch_size"),
    ]  # fmt: skip
    for model, inputs, code, needle in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs)
        assert status_of(info) == code, (model, info.value.message())
        assert needle in info.value.message()


def test_an_expired_deadline_is_deadline_exceeded_not_a_hang(
    client: grpcclient.InferenceServerClient,
) -> None:
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [inp], timeout=1)  # one microsecond, Triton's `timeout` parameter
    assert status_of(info) == "StatusCode.DEADLINE_EXCEEDED"
    assert "tiny" in info.value.message()


def test_a_request_larger_than_grpcs_default_limit(client: grpcclient.InferenceServerClient) -> None:
    # 5 MiB: past gRPC's 4 MiB default, within the server's 8 MiB payload.
    data = np.arange(5 * 1024 * 1024 // 4, dtype=np.float32).reshape(1, -1)
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    np.testing.assert_array_equal(client.infer("identity_fp32", [inp]).as_numpy("OUTPUT0"), data)


def test_statistics_count_grpc_requests(client: grpcclient.InferenceServerClient) -> None:
    def count() -> int:
        stats = client.get_inference_statistics("tiny").model_stats
        return sum(s.inference_stats.success.count for s in stats)

    before = count()
    x = np.ones((1, 16), dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        client.infer("tiny", [inp])
    assert count() == before + 3
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("no_such_model")
    assert status_of(info) == "StatusCode.NOT_FOUND"


async def test_asyncio_client_keeps_concurrent_answers_apart(served: Served) -> None:
    async with grpcaio.InferenceServerClient(served.grpc_url) as aio:
        assert await aio.is_server_ready()

        async def one(i: int) -> None:
            a = np.full((1, 16), i, dtype=np.int32)
            inputs = [grpcaio.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(a)
            result = await aio.infer("simple", inputs, request_id=f"c{i}")
            assert result.get_response().id == f"c{i}"
            assert result.as_numpy("OUTPUT0").tolist() == [[2 * i] * 16]

        await asyncio.gather(*(one(i) for i in range(40)))


# -- streaming --------------------------------------------------------------------------------


def _collect(client: grpcclient.InferenceServerClient, send: Any, until_finals: int) -> list[Any]:
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        send()
        events: list[Any] = []
        finals = 0
        while finals < until_finals:
            result, error = got.get(timeout=30)
            events.append((result, error))
            if error is not None:
                finals += 1
            elif result.get_response().parameters["triton_final_response"].bool_param:
                finals += 1
        return events
    finally:
        client.stop_stream()


def test_a_decoupled_model_streams_with_final_flags(backend_served: Served) -> None:
    client = grpcclient.InferenceServerClient(backend_served.grpc_url)
    values = np.array([5, 6, 7], dtype=np.int32)
    inp = grpcclient.InferInput("IN", [3], "INT32")
    inp.set_data_from_numpy(values)

    def send() -> None:
        client.async_stream_infer("repeat", [inp], request_id="s1", enable_empty_final_response=True)

    events = _collect(client, send, 1)
    assert all(error is None for _, error in events)
    responses = [result.get_response() for result, _ in events]
    assert [r.id for r in responses] == ["s1"] * 4
    outputs = [result.as_numpy("OUT") for result, _ in events[:3]]
    assert [o.tolist() for o in outputs] == [[5], [6], [7]]
    finals = [r.parameters["triton_final_response"].bool_param for r in responses]
    assert finals == [False, False, False, True]
    assert not responses[-1].outputs  # the empty final response

    # Without it, the stream carries the model's answers alone: once the client closes its
    # side, the server finishes what it holds and ends the stream after them.
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("repeat", [inp], request_id="s2")
    client.stop_stream()  # returns once the server has ended the stream
    events = [got.get_nowait() for _ in range(got.qsize())]
    assert [error for _, error in events] == [None] * 3
    assert [result.as_numpy("OUT").tolist() for result, _ in events] == [[5], [6], [7]]


def test_errors_arrive_in_the_stream_and_it_goes_on(backend_served: Served) -> None:
    client = grpcclient.InferenceServerClient(backend_served.grpc_url)
    good = grpcclient.InferInput("IN", [2], "INT32")
    good.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    bad = grpcclient.InferInput("IN", [2], "FP32")
    bad.set_data_from_numpy(np.array([1, 2], dtype=np.float32))
    simple = simple_inputs(np.ones((1, 16), np.int32), np.ones((1, 16), np.int32))

    def send() -> None:
        client.async_stream_infer("no_such_model", [good], request_id="e1")
        client.async_stream_infer("repeat", [bad], request_id="e2")
        client.async_stream_infer("simple", simple, request_id="n1")
        client.async_stream_infer("repeat", [good], request_id="g1", enable_empty_final_response=True)

    events = _collect(client, send, 4)
    errors = sorted(str(error) for _, error in events if error is not None)
    assert len(errors) == 2
    assert "no_such_model" in errors[1] or "no_such_model" in errors[0]
    assert any("FP32" in e for e in errors)
    by_id: dict[str, list[Any]] = {}
    for result, error in events:
        if error is None:
            by_id.setdefault(result.get_response().id, []).append(result)
    # A model that is not decoupled answers once, and that answer is final.
    (single,) = by_id["n1"]
    assert single.get_response().parameters["triton_final_response"].bool_param
    assert single.as_numpy("OUTPUT0").tolist() == [[2] * 16]
    assert [r.as_numpy("OUT").tolist() for r in by_id["g1"][:2]] == [[1], [2]]


def test_a_stream_that_goes_quiet_past_its_deadline_ends_with_an_error(backend_served: Served) -> None:
    client = grpcclient.InferenceServerClient(backend_served.grpc_url)
    values = grpcclient.InferInput("IN", [1], "INT32")
    values.set_data_from_numpy(np.array([1], dtype=np.int32))
    delay = grpcclient.InferInput("DELAY_MS", [1], "UINT32")
    delay.set_data_from_numpy(np.array([3000], dtype=np.uint32))

    def send() -> None:
        # Each answer comes 3 s after the last; the request allows 0.3 s of silence.
        client.async_stream_infer("repeat", [values, delay], request_id="quiet", timeout=300_000)

    ((result, error),) = _collect(client, send, 1)
    assert result is None
    assert "repeat" in str(error) and "sent nothing" in str(error)


def test_model_infer_on_a_decoupled_model_is_unimplemented(backend_served: Served) -> None:
    client = grpcclient.InferenceServerClient(backend_served.grpc_url)
    inp = grpcclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("repeat", [inp])
    assert status_of(info) == "StatusCode.UNIMPLEMENTED"
    assert "ModelStreamInfer" in info.value.message()


# -- shared memory ------------------------------------------------------------------------------


def test_system_shared_memory_over_grpc(client: grpcclient.InferenceServerClient) -> None:
    import tritonclient.utils.shared_memory as shm

    inputs_handle = shm.create_shared_memory_region("grpc_in", "/natron_grpc_in", 128)
    outputs_handle = shm.create_shared_memory_region("grpc_out", "/natron_grpc_out", 128)
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 3, dtype=np.int32)
        shm.set_shared_memory_region(inputs_handle, [a, b])
        client.register_system_shared_memory("grpc_in", "/natron_grpc_in", 128)
        client.register_system_shared_memory("grpc_out", "/natron_grpc_out", 128)
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert status["grpc_in"]["key"] == "/natron_grpc_in"
        assert int(status["grpc_out"]["byte_size"]) == 128

        inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_shared_memory("grpc_in", 64)
        inputs[1].set_shared_memory("grpc_in", 64, offset=64)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
        outputs[0].set_shared_memory("grpc_out", 64)
        outputs[1].set_shared_memory("grpc_out", 64, offset=64)
        result = client.infer("simple", inputs, outputs=outputs)
        assert [o.name for o in result.get_response().outputs] == ["OUTPUT0", "OUTPUT1"]
        np.testing.assert_array_equal(shm.get_contents_as_numpy(outputs_handle, np.int32, [1, 16]), a + b)
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(outputs_handle, np.int32, [1, 16], offset=64), a - b
        )

        # Shared memory beside raw contents in one request.
        mixed = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        mixed[0].set_shared_memory("grpc_in", 64)
        mixed[1].set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
        assert client.infer("simple", mixed).as_numpy("OUTPUT0").tolist() == [list(range(1, 17))]

        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory("grpc_in", "/natron_grpc_in", 128)
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
        too_small = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        too_small[0].set_shared_memory("grpc_in", 60)
        too_small[1].set_shared_memory("grpc_in", 64, offset=64)
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", too_small)
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT"

        client.unregister_system_shared_memory("grpc_in")
        assert set(client.get_system_shared_memory_status(as_json=True)["regions"]) == {"grpc_out"}
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", inputs, outputs=outputs)
        assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
        assert "grpc_in" in info.value.message()
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(inputs_handle)
        shm.destroy_shared_memory_region(outputs_handle)


def test_cuda_shared_memory_without_a_gpu_is_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.register_cuda_shared_memory("cuda0", b"\0" * 64, 0, 64)
    assert status_of(info) == "StatusCode.UNIMPLEMENTED"
    assert "CUDA shared memory" in info.value.message()
    assert client.get_cuda_shared_memory_status(as_json=True).get("regions", {}) == {}
