"""The PyTorch backend on the CPU: TorchScript and torch.export models behind a real `natron
serve`, config names reaching forward(), every datatype, and failures. (Triton's naming rules
alone: tests/unit/test_pytorch_names.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from broker.requester import Requester
from examples import build_backend_models
from natron import datatypes
from natron.errors import NatronError
from natron.inference import InferRequest, InferResponse, Tensor
from tests.harness import Served

pytest.importorskip("torch")

# The shared server and its helpers come as fixtures (see tests/backend_fixtures.py).
pytest_plugins = ["tests.backend_fixtures"]
pytestmark = pytest.mark.timeout(120)

ANSWER_TIMEOUT_S = 30.0  # generous for a loaded 2-core machine; a hang still ends


async def infer(requester: Requester, request: InferRequest) -> InferResponse:
    return await requester.infer(request, "1", ANSWER_TIMEOUT_S)


def post_infer(served: Served, model: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{served.url}/v2/models/{model}/infer", data=json.dumps(body), timeout=ANSWER_TIMEOUT_S
    )


# -- served models -----------------------------------------------------------------------------


def test_a_torchscript_model_with_indexed_names_answers_a_triton_client(backend_served: Served) -> None:
    client = httpclient.InferenceServerClient(backend_served.host_port)
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    y = np.full((2, 16), 0.5, dtype=np.float32)
    inputs = [
        httpclient.InferInput("INPUT__0", [2, 16], "FP32"),
        httpclient.InferInput("INPUT__1", [2, 16], "FP32"),
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    result = client.infer("torch_add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), x + y)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), x - y)


async def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(
    backend_requester: Requester,
) -> None:
    def request(i: int) -> InferRequest:
        x = np.full((1, 16), i, dtype=np.float32)
        return InferRequest(
            f"r{i}",
            "torch_add_sub",
            "",
            [Tensor("INPUT__0", "FP32", (1, 16), x), Tensor("INPUT__1", "FP32", (1, 16), x)],
        )

    answers = await asyncio.gather(*(infer(backend_requester, request(i)) for i in range(12)))
    for i, answer in enumerate(answers):
        outputs = {t.name: t.data for t in answer.outputs}
        np.testing.assert_array_equal(outputs["OUTPUT__0"], np.full((1, 16), 2 * i, dtype=np.float32))
        np.testing.assert_array_equal(outputs["OUTPUT__1"], np.zeros((1, 16), dtype=np.float32))


def test_config_names_reach_the_forward_arguments_of_the_same_name(backend_served: Served) -> None:
    # The config lists `offsets` before `values`; forward(values, offsets) must still get each.
    body = {
        "inputs": [
            {"name": "offsets", "shape": [4], "datatype": "FP32", "data": [10, 10, 10, 10]},
            {"name": "values", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
        ]
    }
    response = post_infer(backend_served, "torch_named", body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs == {"shifted": [11, 12, 13, 14], "doubled": [2, 4, 6, 8]}


def test_a_dict_input_model_gets_its_inputs_keyed_by_config_name(backend_served: Served) -> None:
    body = {
        "inputs": [
            {"name": "a", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]},
            {"name": "b", "shape": [3], "datatype": "INT64", "data": [4, 5, 6]},
        ]
    }
    response = post_infer(backend_served, "torch_dict", body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [4, 10, 18]


async def test_every_datatype_torch_knows_goes_through_and_back(backend_requester: Requester) -> None:
    inputs = []
    for index, datatype in enumerate(build_backend_models.TORCH_DATATYPES):
        array = (np.arange(6) % 3).astype(datatypes.to_numpy_dtype(datatype)).reshape(2, 3)
        inputs.append(Tensor(f"INPUT__{index}", datatype, (2, 3), array))
    answer = await infer(backend_requester, InferRequest("types", "torch_identity", "", inputs))
    got = {t.name: t for t in answer.outputs}
    for index, tensor in enumerate(inputs):
        output = got[f"OUTPUT__{index}"]
        assert output.datatype == tensor.datatype
        assert output.data.dtype == tensor.data.dtype
        np.testing.assert_array_equal(output.data, tensor.data)


def test_bytes_cross_into_torch_as_a_list_of_str(backend_served: Served) -> None:
    client = httpclient.InferenceServerClient(backend_served.host_port)
    text = np.array([b"abc", "héllo".encode(), b""], dtype=np.object_)
    inputs = [httpclient.InferInput("TEXT__0", [3], "BYTES")]
    inputs[0].set_data_from_numpy(text)
    result = client.infer("torch_strings", inputs)
    # TorchScript's str is UTF-8 bytes: upper() changes ASCII letters only, len() counts bytes.
    assert list(result.as_numpy("UPPER__0")) == [b"ABC", "HéLLO".encode(), b""]
    assert result.as_numpy("LENGTH__1").tolist() == [3, 6, 0]


def test_bytes_that_are_not_utf8_are_a_client_error_for_torch(backend_served: Served) -> None:
    client = httpclient.InferenceServerClient(backend_served.host_port)
    inputs = [httpclient.InferInput("TEXT__0", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([b"\xff\xfe"], dtype=np.object_))
    with pytest.raises(Exception, match="UTF-8"):
        client.infer("torch_strings", inputs)


def test_a_torch_export_program_serves_batches(backend_served: Served) -> None:
    body = {
        "inputs": [
            {"name": "a", "shape": [3, 4], "datatype": "FP32", "data": list(range(12))},
            {"name": "b", "shape": [3, 4], "datatype": "FP32", "data": [2] * 12},
        ]
    }
    response = post_infer(backend_served, "torch_export", body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [2 * i + 1 for i in range(12)]


async def test_an_exception_in_forward_answers_500_naming_it_and_the_next_request_works(
    backend_requester: Requester,
) -> None:
    def request(value: float) -> InferRequest:
        x = np.full((1, 2), value, dtype=np.float32)
        return InferRequest("raise", "torch_raises", "", [Tensor("INPUT__0", "FP32", (1, 2), x)])

    with pytest.raises(NatronError) as caught:
        await infer(backend_requester, request(-1.0))
    assert caught.value.status == 500
    assert "PyTorch execute failure" in caught.value.message
    assert "torch_raises refuses negative input" in caught.value.message
    answer = await infer(backend_requester, request(3.0))
    assert answer.outputs[0].data.tolist() == [[6.0, 6.0]]


def test_a_config_that_disagrees_with_forward_makes_the_model_unavailable_with_the_reason(
    backend_served: Served, repository_state: Callable[[str], dict[str, Any]]
) -> None:
    entry = repository_state("torch_wrong_inputs")
    assert entry["state"] == "UNAVAILABLE"
    assert "configuration expects 3 inputs, model provides 2" in entry["reason"]
    assert requests.get(f"{backend_served.url}/v2/models/torch_add_sub/ready", timeout=5).status_code == 200
