"""The `triton_python_backend_utils` API that models written for Triton's Python backend import.

The stub registers this module in `sys.modules` under that name before it imports model.py, so
`import triton_python_backend_utils as pb_utils` works unchanged and no top-level package of that
name is ever installed. Names, signatures and messages follow Triton's module and its C++
bindings; where Triton hands out device memory, this implementation works on the host (tensors
are numpy arrays; DLPack imports from other devices are copied to the host).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from typing import Any, Protocol

import ml_dtypes
import numpy as np
import numpy.typing as npt

from natron import datatypes

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
    "TYPE_BF16": ml_dtypes.bfloat16,
}

# Triton's TRITONSERVER_DataType numbering, which triton_to_numpy_type and friends use.
_TYPE_NUMBERS: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 2,
    "UINT16": 3,
    "UINT32": 4,
    "UINT64": 5,
    "INT8": 6,
    "INT16": 7,
    "INT32": 8,
    "INT64": 9,
    "FP16": 10,
    "FP32": 11,
    "FP64": 12,
    "BYTES": 13,
    "BF16": 14,
}
_TYPE_NAMES = {number: name for name, number in _TYPE_NUMBERS.items()}

log = logging.getLogger("triton_python_backend_utils")


# -- errors -----------------------------------------------------------------------------------


class TritonError:
    """An error a response carries; `code` decides the status the client sees."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


# Triton's protocol status for each code (the edge maps it to HTTP once).
_STATUS_BY_CODE = {
    TritonError.INVALID_ARG: 400,
    TritonError.NOT_FOUND: 404,
    TritonError.UNSUPPORTED: 501,
    TritonError.UNAVAILABLE: 503,
}
_CODE_BY_STATUS = {status: code for code, status in _STATUS_BY_CODE.items()}


def status_of(error: TritonError) -> int:
    return _STATUS_BY_CODE.get(error.code(), 500)


def code_of(status: int) -> int:
    return _CODE_BY_STATUS.get(status, TritonError.INTERNAL)


class TritonModelException(Exception):
    """What pb_utils raises, and what models raise to fail a request."""

    def __init__(self, msg: str = "") -> None:
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


# -- tensors ----------------------------------------------------------------------------------


class Tensor:
    """A named tensor, held as a numpy array on the host."""

    def __init__(self, name: str, numpy_array: Any, triton_dtype: int | None = None) -> None:
        array = numpy_array if isinstance(numpy_array, np.ndarray) else np.asarray(numpy_array)
        if array.dtype.kind == "U" or array.dtype == np.void:
            raise TritonModelException(
                "Tensor dtype used for numpy_array is not support by Python backend. "
                "Please use np.object_ instead."
            )
        if triton_dtype is not None:
            wanted = triton_to_numpy_type(triton_dtype)
            if wanted is not None and array.dtype != wanted:
                array = array.view(wanted)  # reinterpret the bytes, as Triton does
        try:
            self._datatype = datatypes.from_numpy_dtype(array.dtype)
        except Exception:
            raise TritonModelException(
                f"tensor '{name}': numpy dtype {array.dtype} has no Triton datatype"
            ) from None
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> npt.NDArray[Any]:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int:
        return _TYPE_NUMBERS[self._datatype]

    def datatype(self) -> str:
        return self._datatype

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        if self._datatype == datatypes.BYTES:
            raise TritonModelException("DLPack does not support BYTES tensors")
        return self._array.__dlpack__()

    def __dlpack__(self, stream: Any = None) -> Any:
        return self._array.__dlpack__()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU

    @staticmethod
    def from_dlpack(name: str, dlpack: Any) -> Tensor:
        """From a DLPack capsule or any object with `__dlpack__` (torch, cupy, jax...)."""
        if hasattr(dlpack, "__dlpack__"):
            try:
                return Tensor(name, np.from_dlpack(dlpack))
            except (BufferError, RuntimeError, TypeError):
                pass  # on a device numpy cannot read: let the producing framework copy it over
        try:
            import torch
        except ImportError:
            raise TritonModelException(
                f"tensor '{name}': this DLPack tensor is not on the host, and torch is not "
                "installed to copy it there"
            ) from None
        tensor = torch.utils.dlpack.from_dlpack(dlpack).detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return Tensor(name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
        return Tensor(name, tensor.numpy())

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, {self._datatype}, {list(self._array.shape)})"


# -- requests and responses -------------------------------------------------------------------


