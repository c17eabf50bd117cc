"""Bad input gets a clear error and nothing else: Triton's status codes, a JSON body
`{"error": "..."}` naming the mistake, never a 500, never a hang."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import numpy as np
import pytest
import requests

from tests.harness import Served

TINY_INPUT = {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))}


def post(served: Served, path: str, body: bytes | dict[str, Any], **kwargs: Any) -> requests.Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(f"{served.url}{path}", data=data, timeout=30, **kwargs)


def assert_error(response: requests.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


def test_the_tiny_model_answers_a_plain_json_request(served: Served) -> None:
    response = post(served, "/v2/models/tiny/infer", {"inputs": [TINY_INPUT]})
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == [float(2 * i + 1) for i in range(16)]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "object"),
        (b"", "JSON"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{**TINY_INPUT, "name": "NOPE"}]}, "NOPE"),
        ({"inputs": [{**TINY_INPUT, "datatype": "INT32", "data": list(range(16))}]}, "datatype"),
        ({"inputs": [{**TINY_INPUT, "datatype": "FP99"}]}, "FP99"),
        ({"inputs": [{**TINY_INPUT, "shape": [1, 8], "data": list(range(8))}]}, "shape"),
        ({"inputs": [{**TINY_INPUT, "shape": [16], "data": list(range(16))}]}, "shape"),
        ({"inputs": [{**TINY_INPUT, "data": list(range(15))}]}, "15"),
        ({"inputs": [{**TINY_INPUT, "shape": [129, 16], "data": [0.0] * 129 * 16}]}, "max_batch_size"),
        ({"inputs": [{**TINY_INPUT, "data": ["a"] * 16}]}, "INPUT0"),
        ({"inputs": [TINY_INPUT, TINY_INPUT]}, "INPUT0"),
        ({"inputs": [TINY_INPUT], "outputs": [{"name": "NOPE"}]}, "NOPE"),
        ({"inputs": [TINY_INPUT], "parameters": {"timeout": -5}}, "timeout"),
        ({"inputs": [{k: v for k, v in TINY_INPUT.items() if k != "data"}]}, "data"),
    ],
)
def test_client_mistakes_are_400_with_a_reason(served: Served, body: Any, fragment: str) -> None:
    assert_error(post(served, "/v2/models/tiny/infer", body), 400, fragment)


def test_a_missing_input_is_named(served: Served) -> None:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}]}
    assert_error(post(served, "/v2/models/simple/infer", body), 400, "INPUT1")


def test_binary_sizes_that_do_not_add_up_are_400(served: Served) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    ).encode()
    for binary in (b"\0" * 60, b"\0" * 68):
        response = post(
            served,
            "/v2/models/tiny/infer",
            header + binary,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert_error(response, 400)


@pytest.mark.parametrize("value", ["abc", "-1", "999999"])
def test_a_bad_header_length_is_400(served: Served, value: str) -> None:
    response = post(
        served,
        "/v2/models/tiny/infer",
        {"inputs": [TINY_INPUT]},
        headers={"Inference-Header-Content-Length": value},
    )
    assert_error(response, 400, "Inference-Header-Content-Length")


def test_unknown_model_and_version_are_404(served: Served) -> None:
    assert_error(post(served, "/v2/models/nope/infer", {"inputs": [TINY_INPUT]}), 404, "nope")
    assert_error(post(served, "/v2/models/tiny/versions/7/infer", {"inputs": [TINY_INPUT]}), 404, "7")
    assert_error(requests.get(f"{served.url}/v2/models/nope", timeout=5), 404, "nope")
    assert_error(requests.get(f"{served.url}/v2/models/nope/config", timeout=5), 404, "nope")
    assert_error(requests.get(f"{served.url}/v2/no/such/route", timeout=5), 404)


def test_wrong_method_is_405_in_json(served: Served) -> None:
    assert_error(requests.get(f"{served.url}/v2/models/tiny/infer", timeout=5), 405)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_bodies_are_accepted(served: Served, encoding: str) -> None:
    raw = json.dumps({"inputs": [TINY_INPUT]}).encode()
    body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    response = post(served, "/v2/models/tiny/infer", body, headers={"Content-Encoding": encoding})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"][:2] == [1.0, 3.0]


def test_an_expired_deadline_is_504_not_a_hang(served: Served) -> None:
    body = {"inputs": [TINY_INPUT], "parameters": {"timeout": 1}}  # one microsecond
    assert_error(post(served, "/v2/models/tiny/infer", body), 504, "tiny")


def test_a_body_over_the_size_limit_is_413(served: Served) -> None:
    # The served fixture allows 8 MiB.
    big = np.zeros(9 * 1024 * 1024 // 4, dtype=np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [len(big) // 64, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(big)},
                }
            ]
        }
    ).encode()
    response = post(
        served,
        "/v2/models/tiny/infer",
        header + big,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_error(response, 413)


def test_repository_index_rejects_a_bad_body(served: Served) -> None:
    assert_error(post(served, "/v2/repository/index", b"{"), 400, "JSON")
    assert_error(post(served, "/v2/repository/index", {"ready": "yes"}), 400, "ready")
    ready = post(served, "/v2/repository/index", {"ready": True}).json()
    assert ready and all(m["state"] == "READY" for m in ready)
