"""Triton's gRPC infer messages <-> natron's requests and responses, with no I/O.

A `ModelInferRequest` is read into the form an HTTP infer body takes (gateway/kserve.py's JSON
document plus its binary tail), so that both protocols share one parser, one set of checks and
one set of error messages. Raw inputs (`raw_input_contents`, what tritonclient sends) become
binary data; typed `contents` become the JSON `data` they mirror. As in Triton:

* `raw_input_contents` has one entry per input that is neither in shared memory nor given as
  typed `contents`, in input order, and an input cannot have both;
* every output goes back in `raw_output_contents`, one entry per output in output order (empty
  for an output written to shared memory), BYTES in Triton's length-prefixed layout;
* request parameters map onto the same names HTTP uses (`timeout` in microseconds,
  `sequence_id`, `priority`, custom ones), and `triton_enable_empty_final_response` is the
  stream's, taken out here. Unlike HTTP, gRPC parameters may be doubles: they pass through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from gateway import kserve
from natron import datatypes
from natron.datatypes import BYTES
from natron.errors import InternalError, InvalidArgument
from natron.inference import InferResponse

# The typed contents field that carries each datatype; FP16 and BF16 travel raw only.
_CONTENTS: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
_ALL_CONTENTS: Final = tuple(sorted(set(_CONTENTS.values())))
EMPTY_FINAL_PARAMETER: Final = "triton_enable_empty_final_response"
FINAL_PARAMETER: Final = "triton_final_response"
_INT64_MAX: Final = 2**63 - 1


@dataclass(slots=True, frozen=True)
class GrpcInfer:
    """A parsed gRPC infer request: what HTTP's parser gives, and the stream's one option."""

    parsed: kserve.ParsedInfer
    empty_final_response: bool


def parameter_value(parameter: pb.InferParameter) -> Any:
    """An InferParameter's value as Python: bool, int, float or str (None when unset)."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def set_parameter(target: pb.InferParameter, value: Any) -> None:
    if type(value) is bool:
        target.bool_param = value
    elif type(value) is int:
        if value > _INT64_MAX:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif type(value) is float:
        target.double_param = value
    else:
        target.string_param = str(value)


def _parameters(entries: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in entries.items()}


def parse_request(
    message: pb.ModelInferRequest,
    shm: kserve.ShmResolver | None = None,
    *,
    limits: kserve.InputLimits = kserve.DEFAULT_LIMITS,
    max_inputs: int | None = None,
    max_outputs: int | None = None,
) -> GrpcInfer:
    """Raises InvalidArgument, with HTTP's wording where the mistake is the same. `shm` maps
    the shared memory windows inputs and outputs name (as for HTTP); `limits`, `max_inputs`
    and `max_outputs` bound the request as they do there, the counts before any tensor is
    read."""
    model = message.model_name
    if max_inputs is not None and len(message.inputs) > max_inputs:
        raise InvalidArgument(
            f"request 'inputs' lists {len(message.inputs)} tensors, but model '{model}' has only "
            f"{max_inputs} inputs"
        )
    if max_outputs is not None and len(message.outputs) > max_outputs:
        raise InvalidArgument(
            f"request 'outputs' lists {len(message.outputs)} tensors, but model '{model}' has only "
            f"{max_outputs} outputs"
        )
    raw = message.raw_input_contents
    parts: list[bytes] = []
    inputs: list[dict[str, Any]] = []
    for tensor in message.inputs:
        params = _parameters(tensor.parameters)
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        typed = tensor.HasField("contents")
        if "shared_memory_region" in params:
            if typed:
                raise InvalidArgument(
                    f"input '{tensor.name}' is in shared memory and must not also set 'contents'"
                )
        elif typed:
            if raw:
                raise InvalidArgument(
                    f"input '{tensor.name}': 'contents' must not be set when the request uses "
                    "raw_input_contents"
                )
            chunk = _typed(tensor)
            if chunk is None:
                entry["data"] = list(getattr(tensor.contents, _CONTENTS[tensor.datatype]))
            else:
                params["binary_data_size"] = len(chunk)
                parts.append(chunk)
        else:
            if len(parts) >= len(raw):
                raise InvalidArgument(
                    f"input '{tensor.name}' has no data: raw_input_contents has {len(raw)} entries "
                    "and 'contents' is not set"
                )
            chunk = raw[len(parts)]
            params["binary_data_size"] = len(chunk)
            parts.append(chunk)
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    if raw and len(parts) != len(raw):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries, but {len(parts)} inputs take raw data"
        )

    request_params = _parameters(message.parameters)
    empty_final = request_params.pop(EMPTY_FINAL_PARAMETER, False)
    if type(empty_final) is not bool:
        raise InvalidArgument(f"parameter '{EMPTY_FINAL_PARAMETER}' must be a boolean")
    # HTTP's rule allows no floats among custom parameters; gRPC's InferParameter does.
    doubles = {key: value for key, value in request_params.items() if type(value) is float}
    for key in doubles:
        del request_params[key]
    # Every output comes back raw: binary by default, and each one listed says so.
    request_params["binary_data_output"] = True
    doc: dict[str, Any] = {"inputs": inputs, "parameters": request_params}
    if message.id:
        doc["id"] = message.id
    if message.outputs:
        doc["outputs"] = [_output(output) for output in message.outputs]
    parsed = kserve.parse_infer_doc(
        doc, memoryview(b"".join(parts)), model, message.model_version, shm, limits=limits
    )
    parsed.request.parameters.update(doubles)
    return GrpcInfer(parsed, empty_final)


