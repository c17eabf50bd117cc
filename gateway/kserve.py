"""Triton's KServe v2 infer bodies <-> natron's InferRequest / InferResponse, with no I/O.

The HTTP handler hands over the (already decompressed) body and the value of its
`Inference-Header-Content-Length` header; everything else, the binary tensor data extension
and the classification extension included, happens here. Behaviour follows Triton's
`http_server.cc`, with these deliberate differences:

* Every malformed request raises InvalidArgument naming the field and the offending value,
  never another exception type. Checks are stricter than Triton's where Triton silently
  truncates: integers must fit the datatype, BOOL JSON data takes only true/false, FP32 values
  must fit FP32, and input names must be unique. BOOL binary data is read as Triton reads it,
  any nonzero byte true, and normalised to numpy's 0/1 booleans.
* Shared memory (Triton's system shared memory extension) goes through a resolver the caller
  passes in (gateway/sharedmemory.py's registry): `shm(region, offset, byte_size)` gives a view
  of the client's bytes, so parsing stays free of I/O. An input is read from its view; an
  output's view is kept in ParsedInfer and the encoder writes the tensor into it, answering
  the output as Triton does: name, datatype and shape, no data and no parameters (Triton's
  C++ client, perf_analyzer's, reads any output that has parameters as binary data and fails
  without `binary_data_size`). `shared_memory_byte_size` is required (Triton takes a missing
  one as 0 and fails later), and two outputs may not share bytes of one region: the second
  would overwrite the first. Without a resolver (the streaming endpoints) shared memory
  parameters are refused.
* An output that JSON cannot carry faithfully goes back as binary data even when JSON was
  asked for: FP16 and BF16 (Triton rejects those requests instead), BYTES whose elements are
  not valid UTF-8 (Triton would emit invalid JSON), and FP32/FP64 holding NaN or infinity
  (JSON has no such numbers). tritonclient reads any output marked with `binary_data_size`,
  whatever it asked for, so clients see the right values either way.
* Classification supports every numeric datatype, FP16 and BF16 included; Triton refuses
  those two. Elements are "value:index", Triton's format when no label file exists (natron
  has none), with the value printed as C++'s std::to_string does ("0.750000:3").

As in Triton, `parameters.binary_data_output` sets the default only for outputs the request
does not list; a listed output is binary exactly when it says `"binary_data": true`.

Every request's cost is linear in its size, and bounded before the work starts: the numbers of
inputs and outputs by the model's own (names are unique and must be the model's, so a longer
list is refused before it is walked), tensor elements, BYTES element lengths and the nesting of
`data` arrays by InputLimits, whose 400 names the gateway flag that sets it.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, pairwise
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt
import orjson

from natron import datatypes
from natron.datatypes import BINARY_ONLY, BYTES, DATATYPES
from natron.errors import InternalError, InvalidArgument
from natron.inference import InferRequest, InferResponse, Tensor

HEADER_LENGTH_HEADER: Final = "Inference-Header-Content-Length"

_FLOATS: Final = frozenset({"FP32", "FP64"})
# The smallest magnitude that rounds to infinity in float32: FP32's max plus half an ulp.
# orjson prints FP32's max as 3.4028235e+38, just above the max itself, so the limit must
# be where the cast overflows, not the max.
_FP32_OVERFLOW: Final = 2.0**128 - 2.0**103
# Triton keeps dims as int64; numpy cannot index past that either.
_MAX_DIM: Final = 2**63 - 1
# Sequence flags: request parameters Triton itself reads, as booleans only.
_BOOL_PARAMS: Final = frozenset({"sequence_start", "sequence_end"})
_DUMPS_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY
# numpy >= 2 refuses Python ints outside the target dtype; 1.x wraps them around silently.
_NUMPY_CHECKS_INT_RANGE: Final = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
_SHM_REGION: Final = "shared_memory_region"
_SHM_OFFSET: Final = "shared_memory_offset"
_SHM_SIZE: Final = "shared_memory_byte_size"

MiB: Final = 1024 * 1024
# orjson's own nesting limit: it refuses deeper JSON as invalid.
JSON_DEPTH_CEILING: Final = 1024


@dataclass(slots=True, frozen=True)
class InputLimits:
    """Bounds on one infer request beyond its body size, set by the gateway flags they name.

    The defaults hold what any real tensor needs (a 1 GiB FP32 tensor, a 64 MiB string)
    while stopping requests whose cost would come from their shape rather than their bytes: a
    shape of 2**40 elements in a shared memory region, a string that fills a region. JSON
    nesting is bounded by orjson at JSON_DEPTH_CEILING levels for the whole body (deeper is a
    400 "not valid JSON"); `max_json_depth` bounds the `data` arrays within that, by default
    at the ceiling itself, as Triton accepts irregular nesting (flattening is linear either
    way, so the bound is a policy, not a defence against cost).
    """

    max_tensor_elements: int = 1 << 28
    max_bytes_element_bytes: int = 64 * MiB
    max_json_depth: int = 1024


DEFAULT_LIMITS: Final = InputLimits()

# (region, offset, byte_size) -> a writable view of exactly byte_size bytes of the client's
# region; raises InvalidArgument for an unknown region or a window that does not fit it.
ShmResolver = Callable[[str, int, int], memoryview]


@dataclass(slots=True, frozen=True)
class ShmOutput:
    """Where an output goes in shared memory: the encoder writes its bytes into `window`."""

    region: str
    offset: int
    window: memoryview  # shared_memory_byte_size bytes of the region, from offset


@dataclass(slots=True, frozen=True)
class ParsedInfer:
    request: InferRequest  # id from the body's "id" ("" if absent), model/version passed in
    binary_outputs: frozenset[str]  # outputs the client asked back as binary data
    binary_default: bool  # parameters.binary_data_output (applies to outputs not listed)
    timeout_us: int | None  # parameters.timeout (Triton: microseconds), validated > 0
    class_counts: dict[str, int]  # outputs with parameters.classification = k (k > 0)
    shm_outputs: dict[str, ShmOutput] = field(default_factory=dict)  # outputs into shared memory


# ---------------------------------------------------------------------------------- parsing


def parse_infer_body(
    body: bytes,
    header_length: int | None,
    model: str,
    version: str,
    shm: ShmResolver | None = None,
    *,
    limits: InputLimits = DEFAULT_LIMITS,
    max_inputs: int | None = None,
    max_outputs: int | None = None,
) -> ParsedInfer:
    """Decode an infer request body; raises InvalidArgument for anything malformed. `shm`
    resolves shared memory regions (None: shared memory parameters are refused).
    `max_inputs` / `max_outputs`: the model's counts, when the caller knows the model; longer
    lists are refused before they are walked."""
    total = len(body)
    if header_length is None:
        json_end = total
    elif 0 < header_length <= total:
        json_end = header_length
    else:
        raise InvalidArgument(
            f"{HEADER_LENGTH_HEADER} must be in the range (0, {total}] for a body of {total} bytes, "
            f"got {header_length}"
        )
    view = memoryview(body)
    try:
        doc = orjson.loads(view[:json_end])
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"inference request header is not valid JSON: {exc}") from None
    return parse_infer_doc(
        doc,
        view[json_end:],
        model,
        version,
        shm,
        limits=limits,
        max_inputs=max_inputs,
        max_outputs=max_outputs,
    )


def parse_infer_doc(
    doc: Any,
    binary: memoryview,
    model: str,
    version: str,
    shm: ShmResolver | None = None,
    *,
    limits: InputLimits = DEFAULT_LIMITS,
    max_inputs: int | None = None,
    max_outputs: int | None = None,
) -> ParsedInfer:
    """An infer request already decoded from JSON, with the binary tensor data that followed its
    header (empty when none): what the WebSocket and generate endpoints hand in directly, so
    nothing is encoded to JSON only to be parsed again."""
    if type(doc) is not dict:
        raise InvalidArgument(f"inference request must be a JSON object, got {_kind(doc)}")

    request_id = doc.get("id", "")
    if type(request_id) is not str:
        raise InvalidArgument(f"request 'id' must be a string, got {_show(request_id)}")
    parameters, binary_default, timeout_us = _parse_parameters(doc.get("parameters"))
    raw_inputs, raw_outputs = doc.get("inputs"), doc.get("outputs")
    _check_count(raw_inputs, "inputs", model, max_inputs)
    _check_count(raw_outputs, "outputs", model, max_outputs)
    inputs = _parse_inputs(raw_inputs, binary, shm, limits)
    outputs, binary_outputs, class_counts, shm_outputs = _parse_outputs(raw_outputs, shm)
    return ParsedInfer(
        InferRequest(request_id, model, version, inputs, outputs, parameters),
        binary_outputs,
        binary_default,
        timeout_us,
        class_counts,
        shm_outputs,
    )


def _check_count(raw: Any, what: str, model: str, most: int | None) -> None:
    """Names must be unique and the model's: a list longer than the model's own is refused
    before its entries are parsed. Of `most + 1` entries two share a name or one is not the
    model's; the first duplicate among them is named when there is one, as the full parse
    would, so the answer is the same whichever check finds it."""
    if most is None or type(raw) is not list or len(raw) <= most:
        return
    kind = what[:-1]
    seen: set[str] = set()
    for entry in raw[: most + 1]:
        name = entry.get("name") if type(entry) is dict else None
        if type(name) is str and name:
            if name in seen:
                raise InvalidArgument(f"{kind} '{name}' appears more than once in '{what}'")
            seen.add(name)
    raise InvalidArgument(
        f"request '{what}' lists {len(raw)} tensors, but model '{model}' has only {most} {what}"
    )


def _parse_parameters(raw: Any) -> tuple[dict[str, Any], bool, int | None]:
    if raw is None:
        return {}, False, None
    if type(raw) is not dict:
        raise InvalidArgument(f"request 'parameters' must be an object, got {_kind(raw)}")
    passed: dict[str, Any] = {}
    binary_default = False
    timeout_us: int | None = None
    for key, value in raw.items():
        if key == "binary_data_output":
            if type(value) is not bool:
                raise InvalidArgument(f"parameter 'binary_data_output' must be a boolean, got {_show(value)}")
            binary_default = value
        elif key == "timeout":
            if type(value) is not int or value <= 0:
                raise InvalidArgument(
                    f"parameter 'timeout' must be a positive integer of microseconds, got {_show(value)}"
                )
            timeout_us = value
        elif key.startswith("triton_"):
            raise InvalidArgument(f"parameter '{key}': keys starting with 'triton_' are reserved")
        elif key in _BOOL_PARAMS:
            if type(value) is not bool:
                raise InvalidArgument(f"parameter '{key}' must be a boolean, got {_show(value)}")
            passed[key] = value
        elif key == "priority":
            if type(value) is not int or value < 0:
                raise InvalidArgument(
                    f"parameter 'priority' must be a non-negative integer, got {_show(value)}"
                )
            passed[key] = value
        elif key == "sequence_id":
            if not ((type(value) is int and value >= 0) or type(value) is str):
                raise InvalidArgument(
                    f"parameter 'sequence_id' must be a non-negative integer or a string, got {_show(value)}"
                )
            passed[key] = value
        elif type(value) in (str, int, bool):
            passed[key] = value
        else:
            # Triton's rule: custom parameters are strings, integers or booleans.
            raise InvalidArgument(
                f"parameter '{key}' must be a string, integer or boolean, got {_kind(value)} {_show(value)}"
            )
    return passed, binary_default, timeout_us


def _parse_inputs(raw: Any, binary: memoryview, shm: ShmResolver | None, limits: InputLimits) -> list[Tensor]:
    if type(raw) is not list or not raw:
        raise InvalidArgument(f"request 'inputs' must be a non-empty list of tensors, got {_show(raw)}")
    tensors: list[Tensor] = []
    names: set[str] = set()
    offset = 0
    for position, entry in enumerate(raw):
        tensor, offset = _parse_input(entry, position, binary, offset, shm, limits)
        if tensor.name in names:
            raise InvalidArgument(f"input '{tensor.name}' appears more than once in 'inputs'")
        names.add(tensor.name)
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidArgument(
            f"the request carries {len(binary)} bytes of binary data but the inputs' "
            f"binary_data_size values add up to {offset}"
        )
    return tensors


def _parse_input(
    raw: Any, position: int, binary: memoryview, offset: int, shm: ShmResolver | None, limits: InputLimits
) -> tuple[Tensor, int]:
    if type(raw) is not dict:
        raise InvalidArgument(f"inputs[{position}] must be an object, got {_kind(raw)}")
    name = raw.get("name")
    if type(name) is not str or not name:
        raise InvalidArgument(f"inputs[{position}] 'name' must be a non-empty string, got {_show(name)}")
    datatype = raw.get("datatype")
    if type(datatype) is not str or datatype not in DATATYPES:
        raise InvalidArgument(
            f"input '{name}' has unknown datatype {_show(datatype)}; "
            f"expected one of {', '.join(sorted(DATATYPES))}"
        )
    shape = _parse_shape(raw.get("shape"), name)
    params = raw.get("parameters")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise InvalidArgument(f"input '{name}' 'parameters' must be an object, got {_kind(params)}")
    has_data = "data" in raw
    has_size = "binary_data_size" in params
    has_shm = _SHM_REGION in params
    if has_data + has_size + has_shm != 1:
        which = [
            f"'{f}'"
            for f, s in (("data", has_data), ("binary_data_size", has_size), (_SHM_REGION, has_shm))
            if s
        ]
        raise InvalidArgument(
            f"input '{name}' must set exactly one of 'data', parameters 'binary_data_size' and parameters "
            f"'{_SHM_REGION}', but sets {' and '.join(which) or 'none of them'}"
        )
    count = datatypes.element_count(shape)
    if count > limits.max_tensor_elements:
        raise InvalidArgument(
            f"input '{name}' shape {list(shape)} has {count} elements, over the limit of "
            f"{limits.max_tensor_elements} (the gateway's --max-tensor-elements)"
        )
    if has_data:
        _no_shm_window("input", name, params)
        array = _from_json(name, datatype, shape, count, raw["data"], limits)
        return Tensor(name, datatype, shape, array), offset
    if has_shm:
        _, _, window = _shm_window("input", name, params, shm)
        array = _from_binary(name, datatype, shape, count, window.toreadonly(), _SHM_SIZE, limits)
        return Tensor(name, datatype, shape, array), offset
    _no_shm_window("input", name, params)
    size = params["binary_data_size"]
    if type(size) is not int or size < 0:
        raise InvalidArgument(
            f"input '{name}' 'binary_data_size' must be a non-negative integer, got {_show(size)}"
        )
    end = offset + size
    if end > len(binary):
        raise InvalidArgument(
            f"input '{name}' has binary_data_size {size} but only {len(binary) - offset} of the request's "
            f"{len(binary)} binary bytes are left (is {HEADER_LENGTH_HEADER} right?)"
        )
    array = _from_binary(name, datatype, shape, count, binary[offset:end], "binary_data_size", limits)
    return Tensor(name, datatype, shape, array), end


def _shm_window(
    kind: str, name: str, params: dict[str, Any], shm: ShmResolver | None
) -> tuple[str, int, memoryview]:
    """The region, offset and view that a tensor's shared memory parameters name."""
    what = f"{kind} '{name}'"
    if shm is None:
        raise InvalidArgument(
            f"{what} uses '{_SHM_REGION}', which this endpoint does not support; send the tensor "
            "as 'data' or as binary data"
        )
    region = params[_SHM_REGION]
    if type(region) is not str or not region:
        raise InvalidArgument(f"{what} '{_SHM_REGION}' must be a non-empty string, got {_show(region)}")
    offset = params.get(_SHM_OFFSET, 0)
    if type(offset) is not int or offset < 0:
        raise InvalidArgument(f"{what} '{_SHM_OFFSET}' must be a non-negative integer, got {_show(offset)}")
    if _SHM_SIZE not in params:
        raise InvalidArgument(f"{what} sets '{_SHM_REGION}' but not '{_SHM_SIZE}'")
    size = params[_SHM_SIZE]
    if type(size) is not int or size < 0:
        raise InvalidArgument(f"{what} '{_SHM_SIZE}' must be a non-negative integer, got {_show(size)}")
    return region, offset, shm(region, offset, size)


