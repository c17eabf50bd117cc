"""Triton's system shared memory extension: the registry against a real bucket (two registries
standing for two gateway processes), the real Triton client (`tritonclient.http` with
`tritonclient.utils.shared_memory` making the regions) against `natron serve`, and one port
served by two gateway processes."""

from __future__ import annotations

import asyncio
import http.client
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from nats.js.kv import KeyValue
from tritonclient.utils import InferenceServerException

from broker import jetstream
from broker.server import EmbeddedNatsServer
from examples.build_models import build
from gateway.sharedmemory import SHM_DIR, RegionMiss, SharedMemoryRegistry
from natron import datatypes
from natron.errors import InvalidArgument, NotFound
from tests.harness import Served, natron_serve, wait_until, wait_until_async
from tests.mesh.test_http_workers import all_listening, connections_per_process, serve_pid


@pytest.fixture
def shm_key() -> Iterator[str]:
    """A fresh POSIX shared memory key; its object (if a test made one) is removed after."""
    key = f"/natron-test-{uuid.uuid4().hex}"
    yield key
    (SHM_DIR / key[1:]).unlink(missing_ok=True)


def make_object(key: str, size: int) -> Path:
    path = SHM_DIR / key.lstrip("/")
    with path.open("wb") as f:
        f.truncate(size)
    return path


# -- the registry against a bucket -----------------------------------------------------------


@pytest.fixture
async def bucket(nats_server: EmbeddedNatsServer) -> AsyncIterator[KeyValue]:
    nc = await jetstream.connect(nats_server.url, name="test-shared-memory")
    try:
        yield await jetstream.ensure_bucket(nc.jetstream(), f"shm_{uuid.uuid4().hex[:8]}")
    finally:
        await jetstream.close_connection(nc)


@pytest.fixture
async def two_registries(
    bucket: KeyValue,
) -> AsyncIterator[tuple[SharedMemoryRegistry, SharedMemoryRegistry]]:
    """Two gateway processes of one host: one bucket, one scope."""
    first, second = SharedMemoryRegistry(), SharedMemoryRegistry()
    await first.start(bucket, "host-a")
    await second.start(bucket, "host-a")
    try:
        yield first, second
    finally:
        await first.stop()
        await second.stop()


async def test_a_region_registered_through_one_process_is_used_through_another(
    two_registries: tuple[SharedMemoryRegistry, SharedMemoryRegistry], shm_key: str
) -> None:
    first, second = two_registries
    path = make_object(shm_key, 4096)
    await first.register_system("r", shm_key, 1024, 256)
    # At once, whether or not the second one's watch has delivered the registration yet.
    await second.write("r", 8, b"from the second")
    assert bytes(await first.read("r", 8, 15)) == b"from the second"
    with path.open("rb") as f:
        f.seek(1032)
        assert f.read(15) == b"from the second"
    assert await second.system_status("r") == [
        {"name": "r", "key": shm_key, "offset": 1024, "byte_size": 256}
    ]


async def test_requests_that_miss_at_once_all_find_the_region(
    two_registries: tuple[SharedMemoryRegistry, SharedMemoryRegistry], shm_key: str
) -> None:
    first, second = two_registries
    make_object(shm_key, 4096)
    await first.register_system("r", shm_key, 0, 4096)
    await first.write("r", 0, bytes(range(64)))
    views = await asyncio.gather(*(second.read("r", i, 1) for i in range(64)))
    assert [bytes(v) for v in views] == [bytes([i]) for i in range(64)]


async def test_a_duplicate_name_is_refused_whichever_process_holds_it(
    two_registries: tuple[SharedMemoryRegistry, SharedMemoryRegistry], shm_key: str
) -> None:
    first, second = two_registries
    make_object(shm_key, 4096)
    await first.register_system("r", shm_key, 0, 64)
    for registry in (first, second):
        with pytest.raises(InvalidArgument, match="shared memory region 'r' already in manager"):
            await registry.register_system("r", shm_key, 64, 64)
    assert await second.system_status(None) == [{"name": "r", "key": shm_key, "offset": 0, "byte_size": 64}]


