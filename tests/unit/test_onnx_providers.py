"""How Triton's execution accelerators and model parameters become ONNX Runtime provider options,
and TensorRT plans refused with the reason where they cannot run. Nothing here needs a GPU:
the GPU runs themselves are in tests/mesh/test_backend_gpu.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from natron import config as cfg
from natron.errors import InvalidArgument, Unavailable
from workers.backends import BackendContext, load_backend
from workers.backends.onnx import _providers, cuda_options, tensorrt_options
from workers.devices import CPU, Device

A_GPU = Device("GPU", 0, name="test GPU")


def config_from(text: str) -> pb.ModelConfig:
    config = text_format.Parse(text, pb.ModelConfig())
    cfg.fill_defaults(config)
    return config


TRT_ACCELERATED = """
name: "m"
platform: "onnxruntime_onnx"
optimization { execution_accelerators { gpu_execution_accelerator [
  { name: "tensorrt"
    parameters { key: "precision_mode" value: "FP16" }
    parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    parameters { key: "trt_engine_cache_enable" value: "1" }
    parameters { key: "trt_engine_cache_path" value: "/tmp/trt" } },
  { name: "cuda" parameters { key: "cudnn_conv_use_max_workspace" value: "0" } }
] } }
parameters { key: "gpu_mem_limit" value: { string_value: "4294967200" } }
parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }
"""

ALL_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"}


# -- provider options, anywhere ----------------------------------------------------------------


def test_tensorrt_accelerator_parameters_become_tensorrt_provider_options() -> None:
    config = config_from(TRT_ACCELERATED)
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    options = tensorrt_options(config, dict(accel.parameters), Device("GPU", 3))
    assert options == {
        "device_id": 3,
        "trt_fp16_enable": True,
        "trt_max_workspace_size": 1073741824,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/tmp/trt",
    }


def test_int8_precision_enables_int8_and_an_unknown_mode_is_refused() -> None:
    config = config_from('name: "m"')
    assert tensorrt_options(config, {"precision_mode": "INT8"}, A_GPU)["trt_int8_enable"] is True
    with pytest.raises(InvalidArgument, match="precision_mode 'FP8'"):
        tensorrt_options(config, {"precision_mode": "FP8"}, A_GPU)


def test_an_unknown_tensorrt_parameter_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="unknown parameter 'trt_warp_drive'"):
        tensorrt_options(config_from('name: "m"'), {"trt_warp_drive": "1"}, A_GPU)


def test_cuda_options_take_the_cuda_accelerator_and_the_older_model_parameters() -> None:
    config = config_from(TRT_ACCELERATED)
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[1]
    options = cuda_options(config, dict(accel.parameters), Device("GPU", 1))
    assert options == {
        "device_id": 1,
        "gpu_mem_limit": 4294967200,
        "cudnn_conv_algo_search": "HEURISTIC",
        "cudnn_conv_use_max_workspace": "0",
    }


def test_on_a_gpu_tensorrt_comes_before_cuda_before_the_cpu() -> None:
    providers = _providers(config_from(TRT_ACCELERATED), A_GPU, ALL_PROVIDERS)
    assert [p if isinstance(p, str) else p[0] for p in providers] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_a_gpu_without_accelerators_runs_on_cuda() -> None:
    providers = _providers(config_from('name: "m"'), A_GPU, ALL_PROVIDERS)
    assert providers == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]


def test_a_kind_cpu_model_stays_on_the_cpu_of_a_gpu_worker() -> None:
    config = config_from('name: "m" instance_group [ { kind: KIND_CPU } ]')
    assert _providers(config, A_GPU, ALL_PROVIDERS) == ["CPUExecutionProvider"]


def test_without_onnxruntime_gpu_a_gpu_worker_falls_back_to_the_cpu() -> None:
    assert _providers(config_from(TRT_ACCELERATED), A_GPU, {"CPUExecutionProvider"}) == [
        "CPUExecutionProvider"
    ]


def test_an_unknown_gpu_accelerator_is_refused() -> None:
    config = config_from(
        'name: "m" optimization { execution_accelerators { gpu_execution_accelerator [ { name: "warp" } ] } }'
    )
    with pytest.raises(InvalidArgument, match="unknown GPU execution accelerator 'warp'"):
        _providers(config, A_GPU, ALL_PROVIDERS)


# -- TensorRT plans without a GPU --------------------------------------------------------------


def plan_config(name: str, kind: str = "KIND_GPU") -> pb.ModelConfig:
    return config_from(
        f'name: "{name}" platform: "tensorrt_plan" max_batch_size: 8 '
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ] '
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ] '
        f"instance_group [ {{ kind: {kind} }} ]"
    )


def test_a_tensorrt_plan_on_a_worker_without_a_gpu_fails_to_load_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.plan").write_bytes(b"a plan")
    with pytest.raises(Unavailable, match="TensorRT plans run on a GPU only, and this worker has no GPU"):
        load_backend(plan_config("plan"), tmp_path / "1", BackendContext(CPU))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_a_tensorrt_plan_without_the_tensorrt_package_fails_to_load_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.plan").write_bytes(b"a plan")
    with pytest.raises(Unavailable, match="the tensorrt package is not installed"):
        load_backend(plan_config("plan"), tmp_path / "1", BackendContext(A_GPU))
