"""`natron serve` supervises its nats-server like its other children: a killed broker is
started again on the same port and the mesh serves on without a process restart; a port where
a broker it did not start already answers is refused; and nothing outlives a killed serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from broker.server import free_ports
from examples.build_models import build
from tests.harness import ROOT, Mesh, child_processes, natron_serve, wait_until

pytestmark = pytest.mark.mesh


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("serve-broker")
    build(repo, ["tiny"], quiet=True)
    return repo


def nats_server_of(parent: int) -> int | None:
    found = [pid for pid, cmd in child_processes(parent) if "nats-server" in cmd]
    return found[0] if found else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def infer(url: str, value: float) -> requests.Response:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [value] * 16}]}
    return requests.post(f"{url}/v2/models/tiny/infer", json=body, timeout=10)


def test_a_killed_embedded_broker_is_started_again_and_the_mesh_serves_on(
    repository: Path, tmp_path: Path
) -> None:
    with natron_serve(repository, ["tiny"], tmp_path) as served:
        parent = served.pid
        services = [pid for pid, cmd in child_processes(parent) if " natron " in cmd]
        broker = nats_server_of(parent)
        assert broker is not None
        os.kill(broker, signal.SIGKILL)
        wait_until(lambda: "starting it again" in served.output.read_text(), 20, "serve noticing")
        wait_until(lambda: nats_server_of(parent) not in (None, broker), 20, "a new nats-server")
        wait_until(lambda: infer(served.url, 2.0).status_code == 200, 30, "serving again")
        assert infer(served.url, 2.0).json()["outputs"][0]["data"] == [5.0] * 16
        # The same services: none restarted, none loaded anything again.
        assert [pid for pid, cmd in child_processes(parent) if " natron " in cmd] == services
        text = served.output.read_text()
        assert "exited with code -9" in text
        assert text.count("model 'tiny' version 1 ready") == 1


def test_serve_refuses_a_port_where_a_broker_it_did_not_start_answers(repository: Path) -> None:
    mesh = Mesh(repository)
    mesh.start_nats()
    try:
        http_port, grpc_port, metrics_port = free_ports(3)
        result = subprocess.run(
            [
                sys.executable, "-m", "natron", "serve", str(repository),
                "--nats-port", str(mesh.nats_port), "--http-port", str(http_port),
                "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        output = result.stdout + result.stderr
        assert f"already answers on port {mesh.nats_port}" in output, output[-3000:]
        assert "--nats-url" in output
        assert "Traceback" not in output
    finally:
        mesh.stop()


def test_a_killed_serve_leaves_no_broker_behind(repository: Path, tmp_path: Path) -> None:
    http_port, grpc_port, metrics_port, nats_port = free_ports(4)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "natron", "serve", str(repository), "--nats-port", str(nats_port),
            "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
        ],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        broker = wait_until(lambda: nats_server_of(process.pid), 30, "the embedded nats-server")
        wait_until(
            lambda: requests.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1).ok, 60, "ready"
        )
        process.kill()
        process.wait()
        wait_until(lambda: not alive(broker), 10, "the nats-server gone with its parent")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