async def test_an_unregister_reaches_every_process(
    two_registries: tuple[SharedMemoryRegistry, SharedMemoryRegistry], shm_key: str
) -> None:
    first, second = two_registries
    make_object(shm_key, 4096)
    await first.register_system("r", shm_key, 0, 64)
    await first.register_system("s", shm_key, 64, 64)
    view = await second.read("r", 0, 8)
    await first.unregister_system("r")
    # Status reads the bucket: current at once, through either process.
    assert [r["name"] for r in await second.system_status(None)] == ["s"]
    with pytest.raises(NotFound, match="Unable to find system shared memory region: 'r'"):
        await second.system_status("r")

    def gone() -> bool:
        try:
            second.window("r", 0, 8)
        except RegionMiss:
            return True
        return False

    await wait_until_async(gone, 10, "the unregister reaching the other process")
    with pytest.raises(RegionMiss):
        await second.lookup("r", 0, 8)
    assert bytes(view) == bytes(8)  # a view taken before stays usable until released
    view.release()
    # The name is free again, for another key even.
    other = make_object(shm_key + "-2", 64)
    try:
        await second.register_system("r", shm_key + "-2", 0, 64)
        await first.write("r", 0, b"new")
        assert other.read_bytes()[:3] == b"new"
    finally:
        other.unlink()


async def test_unregistering_all_leaves_other_hosts_regions(bucket: KeyValue, shm_key: str) -> None:
    make_object(shm_key, 4096)
    here, there = SharedMemoryRegistry(), SharedMemoryRegistry()
    await here.start(bucket, "host-a")
    await there.start(bucket, "host-b")
    try:
        await here.register_system("r", shm_key, 0, 64)
        await here.register_system("s", shm_key, 64, 64)
        await there.register_system("r", shm_key, 128, 64)  # the same name on another host
        assert [r["name"] for r in await here.system_status(None)] == ["r", "s"]
        assert await there.system_status(None) == [
            {"name": "r", "key": shm_key, "offset": 128, "byte_size": 64}
        ]
        await here.unregister_system(None)
        assert await here.system_status(None) == []
        assert [r["offset"] for r in await there.system_status(None)] == [128]
        await here.unregister_system("never-registered")  # no error, as in Triton
    finally:
        await here.stop()
        await there.stop()


async def test_a_restarted_process_finds_the_hosts_regions(bucket: KeyValue, shm_key: str) -> None:
    make_object(shm_key, 4096)
    first = SharedMemoryRegistry()
    await first.start(bucket, "host-a")
    try:
        await first.register_system("r", shm_key, 0, 64)
    finally:
        await first.stop()
    again = SharedMemoryRegistry()
    await again.start(bucket, "host-a")
    try:
        await again.write("r", 0, b"back")
        assert (SHM_DIR / shm_key[1:]).read_bytes()[:4] == b"back"
    finally:
        await again.stop()


# -- tritonclient against natron serve -------------------------------------------------------


@pytest.fixture(scope="module")
def client(served: Served) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(served.host_port, concurrency=4)


@pytest.fixture
def regions(client: httpclient.InferenceServerClient) -> Iterator[list[Any]]:
    """Handles of the regions a test creates; unregistered and destroyed after."""
    handles: list[Any] = []
    yield handles
    client.unregister_system_shared_memory()
    for handle in handles:
        shm.destroy_shared_memory_region(handle)


def new_region(client: httpclient.InferenceServerClient, handles: list[Any], name: str, size: int) -> Any:
    key = f"/natron-test-{uuid.uuid4().hex}"
    handle = shm.create_shared_memory_region(name, key, size)
    handles.append(handle)
    client.register_system_shared_memory(name, key, size)
    return handle


def wait_ready(client: httpclient.InferenceServerClient, model: str) -> None:
    wait_until(lambda: client.is_model_ready(model), 60, f"{model} ready")


