"""ONNX Runtime backend.

Execution providers follow Triton's ORT backend: on a GPU instance (onnxruntime-gpu installed),
CUDA, preceded by TensorRT when the config's `gpu_execution_accelerator` names it, each taking
the accelerator's parameters by Triton's names (see `tensorrt_options` and `cuda_options`); the
CPU otherwise. On the GPU, inputs and outputs go through I/O binding: inputs are copied to the
device once, outputs stay there until the single copy back (BF16 outputs are bound to the
host, where their bytes can be read). Models with string tensors, which I/O binding cannot
take, run through `run`.
BYTES tensors cross into ONNX Runtime as Python str (UTF-8), because its binding turns bytes
objects into their repr; BF16, which numpy lacks, crosses through OrtValues and I/O binding.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as pb

from natron import config as cfg
from natron.errors import InvalidArgument
from workers.backends import on_gpu
from workers.devices import Device

log = logging.getLogger(__name__)

_BF16_ONNX_TYPE = 16
# Outputs that numpy cannot read from the device (bfloat16, read through its raw pointer) and
# strings, which ONNX Runtime keeps on the host: bound to the CPU.
_HOST_OUTPUT_TYPES = frozenset({"tensor(string)", "tensor(bfloat16)"})


# Triton's TensorRT accelerator parameters -> TensorRT EP options, with how to read the value.
_TRT_OPTIONS: dict[str, tuple[str, type]] = {
    "max_workspace_size_bytes": ("trt_max_workspace_size", int),
    "trt_max_partition_iterations": ("trt_max_partition_iterations", int),
    "trt_min_subgraph_size": ("trt_min_subgraph_size", int),
    "int8_calibration_table_name": ("trt_int8_calibration_table_name", str),
    "int8_use_native_calibration_table": ("trt_int8_use_native_calibration_table", bool),
    "trt_dla_enable": ("trt_dla_enable", bool),
    "trt_dla_core": ("trt_dla_core", int),
    "trt_engine_cache_enable": ("trt_engine_cache_enable", bool),
    "trt_engine_cache_path": ("trt_engine_cache_path", str),
    "trt_engine_cache_prefix": ("trt_engine_cache_prefix", str),
    "trt_dump_subgraphs": ("trt_dump_subgraphs", bool),
    "trt_force_sequential_engine_build": ("trt_force_sequential_engine_build", bool),
    "trt_context_memory_sharing_enable": ("trt_context_memory_sharing_enable", bool),
    "trt_layer_norm_fp32_fallback": ("trt_layer_norm_fp32_fallback", bool),
    "trt_timing_cache_enable": ("trt_timing_cache_enable", bool),
    "trt_timing_cache_path": ("trt_timing_cache_path", str),
    "trt_force_timing_cache": ("trt_force_timing_cache", bool),
    "trt_detailed_build_log": ("trt_detailed_build_log", bool),
    "trt_build_heuristics_enable": ("trt_build_heuristics_enable", bool),
    "trt_sparsity_enable": ("trt_sparsity_enable", bool),
    "trt_builder_optimization_level": ("trt_builder_optimization_level", int),
    "trt_auxiliary_streams": ("trt_auxiliary_streams", int),
    "trt_tactic_sources": ("trt_tactic_sources", str),
    "trt_extra_plugin_lib_paths": ("trt_extra_plugin_lib_paths", str),
    "trt_profile_min_shapes": ("trt_profile_min_shapes", str),
    "trt_profile_max_shapes": ("trt_profile_max_shapes", str),
    "trt_profile_opt_shapes": ("trt_profile_opt_shapes", str),
    "trt_cuda_graph_enable": ("trt_cuda_graph_enable", bool),
    "trt_dump_ep_context_model": ("trt_dump_ep_context_model", bool),
    "trt_ep_context_file_path": ("trt_ep_context_file_path", str),
    "trt_ep_context_embed_mode": ("trt_ep_context_embed_mode", int),
}

# The CUDA EP options Triton still reads from the model's `parameters` (deprecated there, but
# supported), with Triton's numeric values turned into ONNX Runtime's names.
_CUDA_CONFIG_PARAMETERS: dict[str, dict[str, str] | None] = {
    "cudnn_conv_algo_search": {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"},
    "gpu_mem_limit": None,
    "arena_extend_strategy": {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"},
    "do_copy_in_default_stream": None,
}


def _parse(model: str, what: str, key: str, value: str, kind: type) -> Any:
    text = value.strip()
    if kind is bool:
        return cfg.parse_bool(model, f"{what} {key}", text)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise InvalidArgument(
                f"model '{model}': {what} parameter '{key}' must be an integer, got '{value}'"
            ) from None
    return text


def tensorrt_options(config: pb.ModelConfig, parameters: dict[str, str], device: Device) -> dict[str, Any]:
    """Triton's `tensorrt` accelerator parameters as TensorRT EP provider options."""
    options: dict[str, Any] = {"device_id": device.index}
    for key, value in parameters.items():
        if key == "precision_mode":
            mode = value.strip().upper()
            if mode == "FP16":
                options["trt_fp16_enable"] = True
            elif mode == "INT8":
                options["trt_int8_enable"] = True
            elif mode != "FP32":
                raise InvalidArgument(
                    f"model '{config.name}': unsupported precision_mode '{value}' for the TensorRT "
                    "accelerator (FP32, FP16 or INT8)"
                )
            continue
        if key not in _TRT_OPTIONS:
            raise InvalidArgument(
                f"model '{config.name}': unknown parameter '{key}' for the TensorRT execution accelerator"
            )
        option, kind = _TRT_OPTIONS[key]
        options[option] = _parse(config.name, "TensorRT", key, value, kind)
    return options


