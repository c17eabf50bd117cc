"""Ensembles as chained subjects: steps run through the mesh as soon as their inputs exist,
ensembles nest, and a failing step fails only its own request, naming the step and model."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import orjson
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.harness import Served, wait_until


@pytest.fixture(scope="module")
def client(served: Served) -> httpclient.InferenceServerClient:
    client = httpclient.InferenceServerClient(served.host_port)
    for model in ("ensemble_simple", "ensemble_parallel", "ensemble_nested"):
        wait_until(lambda model=model: client.is_model_ready(model), 30, f"{model} ready")
    return client


def int_pair(a: np.ndarray, b: np.ndarray) -> list[httpclient.InferInput]:
    inputs = [httpclient.InferInput(n, list(a.shape), "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def test_a_two_step_ensemble_chains_its_models(client: httpclient.InferenceServerClient) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 5, dtype=np.int32)
    result = client.infer("ensemble_simple", int_pair(a, b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 2 * b)


def test_independent_steps_and_dependent_ones(client: httpclient.InferenceServerClient) -> None:
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    inp = httpclient.InferInput("X", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("ensemble_parallel", [inp])
    np.testing.assert_allclose(result.as_numpy("A"), 2 * x + 1)
    np.testing.assert_allclose(result.as_numpy("B"), 2 * x + 1)
    np.testing.assert_allclose(result.as_numpy("C"), 4 * x + 3, rtol=1e-6)
    only_c = client.infer("ensemble_parallel", [inp], outputs=[httpclient.InferRequestedOutput("C")])
    assert only_c.as_numpy("A") is None


def test_an_ensemble_of_ensembles(client: httpclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    result = client.infer("ensemble_nested", int_pair(a, b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 4 * a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 4 * b)


def test_a_missing_composing_model_makes_the_ensemble_unavailable(served: Served) -> None:
    index = {m["name"]: m for m in requests.post(f"{served.url}/v2/repository/index", timeout=10).json()}
    assert index["ensemble_missing"]["state"] == "UNAVAILABLE"
    assert "composing model 'does_not_exist'" in index["ensemble_missing"]["reason"]
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [0] * 16}]}
    response = requests.post(f"{served.url}/v2/models/ensemble_missing/infer", json=body, timeout=10)
    assert response.status_code == 503
    assert "does_not_exist" in response.json()["error"]


def test_a_failing_step_names_the_step_and_model(client: httpclient.InferenceServerClient) -> None:
    inp = httpclient.InferInput("X", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble_failing", [inp])
    assert info.value.status() == "400"
    assert "ensemble 'ensemble_failing' step 1 (model 'no_batch')" in info.value.message()


async def test_concurrent_ensemble_requests_each_get_their_own_answer(served: Served) -> None:
    wrong: list[int] = []

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [i] * 16},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [i + 1] * 16},
            ]
        }
        async with session.post(
            f"{served.url}/v2/models/ensemble_simple/infer", data=orjson.dumps(body)
        ) as r:
            answer = await r.json()
        outputs = {o["name"]: o["data"] for o in answer.get("outputs", [])}
        if r.status != 200 or outputs != {"OUTPUT0": [2 * i] * 16, "OUTPUT1": [2 * (i + 1)] * 16}:
            wrong.append(i)

    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(asyncio.gather(*(one(session, i) for i in range(200))), 60)
    assert wrong == []