def _no_shm_window(kind: str, name: str, params: dict[str, Any]) -> None:
    if params and (_SHM_OFFSET in params or _SHM_SIZE in params):
        raise InvalidArgument(
            f"{kind} '{name}' sets '{_SHM_OFFSET}' or '{_SHM_SIZE}' without '{_SHM_REGION}'"
        )


def _parse_shape(raw: Any, name: str) -> tuple[int, ...]:
    # `type(d) is int` also rules out bool, which JSON clients would otherwise sneak through.
    if type(raw) is not list or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in raw):
        raise InvalidArgument(
            f"input '{name}' 'shape' must be a list of non-negative integers, got {_show(raw)}"
        )
    return tuple(raw)


def _from_binary(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    chunk: memoryview,
    size_field: str,
    limits: InputLimits,
) -> npt.NDArray[Any]:
    if datatype == BYTES:
        try:
            flat = datatypes.deserialize_bytes(chunk, count)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"input '{name}' binary data: {exc.message} (shape {list(shape)})"
            ) from None
        _check_bytes_lengths(name, flat, limits)
        return _reshape(flat, shape, name)
    dtype = datatypes.to_numpy_dtype(datatype)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise InvalidArgument(
            f"input '{name}' has {size_field} {len(chunk)}, but datatype {datatype} with shape "
            f"{list(shape)} needs {expected} bytes"
        )
    # Zero-copy: the array is a read-only view of the request body (or the client's region).
    array = np.frombuffer(chunk, dtype=dtype)
    if datatype == "BOOL" and count:
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if raw.max() > 1:
            # Triton reads each byte as a C++ bool: any nonzero byte is true. numpy would keep
            # the byte as it is, so the copy holds 0/1 only, the form every backend expects.
            array = raw != 0
    return _reshape(array, shape, name)


