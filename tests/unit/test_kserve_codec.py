"""gateway.kserve: Triton's KServe v2 infer bodies, JSON and binary, both directions.

The properties take their example counts from the Hypothesis profile (tests/conftest.py):
`NATRON_HYPOTHESIS_PROFILE=thorough` runs them ten times longer."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import orjson
import pytest
import tritonclient.http as triton_http
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway import kserve
from gateway.kserve import ParsedInfer, encode_infer_response, parse_infer_body
from natron import datatypes
from natron.errors import InternalError, InvalidArgument
from natron.inference import InferRequest, InferResponse, Tensor

# ------------------------------------------------------------------------------ helpers

NUMERIC = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP32", "FP64"]
JSON_TYPES = ["BOOL", *NUMERIC, "BYTES"]
ALL_TYPES = sorted(datatypes.DATATYPES)


def body_of(doc: dict[str, Any], *chunks: bytes) -> tuple[bytes, int | None]:
    """A request body; with binary chunks, also the Inference-Header-Content-Length."""
    header = orjson.dumps(doc)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def parse(doc: dict[str, Any], *chunks: bytes) -> ParsedInfer:
    body, header_length = body_of(doc, *chunks)
    return parse_infer_body(body, header_length, "model", "1")


def one_input(**fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    entry.update(fields)
    return {"inputs": [{k: v for k, v in entry.items() if v is not ...}]}


def rejects(doc: dict[str, Any], *chunks: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse(doc, *chunks)


def int_range(datatype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(datatype.lower()))
    return int(info.min), int(info.max)


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> npt.NDArray[Any]:
    count = datatypes.element_count(shape)
    if datatype == "BYTES":
        return np.array([f"s{i}é".encode() for i in range(count)], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        bools: npt.NDArray[Any] = (np.arange(count) % 2 == 0).reshape(shape)
        return bools
    dtype = datatypes.to_numpy_dtype(datatype)
    if dtype.kind in "iu":
        low, high = int_range(datatype)
        spread = [low + (high - low) * i // max(count - 1, 1) for i in range(count)]
        return np.array(spread, dtype=dtype).reshape(shape)
    return (np.arange(count, dtype=np.float64) / 4 - 0.75).astype(dtype).reshape(shape)


def json_data(array: npt.NDArray[Any]) -> list[Any]:
    if array.dtype == np.object_:
        return [item.decode() for item in array.reshape(-1)]
    return list(array.reshape(-1).tolist())


def assert_same(got: npt.NDArray[Any], expected: npt.NDArray[Any]) -> None:
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    if expected.dtype == np.object_:
        assert [bytes(x) for x in got.reshape(-1)] == [bytes(x) for x in expected.reshape(-1)]
    else:
        assert got.tobytes() == expected.tobytes()


def response(*outputs: Tensor, parameters: dict[str, Any] | None = None) -> InferResponse:
    return InferResponse("rid", "model", "3", list(outputs), parameters or {})


def parsed_for(
    outputs: list[str] | None = None,
    binary: frozenset[str] = frozenset(),
    binary_default: bool = False,
    class_counts: dict[str, int] | None = None,
) -> ParsedInfer:
    request = InferRequest("rid", "model", "3", [], outputs or [])
    return ParsedInfer(request, binary, binary_default, None, class_counts or {})


def decode(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    end = len(body) if header_length is None else header_length
    doc = orjson.loads(body[:end])
    assert isinstance(doc, dict)
    return doc, body[end:]


def as_request(body: bytes, header_length: int | None) -> ParsedInfer:
    """A response's outputs have the request inputs' layout: re-read them with the parser."""
    doc, binary = decode(body, header_length)
    header = orjson.dumps({"inputs": doc["outputs"]})
    return parse_infer_body(header + binary, len(header), "model", "1")


# ------------------------------------------------------------------------------ parsing: round trips


@pytest.mark.parametrize("datatype", JSON_TYPES)
def test_every_json_capable_datatype_parses_from_json_data(datatype: str) -> None:
    expected = sample(datatype)
    parsed = parse(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 3], "data": json_data(expected)}]}
    )
    (tensor,) = parsed.request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (2, 3))
    assert_same(tensor.data, expected)


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_every_datatype_parses_from_binary_data(datatype: str) -> None:
    expected = sample(datatype)
    raw = datatypes.to_raw(expected, datatype)
    entry = {"name": "x", "datatype": datatype, "shape": [2, 3], "parameters": {"binary_data_size": len(raw)}}
    (tensor,) = parse({"inputs": [entry]}, raw).request.inputs
    assert_same(tensor.data, expected)


def test_nested_and_flat_json_data_give_the_same_tensor() -> None:
    flat = parse(one_input(datatype="INT32", shape=[2, 2, 2], data=list(range(8))))
    nested = parse(one_input(datatype="INT32", shape=[2, 2, 2], data=[[[0, 1], [2, 3]], [[4, 5], [6, 7]]]))
    assert_same(nested.request.inputs[0].data, flat.request.inputs[0].data)


def test_irregular_nesting_is_accepted_when_the_element_count_is_right() -> None:
    # Triton only counts elements in row-major order; it does not check nesting against shape.
    parsed = parse(one_input(datatype="INT64", shape=[2, 3], data=[[0, [1, 2]], 3, [[4], 5]]))
    assert parsed.request.inputs[0].data.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_deeply_nested_data_does_not_hit_the_recursion_limit() -> None:
    # orjson reads up to 1024 levels, deeper than Python's recursion limit; orjson.dumps
    # refuses such depth, so the body is written by hand.
    for data in ("[" * 1020 + "1.5" + "]" * 1020, "[[1.5, " + "[" * 1015 + "]" * 1015 + "]]"):
        body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": %s}]}' % data.encode()
        parsed = parse_infer_body(body, None, "m", "1")
        assert parsed.request.inputs[0].data.tolist() == [1.5]


def test_fp32_json_accepts_integers_and_bytes_json_is_utf8_encoded() -> None:
    parsed = parse(
        {
            "inputs": [
                {"name": "f", "datatype": "FP32", "shape": [3], "data": [1, 2.5, -3]},
                {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["héllo", ""]},
            ]
        }
    )
    floats, strings = parsed.request.inputs
    assert floats.data.dtype == np.float32 and floats.data.tolist() == [1.0, 2.5, -3.0]
    assert strings.data.tolist() == ["héllo".encode(), b""]


def test_zero_sized_tensors_parse_from_json_and_binary() -> None:
    parsed = parse(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [0, 4], "data": []},
                {"name": "b", "datatype": "BYTES", "shape": [3, 0], "parameters": {"binary_data_size": 0}},
            ]
        },
        b"",
    )
    a, b = parsed.request.inputs
    assert a.data.shape == (0, 4) and b.data.shape == (3, 0)


def test_binary_inputs_are_zero_copy_views_of_the_body() -> None:
    raw = np.arange(4, dtype=np.float32).tobytes()
    body, header_length = body_of(one_input(data=..., shape=[4], parameters={"binary_data_size": 16}), raw)
    tensor = parse_infer_body(body, header_length, "m", "1").request.inputs[0]
    assert np.shares_memory(tensor.data, np.frombuffer(body, dtype=np.uint8))
    assert not tensor.data.flags.writeable


def test_binary_and_json_inputs_mix_and_consume_chunks_in_input_order() -> None:
    a, c = np.arange(3, dtype=np.int16), np.array([b"xy", b""], dtype=np.object_)
    raw_a, raw_c = a.tobytes(), datatypes.serialize_bytes(c)
    doc = {
        "inputs": [
            {"name": "a", "datatype": "INT16", "shape": [3], "parameters": {"binary_data_size": len(raw_a)}},
            {"name": "b", "datatype": "BOOL", "shape": [1], "data": [True]},
            {"name": "c", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw_c)}},
        ]
    }
    ta, tb, tc = parse(doc, raw_a, raw_c).request.inputs
    assert_same(ta.data, a)
    assert tb.data.tolist() == [True]
    assert_same(tc.data, c)


def test_request_fields_id_parameters_and_outputs_are_carried_over() -> None:
    doc = one_input()
    doc.update(
        {
            "id": "req-7",
            "parameters": {
                "binary_data_output": True,
                "timeout": 2500,
                "sequence_id": 12,
                "sequence_start": True,
                "priority": 2,
                "custom": "v",
            },
            "outputs": [
                {"name": "y", "parameters": {"binary_data": True, "classification": 3}},
                {"name": "z", "parameters": {"binary_data": False, "classification": 0}},
                {"name": "w"},
            ],
        }
    )
    parsed = parse_infer_body(orjson.dumps(doc), None, "resnet", "2")
    assert (parsed.request.id, parsed.request.model, parsed.request.version) == ("req-7", "resnet", "2")
    assert parsed.request.outputs == ["y", "z", "w"]
    assert parsed.request.parameters == {
        "sequence_id": 12,
        "sequence_start": True,
        "priority": 2,
        "custom": "v",
    }
    assert parsed.binary_outputs == frozenset({"y"})
    assert parsed.binary_default is True
    assert parsed.timeout_us == 2500
    assert parsed.class_counts == {"y": 3}


def test_absent_optional_fields_get_their_defaults() -> None:
    parsed = parse(one_input())
    assert parsed.request.id == ""
    assert parsed.request.outputs == [] and parsed.request.parameters == {}
    assert parsed.binary_outputs == frozenset() and parsed.class_counts == {}
    assert parsed.binary_default is False and parsed.timeout_us is None


# ------------------------------------------------------------------------------ parsing: errors


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"inputs": [NaN]}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"inputs"', "must be a JSON object, got a string"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_rejected(body: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_infer_body(body, None, "m", "1")


@pytest.mark.parametrize("header_length", [0, -1, 10_000])
def test_a_header_length_outside_the_body_is_rejected(header_length: int) -> None:
    body, _ = body_of(one_input())
    with pytest.raises(InvalidArgument, match=rf"Inference-Header-Content-Length.*got {header_length}"):
        parse_infer_body(body, header_length, "m", "1")


def test_a_header_length_that_cuts_the_json_short_is_rejected() -> None:
    body, _ = body_of(one_input())
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        parse_infer_body(body, len(body) - 1, "m", "1")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({}, "'inputs' must be a non-empty list"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": {"name": "x"}}, "'inputs' must be a non-empty list"),
        ({"inputs": [5]}, r"inputs\[0\] must be an object, got an integer"),
    ],
)
def test_inputs_must_be_a_non_empty_list_of_objects(doc: dict[str, Any], match: str) -> None:
    rejects(doc, match=match)


@pytest.mark.parametrize("name", [..., None, 7, ""])
def test_an_input_without_a_string_name_is_rejected(name: Any) -> None:
    rejects(one_input(name=name), match=r"inputs\[0\] 'name' must be a non-empty string")


@pytest.mark.parametrize("datatype", [..., "FLOAT32", "fp32", 3, "STRING"])
def test_an_unknown_datatype_is_rejected(datatype: Any) -> None:
    rejects(
        one_input(datatype=datatype), match=r"input 'x' has unknown datatype .*expected one of BF16, BOOL"
    )


@pytest.mark.parametrize("shape", [..., 2, [-1], [True, True], [2.0], ["2"], [2**63], None])
def test_a_shape_that_is_not_a_list_of_non_negative_integers_is_rejected(shape: Any) -> None:
    rejects(one_input(shape=shape), match=r"input 'x' 'shape' must be a list of non-negative integers, got")


def test_an_input_with_both_data_and_binary_data_size_is_rejected() -> None:
    doc = one_input(parameters={"binary_data_size": 8})
    rejects(
        doc, b"\0" * 8, match="input 'x' must set exactly one of .* but sets 'data' and 'binary_data_size'"
    )


def test_an_input_with_neither_data_nor_binary_data_size_is_rejected() -> None:
    rejects(one_input(data=...), match="input 'x' must set exactly one of .* but sets none of them")


def test_shared_memory_inputs_and_outputs_are_rejected_without_a_resolver() -> None:
    # The streaming endpoints parse without one.
    doc = one_input(data=..., parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8})
    rejects(doc, match="input 'x' uses 'shared_memory_region', which this endpoint does not support")
    doc = one_input()
    doc["outputs"] = [
        {"name": "y", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8}}
    ]
    rejects(doc, match="output 'y' uses 'shared_memory_region', which this endpoint does not support")


def test_input_parameters_that_are_not_an_object_are_rejected() -> None:
    rejects(one_input(parameters=[1]), match="input 'x' 'parameters' must be an object, got an array")


def test_duplicate_input_names_are_rejected() -> None:
    doc = one_input()
    doc["inputs"].append(dict(doc["inputs"][0]))
    rejects(doc, match="input 'x' appears more than once")


@pytest.mark.parametrize(
    ("data", "count"), [([1.0], 1), ([1.0, 2.0, 3.0], 3), ([[1.0], [2.0], [3.0]], 3), ([], 0)]
)
def test_json_data_whose_element_count_differs_from_the_shape_is_rejected(
    data: list[Any], count: int
) -> None:
    rejects(one_input(data=data), match=rf"input 'x' 'data' has {count} elements, but shape \[2\] needs 2")


@pytest.mark.parametrize("data", [{"a": 1}, 1.0, "12", None])
def test_json_data_that_is_not_an_array_is_rejected(data: Any) -> None:
    rejects(one_input(data=data), match="input 'x' 'data' must be a JSON array")


@pytest.mark.parametrize(
    ("datatype", "data", "match"),
    [
        ("BOOL", [True, 1], r"BOOL data takes only true and false, got 1 at element 1"),
        ("BOOL", [0, False], r"BOOL data takes only true and false, got 0 at element 0"),
        ("INT32", [1, 2.0], r"INT32 data takes only integers, got 2.0 at element 1"),
        ("INT32", [1, True], r"INT32 data takes only integers, got True at element 1"),
        ("UINT8", ["1", 2], r"UINT8 data takes only integers, got '1' at element 0"),
        ("INT64", [1, None], r"INT64 data takes only integers, got None at element 1"),
        ("FP32", [1.0, "2"], r"FP32 data takes only numbers, got '2' at element 1"),
        ("FP64", [False, 1.0], r"FP64 data takes only numbers, got False at element 0"),
        ("BYTES", ["a", 1], r"BYTES data takes only strings, got 1 at element 1"),
        (
            "BYTES",
            [{"b64": "AA=="}, "a"],
            r"BYTES data takes only strings, got \{'b64': 'AA=='\} at element 0",
        ),
    ],
)
def test_json_data_of_the_wrong_json_type_is_rejected(datatype: str, data: list[Any], match: str) -> None:
    rejects(one_input(datatype=datatype, data=data), match=rf"input 'x': {match}")


@pytest.mark.parametrize(
    ("datatype", "value", "match"),
    [
        ("INT8", 128, r"INT8 value 128 at element 1 is outside \[-128, 127\]"),
        ("INT8", -129, r"INT8 value -129 at element 1 is outside"),
        ("UINT8", -1, r"UINT8 value -1 at element 1 is outside \[0, 255\]"),
        ("INT16", 2**15, "INT16 value 32768"),
        ("UINT16", 2**16, "UINT16 value 65536"),
        ("INT32", 2**31, "INT32 value 2147483648"),
        ("UINT32", -5, "UINT32 value -5"),
        ("INT64", 2**63, "INT64 value 9223372036854775808"),
        ("UINT64", -1, "UINT64 value -1"),
        ("FP32", 1e39, "FP32 value 1e\\+39 at element 1 is outside FP32's range"),
        ("FP32", -1e39, "FP32 value -1e\\+39 at element 1 is outside FP32's range"),
    ],
)
def test_json_numbers_outside_the_datatype_range_are_rejected(datatype: str, value: Any, match: str) -> None:
    rejects(one_input(datatype=datatype, data=[0, value]), match=rf"input 'x': {match}")


def test_integers_past_64_bits_are_rejected() -> None:
    # orjson reads them as floats, which integer types refuse.
    body = b'{"inputs": [{"name": "x", "datatype": "UINT64", "shape": [1], "data": [18446744073709551616]}]}'
    with pytest.raises(
        InvalidArgument, match=r"input 'x': UINT64 data takes only integers, got 1\.8446744073709552e"
    ):
        parse_infer_body(body, None, "m", "1")


def test_integer_ranges_are_checked_even_where_numpy_would_wrap_around(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # numpy 1.x casts out-of-range Python ints silently; the module checks them itself there.
    monkeypatch.setattr(kserve, "_NUMPY_CHECKS_INT_RANGE", False)
    rejects(
        one_input(datatype="INT8", data=[0, 128]),
        match=r"INT8 value 128 at element 1 is outside \[-128, 127\]",
    )
    rejects(one_input(datatype="UINT64", data=[0, -1]), match="UINT64 value -1 at element 1")
    assert parse(one_input(datatype="UINT8", data=[0, 255])).request.inputs[0].data.tolist() == [0, 255]


def test_fp32_extremes_survive_a_json_round_trip() -> None:
    # orjson prints FP32's max as 3.4028235e+38, a hair above it; it must still parse.
    info = np.finfo(np.float32)
    array = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal], dtype=np.float32)
    body, header_length = encode_infer_response(response(Tensor("y", "FP32", (4,), array)), parsed_for(), "")
    assert header_length is None
    assert_same(as_request(body, header_length).request.inputs[0].data, array)


def test_integer_extremes_of_every_integer_type_are_accepted() -> None:
    for datatype in NUMERIC[:8]:
        low, high = int_range(datatype)
        data = parse(one_input(datatype=datatype, data=[low, high])).request.inputs[0].data
        assert data.tolist() == [low, high]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_json_data_is_rejected_as_binary_only(datatype: str) -> None:
    rejects(one_input(datatype=datatype), match=f"input 'x': {datatype} is supported in binary data only")


@pytest.mark.parametrize("size", [-1, 1.5, "8", True, None])
def test_a_binary_data_size_that_is_not_a_non_negative_integer_is_rejected(size: Any) -> None:
    doc = one_input(data=..., parameters={"binary_data_size": size})
    rejects(doc, b"\0" * 8, match="input 'x' 'binary_data_size' must be a non-negative integer")


def test_a_binary_chunk_whose_size_does_not_match_the_shape_is_rejected() -> None:
    doc = one_input(data=..., parameters={"binary_data_size": 12})
    rejects(
        doc,
        b"\0" * 12,
        match=r"input 'x' has binary_data_size 12, but datatype FP32 with shape \[2\] needs 8",
    )


def test_binary_sizes_that_do_not_add_up_are_rejected() -> None:
    doc = one_input(data=..., parameters={"binary_data_size": 8})
    rejects(
        doc,
        b"\0" * 10,
        match="carries 10 bytes of binary data but the inputs' binary_data_size values add up to 8",
    )


def test_a_binary_data_size_past_the_end_of_the_body_is_rejected() -> None:
    doc = one_input(data=..., parameters={"binary_data_size": 8})
    rejects(
        doc, b"\0" * 4, match="input 'x' has binary_data_size 8 but only 4 of the request's 4 binary bytes"
    )


def test_binary_data_size_without_a_header_length_is_rejected() -> None:
    doc = one_input(data=..., parameters={"binary_data_size": 8})
    rejects(doc, match="binary_data_size 8 but only 0 of the request's 0 binary bytes are left")


def test_binary_data_after_json_only_inputs_is_rejected() -> None:
    rejects(one_input(), b"junk", match="carries 4 bytes of binary data but .* add up to 0")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x05\x00\x00\x00ab", "runs past the end"),
        (b"\x01\x00", "truncated inside an element length"),
        (b"\x01\x00\x00\x00a", r"holds 1 elements, its shape needs 2 \(shape \[2\]\)"),
        (b"\x00\x00\x00\x00" * 3, "holds 3 elements, its shape needs 2"),
    ],
)
def test_malformed_bytes_binary_data_is_rejected(raw: bytes, match: str) -> None:
    doc = one_input(datatype="BYTES", data=..., parameters={"binary_data_size": len(raw)})
    rejects(doc, raw, match=f"input 'x' binary data: .*{match}")


def test_bool_binary_data_reads_any_nonzero_byte_as_true_as_triton_does() -> None:
    doc = one_input(datatype="BOOL", shape=[2, 3], data=..., parameters={"binary_data_size": 6})
    (tensor,) = parse(doc, b"\x00\x02\xff\x01\x00\x80").request.inputs
    assert tensor.data.dtype == np.bool_
    assert tensor.data.tolist() == [[False, True, True], [True, False, True]]
    # Normalised: the bytes that travel on are 0 and 1 only.
    assert tensor.data.tobytes() == b"\x00\x01\x01\x01\x00\x01"


def test_bool_binary_data_of_zeros_and_ones_stays_a_view_of_the_body() -> None:
    doc = one_input(datatype="BOOL", data=..., parameters={"binary_data_size": 2})
    (tensor,) = parse(doc, b"\x01\x00").request.inputs
    assert tensor.data.tolist() == [True, False]
    assert not tensor.data.flags.owndata


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        ({"name": "y"}, "'outputs' must be a list, got an object"),
        (["y"], r"outputs\[0\] must be an object, got a string"),
        ([{"parameters": {}}], r"outputs\[0\] 'name' must be a non-empty string, got None"),
        ([{"name": 1}], r"outputs\[0\] 'name' must be a non-empty string, got 1"),
        ([{"name": "y"}, {"name": "y"}], "output 'y' appears more than once"),
        ([{"name": "y", "parameters": []}], "output 'y' 'parameters' must be an object"),
        (
            [{"name": "y", "parameters": {"binary_data": 1}}],
            "output 'y' 'binary_data' must be a boolean, got 1",
        ),
        (
            [{"name": "y", "parameters": {"classification": -1}}],
            "'classification' must be a non-negative integer",
        ),
        (
            [{"name": "y", "parameters": {"classification": True}}],
            "'classification' must be a non-negative integer",
        ),
        (
            [{"name": "y", "parameters": {"classification": 2.0}}],
            "'classification' must be a non-negative integer",
        ),
    ],
)
def test_malformed_outputs_are_rejected(outputs: Any, match: str) -> None:
    doc = one_input()
    doc["outputs"] = outputs
    rejects(doc, match=match)


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ([], "request 'parameters' must be an object, got an array"),
        ({"binary_data_output": "yes"}, "parameter 'binary_data_output' must be a boolean, got 'yes'"),
        ({"timeout": 0}, "parameter 'timeout' must be a positive integer of microseconds, got 0"),
        ({"timeout": -5}, "parameter 'timeout' must be a positive integer"),
        ({"timeout": 1.5}, "parameter 'timeout' must be a positive integer"),
        ({"timeout": True}, "parameter 'timeout' must be a positive integer"),
        ({"triton_enable_empty_final_response": True}, "'triton_' are reserved"),
        ({"sequence_start": 1}, "parameter 'sequence_start' must be a boolean"),
        ({"sequence_id": -1}, "parameter 'sequence_id' must be a non-negative integer or a string"),
        ({"priority": "high"}, "parameter 'priority' must be a non-negative integer"),
        ({"custom": 1.5}, "parameter 'custom' must be a string, integer or boolean, got a number 1.5"),
        ({"custom": {"a": 1}}, "parameter 'custom' must be a string, integer or boolean, got an object"),
        ({"custom": None}, "parameter 'custom' must be a string, integer or boolean, got null"),
    ],
)
def test_malformed_request_parameters_are_rejected(parameters: Any, match: str) -> None:
    doc = one_input()
    doc["parameters"] = parameters
    rejects(doc, match=match)


@pytest.mark.parametrize("request_id", [1, None, ["a"]])
def test_a_request_id_that_is_not_a_string_is_rejected(request_id: Any) -> None:
    doc = one_input()
    doc["id"] = request_id
    rejects(doc, match="request 'id' must be a string")


def test_error_messages_cut_huge_values_short() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(one_input(shape=list(range(-1, 100_000))))
    assert len(caught.value.message) < 300


# ------------------------------------------------------------------------------ tritonclient requests


def _client_input(name: str, array: npt.NDArray[Any], binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, list(array.shape), datatypes.from_numpy_dtype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_tritonclient_request_bodies_decode_to_exactly_the_clients_arrays() -> None:
    arrays: dict[str, npt.NDArray[Any]] = {
        "f32_json": np.array([[0.1, -2.5e-8, 3.4e38]], dtype=np.float32),
        "f32_bin": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32),
        "f16_bin": np.array([1.5, -0.0, 65504], dtype=np.float16),
        "bf16_bin": np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16),
        "i8_json": np.array([-128, 0, 127], dtype=np.int8),
        "u64_json": np.array([0, 2**64 - 1], dtype=np.uint64),
        "i64_bin": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        "bool_json": np.array([[True, False], [False, True]]),
        "bool_bin": np.array([False, True, True]),
        "bytes_json": np.array([b"hello", "wörld".encode()], dtype=np.object_),
        "bytes_bin": np.array([[b"\x00\xff", b""], [b"a", b"bc"]], dtype=np.object_),
        "f64_json": np.array([1e300, -1e-300, 0.1]),
    }
    inputs = [_client_input(name, array, name.endswith("_bin")) for name, array in arrays.items()]
    outputs = [
        triton_http.InferRequestedOutput("y", binary_data=True),
        triton_http.InferRequestedOutput("z", binary_data=False, class_count=5),
    ]
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="abc", timeout=1000, parameters={"tenant": "t1"}
    )
    parsed = parse_infer_body(body, json_size, "m", "1")
    assert parsed.request.id == "abc"
    assert parsed.timeout_us == 1000
    assert parsed.request.parameters == {"tenant": "t1"}
    assert parsed.request.outputs == ["y", "z"]
    assert parsed.binary_outputs == frozenset({"y"}) and parsed.class_counts == {"z": 5}
    got = {tensor.name: tensor for tensor in parsed.request.inputs}
    assert list(got) == list(arrays)
    for name, expected in arrays.items():
        assert got[name].shape == expected.shape
        assert_same(got[name].data, expected)


def test_tritonclient_requests_without_outputs_ask_for_binary_outputs() -> None:
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        [_client_input("x", np.arange(16, dtype=np.float32), binary=False)]
    )
    assert json_size is None
    parsed = parse_infer_body(body, json_size, "m", "1")
    assert parsed.binary_default is True and parsed.request.outputs == []


# ------------------------------------------------------------------------------ encoding


def test_json_response_matches_tritons_layout() -> None:
    out = Tensor("y", "FP32", (2, 2), np.array([[1.0, 0.5], [-2.0, 0.25]], dtype=np.float32))
    body, header_length = encode_infer_response(response(out), parsed_for(), "rid")
    assert header_length is None
    assert orjson.loads(body) == {
        "id": "rid",
        "model_name": "model",
        "model_version": "3",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 0.5, -2.0, 0.25]}],
    }


def test_response_id_and_parameters_appear_only_when_present() -> None:
    out = Tensor("y", "INT32", (1,), np.array([7], dtype=np.int32))
    doc, _ = decode(*encode_infer_response(response(out), parsed_for(), ""))
    assert "id" not in doc and "parameters" not in doc
    with_params = response(out, parameters={"sequence_id": 3, "final": True})
    doc, _ = decode(*encode_infer_response(with_params, parsed_for(), "r"))
    assert doc["id"] == "r" and doc["parameters"] == {"sequence_id": 3, "final": True}


def test_binary_outputs_are_appended_in_output_order_after_the_json() -> None:
    a = Tensor("a", "INT16", (3,), np.array([1, 2, 3], dtype=np.int16))
    b = Tensor("b", "FP64", (1,), np.array([0.5]))
    c = Tensor("c", "BYTES", (2,), np.array([b"x", b"yz"], dtype=np.object_))
    parsed = parsed_for(["a", "b", "c"], binary=frozenset({"a", "c"}))
    body, header_length = encode_infer_response(response(a, b, c), parsed, "rid")
    doc, binary = decode(body, header_length)
    entries = doc["outputs"]
    assert entries[0] == {
        "name": "a",
        "datatype": "INT16",
        "shape": [3],
        "parameters": {"binary_data_size": 6},
    }
    assert entries[1] == {"name": "b", "datatype": "FP64", "shape": [1], "data": [0.5]}
    assert entries[2]["parameters"] == {"binary_data_size": 11} and "data" not in entries[2]
    assert binary == a.data.tobytes() + b"\x01\x00\x00\x00x\x02\x00\x00\x00yz"


def test_binary_data_output_applies_only_to_outputs_the_request_does_not_list() -> None:
    outs = [Tensor(n, "INT8", (1,), np.array([1], dtype=np.int8)) for n in ("listed", "unlisted")]
    parsed = parsed_for(["listed"], binary_default=True)
    doc, _ = decode(*encode_infer_response(response(*outs), parsed, "rid"))
    listed, unlisted = doc["outputs"]
    assert listed["data"] == [1]
    assert unlisted["parameters"] == {"binary_data_size": 1}


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_outputs_always_go_binary(datatype: str) -> None:
    array = np.array([1.5, -2.0], dtype=datatypes.to_numpy_dtype(datatype))
    body, header_length = encode_infer_response(
        response(Tensor("h", datatype, (2,), array)), parsed_for(["h"]), ""
    )
    doc, binary = decode(body, header_length)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 4}
    assert binary == array.tobytes()


def test_bytes_outputs_go_as_json_strings_unless_they_are_not_utf8() -> None:
    text = Tensor("t", "BYTES", (2,), np.array([b"caf\xc3\xa9", "str ok"], dtype=np.object_))
    raw = Tensor("r", "BYTES", (1,), np.array([b"\xff\xfe"], dtype=np.object_))
    doc, binary = decode(*encode_infer_response(response(text, raw), parsed_for(["t", "r"]), ""))
    assert doc["outputs"][0]["data"] == ["café", "str ok"]
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 6}
    assert binary == b"\x02\x00\x00\x00\xff\xfe"


def test_float_outputs_holding_nan_or_infinity_go_binary() -> None:
    array = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    body, header_length = encode_infer_response(response(Tensor("y", "FP32", (3,), array)), parsed_for(), "")
    doc, binary = decode(body, header_length)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert binary == array.tobytes()


def test_an_empty_binary_output_adds_no_binary_section() -> None:
    out = Tensor("y", "FP32", (0, 3), np.empty((0, 3), dtype=np.float32))
    body, header_length = encode_infer_response(response(out), parsed_for(binary_default=True), "")
    assert header_length is None
    assert orjson.loads(body)["outputs"][0]["parameters"] == {"binary_data_size": 0}


def test_an_output_whose_data_does_not_match_its_shape_is_an_internal_error() -> None:
    out = Tensor("y", "FP32", (4,), np.zeros(3, dtype=np.float32))
    with pytest.raises(InternalError, match=r"output 'y' holds 3 elements but its shape \[4\] needs 4"):
        encode_infer_response(response(out), parsed_for(), "")


def test_classification_returns_top_k_value_index_strings_per_batch_entry() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.0, 0.5]], dtype=np.float32)
    parsed = parsed_for(["y"], class_counts={"y": 2})
    doc, _ = decode(*encode_infer_response(response(Tensor("y", "FP32", (2, 3), scores)), parsed, ""))
    assert doc["outputs"][0] == {
        "name": "y",
        "datatype": "BYTES",
        "shape": [2, 2],
        # Ties keep the lower index first; values print like C++'s std::to_string.
        "data": ["0.700000:1", "0.200000:2", "0.500000:0", "0.500000:2"],
    }


def test_classification_of_an_unbatched_output_ranks_all_elements_and_caps_k() -> None:
    scores = np.array([3, 250, 7], dtype=np.uint8)
    parsed = parsed_for(["y"], class_counts={"y": 10})
    doc, _ = decode(*encode_infer_response(response(Tensor("y", "UINT8", (3,), scores)), parsed, ""))
    assert doc["outputs"][0]["shape"] == [3]
    assert doc["outputs"][0]["data"] == ["250:1", "7:2", "3:0"]


def test_classification_follows_the_batched_flag_when_given() -> None:
    scores = np.array([[1, 9], [5, 3]], dtype=np.int32)
    parsed = parsed_for(["y"], class_counts={"y": 1})
    out = Tensor("y", "INT32", (2, 2), scores)
    doc, _ = decode(*encode_infer_response(response(out), parsed, "", batched=False))
    assert doc["outputs"][0]["shape"] == [1] and doc["outputs"][0]["data"] == ["9:1"]
    doc, _ = decode(*encode_infer_response(response(out), parsed, "", batched=True))
    assert doc["outputs"][0]["shape"] == [2, 1] and doc["outputs"][0]["data"] == ["9:1", "5:0"]


def test_classification_of_bool_or_bytes_outputs_is_rejected() -> None:
    out = Tensor("y", "BOOL", (2,), np.array([True, False]))
    with pytest.raises(
        InvalidArgument, match="classification is not available for output 'y' of unsupported type 'BOOL'"
    ):
        encode_infer_response(response(out), parsed_for(["y"], class_counts={"y": 1}), "")


# ------------------------------------------------------------------------------ tritonclient responses


def test_tritonclient_reads_every_output_of_an_encoded_response() -> None:
    outputs = {
        "f32": Tensor("f32", "FP32", (2, 8), np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)),
        "f16": Tensor("f16", "FP16", (3,), np.array([0.5, -1, 65504], dtype=np.float16)),
        "bf16": Tensor("bf16", "BF16", (2,), np.array([1.5, -3], dtype=ml_dtypes.bfloat16)),
        "flags": Tensor("flags", "BOOL", (2, 2), np.array([[True, False], [False, True]])),
        "flags_bin": Tensor("flags_bin", "BOOL", (3,), np.array([True, True, False])),
        "text": Tensor("text", "BYTES", (2,), np.array([b"hi", "wörld".encode()], dtype=np.object_)),
        "blob": Tensor("blob", "BYTES", (1, 2), np.array([[b"\xff", b""]], dtype=np.object_)),
        "u64": Tensor("u64", "UINT64", (2,), np.array([0, 2**64 - 1], dtype=np.uint64)),
        "i8_bin": Tensor("i8_bin", "INT8", (2,), np.array([-128, 127], dtype=np.int8)),
        "scores": Tensor("scores", "FP32", (1, 4), np.array([[0.1, 0.4, 0.3, 0.2]], dtype=np.float32)),
    }
    parsed = parsed_for(
        list(outputs), binary=frozenset({"flags_bin", "blob", "i8_bin", "scores"}), class_counts={"scores": 2}
    )
    body, header_length = encode_infer_response(response(*outputs.values()), parsed, "rid")
    result = triton_http.InferenceServerClient.parse_response_body(body, header_length=header_length)
    assert result.get_response()["id"] == "rid"
    for name, tensor in outputs.items():
        got = result.as_numpy(name)
        if name == "scores":
            assert got.tolist() == [[b"0.400000:1", b"0.300000:2"]]
        elif name == "text":
            # tritonclient hands JSON BYTES back as str, binary BYTES as bytes.
            assert got.tolist() == ["hi", "wörld"]
        else:
            assert_same(got, tensor.data)


# ------------------------------------------------------------------------------ properties

_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)
_FIELD_VALUES = st.one_of(
    _JSON,
    st.sampled_from(ALL_TYPES),
    st.lists(st.integers(min_value=-2, max_value=4), max_size=4),
    st.just(2**63),
)


_SCALARS_BY_KIND = [
    st.booleans(),
    st.integers(min_value=-300, max_value=300),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
]
_VALID_PARAMETERS: dict[str, st.SearchStrategy[Any]] = {
    "binary_data_output": st.booleans(),
    "timeout": st.integers(1, 10**7),
    "x": st.text(),
}
_SMALL_VALUES = st.booleans() | st.integers(min_value=-1, max_value=5) | _FIELD_VALUES


def _rarely(draw: st.DrawFn) -> bool:
    # Not `== 0`: hypothesis favours the simplest value, which must be the common case.
    return draw(st.integers(min_value=0, max_value=5)) == 5


def _fitting_scalars(datatype: str) -> st.SearchStrategy[Any]:
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.text(max_size=4)
    if datatype in ("FP32", "FP64"):
        return st.floats(allow_nan=False, allow_infinity=False, width=32 if datatype == "FP32" else 64)
    low, high = int_range(datatype)
    return st.integers(min_value=low, max_value=high)


@st.composite
def _near_valid_input(draw: st.DrawFn, index: int) -> tuple[dict[str, Any], bytes]:
    shape = draw(st.lists(st.integers(min_value=0, max_value=3), max_size=3))
    count = datatypes.element_count(shape)
    datatype = draw(st.sampled_from(ALL_TYPES))
    name = draw(st.sampled_from(["in0", "in1"])) if _rarely(draw) else f"in{index}"
    entry: dict[str, Any] = {"name": name, "datatype": datatype}
    entry["shape"] = shape
    if datatype in ("FP16", "BF16") or draw(st.booleans()):
        if datatype == "BYTES":
            items = draw(st.lists(st.binary(max_size=3), min_size=count, max_size=count))
            chunk = b"".join(len(item).to_bytes(4, "little") + item for item in items)
        else:
            chunk = draw(st.binary(min_size=count * datatypes.element_size(datatype), max_size=count * 8))
            if datatype == "BOOL" and not _rarely(draw):
                chunk = bytes(byte & 1 for byte in chunk[:count])
            elif not _rarely(draw):
                chunk = chunk[: count * datatypes.element_size(datatype)]
        entry["parameters"] = {
            "binary_data_size": len(chunk) + (draw(st.sampled_from([-1, 1])) if _rarely(draw) else 0)
        }
    else:
        kind: st.SearchStrategy[Any] = (
            draw(st.sampled_from([*_SCALARS_BY_KIND, _JSON_SCALARS]))
            if _rarely(draw)
            else _fitting_scalars(datatype)
        )
        length = count + 1 if _rarely(draw) else count
        items = draw(st.lists(kind, min_size=length, max_size=length))
        entry["data"] = [items] if draw(st.booleans()) else items
        chunk = b""
    if _rarely(draw):  # damage one field
        entry[draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))] = draw(
            _FIELD_VALUES
        )
    return entry, chunk


@st.composite
def _near_valid_requests(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """Mostly well-formed requests with random damage, to reach the deeper checks."""
    inputs, chunks = zip(*[draw(_near_valid_input(i)) for i in range(draw(st.integers(1, 3)))], strict=True)
    doc: dict[str, Any] = {"inputs": list(inputs)}
    binary = b"".join(chunks)
    if draw(st.booleans()):
        valid = st.fixed_dictionaries(
            {}, optional={"binary_data": st.booleans(), "classification": st.integers(0, 3)}
        )
        keys = st.sampled_from(["binary_data", "classification", "shared_memory_region"])
        doc["outputs"] = [
            {
                "name": name,
                "parameters": draw(st.dictionaries(keys, _SMALL_VALUES) if _rarely(draw) else valid),
            }
            for name in draw(st.lists(st.sampled_from(["y", "z"]), max_size=2, unique=not _rarely(draw)))
        ]
    if draw(st.booleans()):
        keys = st.sampled_from(["binary_data_output", "timeout", "sequence_id", "priority", "x", "triton_x"])
        valid = st.fixed_dictionaries(
            {},
            optional=_VALID_PARAMETERS,
        )
        doc["parameters"] = draw(st.dictionaries(keys, _SMALL_VALUES, max_size=3) if _rarely(draw) else valid)
    if draw(st.booleans()):
        doc["id"] = draw(_FIELD_VALUES if _rarely(draw) else st.text(max_size=5))
    header = orjson.dumps(doc)
    if _rarely(draw):
        binary += b"x"
    header_length = len(header) + (draw(st.sampled_from([-1, 1])) if _rarely(draw) else 0)
    return header + binary, (header_length if binary or draw(st.booleans()) else None)


def _parse_or_invalid(body: bytes, header_length: int | None) -> None:
    try:
        parse_infer_body(body, header_length, "m", "1")
    except InvalidArgument:
        event("rejected")
    else:
        event("accepted")


@given(body=st.binary(max_size=200), header_length=st.none() | st.integers(min_value=-5, max_value=250))
def test_arbitrary_bytes_only_ever_raise_invalid_argument(body: bytes, header_length: int | None) -> None:
    _parse_or_invalid(body, header_length)


@given(doc=_JSON, tail=st.binary(max_size=40), cut=st.none() | st.integers(min_value=-2, max_value=400))
def test_arbitrary_json_only_ever_raises_invalid_argument(doc: Any, tail: bytes, cut: int | None) -> None:
    header = orjson.dumps(doc)
    _parse_or_invalid(header + tail, cut if cut is not None else (len(header) if tail else None))


@given(request=_near_valid_requests())
def test_damaged_requests_only_ever_raise_invalid_argument(request: tuple[bytes, int | None]) -> None:
    _parse_or_invalid(*request)


_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def _tensors(draw: st.DrawFn, name: str) -> Tensor:
    datatype = draw(st.sampled_from(ALL_TYPES))
    shape = draw(_SHAPES)
    if datatype == "BYTES":
        items = draw(
            st.lists(st.binary(max_size=6), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
        )
        array = np.empty(len(items), dtype=np.object_)
        array[:] = items
        return Tensor(name, datatype, shape, array.reshape(shape))
    if datatype == "BF16":
        base = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False)))
        return Tensor(name, datatype, shape, base.astype(ml_dtypes.bfloat16))
    dtype = datatypes.to_numpy_dtype(datatype)
    return Tensor(name, datatype, shape, draw(hnp.arrays(dtype, shape)))


def _tensor_lists() -> st.SearchStrategy[list[Tensor]]:
    return st.integers(min_value=1, max_value=4).flatmap(
        lambda n: st.tuples(*[_tensors(f"t{i}") for i in range(n)]).map(list)
    )


@given(tensors=_tensor_lists())
def test_binary_encoding_then_parsing_is_lossless(tensors: list[Tensor]) -> None:
    body, header_length = encode_infer_response(response(*tensors), parsed_for(binary_default=True), "")
    parsed = as_request(body, header_length)
    for original, tensor in zip(tensors, parsed.request.inputs, strict=True):
        assert (tensor.name, tensor.datatype, tensor.shape) == (
            original.name,
            original.datatype,
            original.shape,
        )
        assert_same(tensor.data, original.data)


@given(tensors=_tensor_lists())
def test_json_encoding_then_parsing_keeps_every_value(tensors: list[Tensor]) -> None:
    # Whatever JSON cannot carry (FP16, BF16, NaN, invalid UTF-8) falls back to binary, so
    # the round trip is exact either way.
    body, header_length = encode_infer_response(response(*tensors), parsed_for(), "")
    parsed = as_request(body, header_length)
    for original, tensor in zip(tensors, parsed.request.inputs, strict=True):
        assert tensor.shape == original.shape
        assert_same(tensor.data, original.data)


# ------------------------------------------------------------------------------ shared memory


class FakeRegions:
    """A resolver over in-memory regions, with the registry's refusals (a resolver is not
    NATS: gateway/sharedmemory.py's registry is tested against a real broker)."""

    def __init__(self, **sizes: int) -> None:
        self.buffers = {name: bytearray(size) for name, size in sizes.items()}

    def __call__(self, region: str, offset: int, byte_size: int) -> memoryview:
        buffer = self.buffers.get(region)
        if buffer is None:
            raise InvalidArgument(f"Unable to find shared memory region: '{region}'")
        if offset + byte_size > len(buffer):
            raise InvalidArgument(f"Invalid offset + byte size for shared memory region: '{region}'")
        return memoryview(buffer)[offset : offset + byte_size]