def _output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> dict[str, Any]:
    params = _parameters(output.parameters)
    if "shared_memory_region" not in params:  # the bytes go to the region instead
        params["binary_data"] = True
    return {"name": output.name, "parameters": params}


def _typed(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes | None:
    """Check that typed contents use the field of their datatype; BYTES come back serialized
    as binary data (its elements may be any bytes, which JSON `data` cannot carry)."""
    datatype = tensor.datatype
    field = _CONTENTS.get(datatype)
    used = [name for name in _ALL_CONTENTS if len(getattr(tensor.contents, name))]
    if field is None:
        if datatype not in datatypes.DATATYPES:
            return None  # the parser names the unknown datatype
        raise InvalidArgument(
            f"input '{tensor.name}': {datatype} has no typed contents; send it in raw_input_contents"
        )
    wrong = [name for name in used if name != field]
    if wrong:
        raise InvalidArgument(
            f"input '{tensor.name}' of datatype {datatype} must use contents.{field}, not contents.{wrong[0]}"
        )
    if datatype != BYTES:
        return None
    values = np.empty(len(tensor.contents.bytes_contents), dtype=np.object_)
    values[:] = list(tensor.contents.bytes_contents)
    return datatypes.serialize_bytes(values)


def encode_response(
    response: InferResponse, parsed: kserve.ParsedInfer, request_id: str, *, batched: bool | None = None
) -> pb.ModelInferResponse:
    """The answer as Triton's gRPC sends it: every output in raw_output_contents."""
    doc, chunks = kserve.infer_response_doc(response, parsed, request_id, batched=batched)
    out = pb.ModelInferResponse(model_name=doc["model_name"], model_version=doc["model_version"])
    if request_id:
        out.id = request_id
    for key, value in doc.get("parameters", {}).items():
        set_parameter(out.parameters[key], value)
    pending = iter(chunks)
    for entry in doc["outputs"]:
        tensor = out.outputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
        params = dict(entry.get("parameters", {}))
        size = params.pop("binary_data_size", None)
        if "data" in entry:  # every output was asked for as binary data
            raise InternalError(f"output '{entry['name']}' was encoded as JSON for a gRPC answer")
        if size is None:  # written to the client's shared memory region
            out.raw_output_contents.append(b"")
        else:
            out.raw_output_contents.append(bytes(next(pending)) if size else b"")
        for key, value in params.items():
            set_parameter(tensor.parameters[key], value)
    return out