def cuda_options(config: pb.ModelConfig, parameters: dict[str, str], device: Device) -> dict[str, Any]:
    """CUDA EP options: the `cuda` accelerator's parameters (passed through, as Triton does) and
    the older per-model parameters Triton still reads."""
    options: dict[str, Any] = {"device_id": device.index}
    model_parameters = {k: v.string_value for k, v in config.parameters.items()}
    for key, names in _CUDA_CONFIG_PARAMETERS.items():
        if key not in model_parameters:
            continue
        value = model_parameters[key].strip()
        if names is not None:
            if value not in names:
                raise InvalidArgument(
                    f"model '{config.name}': parameter '{key}' must be one of {sorted(names)}"
                )
            options[key] = names[value]
        elif key == "gpu_mem_limit":
            options[key] = _parse(config.name, "CUDA", key, value, int)
        else:
            options[key] = _parse(config.name, "CUDA", key, value, bool)
    options.update({key: value.strip() for key, value in parameters.items()})
    return options


def _providers(config: pb.ModelConfig, device: Device, available: set[str] | None = None) -> list[Any]:
    """The provider list for one session, most preferred first; CPU always last."""
    available = set(ort.get_available_providers()) if available is None else available
    providers: list[Any] = []
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    for accel in accelerators:
        if accel.name not in ("tensorrt", "cuda"):
            raise InvalidArgument(
                f"model '{config.name}': unknown GPU execution accelerator '{accel.name}' "
                "(ONNX Runtime knows 'tensorrt' and 'cuda')"
            )
    if on_gpu(config, device):
        if "CUDAExecutionProvider" not in available:
            log.warning(
                "model '%s': onnxruntime here has no CUDA provider (onnxruntime-gpu is not installed); "
                "running on the CPU",
                config.name,
            )
        else:
            cuda_parameters: dict[str, str] = {}
            for accel in accelerators:
                if accel.name == "tensorrt":
                    if "TensorrtExecutionProvider" in available:
                        options = tensorrt_options(config, dict(accel.parameters), device)
                        providers.append(("TensorrtExecutionProvider", options))
                    else:
                        log.warning(
                            "model '%s': no TensorRT provider in onnxruntime; using CUDA", config.name
                        )
                else:
                    cuda_parameters.update(accel.parameters)
            providers.append(("CUDAExecutionProvider", cuda_options(config, cuda_parameters, device)))
    providers.append("CPUExecutionProvider")
    return providers


def _session_options(config: pb.ModelConfig, cpu_threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    params = {k: v.string_value for k, v in config.parameters.items()}
    # Triton's `optimization { graph { level } }`: -1 basic, 1 extended, 2 none, else all.
    level = int(config.optimization.graph.level)
    options.graph_optimization_level = {
        -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # ONNX Runtime's thread pool spins between parallel sections by default. In a server its
    # threads share the cores with the event loop, the gateway and the broker, and spinning
    # takes cycles they need; `allow_spinning: "1"` in the config's parameters restores it.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if params.get("allow_spinning") == "1" else "0"
    )
    # Triton's ORT backend parameter names.
    if cpu_threads and "intra_op_thread_count" not in params:
        # Several CPU workers on one host share its cores (natron serve --workers N).
        options.intra_op_num_threads = cpu_threads
    if "intra_op_thread_count" in params:
        options.intra_op_num_threads = _parse(
            config.name, "model", "intra_op_thread_count", params["intra_op_thread_count"], int
        )
    if "inter_op_thread_count" in params:
        options.inter_op_num_threads = _parse(
            config.name, "model", "inter_op_thread_count", params["inter_op_thread_count"], int
        )
    if "execution_mode" in params:
        parallel = _parse(config.name, "model", "execution_mode", params["execution_mode"], int) == 1
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        )
    if "enable_mem_arena" in params:
        options.enable_cpu_mem_arena = _parse(
            config.name, "model", "enable_mem_arena", params["enable_mem_arena"], bool
        )
    if "enable_mem_pattern" in params:
        options.enable_mem_pattern = _parse(
            config.name, "model", "enable_mem_pattern", params["enable_mem_pattern"], bool
        )
    if "session.use_device_allocator_for_initializers" in params:
        options.add_session_config_entry(
            "session.use_device_allocator_for_initializers",
            params["session.use_device_allocator_for_initializers"],
        )
    return options