def shm_params(region: str, byte_size: int, offset: int = 0) -> dict[str, Any]:
    params: dict[str, Any] = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    if offset:
        params["shared_memory_offset"] = offset
    return params


def raw_bytes(array: npt.NDArray[Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        return datatypes.serialize_bytes(array)
    return np.ascontiguousarray(array).tobytes()


def parse_shm(doc: dict[str, Any], regions: FakeRegions) -> ParsedInfer:
    return parse_infer_body(orjson.dumps(doc), None, "model", "1", regions)


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_an_input_is_read_from_its_shared_memory_region(datatype: str) -> None:
    expected = sample(datatype)
    data = raw_bytes(expected, datatype)
    regions = FakeRegions(r=len(data) + 16)
    regions.buffers["r"][8 : 8 + len(data)] = data
    doc = one_input(datatype=datatype, shape=[2, 3], data=..., parameters=shm_params("r", len(data), 8))
    (tensor,) = parse_shm(doc, regions).request.inputs
    assert_same(tensor.data, expected)


def test_bool_input_in_shared_memory_reads_nonzero_bytes_as_true() -> None:
    regions = FakeRegions(r=3)
    regions.buffers["r"][:] = b"\x07\x00\x01"
    doc = one_input(datatype="BOOL", shape=[3], data=..., parameters=shm_params("r", 3))
    (tensor,) = parse_shm(doc, regions).request.inputs
    assert tensor.data.tolist() == [True, False, True]


def test_inputs_mix_json_binary_and_shared_memory() -> None:
    regions = FakeRegions(r=8)
    regions.buffers["r"][:] = np.array([5, 6], dtype=np.int32).tobytes()
    doc = {
        "inputs": [
            {"name": "a", "datatype": "INT32", "shape": [2], "parameters": shm_params("r", 8)},
            {"name": "b", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}},
            {"name": "c", "datatype": "INT32", "shape": [2], "data": [1, 2]},
        ]
    }
    header = orjson.dumps(doc)
    chunk = np.array([3, 4], dtype=np.int32).tobytes()
    parsed = parse_infer_body(header + chunk, len(header), "model", "1", regions)
    assert [t.data.tolist() for t in parsed.request.inputs] == [[5, 6], [3, 4], [1, 2]]


def test_an_input_in_shared_memory_of_the_wrong_byte_size_is_rejected() -> None:
    doc = one_input(datatype="INT32", shape=[2], data=..., parameters=shm_params("r", 4))
    with pytest.raises(
        InvalidArgument,
        match=r"input 'x' has shared_memory_byte_size 4, but datatype INT32 with shape \[2\] needs 8 bytes",
    ):
        parse_shm(doc, FakeRegions(r=16))


def test_the_resolvers_refusals_reach_the_client() -> None:
    doc = one_input(data=..., parameters=shm_params("nowhere", 8))
    with pytest.raises(InvalidArgument, match="Unable to find shared memory region: 'nowhere'"):
        parse_shm(doc, FakeRegions(r=16))
    doc = one_input(data=..., parameters=shm_params("r", 8, offset=12))
    with pytest.raises(InvalidArgument, match="Invalid offset \\+ byte size for shared memory region: 'r'"):
        parse_shm(doc, FakeRegions(r=16))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"shared_memory_region": 3, "shared_memory_byte_size": 8},
            "'shared_memory_region' must be a non-empty",
        ),
        (
            {"shared_memory_region": "", "shared_memory_byte_size": 8},
            "'shared_memory_region' must be a non-empty",
        ),
        ({"shared_memory_region": "r"}, "sets 'shared_memory_region' but not 'shared_memory_byte_size'"),
        ({**shm_params("r", 8), "shared_memory_offset": -1}, "'shared_memory_offset' must be a non-negative"),
        (
            {**shm_params("r", 8), "shared_memory_offset": 1.5},
            "'shared_memory_offset' must be a non-negative",
        ),
        ({"shared_memory_region": "r", "shared_memory_byte_size": True}, "'shared_memory_byte_size' must be"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -8}, "'shared_memory_byte_size' must be"),
        (
            {**shm_params("r", 8), "binary_data_size": 8},
            "but sets 'binary_data_size' and 'shared_memory_region'",
        ),
    ],
)
def test_malformed_shared_memory_input_parameters_are_rejected(params: dict[str, Any], match: str) -> None:
    doc = one_input(data=..., parameters=params)
    with pytest.raises(InvalidArgument, match=f"input 'x' .*{match}"):
        parse_shm(doc, FakeRegions(r=16))


