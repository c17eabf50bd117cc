"""Model control as Triton defines it: modes none, explicit (load/unload through the API) and
poll (the repository is watched), against real router, worker and gateway processes."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import nats
import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from nats.js.errors import NotFoundError
from tritonclient.utils import InferenceServerException

from broker.subjects import Subjects
from examples.build_models import build
from tests.harness import Mesh, Served, wait_until


def start_mesh(repository: Path, router_args: list[str], workers: int = 1) -> Mesh:
    mesh = Mesh(repository, [*router_args, "--ack-wait-s", "2"])
    mesh.start_nats()
    mesh.start_router()
    for index in range(workers):
        mesh.start_worker(f"w{index}")
    mesh.start_gateway()
    return mesh


@pytest.fixture(scope="module")
def explicit(model_repository: Path) -> Iterator[Mesh]:
    mesh = start_mesh(model_repository, ["--model-control-mode", "explicit", "--load-model", "simple"])
    try:
        mesh.wait_ready("simple")
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def client(explicit: Mesh) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(explicit.url.removeprefix("http://"), network_timeout=120)


def tiny_input(value: float = 1.0) -> list[httpclient.InferInput]:
    inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.full((1, 16), value, dtype=np.float32))
    return [inp]


def test_explicit_mode_loads_only_what_was_named(explicit: Mesh) -> None:
    index = {m["name"]: m for m in explicit.index()}
    assert index["simple"]["state"] == "READY"
    assert index["tiny"]["state"] == "UNAVAILABLE"
    assert index["tiny"]["reason"] == "unloaded"
    assert requests.post(f"{explicit.url}/v2/models/tiny/infer", data=b"{}", timeout=10).status_code == 503


def test_load_answers_once_the_model_is_ready_and_unload_once_it_is_gone(
    client: httpclient.InferenceServerClient,
) -> None:
    client.load_model("tiny")
    assert client.is_model_ready("tiny")  # no waiting: load returned after the fleet had it
    out = client.infer("tiny", tiny_input(2.0)).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((1, 16), 5.0, dtype=np.float32))
    client.unload_model("tiny")
    assert not client.is_model_ready("tiny")  # UNLOADING or UNAVAILABLE: not served either way

    def tiny_state() -> dict[str, str]:
        states = {(m["name"], m.get("version")): m for m in client.get_model_repository_index()}
        return states[("tiny", "1")]

    # The gateway's view follows the router's last word (UNLOADING -> UNAVAILABLE) within moments.
    wait_until(lambda: tiny_state()["state"] == "UNAVAILABLE", 10, "tiny UNAVAILABLE in the index")
    assert tiny_state() == {"name": "tiny", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}


def test_load_with_a_config_override_serves_that_config(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple")
    config["max_batch_size"] = 2
    client.load_model("simple", config=json.dumps(config))
    assert client.get_model_config("simple")["max_batch_size"] == 2
    a = np.ones((3, 16), dtype=np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [3, 16], "INT32"),
        httpclient.InferInput("INPUT1", [3, 16], "INT32"),
    ]
    for inp in inputs:
        inp.set_data_from_numpy(a)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs)
    assert info.value.status() == "400" and "max_batch_size" in info.value.message()
    client.load_model("simple")  # back to config.pbtxt
    assert client.get_model_config("simple")["max_batch_size"] == 8


def test_load_from_uploaded_files(client: httpclient.InferenceServerClient, model_repository: Path) -> None:
    onnx_bytes = (model_repository / "tiny" / "1" / "model.onnx").read_bytes()
    config = client.get_model_config("simple")  # any valid shape of config, renamed below
    config = {
        "name": "uploaded",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
    }
    client.load_model("uploaded", config=json.dumps(config), files={"file:1/model.onnx": onnx_bytes})
    out = client.infer("uploaded", tiny_input(3.0)).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((1, 16), 7.0, dtype=np.float32))


@pytest.mark.parametrize(
    "path", ["../escape/model.onnx", "/etc/passwd", "1/../../escape", "model.onnx", "1/./model.onnx", "1/"]
)
def test_uploaded_paths_cannot_leave_the_model_folder(explicit: Mesh, path: str, tmp_path: Path) -> None:
    body = {
        "parameters": {
            "config": json.dumps({"name": "evil", "platform": "onnxruntime_onnx"}),
            f"file:{path}": base64.b64encode(b"x").decode(),
        }
    }
    response = requests.post(f"{explicit.url}/v2/repository/models/evil/load", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "invalid file path" in response.json()["error"]
    assert not (explicit.repository.parent / "escape").exists()


@pytest.mark.parametrize(
    ("name", "status"), [("bad.name", 400), ("..", 400), ("nope", 404), ("x" * 200, 400)]
)
def test_load_validates_the_model_name(explicit: Mesh, name: str, status: int) -> None:
    response = requests.post(f"{explicit.url}/v2/repository/models/{name}/load", timeout=30)
    assert response.status_code in (status, 404) if name == ".." else response.status_code == status
    assert "error" in response.json()


def test_a_failing_load_is_400_with_the_reason_in_the_index(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model("broken")
    assert info.value.status() == "400"
    assert "Protobuf parsing failed" in info.value.message()
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "Protobuf" in index["broken"]["reason"]


def test_a_bad_warm_up_fails_the_load_and_a_good_one_runs_first(
    client: httpclient.InferenceServerClient,
) -> None:
    config = client.get_model_config("simple")
    good = {**config, "model_warmup": [{"name": "zeros", "batch_size": 2, "count": 3, "inputs": {
        "INPUT0": {"data_type": "TYPE_INT32", "dims": [16], "zero_data": True},
        "INPUT1": {"data_type": "TYPE_INT32", "dims": [16], "random_data": True}}}]}  # fmt: skip
    client.load_model("simple", config=json.dumps(good))
    assert client.is_model_ready("simple")
    bad = {**config, "model_warmup": [{"name": "wrong", "batch_size": 1, "inputs": {
        "NOPE": {"data_type": "TYPE_INT32", "dims": [16], "zero_data": True}}}]}  # fmt: skip
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple", config=json.dumps(bad))
    assert "warm-up sample 'wrong'" in info.value.message()
    # The previous, fully loaded model keeps serving, and says why the reload failed.
    assert client.is_model_ready("simple")
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index()}
    assert "reload failed" in index[("simple", "1")]["reason"]
    client.load_model("simple")


def test_load_and_unload_are_refused_outside_explicit_mode(served: Served) -> None:
    for verb in ("load", "unload"):
        response = requests.post(f"{served.url}/v2/repository/models/tiny/{verb}", timeout=10)
        assert response.status_code == 501
        assert "explicit" in response.json()["error"]


# -- poll ----------------------------------------------------------------------------------


@pytest.fixture
def polled(tmp_path: Path) -> Iterator[Mesh]:
    repository = tmp_path / "repo"
    build(repository, ["tiny", "versioned"])
    mesh = start_mesh(repository, ["--model-control-mode", "poll", "--repository-poll-secs", "0.3"])
    try:
        mesh.wait_ready("tiny")
        yield mesh
    finally:
        mesh.stop()


def test_poll_mode_picks_up_added_changed_and_removed_models(polled: Mesh, tmp_path: Path) -> None:
    build(tmp_path / "more", ["simple"])
    shutil.copytree(tmp_path / "more" / "simple", polled.repository / "simple")
    polled.wait_ready("simple")

    config = polled.repository / "versioned" / "config.pbtxt"
    config.write_text(config.read_text().replace("num_versions: 2", "num_versions: 3"))
    polled.wait_ready("versioned", "1")

    shutil.rmtree(polled.repository / "simple")
    polled.wait_until(
        lambda: requests.get(f"{polled.url}/v2/models/simple", timeout=2).status_code == 404,
        what="simple removed",
    )


def test_a_reload_has_no_gap_and_a_failed_one_keeps_the_old_model(polled: Mesh) -> None:
    failures: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            response = polled.infer_tiny(1.0)
            if response.status_code != 200:
                failures.append(response.status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        # A changed model file: a new generation loads next to the old one, then replaces it.
        model = polled.repository / "tiny" / "1" / "model.onnx"
        model.write_bytes(model.read_bytes())
        polled.wait_until(lambda: "reloading" in polled.log("router"), what="reload seen")
        polled.wait_until(
            lambda: polled.log("w0").count("model 'tiny' version 1 ready") >= 2, what="reloaded"
        )
        # A broken model file: the reload fails, the previous model keeps serving.
        model.write_bytes(b"not a model")
        polled.wait_until(
            lambda: "reload failed" in {m["name"]: m for m in polled.index()}["tiny"].get("reason", ""),
            what="failed reload reported",
        )
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failures == []
    assert polled.infer_tiny(2.0).json()["outputs"][0]["data"] == [5.0] * 16


def test_an_unloaded_version_leaves_no_consumer_behind(
    explicit: Mesh, client: httpclient.InferenceServerClient
) -> None:
    async def consumer_exists() -> bool:
        nc = await nats.connect(explicit.nats_url, **explicit.nats_options("admin"))
        try:
            subjects = Subjects()
            await nc.jetstream().consumer_info(subjects.stream, subjects.consumer("tiny", "1"))
            return True
        except NotFoundError:
            return False
        finally:
            await nc.close()

    client.load_model("tiny")
    assert asyncio.run(consumer_exists())
    client.unload_model("tiny")
    assert not asyncio.run(consumer_exists())
    client.load_model("tiny")  # and a later load creates it again
    assert client.infer("tiny", tiny_input(1.0)).as_numpy("OUTPUT0").tolist() == [[3.0] * 16]
    client.unload_model("tiny")