def status_code(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


def test_simple_adds_and_subtracts_in_shared_memory(
    client: httpclient.InferenceServerClient, regions: list[Any]
) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs_handle = new_region(client, regions, "input_data", 128)
    outputs_handle = new_region(client, regions, "output_data", 128)
    shm.set_shared_memory_region(inputs_handle, [a, b])
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_shared_memory("input_data", 64)
    inputs[1].set_shared_memory("input_data", 64, offset=64)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("output_data", 64)
    outputs[1].set_shared_memory("output_data", 64, offset=64)

    result = client.infer("simple", inputs, outputs=outputs)

    # As Triton answers: the data is in the region, the answer has no data and no parameters.
    assert result.get_output("OUTPUT0") == {"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 16]}
    np.testing.assert_array_equal(shm.get_contents_as_numpy(outputs_handle, np.int32, [1, 16]), a + b)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(outputs_handle, np.int32, [1, 16], offset=64), a - b
    )

    status = client.get_system_shared_memory_status()
    assert sorted((r["name"], r["offset"], r["byte_size"]) for r in status) == [
        ("input_data", 0, 128),
        ("output_data", 0, 128),
    ]
    (one,) = client.get_system_shared_memory_status("input_data")
    assert one["key"] == shm_key_of(inputs_handle)
    client.unregister_system_shared_memory("input_data")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["output_data"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def shm_key_of(handle: Any) -> str:
    key: str = handle._shm_key  # tritonclient keeps no public accessor
    return key


def _sample(datatype: str, count: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    if datatype == "BOOL":
        return rng.integers(0, 2, count).astype(bool)
    if datatype == "BYTES":
        return np.array([f"s{i}-é".encode() * (i % 3) for i in range(count)], dtype=np.object_)
    if datatype == "BF16":
        return rng.normal(size=count).astype(ml_dtypes.bfloat16)
    dtype = datatypes.to_numpy_dtype(datatype)
    if dtype.kind in "iu":
        info = np.iinfo(datatype.lower())
        return np.array([info.min, info.max, 0, 1] * count, dtype=dtype)[:count]
    return rng.normal(size=count).astype(dtype)


@pytest.mark.parametrize("datatype", sorted(datatypes.DATATYPES))
def test_every_datatype_goes_in_and_out_through_shared_memory(
    client: httpclient.InferenceServerClient, regions: list[Any], datatype: str
) -> None:
    model = f"identity_{datatype.lower()}"
    wait_ready(client, model)
    data = _sample(datatype, 6).reshape(2, 3)
    raw = datatypes.serialize_bytes(data) if datatype == "BYTES" else data.tobytes()
    size = len(raw)
    handle = new_region(client, regions, "io", 2 * size + 8)
    shm.set_shared_memory_region(handle, [np.frombuffer(raw, dtype=np.uint8)])
    inp = httpclient.InferInput("INPUT0", [2, 3], datatype)
    inp.set_shared_memory("io", size)
    out = httpclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("io", size + 8, offset=size)

    result = client.infer(model, [inp], outputs=[out])

    assert "data" not in result.get_output("OUTPUT0")
    dtype = np.object_ if datatype == "BYTES" else data.dtype
    got = shm.get_contents_as_numpy(handle, dtype, [2, 3], offset=size)
    if datatype == "BYTES":
        assert got.tolist() == data.tolist()
    else:
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data)


def simple_request(
    inputs_region: str, outputs_region: str, out_size: int = 64
) -> tuple[list[Any], list[Any]]:
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_shared_memory(inputs_region, 64)
    inputs[1].set_shared_memory(inputs_region, 64, offset=64)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0")]
    outputs[0].set_shared_memory(outputs_region, out_size)
    return inputs, outputs


def test_an_unknown_region_is_a_400(client: httpclient.InferenceServerClient, regions: list[Any]) -> None:
    new_region(client, regions, "in", 128)
    inputs, outputs = simple_request("in", "nowhere")
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs, outputs=outputs)
    assert status_code(info) == "400"
    assert "Unable to find shared memory region: 'nowhere'" in info.value.message()


def test_a_region_too_small_for_a_tensor_is_a_400(
    client: httpclient.InferenceServerClient, regions: list[Any]
) -> None:
    new_region(client, regions, "in", 128)
    new_region(client, regions, "small", 32)
    # An input larger than its region.
    inputs, outputs = simple_request("small", "in")
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs, outputs=outputs)
    assert status_code(info) == "400"
    assert "Invalid offset + byte size for shared memory region: 'small'" in info.value.message()
    # An output window smaller than the output: known once the model answered.
    inputs, outputs = simple_request("in", "small", out_size=32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs, outputs=outputs)
    assert status_code(info) == "400"
    assert "output 'OUTPUT0' (32 bytes) should be at least 64 bytes" in info.value.message()
    # An input whose byte size is not its tensor's.
    inputs[0].set_shared_memory("in", 60)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    assert status_code(info) == "400"
    assert (
        "shared_memory_byte_size 60, but datatype INT32 with shape [1, 16] needs 64 bytes"
        in info.value.message()
    )


