"""A failed load never takes a serving model down: whether the router refuses it at once (a
config that does not parse or validate, an instance_group no worker can take) or the workers
fail it (model files that do not load, a Python model whose initialize raises), the load call
answers the reason, the repository index shows it, and the model serves on with its own config:
its metadata and the checks of requests stay the old ones. Real router, worker and gateway
processes, driven with the Triton client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.harness import Mesh, wait_until

# `simple` from examples/build_models.py: OUTPUT0 = INPUT0 + INPUT1, INT32 [16], max_batch_size 8.
SIMPLE_MAX_BATCH = 8

PY_INIT_FAILS = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("no weights for this reload")

    def execute(self, requests):
        return []
"""

# Initialize tells the test it has started, then waits for the test's word: the load is held
# under way for as long as the test looks at what clients see meanwhile.
PY_GATED = """
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        open({started!r}, "w").close()
        while not os.path.exists({gate!r}):
            time.sleep(0.02)

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            outputs = [pb_utils.Tensor("OUTPUT0", np.add(a, b, dtype=np.int32)),
                       pb_utils.Tensor("OUTPUT1", np.subtract(a, b, dtype=np.int32))]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
"""


@pytest.fixture(scope="module")
def mesh(model_repository: Path) -> Iterator[Mesh]:
    mesh = Mesh(model_repository, ["--model-control-mode", "explicit", "--load-model", "simple"])
    mesh.start_nats()
    mesh.start_router()
    mesh.start_worker("w0")
    # These tests upload Python models (model.py), which a gateway takes only when told to.
    mesh.start_gateway("--allow-code-upload", "true")
    try:
        mesh.wait_ready("simple")
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def client(mesh: Mesh) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(mesh.url.removeprefix("http://"), network_timeout=120)
    client.load_model("simple")  # each test starts from config.pbtxt, served, no failure noted
    yield client
    client.close()


def simple_inputs(batch: int) -> list[httpclient.InferInput]:
    inputs = []
    for name, value in (("INPUT0", 3), ("INPUT1", 1)):
        tensor = httpclient.InferInput(name, [batch, 16], "INT32")
        tensor.set_data_from_numpy(np.full((batch, 16), value, dtype=np.int32))
        inputs.append(tensor)
    return inputs


def python_config(client: httpclient.InferenceServerClient, max_batch_size: int) -> dict[str, Any]:
    """`simple`'s config for the Python backend, with another max_batch_size."""
    config = client.get_model_config("simple")
    for key in ("platform", "default_model_filename"):
        config.pop(key, None)
    return {**config, "backend": "python", "max_batch_size": max_batch_size}


def simple_index_entry(client: httpclient.InferenceServerClient) -> dict[str, Any]:
    entries = [e for e in client.get_model_repository_index() if e["name"] == "simple"]
    assert len(entries) == 1, entries
    return dict(entries[0])


def ready_lines(mesh: Mesh) -> int:
    return mesh.log("w0").count("model 'simple' version 1 ready")


def assert_serves_as_before(client: httpclient.InferenceServerClient, reason: str) -> None:
    """The model is READY, says why the last load failed, and is still the ONNX model of
    config.pbtxt: its metadata, its config, and a batch only its max_batch_size allows."""
    assert client.is_model_ready("simple")
    entry = simple_index_entry(client)
    assert entry["state"] == "READY"
    assert "reload failed" in entry["reason"] and reason in entry["reason"], entry
    assert client.get_model_config("simple")["max_batch_size"] == SIMPLE_MAX_BATCH
    metadata = client.get_model_metadata("simple")
    assert metadata["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in metadata["inputs"]] == ["INPUT0", "INPUT1"]
    out = client.infer("simple", simple_inputs(SIMPLE_MAX_BATCH)).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((SIMPLE_MAX_BATCH, 16), 4, dtype=np.int32))
    # The checks are the old config's too: one more than its max_batch_size is refused.
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", simple_inputs(SIMPLE_MAX_BATCH + 1))
    assert info.value.status() == "400" and "max_batch_size" in info.value.message()


