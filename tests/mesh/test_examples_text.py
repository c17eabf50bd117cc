"""The text examples: a pipeline of a Python tokenizer, an ONNX encoder and a Python pooling step
as one ensemble, and a streaming text generator that calls its decoder once per token."""

from __future__ import annotations

import json

import numpy as np
import requests
import tritonclient.http as httpclient

from tests.harness import Served

pytest_plugins = ["tests.backend_fixtures"]


def embed(client: httpclient.InferenceServerClient, text: str) -> np.ndarray:
    inp = httpclient.InferInput("TEXT", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    result: np.ndarray = client.infer("text_pipeline", [inp]).as_numpy("EMBEDDING")
    return result


def test_the_text_pipeline_embeds_text_through_three_steps(backend_served: Served) -> None:
    client = httpclient.InferenceServerClient(backend_served.host_port)
    a, b, c = (
        embed(client, t) for t in ("the quick brown fox", "The quick, brown fox!", "a slow green turtle")
    )
    assert a.shape == (32,) and abs(float(np.linalg.norm(a)) - 1) < 1e-5
    np.testing.assert_allclose(a, b, rtol=1e-6)  # the tokenizer ignores case and punctuation
    assert float(a @ c) < 0.99
    response = requests.post(
        f"{backend_served.url}/v2/models/text_pipeline/infer",
        json={"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["..."]}]},
        timeout=30,
    )
    assert response.status_code == 400
    assert "step 2 (model 'text_pooling')" in response.json()["error"]


def test_the_generator_streams_one_token_per_event(backend_served: Served) -> None:
    response = requests.post(
        f"{backend_served.url}/v2/models/text_generator/generate_stream",
        json={"PROMPT": "once upon a time", "MAX_TOKENS": 12},
        stream=True,
        timeout=60,
    )
    assert response.status_code == 200
    events = [
        json.loads(line[len(b"data: ") :]) for line in response.iter_lines() if line.startswith(b"data: ")
    ]
    tokens = [e["TOKEN"] for e in events]
    assert len(tokens) == 12 and all(isinstance(t, str) and t for t in tokens)
    again = requests.post(
        f"{backend_served.url}/v2/models/text_generator/generate_stream",
        json={"PROMPT": "once upon a time", "MAX_TOKENS": 12},
        timeout=60,
    )
    assert [
        json.loads(x[len("data: ") :])["TOKEN"] for x in again.text.split("\n\n") if x
    ] == tokens  # greedy