def test_an_offset_outside_the_region_is_a_400(
    client: httpclient.InferenceServerClient, regions: list[Any]
) -> None:
    new_region(client, regions, "in", 128)
    inputs, outputs = simple_request("in", "in")
    inputs[1].set_shared_memory("in", 64, offset=128)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs, outputs=outputs)
    assert status_code(info) == "400"
    assert "Invalid offset for shared memory region: 'in'" in info.value.message()


def test_two_outputs_overlapping_in_a_region_are_a_400(
    client: httpclient.InferenceServerClient, regions: list[Any]
) -> None:
    new_region(client, regions, "in", 128)
    inputs, outputs = simple_request("in", "in")
    second = httpclient.InferRequestedOutput("OUTPUT1")
    second.set_shared_memory("in", 64, offset=32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs, outputs=[*outputs, second])
    assert status_code(info) == "400"
    assert "outputs 'OUTPUT0' and 'OUTPUT1' overlap in shared memory region 'in'" in info.value.message()


def test_registering_a_name_twice_is_a_400(
    client: httpclient.InferenceServerClient, regions: list[Any]
) -> None:
    handle = new_region(client, regions, "twice", 64)
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("twice", shm_key_of(handle), 64)
    assert status_code(info) == "400"
    assert "shared memory region 'twice' already in manager" in info.value.message()


def test_registering_an_unknown_key_is_a_400(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("ghost", "/natron-no-such-key", 64)
    assert status_code(info) == "400"
    assert "Unable to open shared memory region: '/natron-no-such-key'" in info.value.message()
    assert client.get_system_shared_memory_status() == []


def test_registering_past_the_end_of_the_object_is_a_400(
    client: httpclient.InferenceServerClient, regions: list[Any]
) -> None:
    handle = new_region(client, regions, "small", 64)
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("past", shm_key_of(handle), 64, offset=32)
    assert status_code(info) == "400"
    assert "failed to register shared memory region 'past': invalid args" in info.value.message()


def test_status_of_an_unknown_region_is_tritons_404(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status("nowhere")
    assert status_code(info) == "404"
    assert "Unable to find system shared memory region: 'nowhere'" in info.value.message()
    client.unregister_system_shared_memory("nowhere")  # no error, as in Triton


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"offset": 0, "byte_size": 8}, "has no 'key' field"),
        ({"key": "/k", "offset": 0}, "has no 'byte_size' field"),
        ({"key": 7, "byte_size": 8}, "'key' must be a string"),
        ({"key": "/k", "byte_size": -8}, "'byte_size' must be a non-negative integer"),
        ({"key": "/k", "byte_size": 8, "offset": "0"}, "'offset' must be a non-negative integer"),
        ({"key": "/", "byte_size": 8}, "invalid shm key '/'"),
        ({"key": "/natron-x", "byte_size": 0}, "byte_size must be positive"),
    ],
)
def test_malformed_register_requests_are_400s(served: Served, body: dict[str, Any], match: str) -> None:
    response = requests.post(f"{served.url}/v2/systemsharedmemory/region/bad/register", json=body, timeout=10)
    assert response.status_code == 400
    assert match in response.json()["error"]


