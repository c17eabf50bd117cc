"""TensorRT backend: serialized engines (`model.plan`) through TensorRT's Python API (10 and up).

Tensors are bound by name. Dynamic shapes go through the engine's optimization profiles: each
execution uses the first profile (of those the instance group's `profile` list allows, all by
default) whose bounds admit every input's shape, switching only when the shapes need another.
Each instance has its own execution context and CUDA stream, and device buffers that grow per
tensor and are reused across executions. CUDA is reached through the runtime library that
TensorRT's own wheels depend on (libcudart, via ctypes), so no other CUDA package is needed.

GPU only: without a GPU, or without the tensorrt package, the model is UNAVAILABLE with that
reason, and the worker serves its other models.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import model_config_pb2 as pb

from natron import datatypes
from natron.errors import InternalError, InvalidArgument, Unavailable, Unsupported
from workers.backends import on_gpu
from workers.devices import Device

log = logging.getLogger(__name__)

_HOST_TO_DEVICE = 1
_DEVICE_TO_HOST = 2
_MIN_BUFFER_BYTES = 256

# TensorRT DataType member name -> Triton datatype.
_TRT_DATATYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "BF16": "BF16",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
}


class CudaRuntime:
    """The few CUDA runtime calls this backend makes, through ctypes."""

    def __init__(self) -> None:
        self._lib = _load_cudart()
        self._lib.cudaGetErrorString.restype = ctypes.c_char_p

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self._lib.cudaGetErrorString(status).decode(errors="replace")
            raise InternalError(f"CUDA {what} failed: {message} (error {status})")

    def set_device(self, index: int) -> None:
        self._check(self._lib.cudaSetDevice(ctypes.c_int(index)), "cudaSetDevice")

    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._check(self._lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return stream.value or 0

    def stream_destroy(self, stream: int) -> None:
        self._lib.cudaStreamDestroy(ctypes.c_void_p(stream))

    def synchronize(self, stream: int) -> None:
        self._check(self._lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def malloc(self, size: int) -> int:
        pointer = ctypes.c_void_p()
        self._check(self._lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(size)), f"cudaMalloc({size})")
        return pointer.value or 0

    def free(self, pointer: int) -> None:
        self._lib.cudaFree(ctypes.c_void_p(pointer))

    def copy_async(self, destination: int, source: int, size: int, kind: int, stream: int) -> None:
        status = self._lib.cudaMemcpyAsync(
            ctypes.c_void_p(destination),
            ctypes.c_void_p(source),
            ctypes.c_size_t(size),
            ctypes.c_int(kind),
            ctypes.c_void_p(stream),
        )
        self._check(status, "cudaMemcpyAsync")


def _load_cudart() -> ctypes.CDLL:
    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    # The nvidia-cuda-runtime wheels TensorRT depends on put the library in site-packages.
    for entry in sys.path:
        for pattern in ("nvidia/cuda_runtime/lib/libcudart.so*", "nvidia/cu*/lib/libcudart.so*"):
            names += sorted(glob.glob(os.path.join(entry, pattern)), reverse=True)
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise Unavailable(f"the CUDA runtime library (libcudart) was not found: {errors[:2]}")


def _datatype_of(trt: Any, dtype: Any) -> str | None:
    for member, datatype in _TRT_DATATYPES.items():
        if getattr(trt.DataType, member, None) == dtype:
            return datatype
    return None


class TensorRTBackend:
    def __init__(
        self,
        *,
        name: str,
        trt: Any,
        cuda: CudaRuntime,
        device_index: int,
        engine: Any,
        context: Any,
        stream: int,
        inputs: dict[str, str],
        outputs: dict[str, str],
        profiles: list[int],
    ) -> None:
        self._name = name
        self._trt = trt
        self._cuda = cuda
        self._device_index = device_index
        self._engine = engine
        self._context = context
        self._stream = stream
        self._inputs = inputs  # engine input name -> Triton datatype
        self._outputs = outputs
        self._profiles = profiles
        self._profile: int | None = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity)

    @staticmethod
    def load(config: pb.ModelConfig, version_dir: Path, device: Device) -> TensorRTBackend:
        path = version_dir / (config.default_model_filename or "model.plan")
        if not path.exists():
            raise Unavailable(f"model '{config.name}': unable to find '{path}'")
        if not on_gpu(config, device):
            where = (
                "its instance_group asks for KIND_CPU" if device.kind == "GPU" else "this worker has no GPU"
            )
            raise Unavailable(f"model '{config.name}': TensorRT plans run on a GPU only, and {where}")
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise Unavailable(
                f"model '{config.name}': the tensorrt package is not installed on this worker "
                f"(install natron's 'gpu' extra): {exc}"
            ) from None
        cuda = CudaRuntime()
        cuda.set_device(device.index)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise InvalidArgument(
                f"model '{config.name}': TensorRT {trt.__version__} cannot deserialize {path.name} "
                "(built by another TensorRT version, or for another GPU?)"
            )
        inputs, outputs = _engine_io(config, trt, engine)
        _check_config(config, engine, inputs, outputs)
        count = int(engine.num_optimization_profiles)
        groups = [g for g in config.instance_group if g.profile]
        profiles = [int(p) for p in groups[0].profile] if groups else list(range(count))
        for profile in profiles:
            if not 0 <= profile < count:
                raise InvalidArgument(
                    f"model '{config.name}': instance_group names optimization profile {profile}, "
                    f"the engine has {count}"
                )
        context = engine.create_execution_context()
        if context is None:
            raise Unavailable(
                f"model '{config.name}': TensorRT could not create an execution context (GPU memory?)"
            )
        stream = cuda.stream_create()
        log.info("loaded %s on GPU %d with %d optimization profile(s)", path, device.index, count)
        return TensorRTBackend(
            name=config.name,
            trt=trt,
            cuda=cuda,
            device_index=device.index,
            engine=engine,
            context=context,
            stream=stream,
            inputs=inputs,
            outputs=outputs,
            profiles=profiles,
        )

    def execute(self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]) -> dict[str, npt.NDArray[Any]]:
        # The current device is per host thread; executions may come from more than one.
        self._cuda.set_device(self._device_index)
        self._use_profile({name: tuple(array.shape) for name, array in inputs.items()})
        context = self._context
        staged: list[npt.NDArray[Any]] = []  # host arrays must live until the stream is done
        for name, array in inputs.items():
            if not context.set_input_shape(name, tuple(int(d) for d in array.shape)):
                raise InvalidArgument(
                    f"model '{self._name}': TensorRT rejects shape {list(array.shape)} for '{name}'"
                )
            host = np.ascontiguousarray(array, dtype=datatypes.to_numpy_dtype(self._inputs[name]))
            pointer = self._buffer(name, host.nbytes)
            if host.nbytes:
                self._cuda.copy_async(pointer, host.ctypes.data, host.nbytes, _HOST_TO_DEVICE, self._stream)
            context.set_tensor_address(name, pointer)
            staged.append(host)
        results: dict[str, npt.NDArray[Any]] = {}
        for name, datatype in self._outputs.items():
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise Unsupported(
                    f"model '{self._name}': output '{name}' has a data-dependent shape {list(shape)}, "
                    "which this backend does not support yet"
                )
            host = np.empty(shape, dtype=datatypes.to_numpy_dtype(datatype))
            context.set_tensor_address(name, self._buffer(name, host.nbytes))
            if not outputs or name in outputs:
                results[name] = host
        if not context.execute_async_v3(self._stream):
            raise InternalError(f"model '{self._name}': TensorRT execution failed (see the worker log)")
        for name, host in results.items():
            if host.nbytes:
                pointer, _ = self._buffers[name]
                self._cuda.copy_async(host.ctypes.data, pointer, host.nbytes, _DEVICE_TO_HOST, self._stream)
        self._cuda.synchronize(self._stream)
        del staged
        return results

    def _use_profile(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for profile in self._profiles:
            if all(self._admits(name, shape, profile) for name, shape in shapes.items()):
                if profile != self._profile:
                    self._context.set_optimization_profile_async(profile, self._stream)
                    self._profile = profile
                return
        bounds = {
            name: [[list(d) for d in self._engine.get_tensor_profile_shape(name, p)] for p in self._profiles]
            for name in shapes
        }
        raise InvalidArgument(
            f"model '{self._name}': input shapes { ({n: list(s) for n, s in shapes.items()}) } fit no "
            f"optimization profile; [min, opt, max] per profile: {bounds}"
        )

    def _admits(self, name: str, shape: tuple[int, ...], profile: int) -> bool:
        low, _, high = (tuple(d) for d in self._engine.get_tensor_profile_shape(name, profile))
        return len(low) == len(shape) and all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True))

    def _buffer(self, name: str, size: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if size > capacity or pointer == 0:
            if pointer:
                self._cuda.free(pointer)
            capacity = max(_MIN_BUFFER_BYTES, 1 << max(size - 1, 0).bit_length())
            pointer = self._cuda.malloc(capacity)
            self._buffers[name] = (pointer, capacity)
        return pointer

    def close(self) -> None:
        self._cuda.set_device(self._device_index)
        self._cuda.synchronize(self._stream)
        for pointer, _ in self._buffers.values():
            self._cuda.free(pointer)
        self._buffers.clear()
        self._cuda.stream_destroy(self._stream)
        self._context = None
        self._engine = None


def _engine_io(config: pb.ModelConfig, trt: Any, engine: Any) -> tuple[dict[str, str], dict[str, str]]:
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for index in range(int(engine.num_io_tensors)):
        name = engine.get_tensor_name(index)
        dtype = engine.get_tensor_dtype(name)
        datatype = _datatype_of(trt, dtype)
        if datatype is None:
            raise Unsupported(
                f"model '{config.name}': engine tensor '{name}' has TensorRT type {dtype}, "
                "which natron cannot carry"
            )
        if engine.is_shape_inference_io(name):
            raise Unsupported(
                f"model '{config.name}': engine tensor '{name}' is a shape tensor, not supported yet"
            )
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs[name] = datatype
        else:
            outputs[name] = datatype
    return inputs, outputs


def _check_config(
    config: pb.ModelConfig, engine: Any, inputs: dict[str, str], outputs: dict[str, str]
) -> None:
    """The config's names, datatypes and ranks must match the engine: fail the load, not requests."""
    batching = config.max_batch_size > 0
    for kind, entries, io in (("input", config.input, inputs), ("output", config.output, outputs)):
        for entry in entries:
            if entry.name not in io:
                raise InvalidArgument(
                    f"model '{config.name}': config {kind} '{entry.name}' is not an {kind} of the "
                    f"engine, which has {sorted(io)}"
                )
            wanted = datatypes.config_to_datatype(pb.DataType.Name(entry.data_type))
            if wanted != io[entry.name]:
                raise InvalidArgument(
                    f"model '{config.name}': config {kind} '{entry.name}' is {wanted}, "
                    f"the engine's is {io[entry.name]}"
                )
            engine_dims = [int(d) for d in engine.get_tensor_shape(entry.name)]
            config_dims = ([-1] if batching else []) + [int(d) for d in entry.dims]
            if len(engine_dims) != len(config_dims) or any(
                e != -1 and c != -1 and e != c for e, c in zip(engine_dims, config_dims, strict=True)
            ):
                raise InvalidArgument(
                    f"model '{config.name}': config {kind} '{entry.name}' has dims {config_dims} "
                    f"(batch first when batching), the engine has {engine_dims}"
                )
    missing = [name for name in inputs if name not in {e.name for e in config.input}]
    if missing:
        raise InvalidArgument(f"model '{config.name}': engine inputs {missing} are not in the config")
