"""natron's wire format: msgpack maps with tensor data as raw little-endian bytes.

Version 1, documented for clients that publish directly in docs/wire-format.md:

request  {"v": 1, "id": str, "model": str, "version": str,
          "inputs": [{"name": str, "datatype": str, "shape": [int], "data": bin}],
          "outputs": [str], "parameters": {str: any}}
response {"v": 1, "id": str, "model": str, "version": str,
          "outputs": [{"name", "datatype", "shape", "data"}], "parameters": {}}
error    {"v": 1, "id": str, "error": str}

Coalesced (docs/wire-format.md, "coalesced messages"): several requests for one model version in
one message, and several of their answers in one answer message:

batch    {"v": 1, "requests": [request map + {"deadline_ns": int, "trace": {str: str}}, ...]}
answers  {"v": 1, "answers": [{"i": int, "status": int} + response or error map, ...]}

Tensors by reference (docs/wire-format.md, "tensors by reference"): an input entry may carry
`"shm": {"key": str, "offset": int, "byte_size": int, "scope": str}` instead of `"data"`; a
request may name where outputs go with `"output_shm": {name: that map}`, and the answer's entry
for such an output carries the same `"shm"` (its `byte_size` what was written) and no data.
Decoding a request with such inputs needs a `ShmAccess` (the worker's, which maps the object);
without one the request is refused. An answer's output by reference decodes to a tensor whose
`ref` says where its bytes are and whose `data` is a zero-filled stand-in of its shape (the
bytes are in the client's region, which the receiver does not read).

The response's status travels in the `Natron-Status` header (HTTP numbering, 200 for success),
so a reader knows an error from a result before decoding the body. BYTES tensor data uses
Triton's 4-byte-length-prefixed layout. Decoding turns any malformed message into
InvalidArgument; it never raises anything else.

Copies: encoding copies each tensor's bytes once, from the array's memory straight into a
buffer sized for the message, and returns a view of that buffer: no `tobytes`, no copy of the
finished message into a bytes object. (Under 16 KiB of tensor data, copying costs less than
making views: such tensors and messages are copied into bytes.) Decoding copies them once, when msgpack turns
the `bin` into bytes; the array is a zero-copy view of those (read-only: a backend that writes
into its inputs copies them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import numpy as np
import numpy.typing as npt

from natron import datatypes
from natron.errors import InvalidArgument, NatronError
from natron.inference import InferRequest, InferResponse, ShmRef, Tensor

WIRE_VERSION = 1
# Requests in one coalesced message, and answers in one answer message: a bound on what one
# message may cost a worker to decode, whoever published it.
MAX_BATCH_ENTRIES = 1024


# Room for a message's keys, names, shapes and parameters beside its tensor data.
_ENVELOPE_BYTES = 1024
# Below this much tensor data, copies are quicker than views: packb (which copies the finished
# message into bytes) for a message, `tobytes` for a tensor.
_VIEW_FROM_BYTES = 16 * 1024


class ShmAccess(Protocol):
    """How a receiver reaches tensors by reference (the worker's, workers/sharedmemory.py).
    Both raise InvalidArgument naming the reference when it cannot be used."""

    def read(self, ref: ShmRef, name: str, datatype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """Input `name`'s array, of `datatype` and `shape`, from the window `ref`."""
        ...

    def check_output(self, ref: ShmRef, name: str) -> None:
        """Whether output `name` can be written into `ref`, before the request runs."""
        ...


def _packb(value: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


def _pack_view(value: dict[str, Any], tensors: list[dict[str, Any]]) -> bytes | memoryview:
    """`value` packed; a large message into a buffer allocated once at about its final size,
    returned as a view of that buffer, since packb would copy the finished message into a
    bytes object once more (and grow its buffer by copying on the way)."""
    data_bytes = 0
    for tensor in tensors:  # a loop, not sum(): this runs for every message, mostly small ones
        data = tensor.get("data")
        if data is not None:  # a tensor by reference has none
            data_bytes += len(data)
    if data_bytes < _VIEW_FROM_BYTES:
        return _packb(value)
    packer = msgpack.Packer(autoreset=False, buf_size=data_bytes + _ENVELOPE_BYTES)
    packer.pack(value)
    view: memoryview = packer.getbuffer()  # keeps the packer, and so its buffer, alive
    return view


def _pack_ref(ref: ShmRef) -> dict[str, Any]:
    return {"key": ref.key, "offset": ref.offset, "byte_size": ref.byte_size, "scope": ref.scope}


def _pack_tensor(tensor: Tensor) -> dict[str, Any]:
    if tensor.ref is not None:
        return {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "shm": _pack_ref(tensor.ref),
        }
    data = tensor.data
    # A small tensor's copy costs less than making a view of it (a few hundred nanoseconds).
    raw = datatypes.to_raw if data.nbytes < _VIEW_FROM_BYTES else datatypes.raw_view
    return {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
        "data": raw(data, tensor.datatype),
    }


def _unpack_ref(raw: Any, what: str) -> ShmRef:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{what} 'shm' must be a map")
    key, offset, byte_size, scope = (raw.get(k) for k in ("key", "offset", "byte_size", "scope"))
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"{what} 'shm' needs a non-empty string 'key'")
    if type(offset) is not int or type(byte_size) is not int or offset < 0 or byte_size < 0:
        raise InvalidArgument(f"{what} 'shm' 'offset' and 'byte_size' must be non-negative integers")
    if not isinstance(scope, str):
        raise InvalidArgument(f"{what} 'shm' needs a string 'scope'")
    return ShmRef(key, offset, byte_size, scope)


def _stand_in(datatype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """A read-only array of `shape` that takes no memory: an output whose bytes went to shared
    memory has nothing to carry, but its tensor keeps the shape and size checks true."""
    dtype = np.dtype(object) if datatype == datatypes.BYTES else datatypes.to_numpy_dtype(datatype)
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _unpack_tensor(raw: Any, shm: ShmAccess | None = None, *, output: bool = False) -> Tensor:
    if not isinstance(raw, dict):
        raise InvalidArgument("tensor entry must be a map")
    name = raw.get("name")
    datatype = raw.get("datatype")
    shape = raw.get("shape")
    data = raw.get("data")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("tensor 'name' must be a non-empty string")
    if not isinstance(datatype, str) or datatype not in datatypes.DATATYPES:
        raise InvalidArgument(f"tensor '{name}' has unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidArgument(f"tensor '{name}' shape must be a list of non-negative integers")
    if data is None and "shm" in raw:
        ref = _unpack_ref(raw["shm"], f"tensor '{name}'")
        if output:
            return Tensor(name, datatype, tuple(shape), _stand_in(datatype, tuple(shape)), ref)
        if shm is None:
            raise InvalidArgument(
                f"input '{name}' is a shared memory reference, which this receiver does not take: "
                "send its bytes in 'data'"
            )
        return Tensor(name, datatype, tuple(shape), shm.read(ref, name, datatype, tuple(shape)))
    if not isinstance(data, bytes):
        raise InvalidArgument(f"tensor '{name}' 'data' must be binary")
    array = datatypes.from_raw(data, datatype, tuple(shape))
    return Tensor(name, datatype, tuple(shape), array)


def _unpack_map(data: bytes | memoryview) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise InvalidArgument(f"message is not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("message must be a msgpack map")
    version = body.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise InvalidArgument(f"unsupported wire format version {version!r}, expected {WIRE_VERSION}")
    return body


def _str_field(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise InvalidArgument(f"'{key}' must be a string")
    return value


def _tensors(
    body: dict[str, Any], key: str, shm: ShmAccess | None = None, *, output: bool = False
) -> list[Tensor]:
    raw = body.get(key, [])
    if not isinstance(raw, list):
        raise InvalidArgument(f"'{key}' must be a list")
    return [_unpack_tensor(item, shm, output=output) for item in raw]


def _output_refs(body: dict[str, Any], shm: ShmAccess | None) -> dict[str, ShmRef]:
    raw = body.get("output_shm")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument("'output_shm' must be a map of output names to shared memory windows")
    refs: dict[str, ShmRef] = {}
    for name, each in raw.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgument("'output_shm' keys must be output names")
        refs[name] = ref = _unpack_ref(each, f"output '{name}'")
        if shm is None:
            raise InvalidArgument(
                f"output '{name}' asks to be written to shared memory, which this receiver does not do"
            )
        shm.check_output(ref, name)
    return refs


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be a map")
    return params


def encode_request(request: InferRequest) -> bytes | memoryview:
    inputs = [_pack_tensor(t) for t in request.inputs]
    return _pack_view(_request_map(request, inputs), inputs)


def decode_request(data: bytes | memoryview, shm: ShmAccess | None = None) -> InferRequest:
    """A request; `shm` reaches its tensors by reference (without it they are refused)."""
    return _request(_unpack_map(data), shm)


def _request(body: dict[str, Any], shm: ShmAccess | None = None) -> InferRequest:
    """A request map's fields, checked (a plain message's body, or one of a coalesced one's)."""
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise InvalidArgument("'outputs' must be a list of output names")
    # The output windows first: a request that cannot be answered maps none of its inputs.
    output_refs = _output_refs(body, shm)
    return InferRequest(
        id=_str_field(body, "id", ""),
        model=_str_field(body, "model"),
        version=_str_field(body, "version", ""),
        inputs=_tensors(body, "inputs", shm),
        outputs=outputs,
        parameters=_parameters(body),
        output_refs=output_refs,
    )


def _response_map(response: InferResponse, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "id": response.id,
        "model": response.model,
        "version": response.version,
        "outputs": outputs,
        "parameters": response.parameters,
    }


def encode_response(response: InferResponse) -> bytes | memoryview:
    outputs = [_pack_tensor(t) for t in response.outputs]
    return _pack_view(_response_map(response, outputs), outputs)


def decode_response(data: bytes | memoryview) -> InferResponse:
    return _response(_unpack_map(data))


def _response(body: dict[str, Any]) -> InferResponse:
    """A response map's fields, checked (a plain answer's body, or one of a coalesced one's)."""
    return InferResponse(
        id=_str_field(body, "id", ""),
        model=_str_field(body, "model", ""),
        version=_str_field(body, "version", ""),
        outputs=_tensors(body, "outputs", output=True),
        parameters=_parameters(body),
    )


def encode_responses(responses: list[InferResponse]) -> bytes | memoryview:
    """Several answers of one stream in one message (coalesced when the reader falls behind)."""
    first = responses[0]
    packed = [[_pack_tensor(t) for t in r.outputs] for r in responses]
    return _pack_view(
        {
            "v": WIRE_VERSION,
            "id": first.id,
            "model": first.model,
            "version": first.version,
            "responses": [
                {"outputs": outputs, "parameters": r.parameters}
                for outputs, r in zip(packed, responses, strict=True)
            ],
        },
        [t for outputs in packed for t in outputs],
    )


def decode_responses(data: bytes | memoryview) -> list[InferResponse]:
    body = _unpack_map(data)
    raw = body.get("responses")
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise InvalidArgument("'responses' must be a list of maps")
    request_id, model, version = (
        _str_field(body, "id", ""),
        _str_field(body, "model", ""),
        _str_field(body, "version", ""),
    )
    return [
        InferResponse(request_id, model, version, _tensors(r, "outputs", output=True), _parameters(r))
        for r in raw
    ]


def encode_error(request_id: str, message: str) -> bytes:
    return _packb({"v": WIRE_VERSION, "id": request_id, "error": message})


def decode_error(status: int, data: bytes | memoryview) -> NatronError:
    """The error a non-200 response carries; a garbled body still yields an error."""
    try:
        body = _unpack_map(data)
        message = body.get("error")
        if not isinstance(message, str):
            message = f"error response without a message (status {status})"
    except InvalidArgument as exc:
        message = f"undecodable error response (status {status}): {exc.message}"
    return NatronError.from_status(status, message)


# -- coalesced messages --------------------------------------------------------------------------


@dataclass(slots=True)
class BatchEntry:
    """One request of a coalesced message: decoded, or the reason it could not be (answered
    to its index alone; the message's other requests are unaffected)."""

    request: InferRequest | None
    error: InvalidArgument | None = None
    request_id: str = ""
    deadline_ns: int = 0  # absolute, unix ns; 0: none given
    trace: dict[str, str] = field(default_factory=dict)


def _request_map(request: InferRequest, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    body = {
        "v": WIRE_VERSION,
        "id": request.id,
        "model": request.model,
        "version": request.version,
        "inputs": inputs,
        "outputs": request.outputs,
        "parameters": request.parameters,
    }
    if request.output_refs:  # absent otherwise: messages by value are as they always were
        body["output_shm"] = {name: _pack_ref(ref) for name, ref in request.output_refs.items()}
    return body


def encode_batch(entries: Sequence[tuple[InferRequest, int, dict[str, str] | None]]) -> bytes | memoryview:
    """Several requests for one model version in one message: (request, deadline_ns, trace
    headers or None) each, in order; an answer names its request by that position."""
    if not 0 < len(entries) <= MAX_BATCH_ENTRIES:
        raise ValueError(f"a coalesced message holds 1..{MAX_BATCH_ENTRIES} requests, got {len(entries)}")
    tensors: list[dict[str, Any]] = []
    maps: list[dict[str, Any]] = []
    for request, deadline_ns, trace in entries:
        inputs = [_pack_tensor(t) for t in request.inputs]
        tensors.extend(inputs)
        one = _request_map(request, inputs)
        del one["v"]
        one["deadline_ns"] = deadline_ns
        if trace:
            one["trace"] = trace
        maps.append(one)
    return _pack_view({"v": WIRE_VERSION, "requests": maps}, tensors)


def _entry(raw: Any, shm: ShmAccess | None = None) -> BatchEntry:
    request_id = ""
    try:
        if not isinstance(raw, dict):
            raise InvalidArgument("a coalesced request must be a map")
        request_id = _str_field(raw, "id", "")
        deadline_ns = raw.get("deadline_ns", 0)
        if type(deadline_ns) is not int or deadline_ns < 0:
            raise InvalidArgument("'deadline_ns' must be a non-negative integer")
        trace = raw.get("trace", {})
        if not isinstance(trace, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in trace.items()
        ):
            raise InvalidArgument("'trace' must be a map of strings")
        request = _request(raw, shm)
    except InvalidArgument as exc:
        return BatchEntry(None, exc, request_id)
    return BatchEntry(request, None, request_id, deadline_ns, trace)


def decode_batch(data: bytes | memoryview, expected: int, shm: ShmAccess | None = None) -> list[BatchEntry]:
    """The requests of a coalesced message whose header announced `expected` of them. A
    malformed envelope raises InvalidArgument (nothing in it can be answered singly); a
    malformed request becomes an entry with its error."""
    body = _unpack_map(data)
    raw = body.get("requests")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("'requests' must be a non-empty list")
    if len(raw) > MAX_BATCH_ENTRIES:
        raise InvalidArgument(
            f"a coalesced message holds at most {MAX_BATCH_ENTRIES} requests, got {len(raw)}"
        )
    if len(raw) != expected:
        raise InvalidArgument(f"the message announces {expected} requests but holds {len(raw)}")
    return [_entry(item, shm) for item in raw]


def encode_answers(answers: Sequence[tuple[int, str, InferResponse | NatronError]]) -> bytes | memoryview:
    """Answers to requests of one coalesced message: (the request's position, its id, the
    answer) each."""
    tensors: list[dict[str, Any]] = []
    maps: list[dict[str, Any]] = []
    for index, request_id, answer in answers:
        if isinstance(answer, NatronError):
            maps.append({"i": index, "status": answer.status, "id": request_id, "error": answer.message})
            continue
        outputs = [_pack_tensor(t) for t in answer.outputs]
        tensors.extend(outputs)
        one = _response_map(answer, outputs)
        del one["v"]  # the envelope's
        maps.append({"i": index, "status": 200, **one})
    return _pack_view({"v": WIRE_VERSION, "answers": maps}, tensors)


def _answer(raw: Any) -> tuple[int, InferResponse | NatronError]:
    if not isinstance(raw, dict):
        raise InvalidArgument("an answer must be a map")
    index = raw.get("i")
    status = raw.get("status")
    if type(index) is not int or index < 0 or type(status) is not int:
        raise InvalidArgument("an answer needs integer 'i' and 'status'")
    if status != 200:
        message = raw.get("error")
        if not isinstance(message, str):
            message = f"error response without a message (status {status})"
        return index, NatronError.from_status(status, message)
    return index, _response(raw)


def decode_answers(data: bytes | memoryview) -> list[tuple[int, InferResponse | NatronError]]:
    """The answers of one answer message, each with its request's position; InvalidArgument
    when the message is malformed."""
    body = _unpack_map(data)
    raw = body.get("answers")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_BATCH_ENTRIES:
        raise InvalidArgument(f"'answers' must be a list of 1..{MAX_BATCH_ENTRIES} maps")
    return [_answer(item) for item in raw]