def _check_bytes_lengths(name: str, items: Any, limits: InputLimits) -> None:
    """BYTES elements within --max-bytes-element-mb; `items` holds bytes objects."""
    if len(items) == 0:
        return
    longest = max(map(len, items))
    if longest > limits.max_bytes_element_bytes:
        raise InvalidArgument(
            f"input '{name}' has a BYTES element of {longest} bytes, over the limit of "
            f"{limits.max_bytes_element_bytes} bytes (the gateway's --max-bytes-element-mb)"
        )


def _from_json(
    name: str, datatype: str, shape: tuple[int, ...], count: int, data: Any, limits: InputLimits
) -> npt.NDArray[Any]:
    if datatype in BINARY_ONLY:
        raise InvalidArgument(
            f"input '{name}': {datatype} is supported in binary data only; send it with parameters "
            "'binary_data_size' after the JSON header"
        )
    if type(data) is not list:
        raise InvalidArgument(f"input '{name}' 'data' must be a JSON array, got {_kind(data)}")
    items, kinds = _flatten(data, limits.max_json_depth, name)
    if len(items) != count:
        raise InvalidArgument(
            f"input '{name}' 'data' has {len(items)} elements, but shape {list(shape)} needs {count}"
        )
    # One C-level pass over the element types decides the whole list; the per-element
    # search only runs to name the culprit in the error.
    if datatype == "BOOL":
        _require_kinds(kinds, (bool,), items, name, "BOOL data takes only true and false")
        array: npt.NDArray[Any] = np.array(items, dtype=np.bool_)
    elif datatype == BYTES:
        _require_kinds(kinds, (str,), items, name, "BYTES data takes only strings")
        array = np.empty(len(items), dtype=np.object_)
        array[:] = [item.encode("utf-8") for item in items]
        _check_bytes_lengths(name, array, limits)
    elif datatype in _FLOATS:
        _require_kinds(kinds, (int, float), items, name, f"{datatype} data takes only numbers")
        array = _floats(items, datatype, name)
    else:
        _require_kinds(kinds, (int,), items, name, f"{datatype} data takes only integers")
        array = _integers(items, datatype, name)
    return _reshape(array, shape, name)