def test_an_input_with_data_and_shared_memory_is_rejected() -> None:
    doc = one_input(parameters=shm_params("r", 8))
    with pytest.raises(InvalidArgument, match="but sets 'data' and 'shared_memory_region'"):
        parse_shm(doc, FakeRegions(r=16))


@pytest.mark.parametrize("key", ["shared_memory_offset", "shared_memory_byte_size"])
def test_a_shared_memory_offset_or_size_without_a_region_is_rejected(key: str) -> None:
    doc = one_input(parameters={key: 0})
    with pytest.raises(InvalidArgument, match=r"input 'x' sets .* without 'shared_memory_region'"):
        parse_shm(doc, FakeRegions(r=16))
    doc = one_input()
    doc["outputs"] = [{"name": "y", "parameters": {key: 0}}]
    with pytest.raises(InvalidArgument, match=r"output 'y' sets .* without 'shared_memory_region'"):
        parse_shm(doc, FakeRegions(r=16))


def shm_output_request(regions: FakeRegions, *outputs: tuple[str, dict[str, Any]]) -> ParsedInfer:
    doc = one_input()
    doc["outputs"] = [{"name": name, "parameters": params} for name, params in outputs]
    return parse_shm(doc, regions)


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_an_output_is_written_into_its_region_and_answered_without_data(datatype: str) -> None:
    array = sample(datatype)
    data = raw_bytes(array, datatype)
    regions = FakeRegions(r=len(data) + 20)
    parsed = shm_output_request(regions, ("y", shm_params("r", len(data) + 4, offset=16)))
    body, header_length = encode_infer_response(response(Tensor("y", datatype, (2, 3), array)), parsed, "")
    assert header_length is None  # no binary data follows the JSON
    doc, _ = decode(body, header_length)
    # As Triton answers: no data and no parameters (its C++ client reads any output with
    # parameters as binary data).
    assert doc["outputs"] == [{"name": "y", "datatype": datatype, "shape": [2, 3]}]
    assert bytes(regions.buffers["r"][16 : 16 + len(data)]) == data
    assert regions.buffers["r"][:16] == bytes(16)


