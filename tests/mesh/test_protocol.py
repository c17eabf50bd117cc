"""The real Triton client, `tritonclient.http`, used unchanged against `natron serve`."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import orjson
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.harness import Served, wait_until


@pytest.fixture(scope="module")
def client(served: Served) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(served.host_port, concurrency=4)


def test_server_is_live_ready_and_describes_itself(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "natron"
    assert "binary_tensor_data" in metadata["extensions"]


def test_serve_prints_the_model_table_and_endpoints(served: Served) -> None:
    def printed() -> str:
        text = served.output.read_text(errors="replace")
        return text if "NATS:" in text else ""

    # The table comes once every model has settled, which may be just after the fixture's
    # readiness check: give it a bounded while.
    output = wait_until(printed, 30, "the model table and endpoints printed")
    assert "natron models" in output
    assert "broken" in output and "UNAVAILABLE" in output
    assert f"HTTP endpoint:    http://127.0.0.1:{served.url.rsplit(':', 1)[1]}" in output
    assert served.nats_url in output


def test_model_metadata_matches_the_config(client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("simple")
    assert metadata["name"] == "simple"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [
        {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ]
    assert [o["name"] for o in metadata["outputs"]] == ["OUTPUT0", "OUTPUT1"]


def test_model_config_is_tritons_json_form(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [16]
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert "dynamic_batching" in config


def test_config_is_completed_from_the_onnx_graph_when_missing(
    client: httpclient.InferenceServerClient,
) -> None:
    config = client.get_model_config("autocomplete")
    assert config["max_batch_size"] == 4  # Triton's default-max-batch-size
    assert config["input"] == [{**config["input"][0], "name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["output"][0]["name"] == "y"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("autocomplete", [inp])
    np.testing.assert_array_equal(result.as_numpy("y"), x * 3)


@pytest.mark.parametrize("binary", [True, False])
def test_simple_add_sub_in_json_and_binary(client: httpclient.InferenceServerClient, binary: bool) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary),
    ]
    result = client.infer("simple", inputs, outputs=outputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_version"] == "1"


def test_only_the_requested_output_comes_back(client: httpclient.InferenceServerClient) -> None:
    a = np.ones((2, 16), dtype=np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [2, 16], "INT32"),
        httpclient.InferInput("INPUT1", [2, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    result = client.infer("simple", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((2, 16), dtype=np.int32))


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(7)
    count = int(np.prod(shape))
    if datatype == "BOOL":
        return rng.integers(0, 2, count).astype(bool).reshape(shape)
    if datatype == "BYTES":
        items = [f"elem-{i}-é".encode() for i in range(count)]
        return np.array(items, dtype=np.object_).reshape(shape)
    if datatype == "BF16":
        return rng.normal(size=shape).astype(ml_dtypes.bfloat16)
    dtype = {
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }[datatype]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = [int(info.min), int(info.max), 0, 1] * count
        return np.array(values[:count], dtype=dtype).reshape(shape)
    return rng.normal(size=shape).astype(dtype)


ALL_DATATYPES = [
    "BOOL",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_round_trips(
    client: httpclient.InferenceServerClient, datatype: str, binary: bool
) -> None:
    if not binary and datatype in ("FP16", "BF16"):
        pytest.skip("Triton's JSON encoding has no FP16/BF16: binary only (tested below)")
    data = _sample(datatype, (3, 5))
    inp = httpclient.InferInput("INPUT0", [3, 5], datatype)
    inp.set_data_from_numpy(data, binary_data=binary)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer(f"identity_{datatype.lower()}", [inp], outputs=[out])
    got = result.as_numpy("OUTPUT0")
    assert got.shape == (3, 5)
    if datatype == "BYTES":
        # tritonclient gives JSON strings back as str, binary ones as bytes.
        as_bytes = [[v.encode() if isinstance(v, str) else v for v in row] for row in got.tolist()]
        assert as_bytes == data.tolist()
    else:
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data)


def test_bool_binary_data_reads_any_nonzero_byte_as_true(served: Served) -> None:
    # Triton reads BOOL bytes as C++ bools; perf_analyzer's random data sends any byte value.
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "BOOL", "shape": [1, 5], "parameters": {"binary_data_size": 5}}
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    )
    response = requests.post(
        f"{served.url}/v2/models/identity_bool/infer",
        data=header + bytes([0, 1, 2, 0x80, 0xFF]),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    json_length = int(response.headers["Inference-Header-Content-Length"])
    assert response.content[json_length:] == bytes([0, 1, 1, 1, 1])


def test_fp16_sent_as_json_is_a_clear_400(client: httpclient.InferenceServerClient) -> None:
    inp = httpclient.InferInput("INPUT0", [1, 2], "FP16")
    inp.set_data_from_numpy(np.ones((1, 2), dtype=np.float16), binary_data=False)
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity_fp16", [inp])
    assert info.value.status() == "400"
    assert "FP16" in info.value.message()


def test_versions_follow_the_version_policy(client: httpclient.InferenceServerClient) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    # latest 2 of versions 1, 2, 3: no version means the highest ready one.
    assert client.infer("versioned", [inp]).as_numpy("OUTPUT0").tolist() == [[3.0] * 4]
    assert client.infer("versioned", [inp], model_version="2").as_numpy("OUTPUT0").tolist() == [[2.0] * 4]
    assert client.is_model_ready("versioned", "2")
    assert not client.is_model_ready("versioned", "1")  # outside the policy
    with pytest.raises(InferenceServerException) as info:
        client.infer("versioned", [inp], model_version="1")
    assert info.value.status() == "404"


def test_model_without_batching_takes_its_exact_shape(client: httpclient.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inp = httpclient.InferInput("INPUT0", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("no_batch", [inp]).as_numpy("OUTPUT0"), x + 1)


def test_repository_index_lists_every_version_with_its_state(
    client: httpclient.InferenceServerClient,
) -> None:
    index = client.get_model_repository_index()
    by_key = {(m["name"], m.get("version", "")): m for m in index}
    assert by_key[("tiny", "1")]["state"] == "READY"
    assert by_key[("versioned", "3")]["state"] == "READY"
    assert ("versioned", "1") not in by_key
    broken = by_key[("broken", "1")]
    assert broken["state"] == "UNAVAILABLE"
    assert "Protobuf parsing failed" in broken["reason"]


def test_an_unavailable_model_answers_503_with_its_reason(client: httpclient.InferenceServerClient) -> None:
    assert not client.is_model_ready("broken")
    inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("broken", [inp])
    assert info.value.status() == "503"
    assert "Protobuf" in info.value.message()
