"""Input hardening without a process: the infer parsers' limits and linear cost, upload names
and bounds, config file names, the settings that carry the limits, and the 500 that tells a
client nothing of the exception."""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway import grpc_codec, kserve
from gateway.kserve import InputLimits, parse_infer_body
from gateway.middleware import unexpected_error
from natron import config as cfg
from natron import datatypes
from natron.cli.main import parse
from natron.cli.serve import plan_children
from natron.errors import InvalidArgument, PayloadTooLarge
from natron.settings import GatewaySettings, RouterSettings, ServeSettings
from router import uploads
from router.uploads import UploadLimits

pytestmark = pytest.mark.unit

INPUT = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}


def body(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def refused(raw: bytes, *fragments: str, header_length: int | None = None, **kwargs: Any) -> str:
    with pytest.raises(InvalidArgument) as info:
        parse_infer_body(raw, header_length, "m", "1", **kwargs)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value.message


# -- linear cost ---------------------------------------------------------------------------


def test_a_hundred_thousand_output_names_parse_in_linear_time() -> None:
    # 40,000 names took 8.8 s when every name was looked up in a list; 200,000 would take
    # minutes. The bound only proves "not quadratic" on a loaded machine.
    outputs = [{"name": f"out{i}"} for i in range(200_000)]
    raw = body({"inputs": [INPUT], "outputs": outputs})
    started = time.perf_counter()
    parsed = parse_infer_body(raw, None, "m", "1")
    assert time.perf_counter() - started < 10
    assert len(parsed.request.outputs) == 200_000


def test_a_duplicate_output_is_refused_naming_it() -> None:
    outputs = [{"name": f"out{i}"} for i in range(1000)] + [{"name": "out7"}]
    refused(body({"inputs": [INPUT], "outputs": outputs}), "'out7' appears more than once")


def test_more_outputs_than_the_model_has_are_refused_before_they_are_read() -> None:
    # Entries that are not even objects: the count alone decides, before any is walked.
    raw = body({"inputs": [INPUT], "outputs": [7] * 100_000})
    message = refused(raw, "100000", "only 2 outputs", max_outputs=2)
    assert "outputs[0]" not in message


def test_more_inputs_than_the_model_has_are_refused_before_they_are_read() -> None:
    inputs = [{**INPUT, "name": f"x{i}"} for i in range(3)]
    refused(body({"inputs": inputs}), "lists 3 tensors", "only 1 inputs", max_inputs=1)


def test_a_list_over_the_count_names_its_first_duplicate_as_the_full_parse_would() -> None:
    refused(body({"inputs": [INPUT] * 3}), "input 'x' appears more than once in 'inputs'", max_inputs=1)
    outputs = [{"name": "a"}, {"name": "b"}, {"name": "a"}]
    refused(body({"inputs": [INPUT], "outputs": outputs}), "output 'a' appears more than once", max_outputs=2)


def test_as_many_outputs_as_the_model_has_pass_the_count() -> None:
    raw = body({"inputs": [INPUT], "outputs": [{"name": "a"}, {"name": "b"}]})
    assert parse_infer_body(raw, None, "m", "1", max_inputs=1, max_outputs=2).request.outputs == ["a", "b"]


def test_grpc_counts_are_checked_before_the_tensors() -> None:
    message = pb.ModelInferRequest(model_name="m")
    for _ in range(3):
        message.outputs.add(name="o")
    message.inputs.add(name="x", datatype="FP32", shape=[1])
    with pytest.raises(InvalidArgument, match="only 1 outputs"):
        grpc_codec.parse_request(message, max_inputs=1, max_outputs=1)
    with pytest.raises(InvalidArgument, match="only 0 inputs"):
        grpc_codec.parse_request(message, max_inputs=0)


# -- tensor limits -------------------------------------------------------------------------


def test_a_shape_over_the_element_limit_is_refused_naming_the_flag() -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1 << 20, 1 << 20], "data": [1.0]}]}
    refused(body(doc), "1099511627776 elements", "--max-tensor-elements")
    small = InputLimits(max_tensor_elements=1)
    refused(body({"inputs": [INPUT]}), "2 elements", "limit of 1", limits=small)


def test_binary_data_over_the_element_limit_is_refused_before_it_is_read() -> None:
    doc = {
        "inputs": [{"name": "x", "datatype": "UINT8", "shape": [16], "parameters": {"binary_data_size": 16}}]
    }
    header = body(doc)
    refused(header + bytes(16), "--max-tensor-elements", header_length=len(header), limits=InputLimits(8))