def test_shared_memory_outputs_sit_beside_json_and_binary_ones() -> None:
    regions = FakeRegions(r=8)
    parsed = shm_output_request(
        regions, ("a", shm_params("r", 8)), ("b", {"binary_data": True}), ("c", {"binary_data": False})
    )
    ints = np.array([1, 2], dtype=np.int32)
    tensors = [Tensor(n, "INT32", (2,), ints + i) for i, n in enumerate("abc")]
    body, header_length = encode_infer_response(response(*tensors), parsed, "")
    doc, binary = decode(body, header_length)
    assert [o["name"] for o in doc["outputs"]] == ["a", "b", "c"]
    assert "data" not in doc["outputs"][0]
    assert binary == (ints + 1).tobytes()
    assert doc["outputs"][2]["data"] == [3, 4]
    assert bytes(regions.buffers["r"]) == ints.tobytes()


def test_an_output_larger_than_its_window_is_a_400_naming_both_sizes() -> None:
    regions = FakeRegions(r=64)
    parsed = shm_output_request(regions, ("y", shm_params("r", 7)))
    out = Tensor("y", "INT32", (2,), np.array([1, 2], dtype=np.int32))
    with pytest.raises(
        InvalidArgument,
        match=r"shared memory size specified with the request for output 'y' \(7 bytes\) should be at "
        r"least 8 bytes to hold the results",
    ):
        encode_infer_response(response(out), parsed, "")
    assert regions.buffers["r"] == bytes(64)  # nothing half-written


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {**shm_params("r", 8), "binary_data": True},
            "can't set both 'shared_memory_region' and 'binary_data'",
        ),
        (
            {**shm_params("r", 8), "classification": 2},
            "can't set both 'shared_memory_region' and 'classification'",
        ),
        ({"shared_memory_region": "r"}, "sets 'shared_memory_region' but not 'shared_memory_byte_size'"),
        (shm_params("nowhere", 8), "Unable to find shared memory region: 'nowhere'"),
    ],
)
def test_shared_memory_outputs_follow_tritons_rules(params: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        shm_output_request(FakeRegions(r=16), ("y", params))


def test_an_output_into_shared_memory_with_binary_data_false_is_accepted() -> None:
    # tritonclient's InferRequestedOutput.set_shared_memory sends binary_data false.
    parsed = shm_output_request(FakeRegions(r=16), ("y", {**shm_params("r", 8), "binary_data": False}))
    assert set(parsed.shm_outputs) == {"y"}


def test_two_outputs_sharing_bytes_of_a_region_are_rejected() -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"outputs 'y' and 'z' overlap in shared memory region 'r': bytes \[0, 8\) and \[4, 12\)",
    ):
        shm_output_request(FakeRegions(r=16), ("y", shm_params("r", 8)), ("z", shm_params("r", 8, offset=4)))


