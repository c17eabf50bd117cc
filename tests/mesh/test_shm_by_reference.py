"""System shared memory by reference: with the worker on the gateway's host, a large input and
output in the client's regions never cross nats-server (its monitoring endpoint counts the
bytes); a worker that cannot reach a region answers a clear 400 and the gateway sends the bytes
instead; a fleet with a worker on "another host" (one that maps no client memory, `natron
worker --system-shm off`) is served by value, with the same answers.

One mesh for the module (nats-server with monitoring, router, gateway, a worker of this host),
the real Triton client making the regions (`tritonclient.utils.shared_memory`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from broker.auth import authorization_block, ensure_credentials
from broker.requester import Requester
from broker.server import ServerOptions, config_text, find_nats_server, free_ports
from broker.subjects import Subjects
from examples.build_models import build
from natron.errors import InvalidArgument
from natron.inference import SHM_DIR, SHM_UNREACHABLE, InferRequest, ShmRef, Tensor, host_scope
from tests.harness import GiveUp, Mesh, wait_until

pytestmark = pytest.mark.mesh

MODEL = "identity_fp32"
ELEMENTS = 4 * 1024 * 1024  # 16 MiB of FP32
TENSOR_BYTES = ELEMENTS * 4


class MonitoredMesh(Mesh):
    """A mesh whose nats-server serves its monitoring endpoint (/varz) on the spare port."""

    grpc_address = ""
    metrics_url = ""

    def shm_sent(self) -> dict[str, float]:
        """The gateway's count of requests naming shared memory, by how they were sent."""
        text = requests.get(self.metrics_url, timeout=10).text
        return {
            sample.labels["sent"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "natron_gateway_shared_memory_requests"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["model"] == MODEL
        }

    def start_nats(self) -> None:
        conf = self.logs / "nats.conf"
        keys = ensure_credentials(self.creds_dir)
        options = ServerOptions(
            port=self.nats_port,
            monitor_port=self.spare_port,
            # Room for a 16 MiB tensor and its envelope by value (the default is 16 MiB).
            max_payload_bytes=64 * 1024 * 1024,
            authorization=authorization_block(keys, Subjects()),
        )
        conf.write_text(config_text(options, self.logs / "js"))
        process = self._spawn("nats", [find_nats_server(), "-c", str(conf)])

        def monitoring() -> bool:
            if process.poll() is not None:
                raise GiveUp(f"nats-server exited with {process.returncode}: {self.log('nats')[-2000:]}")
            return requests.get(self.varz_url, timeout=1).ok

        wait_until(monitoring, 10, "nats-server monitoring")

    @property
    def varz_url(self) -> str:
        return f"http://127.0.0.1:{self.spare_port}/varz"

    def broker_bytes(self) -> int:
        """Bytes nats-server has received from its clients so far."""
        in_bytes: int = requests.get(self.varz_url, timeout=5).json()["in_bytes"]
        return in_bytes


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitoredMesh]:
    repository = tmp_path_factory.mktemp("repo")
    build(repository, [MODEL, "simple", "ensemble_simple"], quiet=True)
    mesh = MonitoredMesh(repository)
    try:
        mesh.start_nats()
        mesh.start_router()
        mesh.start_worker("here")
        mesh.natron("orchestrator", "ensemble", "--nats-url", mesh.nats_url)
        grpc_port, metrics_port = free_ports(2)
        mesh.grpc_address = f"127.0.0.1:{grpc_port}"
        mesh.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        mesh.start_gateway(
            "--grpc-port", str(grpc_port), "--grpc-address", "127.0.0.1", "--metrics-port", str(metrics_port)
        )  # fmt: skip
        mesh.wait_ready(MODEL)
        mesh.wait_ready("ensemble_simple")
        yield mesh
    except BaseException:
        for name in mesh.processes:
            print(f"--- {name}\n{mesh.log(name)[-3000:]}")
        raise
    finally:
        mesh.stop()