def _flatten(data: list[Any], max_depth: int, name: str) -> tuple[list[Any], set[type]]:
    """Nested JSON arrays -> flat list, plus the set of element types; arrays nested deeper
    than `max_depth` (the outer array is level 1) are refused.

    Like Triton, the nesting only has to hold the right number of elements in row-major
    order; it is not checked against the shape. Regular nesting unrolls a level at a time
    in C; irregular nesting falls back to an explicit stack (no recursion: orjson accepts
    deeper nesting than Python's recursion limit).
    """
    kinds = set(map(type, data))
    depth = 1
    while list in kinds:
        if len(kinds) == 1:
            depth += 1
            if depth > max_depth:
                raise _too_deep(name, max_depth)
            data = list(chain.from_iterable(data))
        else:
            data = _flatten_irregular(data, max_depth - depth + 1, name, max_depth)
        kinds = set(map(type, data))
    return data, kinds


def _flatten_irregular(data: list[Any], levels: int, name: str, max_depth: int) -> list[Any]:
    """Flatten `data`, which may nest `levels` levels (itself included)."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                if len(stack) >= levels:
                    raise _too_deep(name, max_depth)
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _too_deep(name: str, max_depth: int) -> InvalidArgument:
    return InvalidArgument(
        f"input '{name}' 'data' nests arrays more than {max_depth} deep (the gateway's --max-json-depth)"
    )


def _require_kinds(
    kinds: set[type], allowed: tuple[type, ...], items: list[Any], name: str, rule: str
) -> None:
    if kinds.issubset(allowed):
        return
    for index, item in enumerate(items):
        if type(item) not in allowed:
            raise InvalidArgument(f"input '{name}': {rule}, got {_show(item)} at element {index}")


def _integers(items: list[Any], datatype: str, name: str) -> npt.NDArray[Any]:
    dtype = datatypes.to_numpy_dtype(datatype)
    info = np.iinfo(cast("np.dtype[np.integer[Any]]", dtype))
    try:
        if not _NUMPY_CHECKS_INT_RANGE and items and (min(items) < info.min or max(items) > info.max):
            raise OverflowError
        return np.array(items, dtype=dtype)
    except OverflowError:
        for index, item in enumerate(items):
            if not info.min <= item <= info.max:
                raise InvalidArgument(
                    f"input '{name}': {datatype} value {item} at element {index} is outside "
                    f"[{info.min}, {info.max}]"
                ) from None
        raise InvalidArgument(f"input '{name}': {datatype} data is out of range") from None


def _floats(items: list[Any], datatype: str, name: str) -> npt.NDArray[Any]:
    try:
        values = np.array(items, dtype=np.float64)
    except OverflowError:
        raise InvalidArgument(
            f"input '{name}': {datatype} data holds an integer too large for a float"
        ) from None
    if datatype == "FP64":
        return values
    # Checked in float64 so that an out-of-range value is reported instead of becoming inf;
    # Python's min/max beat numpy's call overhead on the short lists most requests carry.
    if len(items) <= 64:
        out_of_range = bool(items) and (max(items) >= _FP32_OVERFLOW or min(items) <= -_FP32_OVERFLOW)
    else:
        out_of_range = bool(values.max() >= _FP32_OVERFLOW or values.min() <= -_FP32_OVERFLOW)
    if out_of_range:
        index = int(np.argmax(np.abs(values)))
        raise InvalidArgument(
            f"input '{name}': FP32 value {items[index]} at element {index} is outside FP32's range"
        )
    return values.astype(np.float32)


def _reshape(array: npt.NDArray[Any], shape: tuple[int, ...], name: str) -> npt.NDArray[Any]:
    try:
        return array.reshape(shape)
    except ValueError as exc:  # a zero-sized shape whose other dims exceed numpy's limits
        raise InvalidArgument(f"input '{name}' shape {list(shape)} is not usable: {exc}") from None


def _parse_outputs(
    raw: Any, shm: ShmResolver | None
) -> tuple[list[str], frozenset[str], dict[str, int], dict[str, ShmOutput]]:
    if raw is None:
        return [], frozenset(), {}, {}
    if type(raw) is not list:
        raise InvalidArgument(f"request 'outputs' must be a list, got {_kind(raw)}")
    names: list[str] = []
    seen: set[str] = set()  # a set beside the list: a membership test per name stays O(1)
    binary: set[str] = set()
    class_counts: dict[str, int] = {}
    shm_outputs: dict[str, ShmOutput] = {}
    for position, entry in enumerate(raw):
        if type(entry) is not dict:
            raise InvalidArgument(f"outputs[{position}] must be an object, got {_kind(entry)}")
        name = entry.get("name")
        if type(name) is not str or not name:
            raise InvalidArgument(f"outputs[{position}] 'name' must be a non-empty string, got {_show(name)}")
        if name in seen:
            raise InvalidArgument(f"output '{name}' appears more than once in 'outputs'")
        seen.add(name)
        names.append(name)
        params = entry.get("parameters")
        if params is None:
            continue
        if type(params) is not dict:
            raise InvalidArgument(f"output '{name}' 'parameters' must be an object, got {_kind(params)}")
        if "binary_data" in params:
            flag = params["binary_data"]
            if type(flag) is not bool:
                raise InvalidArgument(f"output '{name}' 'binary_data' must be a boolean, got {_show(flag)}")
            if flag:
                binary.add(name)
        if "classification" in params:
            k = params["classification"]
            if type(k) is not int or k < 0:
                raise InvalidArgument(
                    f"output '{name}' 'classification' must be a non-negative integer, got {_show(k)}"
                )
            if k:  # 0 means no classification, as in Triton and tritonclient
                class_counts[name] = k
        if _SHM_REGION in params:
            # Triton's rules: the bytes go to the region, so neither binary data nor
            # classification (computed from those bytes) can come back in the answer.
            if name in class_counts:
                raise InvalidArgument(f"output '{name}' can't set both '{_SHM_REGION}' and 'classification'")
            if name in binary:
                raise InvalidArgument(f"output '{name}' can't set both '{_SHM_REGION}' and 'binary_data'")
            region, offset, window = _shm_window("output", name, params, shm)
            shm_outputs[name] = ShmOutput(region, offset, window)
        else:
            _no_shm_window("output", name, params)
    if len(shm_outputs) > 1:
        _check_no_overlap(shm_outputs)
    return names, frozenset(binary), class_counts, shm_outputs


def _check_no_overlap(outputs: dict[str, ShmOutput]) -> None:
    """Two outputs writing the same bytes would leave the client one of them, silently."""
    spans = sorted(
        (target.region, target.offset, target.offset + len(target.window), name)
        for name, target in outputs.items()
        if len(target.window)
    )
    for (region, start, end, name), (next_region, next_start, next_end, next_name) in pairwise(spans):
        if region == next_region and next_start < end:
            raise InvalidArgument(
                f"outputs '{name}' and '{next_name}' overlap in shared memory region '{region}': "
                f"bytes [{start}, {end}) and [{next_start}, {next_end})"
            )


# --------------------------------------------------------------------------------- encoding


def encode_infer_response(
    response: InferResponse, parsed: ParsedInfer, request_id: str, *, batched: bool | None = None
) -> tuple[bytes, int | None]:
    """Encode a response as Triton does; returns (body, JSON header length or None).

    The header length is None when no output went binary; otherwise it is the value for the
    `Inference-Header-Content-Length` response header. `batched` says whether the model's
    first dimension is the batch (max_batch_size > 0), which only classification needs;
    None guesses so from an output rank of 2 or more.
    """
    doc, chunks = infer_response_doc(response, parsed, request_id, batched=batched)
    header = dumps_header(doc, response.model)
    if not chunks:
        return header, None
    chunks.insert(0, header)
    return b"".join(chunks), len(header)


def dumps_header(doc: dict[str, Any], model: str) -> bytes:
    """A response header of `model` as JSON, with the options infer responses use."""
    try:
        return orjson.dumps(doc, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise InternalError(f"cannot encode the response of model '{model}' as JSON: {exc}") from None


def infer_response_doc(
    response: InferResponse, parsed: ParsedInfer, request_id: str, *, batched: bool | None = None
) -> tuple[dict[str, Any], list[Any]]:
    """A response's JSON header as a dict, and the binary chunks that follow it (buffers, in
    output order; empty when every output went as JSON). The WebSocket adds its own keys to the
    dict before encoding it once."""
    listed = frozenset(parsed.request.outputs)
    binary_outputs = parsed.binary_outputs
    class_counts = parsed.class_counts
    binary_default = parsed.binary_default
    shm_outputs = parsed.shm_outputs
    entries: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for tensor in response.outputs:
        name = tensor.name
        _check_size(tensor)
        if shm_outputs and name in shm_outputs:
            entries.append(_write_shm_output(tensor, shm_outputs[name]))
            continue
        if class_counts and name in class_counts:
            tensor = _classify(tensor, class_counts[name], batched)
        if name in binary_outputs:
            as_binary = True
        elif name in listed:
            as_binary = False
        else:
            as_binary = binary_default
        entry, chunk = _encode_output(tensor, as_binary)
        entries.append(entry)
        if chunk is not None and len(chunk):
            chunks.append(chunk)

    doc: dict[str, Any] = {}
    if request_id:
        doc["id"] = request_id
    doc["model_name"] = response.model
    doc["model_version"] = response.version
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = entries
    return doc, chunks


def _encode_output(tensor: Tensor, as_binary: bool) -> tuple[dict[str, Any], Any]:
    """One output's JSON entry, and its binary chunk (a buffer) when it goes binary."""
    datatype = tensor.datatype
    data = tensor.data
    json_data: Any = None
    if not as_binary:
        if datatype == BYTES:
            json_data = _utf8_strings(data)
            as_binary = json_data is None
        elif datatype in BINARY_ONLY:
            as_binary = True
        else:
            # Contiguous, native-order, 1-D: the form orjson serializes straight from memory.
            json_data = np.ascontiguousarray(data, dtype=datatypes.to_numpy_dtype(datatype)).reshape(-1)
            as_binary = datatype in _FLOATS and not np.isfinite(json_data).all()
    if not as_binary:
        entry = {"name": tensor.name, "datatype": datatype, "shape": tensor.shape, "data": json_data}
        return entry, None
    chunk: Any
    if datatype == BYTES:
        chunk = datatypes.serialize_bytes(data)
    else:
        # A uint8 view exports a plain buffer (BF16 cannot), so b"".join copies it only once.
        contiguous = np.ascontiguousarray(data, dtype=datatypes.to_numpy_dtype(datatype))
        chunk = contiguous.reshape(-1).view(np.uint8)
    entry = {
        "name": tensor.name,
        "datatype": datatype,
        "shape": tensor.shape,
        "parameters": {"binary_data_size": len(chunk)},
    }
    return entry, chunk