def test_outputs_side_by_side_or_in_other_regions_and_inputs_under_outputs_are_fine() -> None:
    regions = FakeRegions(r=16, q=8)
    doc = one_input(datatype="INT32", data=..., parameters=shm_params("r", 8))
    doc["outputs"] = [
        {"name": "y", "parameters": shm_params("r", 8)},  # over the input: read before written
        {"name": "z", "parameters": shm_params("r", 8, offset=8)},
        {"name": "w", "parameters": shm_params("q", 8)},
        {"name": "v", "parameters": shm_params("r", 0, offset=4)},  # empty: shares no byte
    ]
    parsed = parse_shm(doc, regions)
    assert set(parsed.shm_outputs) == {"y", "z", "w", "v"}


_SHM_KEYS = st.sampled_from(
    [
        "shared_memory_region",
        "shared_memory_offset",
        "shared_memory_byte_size",
        "binary_data_size",
        "binary_data",
        "classification",
    ]
)
_SHM_VALUES = st.sampled_from(["r", "q", "", "nowhere"]) | _SMALL_VALUES | st.integers(0, 40)


@given(
    datatype=st.sampled_from(ALL_TYPES),
    shape=st.lists(st.integers(min_value=0, max_value=3), max_size=2),
    input_params=st.dictionaries(_SHM_KEYS, _SHM_VALUES),
    output_params=st.lists(st.dictionaries(_SHM_KEYS, _SHM_VALUES), max_size=3),
    data=st.binary(max_size=40),
)
def test_damaged_shared_memory_requests_only_ever_raise_invalid_argument(
    datatype: str,
    shape: list[int],
    input_params: dict[str, Any],
    output_params: list[dict[str, Any]],
    data: bytes,
) -> None:
    regions = FakeRegions(r=len(data), q=16)
    regions.buffers["r"][:] = data
    doc = {
        "inputs": [{"name": "x", "datatype": datatype, "shape": shape, "parameters": input_params}],
        "outputs": [{"name": f"y{i}", "parameters": p} for i, p in enumerate(output_params)],
    }
    try:
        parse_shm(doc, regions)
    except InvalidArgument:
        event("rejected")
    else:
        event("accepted")


@given(tensors=_tensor_lists())
def test_outputs_written_to_shared_memory_read_back_as_inputs_unchanged(tensors: list[Tensor]) -> None:
    sizes = [len(raw_bytes(t.data, t.datatype)) for t in tensors]
    regions = FakeRegions(r=sum(sizes))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parsed = shm_output_request(
        regions,
        *[
            (t.name, shm_params("r", size, start))
            for t, size, start in zip(tensors, sizes, starts, strict=True)
        ],
    )
    body, header_length = encode_infer_response(response(*tensors), parsed, "")
    doc, _ = decode(body, header_length)
    inputs = [
        {**entry, "parameters": shm_params("r", size, start)}
        for entry, size, start in zip(doc["outputs"], sizes, starts, strict=True)
    ]
    back = parse_shm({"inputs": inputs}, regions)
    for original, tensor in zip(tensors, back.request.inputs, strict=True):
        assert tensor.shape == original.shape
        assert_same(tensor.data, original.data)