def failed_load(client: httpclient.InferenceServerClient, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple", **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("{not json", "'config' parameter is not valid JSON"),
        ('["a", "list"]', "'config' parameter must be a JSON object"),
        ('{"name": "simple", "max_batch_size": "many"}', "max_batch_size"),
        ('{"name": "simple", "platform": "onnxruntime_onnx", "input": [{"name": "INPUT0", '
         '"data_type": "TYPE_NOPE", "dims": [16]}]}', "TYPE_NOPE"),
        ('{"name": "other"}', "names model 'other'"),
    ],
)  # fmt: skip
def test_a_config_override_that_fails_to_parse_leaves_the_model_serving(
    client: httpclient.InferenceServerClient, config: str, reason: str
) -> None:
    error = failed_load(client, config=config)
    assert error.status() == "400" and reason in error.message(), error.message()
    assert_serves_as_before(client, reason)


def test_an_instance_group_no_worker_can_take_leaves_the_model_serving(
    mesh: Mesh, client: httpclient.InferenceServerClient
) -> None:
    config = {**client.get_model_config("simple"), "instance_group": [{"kind": "KIND_GPU", "count": 1}]}
    before = ready_lines(mesh)
    error = failed_load(client, config=json.dumps(config))
    assert error.status() == "400" and "GPU" in error.message(), error.message()
    assert_serves_as_before(client, "no GPU worker has joined")
    assert ready_lines(mesh) == before  # refused before any worker saw it


def test_model_files_that_fail_to_load_leave_the_model_serving(
    mesh: Mesh, client: httpclient.InferenceServerClient
) -> None:
    config = {**client.get_model_config("simple"), "max_batch_size": 2}
    before = ready_lines(mesh)
    error = failed_load(client, config=json.dumps(config), files={"file:1/model.onnx": b"not a model"})
    assert error.status() == "400", error.message()
    assert "failed to load 'simple': version 1:" in error.message()
    assert_serves_as_before(client, "version 1:")
    # The instances that served before serve on: the worker loaded nothing again for them.
    assert ready_lines(mesh) == before


def test_a_python_model_whose_initialize_raises_leaves_the_model_serving(
    mesh: Mesh, client: httpclient.InferenceServerClient
) -> None:
    before = ready_lines(mesh)
    error = failed_load(
        client,
        config=json.dumps(python_config(client, 2)),
        files={"file:1/model.py": PY_INIT_FAILS.encode()},
    )
    assert error.status() == "400" and "no weights for this reload" in error.message(), error.message()
    assert_serves_as_before(client, "no weights for this reload")
    assert ready_lines(mesh) == before


def test_a_failed_reload_then_a_good_one_serves_the_good_one_and_clears_the_reason(
    client: httpclient.InferenceServerClient,
) -> None:
    failed_load(client, config="{not json")
    config = {**client.get_model_config("simple"), "max_batch_size": 4}
    client.load_model("simple", config=json.dumps(config))
    assert client.get_model_config("simple")["max_batch_size"] == 4
    assert "reason" not in simple_index_entry(client)
    client.load_model("simple")
    assert client.get_model_config("simple")["max_batch_size"] == SIMPLE_MAX_BATCH


def test_clients_see_the_serving_config_until_a_reload_has_succeeded(
    mesh: Mesh, client: httpclient.InferenceServerClient, tmp_path: Path
) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    model = PY_GATED.format(started=str(started), gate=str(gate))
    config = json.dumps(python_config(client, 2))
    outcome: list[BaseException | None] = []

    def load() -> None:
        other = httpclient.InferenceServerClient(mesh.url.removeprefix("http://"), network_timeout=120)
        try:
            other.load_model("simple", config=config, files={"file:1/model.py": model.encode()})
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            other.close()

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(started.exists, 60, "the reload under way")
        # Under way: the ONNX model serves, and clients see its config and metadata.
        assert simple_index_entry(client)["state"] == "READY"
        assert client.get_model_config("simple")["max_batch_size"] == SIMPLE_MAX_BATCH
        assert client.get_model_metadata("simple")["platform"] == "onnxruntime_onnx"
        out = client.infer("simple", simple_inputs(3)).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(out, np.full((3, 16), 4, dtype=np.int32))
    finally:
        gate.touch()
        thread.join(timeout=120)
    assert outcome == [None]
    # Loaded: its own config is what clients see and what requests are checked against.
    assert client.get_model_config("simple")["backend"] == "python"
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", simple_inputs(3))
    assert info.value.status() == "400" and "max_batch_size" in info.value.message()
    out = client.infer("simple", simple_inputs(2)).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((2, 16), 4, dtype=np.int32))
