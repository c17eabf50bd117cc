"""GPU backends: ONNX Runtime's CUDA and TensorRT providers, TensorRT plans, PyTorch on CUDA.

The tests marked `gpu` need an NVIDIA GPU (and the `gpu` extra, or a CUDA torch) and skip
cleanly without one. The other runs anywhere: a TensorRT plan served on a machine without a GPU
is UNAVAILABLE with the reason while the worker serves everything else. (How accelerator
parameters become provider options: tests/unit/test_onnx_providers.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from examples import build_backend_models, build_models
from natron import config as cfg
from natron.errors import InvalidArgument, NatronError
from tests.harness import Served
from workers.backends import BackendContext, load_backend
from workers.devices import discover_gpus

# The shared server and its helpers come as fixtures (see tests/backend_fixtures.py).
pytest_plugins = ["tests.backend_fixtures"]
pytestmark = pytest.mark.timeout(300)

GPUS = discover_gpus()
needs_gpu = pytest.mark.skipif(not GPUS, reason="no NVIDIA GPU on this machine")


def config_from(text: str) -> pb.ModelConfig:
    config = text_format.Parse(text, pb.ModelConfig())
    cfg.fill_defaults(config)
    return config


# -- without a GPU: the example repository's plan ----------------------------------------------


@pytest.mark.skipif(bool(GPUS), reason="this machine has a GPU")
def test_a_served_tensorrt_plan_without_a_gpu_is_unavailable_and_the_rest_serves(
    backend_served: Served, repository_state: Callable[[str], dict[str, Any]]
) -> None:
    entry = repository_state("trt_plan")
    assert entry["state"] == "UNAVAILABLE"
    assert "TensorRT plans run on a GPU only" in entry["reason"]
    assert requests.get(f"{backend_served.url}/v2/models/add_sub/ready", timeout=5).status_code == 200


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("gpu_models")
    build_models.build(repo, ["tiny", "identity_bf16", "identity_bytes"], quiet=True)
    return repo


def tiny_config(accelerators: str = "") -> pb.ModelConfig:
    return config_from(
        'name: "tiny" platform: "onnxruntime_onnx" max_batch_size: 128 '
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ] '
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ] '
        "instance_group [ { kind: KIND_GPU } ] " + accelerators
    )


def plan_config(name: str, kind: str = "KIND_GPU") -> pb.ModelConfig:
    return config_from(
        f'name: "{name}" platform: "tensorrt_plan" max_batch_size: 8 '
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ] '
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ] '
        f"instance_group [ {{ kind: {kind} }} ]"
    )


def ort_with(provider: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    if provider not in ort.get_available_providers():
        pytest.skip(f"onnxruntime here has no {provider}")


@pytest.mark.gpu
@needs_gpu
def test_onnx_runtime_runs_on_cuda_with_io_binding(onnx_models: Path) -> None:
    ort_with("CUDAExecutionProvider")
    backend = load_backend(tiny_config(), onnx_models / "tiny" / "1", BackendContext(GPUS[0]))
    try:
        assert backend._session.get_providers()[0] == "CUDAExecutionProvider"  # type: ignore[union-attr]
        assert backend._bind  # type: ignore[union-attr]
        x = np.linspace(-1, 1, 5 * 16, dtype=np.float32).reshape(5, 16)
        out = backend.execute({"INPUT0": x}, [])  # type: ignore[union-attr]
        np.testing.assert_allclose(out["OUTPUT0"], 2 * x + 1, rtol=1e-6)
    finally:
        backend.close()


@pytest.mark.gpu
@needs_gpu
def test_onnx_runtime_runs_through_the_tensorrt_provider_in_fp16(onnx_models: Path, tmp_path: Path) -> None:
    ort_with("TensorrtExecutionProvider")
    accel = (
        'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
        'parameters { key: "precision_mode" value: "FP16" } '
        f'parameters {{ key: "trt_engine_cache_path" value: "{tmp_path}" }} }} ] }} }}'
    )
    backend = load_backend(tiny_config(accel), onnx_models / "tiny" / "1", BackendContext(GPUS[0]))
    try:
        assert backend._session.get_providers()[0] == "TensorrtExecutionProvider"  # type: ignore[union-attr]
        x = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)
        out = backend.execute({"INPUT0": x}, [])  # type: ignore[union-attr]
        np.testing.assert_allclose(out["OUTPUT0"], 2 * x + 1, rtol=1e-2, atol=1e-2)
    finally:
        backend.close()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("model", ["identity_bf16", "identity_bytes"])
def test_bf16_and_strings_still_cross_onnx_runtime_on_cuda(onnx_models: Path, model: str) -> None:
    ort_with("CUDAExecutionProvider")
    config = cfg.read_config(onnx_models / model)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU)
    cfg.fill_defaults(config)
    backend = load_backend(config, onnx_models / model / "1", BackendContext(GPUS[0]))
    try:
        if model == "identity_bytes":
            x: Any = np.array([[b"a", b"bc"]], dtype=np.object_)
        else:
            import ml_dtypes

            x = np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16)
        out = backend.execute({"INPUT0": x}, [])  # type: ignore[union-attr]
        assert out["OUTPUT0"].dtype == x.dtype
        np.testing.assert_array_equal(out["OUTPUT0"], x)
    finally:
        backend.close()


def build_plan(onnx_path: Path, plan_path: Path, max_batch: int) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("INPUT0", (1, 16), (4, 16), (max_batch, 16))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    plan_path.write_bytes(bytes(plan))


@pytest.mark.gpu
@needs_gpu
def test_a_tensorrt_plan_serves_dynamic_batches_within_its_profile(onnx_models: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    (tmp_path / "1").mkdir()
    build_plan(onnx_models / "tiny" / "1" / "model.onnx", tmp_path / "1" / "model.plan", max_batch=8)
    backend = load_backend(plan_config("plan"), tmp_path / "1", BackendContext(GPUS[0]))
    try:
        for rows in (1, 5, 8):
            x = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
            out = backend.execute({"INPUT0": x}, ["OUTPUT0"])  # type: ignore[union-attr]
            np.testing.assert_allclose(out["OUTPUT0"], 2 * x + 1, rtol=1e-5)
        with pytest.raises(NatronError, match="fit no optimization profile"):
            backend.execute({"INPUT0": np.zeros((9, 16), np.float32)}, [])  # type: ignore[union-attr]
    finally:
        backend.close()


@pytest.mark.gpu
@needs_gpu
def test_a_tensorrt_plan_whose_config_names_another_input_is_refused(
    onnx_models: Path, tmp_path: Path
) -> None:
    pytest.importorskip("tensorrt")
    (tmp_path / "1").mkdir()
    build_plan(onnx_models / "tiny" / "1" / "model.onnx", tmp_path / "1" / "model.plan", max_batch=8)
    config = plan_config("plan")
    config.input[0].name = "WRONG"
    with pytest.raises(InvalidArgument, match="config input 'WRONG' is not an input of the engine"):
        load_backend(config, tmp_path / "1", BackendContext(GPUS[0]))


@pytest.mark.gpu
@needs_gpu
def test_pytorch_runs_on_the_instances_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    build_backend_models.build(tmp_path, ["torch_add_sub"], quiet=True)
    config = cfg.read_config(tmp_path / "torch_add_sub")
    del config.instance_group[:]
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU)
    cfg.fill_defaults(config)
    backend = load_backend(config, tmp_path / "torch_add_sub" / "1", BackendContext(GPUS[0]))
    try:
        assert backend._device.type == "cuda"  # type: ignore[union-attr]
        x = np.arange(32, dtype=np.float32).reshape(2, 16)
        out = backend.execute({"INPUT__0": x, "INPUT__1": x}, [])  # type: ignore[union-attr]
        np.testing.assert_array_equal(out["OUTPUT__0"], 2 * x)
        np.testing.assert_array_equal(out["OUTPUT__1"], np.zeros_like(x))
    finally:
        backend.close()