def _run_options(config: pb.ModelConfig) -> ort.RunOptions | None:
    shrinkage = config.parameters.get("memory.enable_memory_arena_shrinkage")
    if shrinkage is None or not shrinkage.string_value:
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", shrinkage.string_value)
    return options


class OnnxRuntimeBackend:
    def __init__(
        self,
        session: ort.InferenceSession,
        name: str,
        gpu_index: int | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> None:
        self._session = session
        self._name = name
        self._input_types = {i.name: i.type for i in session.get_inputs()}
        self._output_names = [o.name for o in session.get_outputs()]
        self._output_types = {o.name: o.type for o in session.get_outputs()}
        self._uses_bf16 = "tensor(bfloat16)" in {*self._input_types.values(), *self._output_types.values()}
        self._string_inputs = {n for n, t in self._input_types.items() if t == "tensor(string)"}
        # The GPU this session runs on when a GPU provider took it, else None.
        self._gpu_index = gpu_index
        # I/O binding cannot take string tensors; `run` handles their copies itself.
        has_strings = "tensor(string)" in {*self._input_types.values(), *self._output_types.values()}
        self._bind = self._uses_bf16 or (gpu_index is not None and not has_strings)
        self._run_options = run_options

    @staticmethod
    def load(
        config: pb.ModelConfig, version_dir: Path, device: Device, cpu_threads: int = 0
    ) -> OnnxRuntimeBackend:
        path = version_dir / cfg.model_filename(config)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} not found")
        providers = _providers(config, device)
        session = ort.InferenceSession(
            str(path), sess_options=_session_options(config, cpu_threads), providers=providers
        )
        used = session.get_providers()
        on_device = any(p in used for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
        if len(providers) > 1 and not on_device:
            log.warning("model '%s': the GPU providers failed to start; running on the CPU", config.name)
        backend = OnnxRuntimeBackend(
            session, config.name, device.index if on_device else None, _run_options(config)
        )
        backend._check_config(config)
        log.info("loaded %s on %s with %s", path, device.name, used[0])
        return backend

    def _check_config(self, config: pb.ModelConfig) -> None:
        """The config's names must exist in the graph: fail the load, not every request."""
        for entry in config.input:
            if entry.name not in self._input_types:
                raise InvalidArgument(
                    f"model '{config.name}': config input '{entry.name}' is not an input of the "
                    f"ONNX graph, which has {sorted(self._input_types)}"
                )
        for entry in config.output:
            if entry.name not in self._output_names:
                raise InvalidArgument(
                    f"model '{config.name}': config output '{entry.name}' is not an output of the "
                    f"ONNX graph, which has {self._output_names}"
                )

    def execute(self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]) -> dict[str, npt.NDArray[Any]]:
        names = outputs or self._output_names
        feeds: dict[str, Any] = {}
        for name, array in inputs.items():
            if name in self._string_inputs:
                try:
                    array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
                except UnicodeDecodeError:
                    raise InvalidArgument(
                        f"input '{name}': ONNX Runtime string tensors must hold valid UTF-8"
                    ) from None
            feeds[name] = array
        if self._bind:
            results = self._run_bound(feeds, names)
        else:
            results = dict(zip(names, self._session.run(names, feeds, self._run_options), strict=True))
        for name, value in results.items():
            if value.dtype == np.object_:
                results[name] = np.vectorize(
                    lambda s: s.encode("utf-8") if isinstance(s, str) else bytes(s), otypes=[object]
                )(value)
        return results

    def _run_bound(self, feeds: dict[str, Any], names: list[str]) -> dict[str, npt.NDArray[Any]]:
        binding = self._session.io_binding()
        for name, array in feeds.items():
            if array.dtype == ml_dtypes.bfloat16:
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(array).view(np.uint16), _BF16_ONNX_TYPE
                )
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:
            if self._gpu_index is None or self._output_types[name] in _HOST_OUTPUT_TYPES:
                binding.bind_output(name, "cpu")
            else:
                # Left on the device by the run; `numpy()` below is its only copy to the host.
                binding.bind_output(name, "cuda", self._gpu_index)
        self._session.run_with_iobinding(binding, self._run_options)
        results: dict[str, npt.NDArray[Any]] = {}
        for name, value in zip(names, binding.get_outputs(), strict=True):
            if value.data_type() == "tensor(bfloat16)":
                shape = tuple(value.shape())
                count = int(np.prod(shape))
                raw: Any = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else []
                # Copy out while the OrtValue still owns the memory.
                results[name] = np.array(raw, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(shape)
            else:
                results[name] = value.numpy()
        return results

    def close(self) -> None:
        del self._session
