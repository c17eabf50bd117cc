"""A `natron serve` of the backend example models, shared by the backend test modules.

Test modules load it with `pytest_plugins = ["tests.backend_fixtures"]`, so one server (one
worker, one stub per Python model instance, one torch import) serves them all. Its repository
holds the PyTorch models only when torch is installed, and `simple` for the BLS models.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from nats.aio.client import Client

from broker import jetstream
from broker.auth import ClientAuth, seed_path
from broker.requester import Requester
from broker.subjects import Subjects
from examples import build_backend_models, build_models, build_text_models
from tests.harness import Served, natron_serve, wait_until

HAVE_TORCH = importlib.util.find_spec("torch") is not None

# Models that load; the others are there to fail, and tests wait for their reasons.
PYTHON_READY = [
    "add_sub", "bls", "bls_async", "bls_decoupled", "repeat", "py_identity", "py_faults",
    "text_tokenizer", "text_pooling", "text_generator",
]  # fmt: skip
PYTHON_BROKEN = ["py_bad_import", "py_init_fails"]
TORCH_READY = [
    "torch_add_sub",
    "torch_named",
    "torch_dict",
    "torch_strings",
    "torch_raises",
    "torch_identity",
    "torch_export",
]
TORCH_BROKEN = ["torch_wrong_inputs"]


@pytest.fixture(scope="session")
def backend_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("backend_models")
    build_models.build(repo, ["simple"], quiet=True)
    names = PYTHON_READY + PYTHON_BROKEN + (TORCH_READY + TORCH_BROKEN if HAVE_TORCH else [])
    build_backend_models.build(repo, names, quiet=True)
    build_text_models.build(repo)
    # A streaming ensemble: each answer of the decoupled `repeat` flows through `py_identity`.
    (repo / "ens_repeat" / "1").mkdir(parents=True)
    (repo / "ens_repeat" / "config.pbtxt").write_text(
        'name: "ens_repeat"\nplatform: "ensemble"\nmodel_transaction_policy { decoupled: true }\n'
        'input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] },'
        ' { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] } ]\n'
        "ensemble_scheduling { step [\n"
        '  { model_name: "repeat" model_version: -1 input_map { key: "IN" value: "IN" }'
        ' output_map { key: "OUT" value: "tok" } output_map { key: "IDX" value: "IDX" } },\n'
        '  { model_name: "py_identity" model_version: -1 input_map { key: "INPUT_INT32" value: "tok" }'
        ' output_map { key: "OUTPUT_INT32" value: "OUT" } }\n'
        "] }\n"
    )
    # A TensorRT plan: on a machine without a GPU it must be UNAVAILABLE, with the reason.
    (repo / "trt_plan" / "1").mkdir(parents=True)
    (repo / "trt_plan" / "1" / "model.plan").write_bytes(b"not a real engine")
    (repo / "trt_plan" / "config.pbtxt").write_text(
        'name: "trt_plan"\nplatform: "tensorrt_plan"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    )
    return repo


@pytest.fixture(scope="session")
def backend_served(backend_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ready = PYTHON_READY + (TORCH_READY if HAVE_TORCH else []) + ["simple", "ens_repeat", "text_pipeline"]
    with natron_serve(
        backend_repository, ready, tmp_path_factory.mktemp("backend_serve"), timeout_s=120
    ) as s:
        yield s


@pytest.fixture(scope="session")
async def backend_nc(backend_served: Served) -> AsyncIterator[Client]:
    # A client of the deployment, as an application publishing to NATS would be.
    assert backend_served.creds_dir is not None
    creds = ClientAuth(seed_path(backend_served.creds_dir, "client"))
    nc = await jetstream.connect(backend_served.nats_url, name="backend-tests", auth=creds)
    yield nc
    await nc.drain()


@pytest.fixture(scope="session")
async def backend_requester(backend_nc: Client) -> AsyncIterator[Requester]:
    async with Requester(backend_nc, Subjects()) as requester:
        yield requester


@pytest.fixture(scope="session")
def repository_state(backend_served: Served) -> Callable[[str], dict[str, Any]]:
    """`repository_state(model)`: the model's repository index entry once it left LOADING."""

    def state(model: str, timeout_s: float = 60.0) -> dict[str, Any]:
        def settled() -> dict[str, Any] | None:
            index = requests.post(f"{backend_served.url}/v2/repository/index", timeout=5).json()
            entries = [e for e in index if e["name"] == model]
            return dict(entries[0]) if entries and entries[0]["state"] != "LOADING" else None

        result: dict[str, Any] = wait_until(settled, timeout_s, f"model '{model}' out of LOADING", 0.2)
        return result

    return state
