"""Property tests of the NATS wire format (broker/codec.py, docs/wire-format.md).

Whatever arrives from the network, decoding a request or a response fails only with
InvalidArgument (a 400 for the sender), decoding an error never fails, and everything natron
encodes decodes back to the same values, bit for bit.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from broker import codec
from natron import datatypes
from natron.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NatronError,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    Unsupported,
)
from natron.inference import InferRequest, InferResponse, Tensor

# Quick enough for a loaded 2-core machine, many examples all the same.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL_DATATYPES = sorted(datatypes.DATATYPES)

# -- strategies --------------------------------------------------------------------------------

# Strings msgpack can encode (UTF-8: no lone surrogates).
texts = st.text(st.characters(codec="utf-8"), max_size=12)
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=24),
)
# Anything msgpack can encode (maps with string keys, as the decoder's strict_map_key demands).
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def _anything_or(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, now and then any msgpack value."""
    # sampled_from favours its first entries, as hypothesis favours simple examples.
    return st.sampled_from([True] * 7 + [False]).flatmap(
        lambda plausible: valid if plausible else msgpack_values
    )


@st.composite
def _maps(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A map with every field, each one now and then missing: the checks past the first run."""
    return {
        key: draw(strategy) for key, strategy in fields.items() if draw(st.sampled_from([True] * 9 + [False]))
    }


# Shapes stay small here: shapes beyond numpy's limits have their own test at the end of this file.
plausible_shapes = st.lists(st.integers(min_value=-1, max_value=4), max_size=4)
# Data whose length often fits the shape: multiples of the element sizes, BYTES-like prefixes.
plausible_data = st.one_of(
    st.integers(min_value=0, max_value=8).flatmap(lambda n: st.binary(min_size=n * 4, max_size=n * 4)),
    st.binary(max_size=40),
    st.lists(st.binary(max_size=5), max_size=4).map(
        lambda items: b"".join(len(i).to_bytes(4, "little") + i for i in items)
    ),
)
tensor_maps = _maps(
    {
        "name": _anything_or(st.sampled_from(["INPUT0", "OUTPUT0", "x"])),
        "datatype": _anything_or(st.sampled_from([*ALL_DATATYPES, "fp32", "STRING"])),
        "shape": _anything_or(plausible_shapes),
        "data": _anything_or(plausible_data),
    }
)
near_valid_bodies = _maps(
    {
        "v": _anything_or(st.just(1)),
        "id": _anything_or(texts),
        "model": _anything_or(st.sampled_from(["tiny", "simple"])),
        "version": _anything_or(st.sampled_from(["1", "2", ""])),
        "inputs": _anything_or(st.lists(_anything_or(tensor_maps), max_size=3)),
        "outputs": _anything_or(st.lists(_anything_or(texts), max_size=3)),
        "parameters": _anything_or(st.dictionaries(texts, msgpack_values, max_size=3)),
        "error": _anything_or(texts),
    }
)


def _decoders_fail_only_with_invalid_argument(data: bytes) -> None:
    for decode in (codec.decode_request, codec.decode_response):
        try:
            decode(data)
        except InvalidArgument as exc:
            assert isinstance(exc.message, str) and exc.message
            assert exc.status == 400


# -- decoding untrusted input ------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes_fail_to_decode_only_with_invalid_argument(data: bytes) -> None:
    _decoders_fail_only_with_invalid_argument(data)


@FUZZ
@given(msgpack_values)
def test_arbitrary_msgpack_values_fail_to_decode_only_with_invalid_argument(value: Any) -> None:
    _decoders_fail_only_with_invalid_argument(msgpack.packb(value))


@FUZZ
@given(near_valid_bodies)
def test_nearly_valid_maps_fail_to_decode_only_with_invalid_argument(body: dict[str, Any]) -> None:
    _decoders_fail_only_with_invalid_argument(msgpack.packb(body))


@FUZZ
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=200))
def test_truncated_valid_messages_fail_to_decode_only_with_invalid_argument(tail: bytes, cut: int) -> None:
    message = codec.encode_request(
        InferRequest("r", "tiny", "1", [Tensor("B", "BYTES", (2,), _object_array([b"ab", b""], (2,)))])
    )
    _decoders_fail_only_with_invalid_argument(bytes(message)[:cut] + tail)


STATUS_CLASSES: dict[int, type[NatronError]] = {
    400: InvalidArgument,
    404: NotFound,
    413: PayloadTooLarge,
    500: InternalError,
    501: Unsupported,
    503: Unavailable,
    504: DeadlineExceeded,
}


def _check_error(status: int, data: bytes) -> NatronError:
    error = codec.decode_error(status, data)
    assert isinstance(error, NatronError)
    assert error.status == status
    assert type(error) is STATUS_CLASSES.get(status, InternalError)
    assert isinstance(error.message, str)  # empty only when the sender sent an empty message
    return error


@FUZZ
@given(st.integers(min_value=-(2**70), max_value=2**70), st.binary(max_size=128))
def test_decoding_an_error_never_raises_and_keeps_the_status(status: int, data: bytes) -> None:
    _check_error(status, data)


@FUZZ
@given(st.sampled_from([*STATUS_CLASSES, 200, 418, 599]), st.one_of(msgpack_values, near_valid_bodies))
def test_decoding_any_msgpack_error_body_never_raises(status: int, body: Any) -> None:
    error = _check_error(status, msgpack.packb(body))
    # `True == 1` in Python, but the codec reads only an int 1 as version 1.
    if (
        isinstance(body, dict)
        and type(body.get("v")) is int
        and body["v"] == 1
        and isinstance(body.get("error"), str)
    ):
        assert error.message == body["error"]
    else:
        assert f"status {status}" in error.message


@FUZZ
@given(st.sampled_from(sorted(STATUS_CLASSES)), texts, texts)
def test_an_encoded_error_decodes_to_its_class_and_message(
    status: int, request_id: str, message: str
) -> None:
    error = codec.decode_error(status, codec.encode_error(request_id, message))
    assert type(error) is STATUS_CLASSES[status]
    assert error.message == message
    assert error.status == status


# -- the version field -------------------------------------------------------------------------


@FUZZ
@given(msgpack_values)
def test_a_wrong_version_is_rejected_naming_it(version: Any) -> None:
    # 1.0 and true compare equal to 1 in Python, and are refused all the same.
    assume(not (type(version) is int and version == codec.WIRE_VERSION))
    body = msgpack.packb({"v": version, "id": "r", "model": "tiny", "inputs": [], "outputs": []})
    for decode in (codec.decode_request, codec.decode_response):
        with pytest.raises(InvalidArgument) as caught:
            decode(body)
        assert "unsupported wire format version" in caught.value.message
        assert repr(version) in caught.value.message
    error = codec.decode_error(503, body)
    assert type(error) is Unavailable and "unsupported wire format version" in error.message


def test_a_missing_version_and_version_2_are_named_in_the_message() -> None:
    with pytest.raises(InvalidArgument, match=r"unsupported wire format version None, expected 1"):
        codec.decode_request(msgpack.packb({"model": "tiny"}))
    with pytest.raises(InvalidArgument, match=r"unsupported wire format version 2, expected 1"):
        codec.decode_response(msgpack.packb({"v": 2, "model": "tiny"}))


# -- round trips -------------------------------------------------------------------------------

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def _object_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(shape)


@st.composite
def tensors(draw: st.DrawFn, datatype: str | None = None, name: str | None = None) -> Tensor:
    datatype = datatype or draw(st.sampled_from(ALL_DATATYPES))
    shape = draw(shapes)
    if datatype == "BYTES":
        count = datatypes.element_count(shape)
        items = draw(st.lists(st.binary(max_size=12), min_size=count, max_size=count))
        array = _object_array(items, shape)
    elif datatype == "BF16":
        # Any 16-bit pattern is a bfloat16 (NaN payloads and signed zeros included).
        bits = draw(hnp.arrays(np.dtype("<u2"), shape))
        array = bits.view(ml_dtypes.bfloat16)
    else:
        array = draw(hnp.arrays(datatypes.to_numpy_dtype(datatype), shape))
    tensor_name = name or draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8))
    return Tensor(tensor_name, datatype, shape, array)


def _assert_same_tensors(got: list[Tensor], want: list[Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
        assert a.data.shape == b.shape
        if b.datatype == "BYTES":
            assert a.data.dtype == np.object_
            assert a.data.ravel().tolist() == [bytes(x) for x in b.data.ravel()]
        else:
            assert a.data.dtype == datatypes.to_numpy_dtype(b.datatype)
            assert a.data.tobytes() == np.ascontiguousarray(b.data).tobytes()  # bitwise: NaNs too


parameters = st.dictionaries(
    texts,
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), texts, st.binary(max_size=8)),
    max_size=3,
)


@ROUND_TRIP
@given(
    st.lists(tensors(), max_size=4),
    texts,
    st.sampled_from(["tiny", "identity_bf16", "m-1_x"]),
    st.sampled_from(["", "1", "42"]),
    st.lists(texts, max_size=3),
    parameters,
)
def test_requests_round_trip_losslessly(
    inputs: list[Tensor],
    request_id: str,
    model: str,
    version: str,
    outputs: list[str],
    params: dict[str, Any],
) -> None:
    request = InferRequest(request_id, model, version, inputs, outputs, params)
    decoded = codec.decode_request(codec.encode_request(request))
    assert (decoded.id, decoded.model, decoded.version) == (request_id, model, version)
    assert decoded.outputs == outputs
    assert decoded.parameters == params
    _assert_same_tensors(decoded.inputs, inputs)


@ROUND_TRIP
@given(st.lists(tensors(), max_size=4), texts, parameters)
def test_responses_round_trip_losslessly(
    outputs: list[Tensor], response_id: str, params: dict[str, Any]
) -> None:
    response = InferResponse(response_id, "tiny", "3", outputs, params)
    decoded = codec.decode_response(codec.encode_response(response))
    assert (decoded.id, decoded.model, decoded.version) == (response_id, "tiny", "3")
    assert decoded.parameters == params
    _assert_same_tensors(decoded.outputs, outputs)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_datatype_round_trips_with_any_shape_including_empty_ones(
    datatype: str, data: st.DataObject
) -> None:
    tensor = data.draw(tensors(datatype, "T"))
    for t in (tensor, Tensor("E", datatype, (2, 0, 3), _empty(datatype, (2, 0, 3)))):
        decoded = codec.decode_request(codec.encode_request(InferRequest("", "m", "", [t])))
        _assert_same_tensors(decoded.inputs, [t])


def _empty(datatype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return _object_array([], shape)
    return np.zeros(shape, dtype=datatypes.to_numpy_dtype(datatype))


def test_the_wire_layout_is_the_documented_one() -> None:
    """The bytes docs/wire-format.md shows: little-endian, C order, BYTES length-prefixed."""
    request = InferRequest(
        "req-1",
        "tiny",
        "1",
        [Tensor("INPUT0", "FP32", (1, 16), np.arange(16, dtype=np.float32).reshape(1, 16))],
        ["OUTPUT0"],
    )
    encoded = bytes(codec.encode_request(request))
    assert len(encoded) == 178
    assert encoded.startswith(bytes.fromhex("87a17601a26964a57265712d31"))
    assert bytes.fromhex("a464617461c440") + np.arange(16, dtype="<f4").tobytes() in encoded
    assert encoded.endswith(bytes.fromhex("aa706172616d657465727380"))

    def data_of(datatype: str, array: np.ndarray[Any, Any]) -> bytes:
        body = msgpack.unpackb(
            codec.encode_request(InferRequest("", "m", "", [Tensor("t", datatype, array.shape, array)]))
        )
        data: bytes = body["inputs"][0]["data"]
        return data

    assert data_of("FP32", np.array([1.0, -2.5], np.float32)) == bytes.fromhex("0000803f000020c0")
    assert data_of("BF16", np.array([1.0, -2.5], ml_dtypes.bfloat16)) == bytes.fromhex("803f20c0")
    assert data_of("BYTES", _object_array([b"ab", b""], (2,))) == bytes.fromhex("02000000616200000000")
    assert data_of("BOOL", np.array([True, False])) == b"\x01\x00"
    assert data_of("INT16", np.array([[1, 2], [3, -1]], np.int16)) == bytes.fromhex("010002000300ffff")


@pytest.mark.parametrize(
    "shape",
    [[1] * 65, [0, 2**63], [0, 2**64 - 1], [0, 2**40, 2**40]],
    ids=["65-dims", "dim-2^63", "dim-2^64-1", "overflowing-product"],
)
@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_shapes_numpy_cannot_hold_are_invalid_arguments(shape: list[int], datatype: str) -> None:
    # One element (4 zero bytes: 0.0, or one empty BYTES element) when the shape holds one.
    data = b"" if 0 in shape else b"\x00\x00\x00\x00"
    body = msgpack.packb(
        {"v": 1, "model": "m", "inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}
    )
    with pytest.raises(InvalidArgument):
        codec.decode_request(body)


def test_coalesced_stream_answers_round_trip() -> None:
    answers = [
        InferResponse("r", "m", "1", [Tensor("OUT", "INT32", (1,), np.array([i], dtype=np.int32))])
        for i in range(3)
    ]
    decoded = codec.decode_responses(codec.encode_responses(answers))
    assert [int(a.outputs[0].data[0]) for a in decoded] == [0, 1, 2]
    assert {(a.id, a.model, a.version) for a in decoded} == {("r", "m", "1")}
    with pytest.raises(InvalidArgument, match="responses"):
        codec.decode_responses(msgpack.packb({"v": 1, "responses": "nope"}))


def _large(datatype: str, layout: str) -> np.ndarray[Any, Any]:
    """About 64 KiB of `datatype` (past the size where messages are packed as views), laid out
    contiguously, transposed (strided), or big-endian."""
    dtype = datatypes.to_numpy_dtype(datatype)
    count = 64 * 1024 // max(dtype.itemsize, 1)
    values = np.arange(count, dtype=np.int64) % 100
    array = (values % 2).astype(dtype) if datatype == "BOOL" else values.astype(dtype)
    array = array.reshape(128, -1)
    if layout == "strided":
        return array.T
    if layout == "big-endian" and dtype.itemsize > 1 and datatype != "BF16":
        return array.astype(dtype.newbyteorder(">"))
    return array


@pytest.mark.parametrize("layout", ["contiguous", "strided", "big-endian"])
@pytest.mark.parametrize("datatype", [d for d in ALL_DATATYPES if d != datatypes.BYTES])
def test_large_tensors_encode_to_the_same_bytes_without_tobytes(datatype: str, layout: str) -> None:
    array = _large(datatype, layout)
    request = InferRequest("r", "m", "1", [Tensor("x", datatype, array.shape, array)])
    encoded = codec.encode_request(request)
    # The layout the documented format asks for: little-endian, C order, whatever came in.
    wire = np.ascontiguousarray(array, dtype=datatypes.to_numpy_dtype(datatype)).tobytes()
    expected = msgpack.packb(
        {
            "v": 1,
            "id": "r",
            "model": "m",
            "version": "1",
            "inputs": [{"name": "x", "datatype": datatype, "shape": list(array.shape), "data": wire}],
            "outputs": [],
            "parameters": {},
        }
    )
    assert bytes(encoded) == expected
    (decoded,) = codec.decode_request(encoded).inputs
    assert decoded.data.tobytes() == wire


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16", "BOOL", "INT64"])
def test_a_contiguous_little_endian_tensor_is_packed_from_its_own_memory(datatype: str) -> None:
    array = _large(datatype, "contiguous")
    view = datatypes.raw_view(array, datatype)
    assert isinstance(view, memoryview)
    assert np.shares_memory(np.frombuffer(view, np.uint8), array)