class InferenceResponse:
    def __init__(
        self,
        output_tensors: list[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        if output_tensors is None:
            output_tensors = []
        if not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list.')
        self._output_tensors = output_tensors
        self._error = error
        self._parameters = _parameters_dict(parameters)

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


class _Sender(Protocol):
    def __call__(self, response: InferenceResponse | None, final: bool) -> None: ...


class InferenceResponseSender:
    """Sends a request's responses: any number, the last one with the final flag."""

    def __init__(self, send: _Sender, cancelled: Callable[[], bool] = lambda: False) -> None:
        self._send = send
        self._closed = False
        self._cancelled = cancelled

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self._closed:
            raise TritonModelException("Unable to send response. Response sender has been closed.")
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags is set to zero."
            )
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException("response must be an InferenceResponse")
        if final:
            self._closed = True
        self._send(response, final)

    def is_cancelled(self) -> bool:
        """Whether the client went away: a streaming model may stop sending."""
        return self._cancelled()


class _Mesh(Protocol):
    """What BLS needs from the stub; see pystub.mesh."""

    def exec(self, request: InferenceRequest, decoupled: bool) -> Any: ...

    async def async_exec(self, request: InferenceRequest, decoupled: bool) -> Any: ...


_mesh_provider: Callable[[], _Mesh] | None = None


def _install_mesh(provider: Callable[[], _Mesh]) -> None:
    global _mesh_provider
    _mesh_provider = provider


def _mesh() -> _Mesh:
    if _mesh_provider is None:
        raise TritonModelException("BLS is not available in this process")
    return _mesh_provider()


class InferenceRequest:
    """A request to this model (built by the stub) or, built by model code, a BLS request to
    another model, sent through the mesh by `exec()` or `await async_exec()`."""

    def __init__(
        self,
        model_name: str = "",
        inputs: list[Tensor] | None = None,
        requested_output_names: list[str] | None = None,
        request_id: str = "",
        correlation_id: int | str = 0,
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        preferred_memory: Any = None,
        trace: Any = None,
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        inputs = [] if inputs is None else inputs
        names = [] if requested_output_names is None else requested_output_names
        if not isinstance(inputs, list) or not all(isinstance(t, Tensor) for t in inputs):
            raise TritonModelException("inputs must be a list of pb_utils.Tensor")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TritonModelException("requested_output_names must be a list of str")
        self.model_name = model_name
        self.model_version = int(model_version)
        self._inputs = inputs
        self._requested_output_names = names
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout_us = int(timeout)
        self._parameters = _parameters_dict(parameters)
        self._sender: InferenceResponseSender | None = None
        self._cancelled: Callable[[], bool] = lambda: False

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested_output_names

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout_us

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def parameters_dict(self) -> dict[str, Any]:
        return dict(self._parameters)

    def is_cancelled(self) -> bool:
        """Whether the client went away (its queued or streaming work is no longer wanted)."""
        return self._cancelled()

    def set_release_flags(self, flags: int) -> None:
        if flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            raise TritonModelException("rescheduling requests is not supported")

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            raise TritonModelException("only requests to this model have a response sender")
        return self._sender

    def exec(self, decoupled: bool = False) -> Any:
        """Run this request on `model_name` and wait: an InferenceResponse (errors inside it), or
        with `decoupled=True` an iterator over the responses of a decoupled model."""
        return _mesh().exec(self, decoupled)

    async def async_exec(self, decoupled: bool = False) -> Any:
        """The awaitable form of `exec()`; with `decoupled=True`, an async iterator."""
        return await _mesh().async_exec(self, decoupled)

    def _bind(self, sender: InferenceResponseSender, cancelled: Callable[[], bool]) -> None:
        self._sender = sender
        self._cancelled = cancelled


def _parameters_dict(parameters: dict[str, Any] | str | None) -> dict[str, Any]:
    if parameters is None:
        return {}
    if isinstance(parameters, str):
        loaded = json.loads(parameters) if parameters else {}
        if not isinstance(loaded, dict):
            raise TritonModelException("parameters must be a JSON object")
        return loaded
    if not isinstance(parameters, dict):
        raise TritonModelException("parameters must be a dict or a JSON string")
    for key, value in parameters.items():
        if not isinstance(key, str) or not isinstance(value, bool | int | str | float):
            raise TritonModelException("parameters map str keys to bool, int, float or str values")
    return dict(parameters)


# -- helpers Triton ships ---------------------------------------------------------------------


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in model_config.get("input", []):
        if entry["name"] == name:
            return dict(entry)
    return None


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in model_config.get("output", []):
        if entry["name"] == name:
            return dict(entry)
    return None


def using_decoupled_model_transaction_policy(model_config: dict[str, Any]) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_string_to_numpy(triton_type_string: str) -> Any:
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> Any:
    name = _TYPE_NAMES.get(data_type)
    if name is None:
        return None
    return np.object_ if name == datatypes.BYTES else datatypes.to_numpy_dtype(name).type


def numpy_to_triton_type(data_type: Any) -> int | None:
    try:
        return _TYPE_NUMBERS[datatypes.from_numpy_dtype(np.dtype(data_type))]
    except Exception:
        return None


def serialize_byte_tensor(input_tensor: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | None:
    """BYTES elements -> one uint8 array in Triton's 4-byte-length-prefixed layout."""
    if input_tensor.size == 0:
        return np.empty([0], dtype=np.uint8)
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts: list[bytes] = []
    for item in input_tensor.ravel(order="C"):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor: bytes | npt.NDArray[Any]) -> npt.NDArray[np.object_]:
    buffer = encoded_tensor.tobytes() if isinstance(encoded_tensor, np.ndarray) else bytes(encoded_tensor)
    return datatypes.deserialize_bytes(buffer)


# -- logging ----------------------------------------------------------------------------------


class Logger:
    """pb_utils.Logger: `Logger.log_info(msg)`, or `Logger.log(msg, Logger.WARNING)`."""

    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3

    _LEVELS = {INFO: logging.INFO, WARNING: logging.WARNING, ERROR: logging.ERROR, VERBOSE: logging.DEBUG}

    @staticmethod
    def log(message: str, level: int = INFO) -> None:
        log.log(Logger._LEVELS.get(level, logging.INFO), "%s", message)

    @staticmethod
    def log_info(message: str) -> None:
        log.info("%s", message)

    @staticmethod
    def log_warn(message: str) -> None:
        log.warning("%s", message)

    @staticmethod
    def log_error(message: str) -> None:
        log.error("%s", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        log.debug("%s", message)


# -- auto-complete ----------------------------------------------------------------------------


class ModelConfig:
    """What `TritonPythonModel.auto_complete_config` receives and returns."""

    def __init__(self, model_config: str | dict[str, Any]) -> None:
        self._model_config: dict[str, Any] = (
            json.loads(model_config) if isinstance(model_config, str) else dict(model_config)
        )
        self._model_config.setdefault("input", [])
        self._model_config.setdefault("output", [])
        self._model_config.setdefault("max_batch_size", 0)

    def as_dict(self) -> dict[str, Any]:
        return self._model_config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = int(self._model_config.get("max_batch_size", 0))
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config "
                f"function for model '{self._name}' specified max_batch_size {max_batch_size}"
            )
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        for scheduler in ("sequence_batching", "ensemble_scheduling"):
            if self._model_config.get(scheduler):
                raise ValueError(
                    f"Configuration specified scheduling_choice as '{scheduler}', but "
                    f"auto-complete-config function for model '{self._name}' tries to set "
                    "scheduling_choice as 'dynamic_batching'"
                )
        if not self._model_config.get("dynamic_batching"):
            self._model_config["dynamic_batching"] = {}

    def set_model_transaction_policy(self, transaction_policy_dict: dict[str, Any]) -> None:
        policy = self._model_config.setdefault("model_transaction_policy", {})
        for key, value in transaction_policy_dict.items():
            if key != "decoupled":
                raise ValueError(f"model transaction property '{key}' is not supported")
            policy[key] = value

    def add_input(self, input: dict[str, Any]) -> None:  # Triton's parameter name
        self._add("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict[str, Any]) -> None:
        self._add("output", output, ("name", "data_type", "dims"))

    @property
    def _name(self) -> str:
        return str(self._model_config.get("name", ""))

    def _add(self, kind: str, entry: dict[str, Any], allowed: tuple[str, ...]) -> None:
        name = entry.get("name")
        if name is None:
            raise ValueError(
                f"{kind} in auto-complete-config function for model '{self._name}' is missing "
                "'name' property."
            )
        for key in entry:
            if key not in allowed:
                raise ValueError(
                    f"{kind} '{name}' in auto-complete-config function for model '{self._name}' "
                    f"contains property other than {', '.join(repr(a) for a in allowed)}."
                )
        for key in ("data_type", "dims"):
            if key not in entry:
                raise ValueError(
                    f"{kind} '{name}' in auto-complete-config function for model '{self._name}' "
                    f"is missing '{key}' property."
                )
        for current in self._model_config[kind]:
            if current["name"] != name:
                continue
            if current.get("data_type", "TYPE_INVALID") not in ("TYPE_INVALID", entry["data_type"]):
                raise ValueError(
                    f"unable to load model '{self._name}', configuration expects datatype "
                    f"{current['data_type']} for {kind} '{name}', model provides {entry['data_type']}"
                )
            if current.get("dims") and list(current["dims"]) != list(entry["dims"]):
                raise ValueError(
                    f"model '{self._name}', tensor '{name}': the model expects dims {entry['dims']} "
                    f"but the model configuration specifies dims {current['dims']}"
                )
            current.update(entry)
            return
        self._model_config[kind].append(dict(entry))


__all__ = [
    "TRITONSERVER_REQUEST_RELEASE_ALL",
    "TRITONSERVER_REQUEST_RELEASE_RESCHEDULE",
    "TRITONSERVER_RESPONSE_COMPLETE_FINAL",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceResponseSender",
    "Logger",
    "ModelConfig",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "deserialize_bytes_tensor",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "numpy_to_triton_type",
    "serialize_byte_tensor",
    "triton_string_to_numpy",
    "triton_to_numpy_type",
    "using_decoupled_model_transaction_policy",
]
