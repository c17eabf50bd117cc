"""Server readiness as Triton's --strict-readiness: /v2/health/ready answers 200 only once a
worker is live and every model that should be loaded has settled (READY, or failed for good),
and 503 with the reason before; `--strict-readiness false` answers 200 once the gateway is
connected and synced. Real router, worker, orchestrator and gateway processes."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from examples.build_models import build
from tests.harness import Mesh

# A Python model whose initialize and finalize each wait for a file the test creates, so a load
# or an unload stays under way for as long as the test looks; each first leaves a mark, and
# finalize another once it is done.
GATED_MODEL = """
import os
import time

import triton_python_backend_utils as pb_utils


def _hold(mark, gate):
    open(mark, "w").close()
    while not os.path.exists(gate):
        time.sleep(0.02)


class TritonPythonModel:
    def initialize(self, args):
        _hold({init_mark!r}, {init_gate!r})

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(
            r, "INPUT0").as_numpy())]) for r in requests]

    def finalize(self):
        _hold({fini_mark!r}, {fini_gate!r})
        open({fini_done!r}, "w").close()
"""
GATED_CONFIG = """name: "gated"
backend: "python"
max_batch_size: 4
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 1 ] } ]
"""


class Gates:
    """The marks and gates of the `gated` model: `init_gate` and `fini_gate` let its
    initialize and finalize go on; `init_mark` and `fini_mark` say they have started, and
    `fini_done` that a finalize has ended."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.init_mark, self.init_gate = folder / "init-mark", folder / "init-gate"
        self.fini_mark, self.fini_gate = folder / "fini-mark", folder / "fini-gate"
        self.fini_done = folder / "fini-done"

    def write_model(self, repository: Path) -> None:
        (repository / "gated" / "1").mkdir(parents=True)
        (repository / "gated" / "config.pbtxt").write_text(GATED_CONFIG)
        paths = {k: str(v) for k, v in vars(self).items()}
        (repository / "gated" / "1" / "model.py").write_text(GATED_MODEL.format(**paths))


@pytest.fixture
def meshes() -> Iterator[Callable[..., Mesh]]:
    """`meshes(repository, *router_args)`: NATS and a router, started; the test adds the rest."""
    started: list[Mesh] = []

    def start(repository: Path, *router_args: str) -> Mesh:
        mesh = Mesh(repository, list(router_args))
        started.append(mesh)
        mesh.start_nats()
        mesh.start_router()
        return mesh

    yield start
    for mesh in started:
        mesh.stop()


def health(mesh: Mesh) -> tuple[int, str]:
    response = requests.get(f"{mesh.url}/v2/health/ready", timeout=5)
    return response.status_code, response.json()["error"] if response.status_code != 200 else ""


def wait_health(mesh: Mesh, status: int, says: str = "") -> None:
    def reached() -> bool:
        code, reason = health(mesh)
        return code == status and says in reason

    mesh.wait_until(reached, 60, f"/v2/health/ready answering {status} {says!r}")


def test_no_live_worker_is_not_ready_and_with_nothing_loaded_one_worker_makes_it_ready(
    meshes: Callable[..., Mesh], tmp_path: Path
) -> None:
    build(tmp_path / "repo", ["tiny"])
    mesh = meshes(tmp_path / "repo", "--model-control-mode", "explicit")
    mesh.start_gateway()
    wait_health(mesh, 503, "no live worker")
    mesh.start_worker("w0")
    wait_health(mesh, 200)  # explicit mode, nothing loaded: nothing to wait for
    mesh.signal("w0", signal.SIGTERM)
    mesh.wait_exit("w0")
    wait_health(mesh, 503, "no live worker")  # the worker left the fleet


