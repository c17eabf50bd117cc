"""PyTorch backend: TorchScript (`model.pt`) and torch.export programs (`model.pt2`).

Config names map to forward() arguments and outputs by Triton's rules:

* inputs: when every config input is a forward() argument name, by name; else when every
  config input is `<name>__<index>`, by index; else in config order. A forward() that takes a
  single `Dict[str, Tensor]` gets a dict keyed by the config's input names.
* outputs: when every config output is `<name>__<index>`, index into what forward() returns
  (a Tensor, a tuple, or a List[str]); else in config order.

BYTES crosses as `List[str]` (1-D only, as in Triton); BF16 and the unsigned types cross as
the torch dtypes of the same width. Execution runs under `torch.inference_mode` (Triton's
default; `INFERENCE_MODE: "false"` turns it off) on the instance's GPU when it has one.
"""

from __future__ import annotations

import logging
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import model_config_pb2 as pb

from natron import config as cfg
from natron import datatypes
from natron.config import ConfigError
from natron.errors import InternalError, InvalidArgument, Unavailable
from workers.backends import on_gpu
from workers.devices import Device

log = logging.getLogger(__name__)

_thread_settings_lock = threading.Lock()
_thread_settings: dict[str, int] = {}


def named_index(name: str) -> int | None:
    """The index of a `<name>__<index>` tensor name, as Triton parses it (first `__`)."""
    position = name.find("__")
    if position < 0:
        return None
    suffix = name[position + 2 :]
    return int(suffix) if suffix.isdigit() else None


def map_inputs(model: str, config_names: list[str], forward_args: list[str] | None) -> dict[str, int]:
    """Config input name -> forward() position (FORWARD_ARGUMENT, NAMED_INDEX, config order)."""
    if forward_args is not None and len(forward_args) != len(config_names):
        raise InvalidArgument(
            f"unable to load model '{model}', configuration expects {len(config_names)} inputs, "
            f"model provides {len(forward_args)}"
        )
    if forward_args is not None and all(n in forward_args for n in config_names):
        return {n: forward_args.index(n) for n in config_names}
    indices = [named_index(n) for n in config_names]
    if all(i is not None for i in indices):
        mapping = {n: i for n, i in zip(config_names, indices, strict=True) if i is not None}
        count = len(forward_args) if forward_args is not None else len(config_names)
        for name, index in mapping.items():
            if index >= count:
                raise InvalidArgument(
                    f"model '{model}': input '{name}' names forward() argument {index}, "
                    f"the model takes {count}"
                )
        if len(set(mapping.values())) != len(mapping):
            raise InvalidArgument(f"model '{model}': two config inputs name the same argument index")
        return mapping
    if forward_args is not None:
        log.warning(
            "model '%s': config inputs %s are neither forward() arguments %s nor <name>__<index>; "
            "mapping them in config order",
            model,
            config_names,
            forward_args,
        )
    return {n: i for i, n in enumerate(config_names)}


def map_outputs(config_names: list[str]) -> dict[str, int]:
    indices = [named_index(n) for n in config_names]
    if all(i is not None for i in indices):
        return {n: i for n, i in zip(config_names, indices, strict=True) if i is not None}
    return {n: i for i, n in enumerate(config_names)}


def _parse_threads(config: pb.ModelConfig, key: str) -> int | None:
    if key not in config.parameters:
        return None
    text = config.parameters[key].string_value.strip()
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(
            f"model '{config.name}': parameter {key} must be an integer, got '{text}'"
        ) from None
    return value if value > 0 else None


def _apply_thread_settings(config: pb.ModelConfig, torch: Any) -> None:
    """INTRA_/INTER_OP_THREAD_COUNT are process-wide in PyTorch: as in Triton, the first model
    that sets one wins and a different later value is ignored with a warning."""
    setters = {
        "INTRA_OP_THREAD_COUNT": torch.set_num_threads,
        "INTER_OP_THREAD_COUNT": torch.set_num_interop_threads,
    }
    with _thread_settings_lock:
        for key, setter in setters.items():
            value = _parse_threads(config, key)
            if value is None:
                continue
            if key in _thread_settings:
                if _thread_settings[key] != value:
                    log.warning(
                        "model '%s': %s=%d ignored, this worker already uses %d",
                        config.name,
                        key,
                        value,
                        _thread_settings[key],
                    )
                continue
            try:
                setter(value)
            except RuntimeError as exc:  # inter-op threads are fixed once torch used them
                log.warning("model '%s': %s=%d not applied: %s", config.name, key, value, exc)
            _thread_settings[key] = value


@dataclass(slots=True, frozen=True)
class _Program:
    """What was loaded: something to call, and the argument names when the format keeps them."""

    call: Callable[..., Any]
    forward_args: list[str] | None
    dict_input: bool
    kind: str  # "TorchScript", "torch.export", "AOTInductor"