def test_cuda_shared_memory_is_a_501_saying_why(
    client: httpclient.InferenceServerClient, served: Served
) -> None:
    response = requests.post(
        f"{served.url}/v2/cudasharedmemory/region/gpu/register",
        json={"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64},
        timeout=10,
    )
    assert response.status_code == 501
    assert "CUDA shared memory is not supported" in response.json()["error"]
    # Nothing can be registered, so nothing is listed and unregistering is no error: tools that
    # clean up both kinds (perf_analyzer) go on.
    assert client.get_cuda_shared_memory_status() == []
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("gpu")
    with pytest.raises(InferenceServerException) as info:
        client.get_cuda_shared_memory_status("gpu")
    assert status_code(info) == "404"


def test_the_extensions_routes_answer_wrong_methods_with_405(served: Served) -> None:
    assert requests.post(f"{served.url}/v2/systemsharedmemory/status", timeout=10).status_code == 405
    assert requests.get(f"{served.url}/v2/systemsharedmemory/unregister", timeout=10).status_code == 405


# -- one port, two gateway processes ---------------------------------------------------------

CONNECTIONS = 12


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, int]]:
    repository = tmp_path_factory.mktemp("repo")
    build(repository, ["simple"])
    with natron_serve(
        repository, ["simple"], tmp_path_factory.mktemp("serve"), ("--http-workers", "2")
    ) as served:
        yield served, serve_pid(int(served.url.rsplit(":", 1)[1]))


def call(connection: http.client.HTTPConnection, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    connection.request(method, path, json.dumps(body) if body is not None else None)
    response = connection.getresponse()
    text = response.read()
    return response.status, json.loads(text) if text else None


def shm_infer_body(slot: int) -> dict[str, Any]:
    def params(region: str, offset: int) -> dict[str, Any]:
        return {"shared_memory_region": region, "shared_memory_offset": offset, "shared_memory_byte_size": 64}

    return {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "parameters": params("in", 0)},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "parameters": params("in", 64)},
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": params("out", 64 * slot)}],
    }


def test_a_region_registered_through_one_gateway_process_serves_through_all(
    two_gateways: tuple[Served, int], shm_key: str
) -> None:
    served, pid = two_gateways
    port = int(served.url.rsplit(":", 1)[1])
    gateways = wait_until(lambda: all_listening(pid, port, 2), 30, "both gateway processes listening")
    in_handle = shm.create_shared_memory_region("in", shm_key, 128)
    out_handle = shm.create_shared_memory_region("out", shm_key + "-out", 64 * CONNECTIONS)
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(CONNECTIONS)]
    try:
        a = np.arange(16, dtype=np.int32)
        shm.set_shared_memory_region(in_handle, [a, np.full(16, 5, dtype=np.int32)])
        for name, key, size in (("in", shm_key, 128), ("out", shm_key + "-out", 64 * CONNECTIONS)):
            status, _ = call(
                connections[0],
                "POST",
                f"/v2/systemsharedmemory/region/{name}/register",
                {"key": key, "byte_size": size},
            )
            assert status == 200

        for slot, connection in enumerate(connections):
            status, answer = call(connection, "POST", "/v2/models/simple/infer", shm_infer_body(slot))
            assert status == 200, answer
            assert "data" not in answer["outputs"][0]
            status, listed = call(connection, "GET", "/v2/systemsharedmemory/status")
            assert status == 200 and sorted(r["name"] for r in listed) == ["in", "out"]
        got = shm.get_contents_as_numpy(out_handle, np.int32, [CONNECTIONS, 16])
        np.testing.assert_array_equal(got, np.tile(a + 5, (CONNECTIONS, 1)))
        # Both processes served: each holds some of the kept-alive connections (12 connections
        # hashed onto one of two listeners: a chance of 2 in 4096).
        held = connections_per_process(gateways, port)
        assert all(count > 0 for count in held.values()), held

        assert call(connections[0], "POST", "/v2/systemsharedmemory/unregister")[0] == 200
        for connection in connections:
            assert call(connection, "GET", "/v2/systemsharedmemory/status") == (200, [])

            def refused(connection: http.client.HTTPConnection = connection) -> bool:
                status, answer = call(connection, "POST", "/v2/models/simple/infer", shm_infer_body(0))
                return status == 400 and "Unable to find shared memory region" in answer["error"]

            wait_until(refused, 10, "the unregister reaching every gateway process")
    finally:
        for connection in connections:
            connection.close()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