def test_a_model_still_loading_keeps_the_server_not_ready_and_a_failed_one_does_not(
    meshes: Callable[..., Mesh], tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    build(repository, ["tiny", "broken"])
    gates = Gates(tmp_path / "gates")
    gates.write_model(repository)
    mesh = meshes(repository)
    mesh.start_gateway()
    mesh.start_worker("w0")
    mesh.wait_until(gates.init_mark.exists, 60, "gated model loading")
    code, reason = health(mesh)
    assert code == 503 and "'gated'" in reason, reason
    assert "'broken'" not in reason  # failed for good: nothing to wait for
    gates.init_gate.touch()
    wait_health(mesh, 200)
    index = {m["name"]: m for m in mesh.index()}
    assert index["gated"]["state"] == index["tiny"]["state"] == "READY"
    assert index["broken"]["state"] == "UNAVAILABLE" and index["broken"]["reason"]
    gates.fini_gate.touch()  # let the model go when the mesh stops


def test_an_ensemble_keeps_the_server_not_ready_until_an_orchestrator_serves_it(
    meshes: Callable[..., Mesh], tmp_path: Path
) -> None:
    build(tmp_path / "repo", ["simple", "ensemble_simple"])
    mesh = meshes(tmp_path / "repo")
    mesh.start_gateway()
    mesh.start_worker("w0")
    mesh.wait_ready("simple")
    wait_health(mesh, 503, "'ensemble_simple'")
    mesh.natron("orchestrator", "ensemble", "--nats-url", mesh.nats_url)
    wait_health(mesh, 200)
    mesh.wait_ready("ensemble_simple")


def test_a_model_reloading_or_unloading_keeps_the_server_ready(
    meshes: Callable[..., Mesh], tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    gates = Gates(tmp_path / "gates")
    gates.write_model(repository)
    gates.init_gate.touch()
    gates.fini_gate.touch()
    mesh = meshes(repository, "--model-control-mode", "explicit", "--load-model", "gated")
    mesh.start_gateway()
    mesh.start_worker("w0")
    # Once the router has published it (before, the gateway knows of no model to wait for).
    mesh.wait_until(lambda: any(m["name"] == "gated" for m in mesh.index()), what="gated published")
    wait_health(mesh, 200)
    assert gates.init_mark.exists()
    load_url = f"{mesh.url}/v2/repository/models/gated/load"

    def in_background(call: Callable[[], requests.Response]) -> tuple[threading.Thread, list[int]]:
        statuses: list[int] = []
        thread = threading.Thread(target=lambda: statuses.append(call().status_code))
        thread.start()
        return thread, statuses

    # A reload under way: the model that serves keeps it READY, the server ready.
    gates.init_gate.unlink()
    gates.init_mark.unlink()
    io = {"data_type": "TYPE_FP32", "dims": [1]}
    config = {
        "name": "gated",
        "backend": "python",
        "max_batch_size": 2,
        "input": [{"name": "INPUT0", **io}],
        "output": [{"name": "OUTPUT0", **io}],
    }
    reload, reloaded = in_background(
        lambda: requests.post(load_url, json={"parameters": {"config": json.dumps(config)}}, timeout=120)
    )
    try:
        mesh.wait_until(gates.init_mark.exists, 60, "reload under way")
        assert health(mesh) == (200, "")
        assert {m["name"]: m for m in mesh.index()}["gated"]["state"] == "READY"
    finally:
        gates.init_gate.touch()
        reload.join(timeout=120)
    assert reloaded == [200]

    # The reload retired the instance that served before: once its finalize has ended, the
    # marks and gates are the next step's.
    mesh.wait_until(gates.fini_done.exists, 60, "the previous instance finalized")
    for path in (gates.fini_gate, gates.fini_mark, gates.fini_done):
        path.unlink()

    # An unload under way: the model is on its way out, there is nothing to wait for.
    unload, unloaded = in_background(
        lambda: requests.post(f"{mesh.url}/v2/repository/models/gated/unload", timeout=120)
    )
    try:
        mesh.wait_until(gates.fini_mark.exists, 60, "unload under way")
        assert {m["name"]: m for m in mesh.index()}["gated"]["state"] == "UNLOADING"
        assert health(mesh) == (200, "")
    finally:
        gates.fini_gate.touch()
        unload.join(timeout=120)
    assert unloaded == [200]


def test_without_strict_readiness_connected_and_synced_is_ready(
    meshes: Callable[..., Mesh], tmp_path: Path
) -> None:
    build(tmp_path / "repo", ["tiny"])
    mesh = meshes(tmp_path / "repo")
    mesh.natron(
        "gateway", "gateway", "--nats-url", mesh.nats_url, "--http-port", str(mesh.http_port),
        "--http-address", "127.0.0.1", "--strict-readiness", "false",
    )  # fmt: skip
    mesh.wait_until(lambda: any(m["name"] == "tiny" for m in mesh.index()), what="tiny published")
    # No worker at all, tiny not served: ready all the same.
    assert health(mesh) == (200, "")
    assert {m["name"]: m for m in mesh.index()}["tiny"]["state"] == "UNAVAILABLE"