def test_a_bytes_element_over_the_length_limit_is_refused_in_json_and_binary() -> None:
    limits = InputLimits(max_bytes_element_bytes=4)
    doc = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["abcd", "abcde"]}]}
    refused(body(doc), "element of 5 bytes", "--max-bytes-element-mb", limits=limits)
    chunk = datatypes.serialize_bytes(np.array([b"ab", b"abcdef"], dtype=np.object_))
    doc = {
        "inputs": [
            {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(chunk)}}
        ]
    }
    header = body(doc)
    refused(header + chunk, "element of 6 bytes", header_length=len(header), limits=limits)
    # At the limit: taken.
    ok = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["abcd"]}]}
    assert parse_infer_body(body(ok), None, "m", "1", limits=limits).request.inputs[0].data.tolist() == [
        b"abcd"
    ]


@pytest.mark.parametrize(
    "data",
    [
        "[[[[1.5]]]]",  # regular nesting, unrolled a level at a time
        "[1.5, [[[]]]]",  # irregular nesting, the explicit stack
    ],
)
def test_data_nested_deeper_than_the_limit_is_refused_naming_the_flag(data: str) -> None:
    raw = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": %s}]}' % data.encode()
    refused(raw, "more than 3 deep", "--max-json-depth", limits=InputLimits(max_json_depth=3))
    parsed = parse_infer_body(raw, None, "m", "1", limits=InputLimits(max_json_depth=4))
    assert parsed.request.inputs[0].data.tolist() == [1.5]


def test_json_deeper_than_orjson_takes_is_a_400_anywhere_in_the_body() -> None:
    deep = "[" * (kserve.JSON_DEPTH_CEILING + 1) + "]" * (kserve.JSON_DEPTH_CEILING + 1)
    refused(b'{"inputs": [], "extra": %s}' % deep.encode(), "not valid JSON")


# -- uploads -------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("²/x", "version folder"),  # a Unicode digit: int() of it once raised ValueError
        ("01/x", "version folder"),
        ("99999999999999999999/x", "version folder"),
        ("1/" + "a" * 300, "longer than 255 bytes"),
        ("1/" + "a/" * 600 + "b", "longer than 1024 bytes"),
        ("1/a\ud800", "not valid UTF-8"),
        ("1/a\nb", "control characters"),
        ("1/../x", "'..'"),
        ("/etc/passwd", "relative"),
        ("1", "version folder"),
    ],
)
def test_a_bad_upload_name_is_a_400_naming_the_file_and_no_host_path(
    tmp_path: Path, name: str, fragment: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        uploads.write_uploads(tmp_path, "m", {name: b64(b"x")})
    assert fragment in info.value.message, info.value.message
    assert str(tmp_path) not in info.value.message
    assert not any(tmp_path.iterdir())  # nothing written


def test_uploads_over_the_file_count_are_a_400_naming_the_flag(tmp_path: Path) -> None:
    files = {f"1/f{i}": b64(b"x") for i in range(11)}
    with pytest.raises(InvalidArgument, match=r"11 files.*--max-upload-files"):
        uploads.write_uploads(tmp_path, "m", files, UploadLimits(max_files=10))
    assert not any(tmp_path.iterdir())


def test_uploads_over_the_size_limit_are_a_413_before_anything_is_decoded(tmp_path: Path) -> None:
    files = {"1/a": b64(bytes(600)), "1/b": b64(bytes(600))}
    with pytest.raises(PayloadTooLarge, match="--max-upload-mb"):
        uploads.write_uploads(tmp_path, "m", files, UploadLimits(max_bytes=1000))
    folder = uploads.write_uploads(tmp_path, "m", files, UploadLimits(max_bytes=1200))
    assert (folder / "1" / "a").read_bytes() == bytes(600)


def test_a_file_under_another_file_is_a_400_not_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="would sit under the file '1/a'"):
        uploads.write_uploads(tmp_path, "m", {"1/a": b64(b"x"), "1/a/b": b64(b"y")})


def test_a_write_that_fails_is_a_400_without_the_host_path(tmp_path: Path) -> None:
    root = tmp_path / "not-a-dir"
    root.write_text("a file where the upload root should be")
    with pytest.raises(InvalidArgument) as info:
        uploads.write_uploads(root, "m", {"1/model.onnx": b64(b"x")})
    assert "cannot be written" in info.value.message and str(tmp_path) not in info.value.message


def test_only_folders_written_for_uploads_are_ever_removed(tmp_path: Path) -> None:
    folder = uploads.write_uploads(tmp_path, "m", {"1/model.onnx": b64(b"x")})
    assert uploads.is_upload(str(folder.resolve()), tmp_path)
    assert not uploads.is_upload(str(tmp_path / "m"), tmp_path)
    assert not uploads.is_upload("/srv/models/m", tmp_path)
    other = uploads.write_uploads(tmp_path, "m", {"1/model.onnx": b64(b"y")})
    assert uploads.orphans(tmp_path, keep={str(folder.resolve())}) == [other.resolve()]
    uploads.remove_folders([folder, other])
    assert not (tmp_path / "m").exists()  # the model's folder goes with its last upload