def _load_program(path: Path, device: Any, torch: Any) -> _Program:
    if path.suffix == ".pt2":
        with zipfile.ZipFile(path) as archive:
            aoti = any("aotinductor" in name for name in archive.namelist())
        if aoti:
            # An AOTInductor package is compiled for one device; its argument names are not kept.
            compiled = torch._inductor.aoti_load_package(str(path))
            return _Program(compiled, None, False, "AOTInductor")
        program = torch.export.load(str(path))
        signature = program.module_call_graph[0].signature if program.module_call_graph else None
        names = list(signature.forward_arg_names) if signature and signature.forward_arg_names else None
        module = program.module().to(device)
        return _Program(module, names or list(program.graph_signature.user_inputs), False, "torch.export")
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    arguments = list(module.forward.schema.arguments)
    if arguments and arguments[0].type.kind() == "ClassType":
        arguments = arguments[1:]  # self
    if len(arguments) == 1 and arguments[0].type.kind() == "DictType":
        return _Program(module, None, True, "TorchScript")
    for argument in arguments:
        if argument.type.kind() not in ("TensorType", "ListType"):
            raise InvalidArgument(
                f"an input of type '{argument.type}' was detected in the model; only a single input "
                "of type Dict(str, Tensor) or input(s) of type Tensor or List[str] are supported"
            )
    return _Program(module, [a.name for a in arguments], False, "TorchScript")


def load_pytorch(config: pb.ModelConfig, version_dir: Path, device: Device) -> PyTorchBackend:
    """Load a TorchScript or torch.export model; raises with the real reason on failure."""
    try:
        import torch
    except ImportError:
        raise Unavailable(
            f"model '{config.name}': the torch package is not installed on this worker "
            "(install natron's 'torch' extra)"
        ) from None
    explicit = bool(config.default_model_filename)
    path = version_dir / (config.default_model_filename or "model.pt")
    if not path.exists() and not explicit and (version_dir / "model.pt2").exists():
        path = version_dir / "model.pt2"  # Triton's second default name
    if not path.exists():
        raise Unavailable(f"model '{config.name}': unable to find '{path}'")
    if not config.input or not config.output:
        raise ConfigError(
            f"model '{config.name}': a PyTorch model's config must list its inputs and outputs "
            "(PyTorch keeps too little metadata to complete it)"
        )
    for entry in (*config.input, *config.output):
        if entry.data_type == pb.TYPE_STRING and len(entry.dims) + (config.max_batch_size > 0) > 1:
            raise ConfigError(
                f"model '{config.name}': '{entry.name}' is TYPE_STRING, which PyTorch takes as a "
                "1-dimensional List[str] only"
            )
    _apply_thread_settings(config, torch)
    target = torch.device("cpu")
    if on_gpu(config, device):
        if torch.cuda.is_available():
            target = torch.device("cuda", device.index)
        else:
            log.warning("model '%s': this torch build has no CUDA; running on the CPU", config.name)
    inference_mode = cfg.parameter_bool(config, "INFERENCE_MODE", True)
    with torch.inference_mode(inference_mode):
        program = _load_program(path, target, torch)
    config_inputs = [i.name for i in config.input]
    backend = PyTorchBackend(
        name=config.name,
        program=program,
        input_index={}
        if program.dict_input
        else map_inputs(config.name, config_inputs, program.forward_args),
        output_index=map_outputs([o.name for o in config.output]),
        output_types={
            o.name: datatypes.config_to_datatype(pb.DataType.Name(o.data_type)) for o in config.output
        },
        device=target,
        inference_mode=inference_mode,
        optimized=not cfg.parameter_bool(config, "DISABLE_OPTIMIZED_EXECUTION", False),
        clean_cache=cfg.parameter_bool(config, "ENABLE_CACHE_CLEANING", False),
    )
    log.info("loaded %s (%s) on %s", path, program.kind, target)
    return backend