def _write_shm_output(tensor: Tensor, target: ShmOutput) -> dict[str, Any]:
    """Write an output into its shared memory window; its JSON entry, without data."""
    datatype = tensor.datatype
    if tensor.ref is not None:  # the worker wrote it there (tensors by reference)
        return {"name": tensor.name, "datatype": datatype, "shape": tensor.shape}
    chunk: Any
    if datatype == BYTES:
        chunk = datatypes.serialize_bytes(tensor.data)
    else:
        contiguous = np.ascontiguousarray(tensor.data, dtype=datatypes.to_numpy_dtype(datatype))
        chunk = contiguous.reshape(-1).view(np.uint8)
    size = len(chunk)
    window = target.window
    if size > len(window):
        raise InvalidArgument(
            f"shared memory size specified with the request for output '{tensor.name}' "
            f"({len(window)} bytes) should be at least {size} bytes to hold the results"
        )
    window[:size] = chunk
    return {"name": tensor.name, "datatype": datatype, "shape": tensor.shape}


def _check_size(tensor: Tensor) -> None:
    # A backend bug, not a client mistake: Triton answers it with an internal error too.
    count = datatypes.element_count(tensor.shape)
    if tensor.data.size != count:
        raise InternalError(
            f"output '{tensor.name}' holds {tensor.data.size} elements "
            f"but its shape {list(tensor.shape)} needs {count}"
        )


