"""ONNX Runtime backend.

Execution providers follow Triton: CUDA on a GPU instance when the GPU build is installed
(plus TensorRT when the config's `gpu_execution_accelerator` asks for it), the CPU otherwise.
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
from workers.devices import Device

log = logging.getLogger(__name__)

_BF16_ONNX_TYPE = 16


def _providers(config: pb.ModelConfig, device: Device) -> list[Any]:
    available = set(ort.get_available_providers())
    providers: list[Any] = []
    if device.kind == "GPU" and "CUDAExecutionProvider" in available:
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        for accel in accelerators:
            if accel.name == "tensorrt" and "TensorrtExecutionProvider" in available:
                options: dict[str, Any] = {"device_id": device.index}
                params = dict(accel.parameters)
                if params.get("precision_mode") == "FP16":
                    options["trt_fp16_enable"] = True
                if "max_workspace_size_bytes" in params:
                    options["trt_max_workspace_size"] = int(params["max_workspace_size_bytes"])
                providers.append(("TensorrtExecutionProvider", options))
        providers.append(("CUDAExecutionProvider", {"device_id": device.index}))
    providers.append("CPUExecutionProvider")
    return providers


def _session_options(config: pb.ModelConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    params = {k: v.string_value for k, v in config.parameters.items()}
    # ONNX Runtime's thread pool spins between parallel sections by default. In a server its
    # threads share the cores with the event loop, the gateway and the broker, and spinning
    # takes cycles they need; `allow_spinning: "1"` in the config's parameters restores it.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if params.get("allow_spinning") == "1" else "0"
    )
    # Triton's ORT backend parameter names.
    if "intra_op_thread_count" in params:
        options.intra_op_num_threads = int(params["intra_op_thread_count"])
    if "inter_op_thread_count" in params:
        options.inter_op_num_threads = int(params["inter_op_thread_count"])
    return options


class OnnxRuntimeBackend:
    def __init__(self, session: ort.InferenceSession, name: str) -> None:
        self._session = session
        self._name = name
        self._input_types = {i.name: i.type for i in session.get_inputs()}
        self._output_names = [o.name for o in session.get_outputs()]
        output_types = {o.name: o.type for o in session.get_outputs()}
        self._uses_bf16 = "tensor(bfloat16)" in {*self._input_types.values(), *output_types.values()}
        self._string_inputs = {n for n, t in self._input_types.items() if t == "tensor(string)"}

    @staticmethod
    def load(config: pb.ModelConfig, version_dir: Path, device: Device) -> OnnxRuntimeBackend:
        path = version_dir / cfg.model_filename(config)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} not found")
        session = ort.InferenceSession(
            str(path), sess_options=_session_options(config), providers=_providers(config, device)
        )
        backend = OnnxRuntimeBackend(session, config.name)
        backend._check_config(config)
        log.info("loaded %s on %s with %s", path, device.name, session.get_providers()[0])
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
        if self._uses_bf16:
            results = self._run_bound(feeds, names)
        else:
            results = dict(zip(names, self._session.run(names, feeds), strict=True))
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
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
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