# -- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../../x/1/model.py", "/etc/model.py", "a/../../b", "a//b", "./model.py"]
)
def test_a_model_file_outside_the_version_folder_is_refused_in_every_config(name: str) -> None:
    with pytest.raises(cfg.ConfigError, match="inside the version folder"):
        cfg.config_from_json({"name": "m", "backend": "python", "default_model_filename": name})
    with pytest.raises(cfg.ConfigError, match="inside the version folder"):
        cfg.parse_config_text(
            f'name: "m"\nbackend: "python"\ndefault_model_filename: "{name}"', "config.pbtxt"
        )
    with pytest.raises(cfg.ConfigError, match="cc_model_filenames"):
        cfg.config_from_json({"name": "m", "cc_model_filenames": {"8.0": name}})


def test_a_model_file_in_a_subfolder_of_the_version_folder_is_taken() -> None:
    config = cfg.config_from_json({"name": "m", "default_model_filename": "weights/model.onnx"})
    assert config.default_model_filename == "weights/model.onnx"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"parameters": {"EXECUTION_ENV_PATH": {"string_value": "/tmp/env.tar.gz"}}}, "EXECUTION_ENV_PATH"),
        (
            {
                "optimization": {
                    "execution_accelerators": {
                        "gpu_execution_accelerator": [
                            {"name": "tensorrt", "parameters": {"trt_extra_plugin_lib_paths": "/tmp/evil.so"}}
                        ]
                    }
                }
            },
            "trt_extra_plugin_lib_paths",
        ),
        ({"model_repository_agents": {"agents": [{"name": "checksum"}]}}, "model_repository_agents"),
        ({"default_model_filename": "../../../x/1/model.py"}, "inside the version folder"),
    ],
)
def test_a_load_config_may_not_name_host_paths(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(cfg.ConfigError, match=fragment):
        cfg.check_override({"name": "m", "backend": "python", **override})


def test_a_plain_load_config_passes_and_a_broken_one_is_left_to_the_load() -> None:
    cfg.check_override(
        {
            "name": "m",
            "backend": "onnxruntime",
            "parameters": {"intra_op_thread_count": {"string_value": "2"}},
        }
    )
    cfg.check_override({"name": "m", "no_such_field": 1})  # the load reports it, as before


# -- errors and settings -------------------------------------------------------------------


def test_an_unexpected_error_shows_an_incident_id_and_logs_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    error = OSError(2, "No such file or directory", "/srv/secret/upload/1/model.onnx")
    with caplog.at_level(logging.ERROR, logger="gateway.middleware"):
        message = unexpected_error(error, "POST /v2/repository/models/m/load")
    assert "OSError" not in message and "/srv/secret" not in message
    incident = message.split("incident ")[1].split(")")[0]
    record = next(r for r in caplog.records if incident in r.getMessage())
    assert record.exc_info is not None and "/srv/secret" in str(record.exc_info[1])


def test_the_limits_are_flags_and_variables_and_reach_a_served_gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gateway = parse(["gateway", "--max-tensor-elements", "1000", "--max-bytes-element-mb", "2"])
    assert isinstance(gateway, GatewaySettings)
    assert (gateway.max_tensor_elements, gateway.max_bytes_element_mb, gateway.max_json_depth) == (
        1000,
        2,
        1024,
    )
    monkeypatch.setenv("NATRON_MAX_JSON_DEPTH", "8")
    monkeypatch.setenv("NATRON_MAX_UPLOAD_FILES", "5")
    assert parse(["gateway"]).max_json_depth == 8  # type: ignore[union-attr]
    router = parse(["router", str(tmp_path), "--max-upload-mb", "3"])
    assert isinstance(router, RouterSettings) and (router.max_upload_files, router.max_upload_mb) == (5, 3)
    serve = parse(["serve", str(tmp_path), "--max-tensor-elements", "77", "--max-upload-files", "9"])
    assert isinstance(serve, ServeSettings)
    children = {
        c.name: c.settings for c in plan_children(serve, "nats://127.0.0.1:1", [], "box", parent_pid=1)
    }
    served_gateway, served_router = children["gateway"], children["router"]
    assert isinstance(served_gateway, GatewaySettings) and served_gateway.max_tensor_elements == 77
    assert served_gateway.max_json_depth == 8
    assert isinstance(served_router, RouterSettings) and served_router.max_upload_files == 9


def test_a_limit_out_of_range_is_refused_naming_its_flag() -> None:
    with pytest.raises(SystemExit):
        parse(["gateway", "--max-json-depth", "2000"])