def _utf8_strings(data: npt.NDArray[Any]) -> list[str] | None:
    try:
        return [item if isinstance(item, str) else bytes(item).decode("utf-8") for item in data.reshape(-1)]
    except UnicodeDecodeError:
        return None


def _classify(tensor: Tensor, k: int, batched: bool | None) -> Tensor:
    """Triton's classification extension: the top-k "value:index" strings per batch entry."""
    datatype = tensor.datatype
    if datatype in ("BOOL", BYTES):
        raise InvalidArgument(
            f"classification is not available for output '{tensor.name}' of unsupported type '{datatype}'"
        )
    shape = tensor.shape
    if batched is None:
        batched = len(shape) >= 2
    values = np.asarray(tensor.data, dtype=datatypes.to_numpy_dtype(datatype))
    if batched and shape:
        rows, per_row = shape[0], datatypes.element_count(shape[1:])
    else:
        rows, per_row = 1, datatypes.element_count(shape)
    top = min(k, per_row)
    as_float = values.dtype.kind not in "iu"
    strings: list[bytes] = []
    for row in values.reshape(rows, per_row):
        # Descending by value, ties broken by the lower index: a stable ascending sort of
        # the reversed row, read backwards (negating would break unsigned types).
        order = np.argsort(row[::-1], kind="stable")[::-1][:top]
        for reversed_index in order.tolist():
            index = per_row - 1 - reversed_index
            value = row[index]
            text = f"{float(value):f}" if as_float else str(int(value))
            strings.append(f"{text}:{index}".encode())
    out_shape = (rows, top) if batched and shape else (top,)
    array = np.empty(len(strings), dtype=np.object_)
    array[:] = strings
    return Tensor(tensor.name, BYTES, out_shape, array.reshape(out_shape))


# ---------------------------------------------------------------------------------- helpers


_KINDS: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}

# Bounded in size and depth: clients can send huge or deeply nested values, and a plain
# repr() would be slow or hit the recursion limit.
_REPR: Final = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxdict = 8
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A JSON value for an error message, cut short."""
    return _REPR.repr(value)