def _summary(exc: Exception) -> str:
    """The exception in one line. TorchScript errors carry the interpreter's whole traceback;
    their last line is the model's own exception (`builtins.ValueError: ...`)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if type(exc).__name__ == "Error" and lines:  # torch.jit.Error
        return lines[-1]
    return f"{type(exc).__name__}: {lines[-1] if lines else exc}"


# torch dtype name -> Triton datatype; every fixed-size datatype has one.
_TORCH_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
}


class PyTorchBackend:
    def __init__(
        self,
        *,
        name: str,
        program: _Program,
        input_index: dict[str, int],
        output_index: dict[str, int],
        output_types: dict[str, str],
        device: Any,
        inference_mode: bool,
        optimized: bool,
        clean_cache: bool,
    ) -> None:
        import torch

        # Typed loosely: torch's stubs are partial, and this module imports torch lazily.
        self._torch: Any = torch
        self._name = name
        self._program = program
        self._input_index = input_index
        self._output_index = output_index
        self._output_types = output_types
        self._device = device
        self._inference_mode = inference_mode
        self._optimized = optimized
        self._clean_cache = clean_cache and device.type == "cuda"
        # One stream per instance, as Triton gives each GPU instance its own.
        self._stream = self._torch.cuda.Stream(device) if device.type == "cuda" else None

    def execute(self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]) -> dict[str, npt.NDArray[Any]]:
        torch = self._torch
        with torch.inference_mode(self._inference_mode):
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    results = self._run(inputs)
                    answer = {name: self._to_numpy(name, results) for name in outputs or self._output_index}
                self._stream.synchronize()
            else:
                results = self._run(inputs)
                answer = {name: self._to_numpy(name, results) for name in outputs or self._output_index}
        if self._clean_cache:
            torch.cuda.empty_cache()
        return answer

    def _run(self, inputs: dict[str, npt.NDArray[Any]]) -> list[Any]:
        torch = self._torch
        values = {name: self._to_torch(name, array) for name, array in inputs.items()}
        if self._program.dict_input:
            call_args: list[Any] = [values]
        else:
            call_args = [None] * len(self._input_index)
            for name, value in values.items():
                call_args[self._input_index[name]] = value
            missing = [n for n, i in self._input_index.items() if call_args[i] is None]
            if missing:
                raise InvalidArgument(f"model '{self._name}' needs input(s) {missing} for forward()")
        try:
            if self._optimized or self._program.kind != "TorchScript":
                returned = self._program.call(*call_args)
            else:
                with torch.jit.optimized_execution(False):
                    returned = self._program.call(*call_args)
        except Exception as exc:
            raise InternalError(f"model '{self._name}': PyTorch execute failure: {_summary(exc)}") from exc
        if isinstance(returned, torch.Tensor):
            return [returned]
        if isinstance(returned, tuple):
            return list(returned)
        if isinstance(returned, list) and all(isinstance(s, str) for s in returned):
            return [returned]
        if isinstance(returned, list) and all(isinstance(t, torch.Tensor) for t in returned):
            return returned  # torch.export programs and AOTInductor return lists
        raise InternalError(
            f"model '{self._name}': forward() must return a Tensor, a List[str] or a tuple of "
            f"them, it returned {type(returned).__name__}"
        )

    def _to_torch(self, name: str, array: npt.NDArray[Any]) -> Any:
        torch = self._torch
        if array.dtype == np.object_:
            if array.ndim != 1:
                raise InvalidArgument(f"input '{name}': PyTorch takes BYTES as a 1-dimensional List[str]")
            try:
                return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array]
            except UnicodeDecodeError:
                raise InvalidArgument(f"input '{name}': PyTorch string inputs must be valid UTF-8") from None
        # A single request's input is a view of the received message, which is immutable: a
        # model that writes to its input in place must not write into that buffer.
        if not array.flags.writeable:
            array = array.copy()
        if array.dtype == ml_dtypes.bfloat16:
            tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(self._device) if self._device.type != "cpu" else tensor

    def _to_numpy(self, name: str, results: list[Any]) -> npt.NDArray[Any]:
        torch = self._torch
        position = self._output_index[name]
        if position >= len(results):
            raise InternalError(
                f"model '{self._name}': config output '{name}' refers to output index {position}, "
                f"forward() returned {len(results)} output(s)"
            )
        value = results[position]
        expected = self._output_types[name]
        if isinstance(value, list):
            if expected != datatypes.BYTES:
                raise InternalError(
                    f"model '{self._name}': configuration expects datatype {expected} for output "
                    f"'{name}', model provides List[str]"
                )
            strings = np.empty(len(value), dtype=np.object_)
            strings[:] = [s.encode("utf-8") for s in value]
            return strings
        if not isinstance(value, torch.Tensor):
            raise InternalError(f"model '{self._name}': output '{name}' must be a Tensor or List[str]")
        provided = _TORCH_DATATYPES.get(str(value.dtype).removeprefix("torch."))
        if provided != expected:
            raise InternalError(
                f"model '{self._name}': configuration expects datatype {expected} for output "
                f"'{name}', model provides {provided or value.dtype}"
            )
        if value.dim() == 0:
            raise InternalError(f"model '{self._name}': output '{name}' is a scalar, which is not supported")
        value = value.detach().contiguous().cpu()
        if value.dtype == torch.bfloat16:
            bf16: npt.NDArray[Any] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return bf16
        array: npt.NDArray[Any] = value.numpy()
        return array

    def close(self) -> None:
        self._program = None  # type: ignore[assignment]
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