class Regions:
    """An input and an output region of TENSOR_BYTES each, registered with the server."""

    def __init__(self, client: httpclient.InferenceServerClient) -> None:
        self.client = client
        tag = uuid.uuid4().hex[:12]
        self.in_key, self.out_key = f"/natron-ref-in-{tag}", f"/natron-ref-out-{tag}"
        self.in_name, self.out_name = f"in-{tag}", f"out-{tag}"
        self.handles: list[Any] = []
        for name, key in ((self.in_name, self.in_key), (self.out_name, self.out_key)):
            # An offset within the object, so that the references' offsets are checked too.
            handle = shm.create_shared_memory_region(name, key, TENSOR_BYTES + 4096)
            self.handles.append(handle)
            client.register_system_shared_memory(name, key, TENSOR_BYTES, offset=4096)

    def infer(self, data: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        shm.set_shared_memory_region(self.handles[0], [data], offset=4096)
        tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_shared_memory(self.in_name, data.nbytes)
        output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        output.set_shared_memory(self.out_name, TENSOR_BYTES)
        result = self.client.infer(MODEL, [tensor], outputs=[output])
        answer = result.get_output("OUTPUT0")
        assert answer["shape"] == list(data.shape) and "data" not in answer
        out: np.ndarray[Any, Any] = shm.get_contents_as_numpy(self.handles[1], np.float32, data.shape, 4096)
        return out.copy()

    def close(self) -> None:
        for name in (self.in_name, self.out_name):
            try:
                self.client.unregister_system_shared_memory(name)
            except InferenceServerException:
                pass
        for handle in self.handles:
            try:
                shm.destroy_shared_memory_region(handle)
            except (shm.SharedMemoryException, FileNotFoundError):
                pass  # a test unlinked it already


@pytest.fixture
def regions(mesh: MonitoredMesh) -> Iterator[Regions]:
    client = httpclient.InferenceServerClient(mesh.url.removeprefix("http://"), network_timeout=60)
    made = Regions(client)
    try:
        yield made
    finally:
        made.close()
        client.close()


def _tensor(seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((1, ELEMENTS), dtype=np.float32)


def test_a_large_input_and_output_in_shared_memory_never_cross_the_broker(
    mesh: MonitoredMesh, regions: Regions
) -> None:
    sent = mesh.shm_sent().get("by_reference", 0)
    for seed in range(3):
        data = _tensor(seed)
        before = mesh.broker_bytes()
        np.testing.assert_array_equal(regions.infer(data), data)
        carried = mesh.broker_bytes() - before
        # The request and its answer, heartbeats and watches of the moment: kilobytes.
        assert carried < TENSOR_BYTES // 16, (
            f"{carried} bytes crossed nats-server for a {TENSOR_BYTES}-byte tensor"
        )
    # Operators see it too: /metrics counts the requests sent by reference.
    assert mesh.shm_sent().get("by_reference", 0) == sent + 3


def test_grpc_infer_through_shared_memory_never_crosses_the_broker_either(mesh: MonitoredMesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.grpc_address)
    tag = uuid.uuid4().hex[:12]
    handles = [
        shm.create_shared_memory_region(f"{n}-{tag}", f"/natron-ref-g{n}-{tag}", TENSOR_BYTES) for n in "io"
    ]
    try:
        for n in "io":
            client.register_system_shared_memory(f"{n}-{tag}", f"/natron-ref-g{n}-{tag}", TENSOR_BYTES)
        data = _tensor(11)
        shm.set_shared_memory_region(handles[0], [data])
        tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_shared_memory(f"i-{tag}", TENSOR_BYTES)
        output = grpcclient.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory(f"o-{tag}", TENSOR_BYTES)
        before = mesh.broker_bytes()
        client.infer(MODEL, [tensor], outputs=[output])
        assert mesh.broker_bytes() - before < TENSOR_BYTES // 16
        got = shm.get_contents_as_numpy(handles[1], np.float32, data.shape)
        np.testing.assert_array_equal(got, data)
    finally:
        client.unregister_system_shared_memory()
        for handle in handles:
            shm.destroy_shared_memory_region(handle)
        client.close()


def test_a_region_unlinked_after_registering_is_served_by_value(
    mesh: MonitoredMesh, regions: Regions
) -> None:
    # Triton lets a client unlink its key once registered; the gateway holds its mapping, the
    # worker cannot open the key, says so, and the gateway sends the bytes instead.
    (SHM_DIR / regions.in_key.lstrip("/")).unlink()
    data = _tensor(7)
    before, sent = mesh.broker_bytes(), mesh.shm_sent()
    np.testing.assert_array_equal(regions.infer(data), data)
    assert mesh.broker_bytes() - before >= TENSOR_BYTES
    after = mesh.shm_sent()
    assert after["by_reference"] == sent["by_reference"] + 1
    assert after["by_value_again"] == sent.get("by_value_again", 0) + 1
    assert "sent again by value" in mesh.log("gateway")
    assert f"{SHM_UNREACHABLE} 'here': cannot open its key" in mesh.log("gateway")


def test_a_region_cut_short_is_a_400_saying_so(mesh: MonitoredMesh, regions: Regions) -> None:
    with (SHM_DIR / regions.out_key.lstrip("/")).open("r+b") as f:
        f.truncate(1024)
    with pytest.raises(InferenceServerException, match="no longer usable") as caught:
        regions.infer(_tensor(8))
    assert caught.value.status() == "400"


def test_an_ensemble_reads_and_writes_shared_memory_by_reference(mesh: MonitoredMesh, shm_tag: str) -> None:
    # The orchestrator (a worker of this host too) reads the inputs in place, its steps get
    # them by value, and it writes the ensemble's outputs into the client's regions.
    client = httpclient.InferenceServerClient(mesh.url.removeprefix("http://"))
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    handle = shm.create_shared_memory_region(shm_tag, f"/{shm_tag}", 256)
    try:
        client.register_system_shared_memory(shm_tag, f"/{shm_tag}", 256)
        shm.set_shared_memory_region(handle, [a, b])
        inputs = []
        for index, offset in enumerate((0, 64)):
            tensor = httpclient.InferInput(f"INPUT{index}", [1, 16], "INT32")
            tensor.set_shared_memory(shm_tag, 64, offset=offset)
            inputs.append(tensor)
        outputs = []
        for index, offset in enumerate((128, 192)):
            output = httpclient.InferRequestedOutput(f"OUTPUT{index}")
            output.set_shared_memory(shm_tag, 64, offset=offset)
            outputs.append(output)
        client.infer("ensemble_simple", inputs, outputs=outputs)
        assert shm.get_contents_as_numpy(handle, np.int32, [1, 16], 128).tolist() == (2 * a).tolist()
        assert shm.get_contents_as_numpy(handle, np.int32, [1, 16], 192).tolist() == (2 * b).tolist()
    finally:
        client.unregister_system_shared_memory(shm_tag)
        shm.destroy_shared_memory_region(handle)
        client.close()


@pytest.fixture
def shm_tag() -> str:
    return f"natron-ref-ens-{uuid.uuid4().hex[:12]}"


async def _direct(mesh: MonitoredMesh, request: InferRequest) -> Any:
    nc = await nats.connect(mesh.nats_url, **mesh.nats_options("client"))
    try:
        async with Requester(nc, Subjects()) as requester:
            return await requester.infer(request, "1", 30.0)
    finally:
        await nc.close()


def test_a_reference_the_worker_cannot_reach_is_a_400_before_running(
    mesh: MonitoredMesh, tmp_path: Path
) -> None:
    key = f"/natron-ref-direct-{uuid.uuid4().hex[:12]}"
    path = SHM_DIR / key[1:]
    path.write_bytes(np.ones(16, dtype=np.float32).tobytes())
    try:
        data = np.ones((1, 16), dtype=np.float32)
        scope = host_scope()
        assert scope is not None

        def request(ref: ShmRef) -> InferRequest:
            return InferRequest("direct", MODEL, "1", [Tensor("INPUT0", "FP32", (1, 16), data, ref)])

        with pytest.raises(
            InvalidArgument, match=f"'{key}' is {SHM_UNREACHABLE} 'here': .*host scope 'elsewhere'"
        ):
            asyncio.run(_direct(mesh, request(ShmRef(key, 0, 64, "elsewhere"))))
        with pytest.raises(InvalidArgument, match="short of offset 32 \\+ byte_size 64"):
            asyncio.run(_direct(mesh, request(ShmRef(key, 32, 64, scope))))
        # A direct client of this host may send references itself, and gets the bytes back.
        answer = asyncio.run(_direct(mesh, request(ShmRef(key, 0, 64, scope))))
        assert answer.outputs[0].data.tolist() == data.tolist() and answer.outputs[0].ref is None
    finally:
        path.unlink(missing_ok=True)


def test_a_fleet_with_a_worker_on_another_host_is_served_by_value(
    mesh: MonitoredMesh, regions: Regions
) -> None:
    # Last in the module: it changes the fleet. A worker that maps no client memory stands for
    # a worker on another host; placement gives it the model too, so references would not do.
    mesh.start_worker("elsewhere", "--system-shm", "off")
    mesh.wait_until(lambda: f"model '{MODEL}' version 1 ready" in mesh.log("elsewhere"), 60, "second worker")
    seeds = iter(range(100, 200))

    def by_value() -> bool:
        data = _tensor(next(seeds))
        before = mesh.broker_bytes()
        np.testing.assert_array_equal(regions.infer(data), data)  # right, whichever way it went
        return mesh.broker_bytes() - before >= TENSOR_BYTES

    mesh.wait_until(by_value, 30, "the gateway carries the bytes")
    sent = mesh.shm_sent().get("by_value", 0)
    for _ in range(4):  # whichever worker takes them
        assert by_value()
    assert mesh.shm_sent()["by_value"] == sent + 4
