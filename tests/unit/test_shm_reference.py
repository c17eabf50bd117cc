"""Tensors by reference (docs/wire-format.md, "tensors by reference"): the codec's form, both
ways; a receiver without shared memory refuses it; the worker's side (workers/sharedmemory.py)
reads and writes the client's objects in /dev/shm and refuses what it cannot reach with the 400
the gateway retries by value; a worker report without a host scope is another host."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest

from broker import codec
from natron.errors import InternalError, InvalidArgument
from natron.inference import (
    SHM_DIR,
    SHM_UNREACHABLE,
    InferRequest,
    InferResponse,
    ShmRef,
    Tensor,
    host_scope,
)
from natron.records import WorkerReport
from workers.sharedmemory import WorkerSharedMemory

pytestmark = pytest.mark.unit

SCOPE = "host-a"


@pytest.fixture
def key() -> Iterator[str]:
    """A fresh POSIX shared memory key, its object removed after the test."""
    name = f"natron-unit-{uuid.uuid4().hex}"
    yield f"/{name}"
    (SHM_DIR / name).unlink(missing_ok=True)


def make_object(key: str, data: bytes) -> Path:
    path = SHM_DIR / key.lstrip("/")
    path.write_bytes(data)
    return path


class _Recorder:
    """A codec.ShmAccess that hands out what it was given and remembers what it was asked."""

    def __init__(self) -> None:
        self.reads: list[tuple[ShmRef, str, str, tuple[int, ...]]] = []
        self.outputs: list[tuple[ShmRef, str]] = []

    def read(self, ref: ShmRef, name: str, datatype: str, shape: tuple[int, ...]) -> Any:
        self.reads.append((ref, name, datatype, shape))
        return np.full(shape, 7, dtype=np.float32)

    def check_output(self, ref: ShmRef, name: str) -> None:
        self.outputs.append((ref, name))


def _request(ref: ShmRef | None = None, output_refs: dict[str, ShmRef] | None = None) -> InferRequest:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    return InferRequest(
        "r1", "m", "1", [Tensor("x", "FP32", (2, 4), data, ref)], ["y"], {}, output_refs or {}
    )


# -- the codec -------------------------------------------------------------------------------


def test_an_input_by_reference_carries_no_bytes_and_reaches_the_receivers_access() -> None:
    ref = ShmRef("/k", 4096, 32, SCOPE)
    out = ShmRef("/k", 8192, 32, SCOPE)
    wire = bytes(codec.encode_request(_request(ref, {"y": out})))
    body = msgpack.unpackb(wire)
    assert "data" not in body["inputs"][0]
    assert body["inputs"][0]["shm"] == {"key": "/k", "offset": 4096, "byte_size": 32, "scope": SCOPE}
    assert body["output_shm"] == {"y": {"key": "/k", "offset": 8192, "byte_size": 32, "scope": SCOPE}}
    access = _Recorder()
    decoded = codec.decode_request(wire, access)
    assert access.outputs == [(out, "y")]
    assert access.reads == [(ref, "x", "FP32", (2, 4))]
    assert decoded.output_refs == {"y": out}
    assert decoded.inputs[0].data.tolist() == [[7.0] * 4] * 2


def test_a_request_by_value_is_encoded_as_before() -> None:
    body = msgpack.unpackb(bytes(codec.encode_request(_request())))
    assert "output_shm" not in body
    assert set(body["inputs"][0]) == {"name", "datatype", "shape", "data"}


def test_a_receiver_without_shared_memory_refuses_references() -> None:
    wire = bytes(codec.encode_request(_request(ShmRef("/k", 0, 32, SCOPE))))
    with pytest.raises(InvalidArgument, match="input 'x' is a shared memory reference"):
        codec.decode_request(wire)
    wire = bytes(codec.encode_request(_request(output_refs={"y": ShmRef("/k", 0, 32, SCOPE)})))
    with pytest.raises(InvalidArgument, match="output 'y' asks to be written to shared memory"):
        codec.decode_request(wire)


def test_a_coalesced_request_by_reference_fails_alone() -> None:
    good, bad = _request(), _request(ShmRef("/k", 0, 32, SCOPE))
    entries = codec.decode_batch(bytes(codec.encode_batch([(good, 0, None), (bad, 0, None)])), 2)
    assert entries[0].request is not None and entries[0].error is None
    assert entries[1].request is None and entries[1].error is not None
    assert "shared memory reference" in entries[1].error.message


@pytest.mark.parametrize(
    "shm",
    [
        "k",
        {"offset": 0, "byte_size": 4, "scope": SCOPE},
        {"key": "", "offset": 0, "byte_size": 4, "scope": SCOPE},
        {"key": "/k", "offset": -1, "byte_size": 4, "scope": SCOPE},
        {"key": "/k", "offset": 0, "byte_size": True, "scope": SCOPE},
        {"key": "/k", "offset": 0, "byte_size": 4},
    ],
)
def test_a_malformed_reference_is_a_400(shm: Any) -> None:
    body = {
        "v": 1,
        "id": "r",
        "model": "m",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "shm": shm}],
    }
    with pytest.raises(InvalidArgument, match="tensor 'x' 'shm'"):
        codec.decode_request(msgpack.packb(body), _Recorder())


def test_an_output_by_reference_comes_back_with_its_shape_and_no_bytes() -> None:
    ref = ShmRef("/k", 0, 64, SCOPE)
    data = np.arange(16, dtype=np.float32).reshape(4, 4)
    response = InferResponse("r", "m", "1", [Tensor("y", "FP32", (4, 4), data, ref)])
    for wire, decode in (
        (codec.encode_response(response), codec.decode_response),
        (codec.encode_responses([response]), lambda w: codec.decode_responses(w)[0]),
    ):
        assert len(bytes(wire)) < 200
        (tensor,) = decode(bytes(wire)).outputs
        assert tensor.ref == ref and tensor.shape == (4, 4) and tensor.data.size == 16
        assert not tensor.data.any()  # the stand-in takes no memory and holds nothing
    (answer,) = codec.decode_answers(bytes(codec.encode_answers([(0, "r", response)])))
    assert isinstance(answer[1], InferResponse) and answer[1].outputs[0].ref == ref


# -- the worker's side -----------------------------------------------------------------------


def test_the_worker_reads_an_input_as_a_view_of_the_clients_object(key: str) -> None:
    values = np.arange(1024, dtype=np.float32)
    path = make_object(key, bytes(4096) + values.tobytes())
    shm = WorkerSharedMemory("w1", SCOPE)
    array = shm.read(ShmRef(key, 4096, values.nbytes, SCOPE), "x", "FP32", (32, 32))
    assert array.reshape(-1).tolist() == values.tolist()
    assert not array.flags.writeable
    # A view, not a copy: what the client writes next is what the array holds.
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(np.float32(-1).tobytes())
    assert array[0, 0] == -1
    shm.close()


def test_the_worker_writes_an_output_into_the_clients_window(key: str) -> None:
    path = make_object(key, bytes(8192))
    shm = WorkerSharedMemory("w1", SCOPE)
    ref = ShmRef(key, 1000, 4096, SCOPE)
    request = InferRequest("r", "m", "1", [], output_refs={"y": ref})
    data = np.arange(256, dtype=np.int32).reshape(2, 128)
    other = Tensor("z", "INT32", (1,), np.zeros(1, dtype=np.int32))
    placed, untouched = shm.place_outputs(request, [Tensor("y", "INT32", (2, 128), data), other])
    assert placed.ref == ShmRef(key, 1000, 1024, SCOPE)  # what was written
    assert untouched is other
    assert path.read_bytes()[1000:2024] == data.tobytes()
    shm.close()


def test_an_output_too_large_for_its_window_is_tritons_400(key: str) -> None:
    make_object(key, bytes(4096))
    shm = WorkerSharedMemory("w1", SCOPE)
    request = InferRequest("r", "m", "1", [], output_refs={"y": ShmRef(key, 0, 16, SCOPE)})
    with pytest.raises(InvalidArgument, match="should be at least 64 bytes to hold the results"):
        shm.place_outputs(request, [Tensor("y", "FP32", (16,), np.zeros(16, dtype=np.float32))])
    bad = Tensor("y", "FP32", (17,), np.zeros(16, dtype=np.float32))
    with pytest.raises(InternalError, match="holds 16 elements"):
        shm.place_outputs(request, [bad])


@pytest.mark.parametrize(
    ("worker_scope", "ref_scope", "why"),
    [
        (SCOPE, "host-b", "in host scope 'host-b', the worker in 'host-a'"),
        (None, SCOPE, "this worker maps no client shared memory"),
    ],
)
def test_a_reference_from_another_host_is_not_reachable(
    key: str, worker_scope: str | None, ref_scope: str, why: str
) -> None:
    make_object(key, bytes(64))
    shm = WorkerSharedMemory("w1", worker_scope)
    with pytest.raises(InvalidArgument) as caught:
        shm.check_output(ShmRef(key, 0, 64, ref_scope), "y")
    assert caught.value.message.startswith(f"shared memory region '{key}' is {SHM_UNREACHABLE} 'w1'")
    assert why in caught.value.message
    assert shm.mapped == 0  # nothing was opened


def test_an_unlinked_key_is_not_reachable_and_a_short_object_is_a_400(key: str) -> None:
    shm = WorkerSharedMemory("w1", SCOPE)
    with pytest.raises(InvalidArgument, match=f"{SHM_UNREACHABLE} 'w1': cannot open its key"):
        shm.read(ShmRef(key, 0, 16, SCOPE), "x", "FP32", (4,))
    make_object(key, bytes(16))
    with pytest.raises(InvalidArgument, match="is 16 bytes, short of offset 8 \\+ byte_size 16"):
        shm.read(ShmRef(key, 8, 16, SCOPE), "x", "FP32", (4,))
    with pytest.raises(InvalidArgument, match="input 'x' in shared memory"):
        shm.read(ShmRef(key, 0, 16, SCOPE), "x", "FP32", (3,))  # 12 bytes, not 16
    for bad in ("/", "/a/b", "/..", "/triton_python_backend_shm_region_1"):
        with pytest.raises(InvalidArgument, match="invalid shared memory key"):
            shm.check_output(ShmRef(bad, 0, 1, SCOPE), "y")


def test_a_replaced_or_truncated_object_is_checked_again_on_each_use(key: str) -> None:
    path = make_object(key, np.ones(16, dtype=np.float32).tobytes())
    shm = WorkerSharedMemory("w1", SCOPE)
    ref = ShmRef(key, 0, 64, SCOPE)
    assert shm.read(ref, "x", "FP32", (16,)).sum() == 16
    # The client unlinks its object and makes another under the same key: the new one is read.
    path.unlink()
    make_object(key, np.full(16, 2, dtype=np.float32).tobytes())
    assert shm.read(ref, "x", "FP32", (16,)).sum() == 32
    os.truncate(path, 32)
    with pytest.raises(InvalidArgument, match="is 32 bytes, short of offset 0 \\+ byte_size 64"):
        shm.read(ref, "x", "FP32", (16,))
    shm.close()


def test_the_mappings_kept_are_bounded(key: str) -> None:
    keys = [f"{key}-{i}" for i in range(5)]
    try:
        for each in keys:
            make_object(each, bytes(8))
        shm = WorkerSharedMemory("w1", SCOPE, max_mappings=3)
        held = shm.read(ShmRef(keys[0], 0, 8, SCOPE), "x", "UINT8", (8,))
        for each in keys[1:]:
            shm.check_output(ShmRef(each, 0, 8, SCOPE), "y")
        assert shm.mapped == 3
        # The first mapping was dropped while a view of it lived: the view still reads.
        assert held.tolist() == [0] * 8
        shm.close()
        assert shm.mapped == 0
    finally:
        for each in keys:
            (SHM_DIR / each.lstrip("/")).unlink(missing_ok=True)


def test_bool_bytes_other_than_zero_and_one_are_read_as_true(key: str) -> None:
    make_object(key, bytes([0, 1, 2, 255]))
    shm = WorkerSharedMemory("w1", SCOPE)
    assert shm.read(ShmRef(key, 0, 4, SCOPE), "x", "BOOL", (4,)).tolist() == [False, True, True, True]
    shm.close()


def test_a_worker_of_this_host_reports_its_scope_and_an_old_report_has_none() -> None:
    assert WorkerSharedMemory.of_host("w").scope == host_scope()
    assert WorkerSharedMemory.of_host("w", enabled=False).scope is None
    report = WorkerReport("w", "h", 1, [], host_scope="s-1")
    assert WorkerReport.from_json(report.to_json()).host_scope == "s-1"
    old = orjson.loads(report.to_json())
    del old["host_scope"]
    assert WorkerReport.from_json(orjson.dumps(old)).host_scope is None
