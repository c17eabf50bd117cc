"""Several model repositories, as tritonserver's repeated --model-repository: `natron serve`
serves the models of all of them as one repository; a name found in more than one is
UNAVAILABLE, naming them; an explicit load looks in each; uploads still go to --upload-dir.
And in poll mode, a name that turns up in a second repository leaves the model serving from
its first, saying why its reload failed, until the second copy goes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from examples.build_models import build
from tests.harness import Mesh, Served, natron_serve, wait_until

# In both repositories: served from neither.
TWICE = "identity_fp32"


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    # ensemble_simple, in the first, chains simple, in the second.
    build(first, ["tiny", "ensemble_simple", TWICE])
    build(second, ["simple", "identity_int32", TWICE])
    return first.resolve(), second.resolve()


@pytest.fixture(scope="module")
def served(repositories: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    first, second = repositories
    log_dir = tmp_path_factory.mktemp("serve")
    args = (
        "--model-repository", str(first), "--model-repository", str(second),
        "--model-control-mode", "explicit", "--upload-dir", str(log_dir / "uploads"),
        *(arg for name in ("tiny", "simple", "ensemble_simple", TWICE) for arg in ("--load-model", name)),
    )  # fmt: skip
    with natron_serve(first, ["tiny", "simple", "ensemble_simple"], log_dir, args) as s:
        yield s


@pytest.fixture
def client(served: Served) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(served.host_port, network_timeout=120)


def index_of(url: str) -> dict[str, dict[str, Any]]:
    response = requests.post(f"{url}/v2/repository/index", timeout=10)
    response.raise_for_status()
    return {entry["name"]: entry for entry in response.json()}


def fp32(value: float, name: str = "INPUT0") -> list[httpclient.InferInput]:
    inp = httpclient.InferInput(name, [1, 16], "FP32")
    inp.set_data_from_numpy(np.full((1, 16), value, dtype=np.float32))
    return [inp]


def int32_pair(a: int, b: int) -> list[httpclient.InferInput]:
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        inp = httpclient.InferInput(name, [1, 16], "INT32")
        inp.set_data_from_numpy(np.full((1, 16), value, dtype=np.int32))
        inputs.append(inp)
    return inputs


def test_serve_serves_the_models_of_every_repository_and_logs_them_all(
    served: Served, client: httpclient.InferenceServerClient, repositories: tuple[Path, Path]
) -> None:
    out = client.infer("tiny", fp32(2.0)).as_numpy("OUTPUT0")  # from the first
    np.testing.assert_array_equal(out, np.full((1, 16), 5.0, dtype=np.float32))
    result = client.infer("simple", int32_pair(5, 3))  # from the second
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 8, dtype=np.int32))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.full((1, 16), 2, dtype=np.int32))
    # An ensemble in one repository chains a model of another.
    chained = client.infer("ensemble_simple", int32_pair(5, 3))
    np.testing.assert_array_equal(chained.as_numpy("OUTPUT0"), np.full((1, 16), 10, dtype=np.int32))
    first, second = repositories
    assert f"model(s) in {first}, {second}, mode explicit" in served.output.read_text(errors="replace")


def test_a_model_in_two_repositories_is_unavailable_naming_both(
    served: Served, client: httpclient.InferenceServerClient, repositories: tuple[Path, Path]
) -> None:
    first, second = repositories
    reason = f"not unique across the model repositories: in {first}, {second}"
    assert index_of(served.url)[TWICE] == {"name": TWICE, "state": "UNAVAILABLE", "reason": reason}
    assert not client.is_model_ready(TWICE)
    response = requests.post(
        f"{served.url}/v2/models/{TWICE}/infer",
        json={"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
        timeout=30,
    )
    assert response.status_code == 503 and reason in response.json()["error"], response.text
    # Loading it again is refused the same way, at once, and changes nothing.
    with pytest.raises(InferenceServerException) as info:
        client.load_model(TWICE)
    assert info.value.status() == "400" and info.value.message() == f"failed to load '{TWICE}': {reason}"
    assert index_of(served.url)[TWICE]["reason"] == reason


def test_an_explicit_load_finds_a_model_in_the_second_repository(
    served: Served, client: httpclient.InferenceServerClient
) -> None:
    assert index_of(served.url)["identity_int32"]["reason"] == "unloaded"
    client.load_model("identity_int32")
    assert client.is_model_ready("identity_int32")
    inp = httpclient.InferInput("INPUT0", [1, 3], "INT32")
    inp.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int32))
    out = client.infer("identity_int32", [inp]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.array([[1, 2, 3]], dtype=np.int32))


def test_a_load_of_a_model_in_no_repository_is_not_found(served: Served) -> None:
    response = requests.post(f"{served.url}/v2/repository/models/nowhere/load", timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "no model 'nowhere' in the model repositories"


def test_uploaded_files_go_to_the_upload_dir_not_to_a_repository(
    served: Served, client: httpclient.InferenceServerClient, repositories: tuple[Path, Path]
) -> None:
    onnx_bytes = (repositories[0] / "tiny" / "1" / "model.onnx").read_bytes()
    config = {
        "name": "uploaded",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
    }
    client.load_model("uploaded", config=json.dumps(config), files={"file:1/model.onnx": onnx_bytes})
    out = client.infer("uploaded", fp32(3.0)).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((1, 16), 7.0, dtype=np.float32))
    (written,) = (served.output.parent / "uploads" / "uploaded").glob("*/1/model.onnx")
    assert written.read_bytes() == onnx_bytes
    assert all(not (repository / "uploaded").exists() for repository in repositories)


# -- poll ----------------------------------------------------------------------------------


@pytest.fixture
def polled(tmp_path: Path) -> Iterator[tuple[Mesh, Path, Path]]:
    first, second = (tmp_path / "first").resolve(), (tmp_path / "second").resolve()
    build(first, ["tiny", "simple"])
    build(second, ["simple"])
    mesh = Mesh(
        first,
        ["--model-repository", str(first), "--model-repository", str(second),
         "--model-control-mode", "poll", "--repository-poll-secs", "0.3"],
    )  # fmt: skip
    mesh.start_nats()
    mesh.start_router()
    mesh.start_worker("w0")
    mesh.start_gateway()
    try:
        mesh.wait_ready("tiny")
        yield mesh, first, second
    finally:
        mesh.stop()


def test_poll_mode_follows_a_name_into_and_out_of_a_second_repository(
    polled: tuple[Mesh, Path, Path],
) -> None:
    mesh, first, second = polled
    both = f"not unique across the model repositories: in {first}, {second}"
    wait_until(lambda: index_of(mesh.url)["simple"].get("reason") == both, 30, "simple unavailable")
    assert index_of(mesh.url)["simple"]["state"] == "UNAVAILABLE"

    # Gone from the second: served from the first.
    shutil.rmtree(second / "simple")
    mesh.wait_ready("simple")

    # A copy of a served model in the second: it serves on from the first, and says why.
    shutil.copytree(first / "tiny", second / "tiny")
    wait_until(lambda: both in index_of(mesh.url)["tiny"].get("reason", ""), 30, "tiny's failure shown")
    tiny = index_of(mesh.url)["tiny"]
    assert tiny["state"] == "READY" and tiny["reason"].startswith("reload failed")
    assert mesh.infer_tiny(2.0).json()["outputs"][0]["data"] == [5.0] * 16

    # The copy gone: nothing left to say.
    shutil.rmtree(second / "tiny")
    wait_until(lambda: "reason" not in index_of(mesh.url)["tiny"], 30, "tiny's failure cleared")
    assert index_of(mesh.url)["tiny"]["state"] == "READY"
