"""Several gateway processes on one HTTP port (`--http-workers`): the kernel spreads the
connections over them, a scrape counts every process's requests, and one that dies is restarted
while the others keep serving.

Which process served is read from outside, as an operator would: the sockets each gateway
process holds (/proc/PID/fd) matched against the kernel's TCP table (/proc/net/tcp)."""

from __future__ import annotations

import http.client
import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from broker.server import free_ports
from examples.build_models import build
from tests.harness import Mesh, Served, natron_serve, wait_until
from tests.mesh.test_serve import children_of

CONNECTIONS = 16
REQUESTS_PER_CONNECTION = 4
TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def tcp_inodes(local_port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets in `state` whose local port is `local_port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == local_port and fields[3] == state:
                    inodes.add(int(fields[9]))
    return inodes


def gateways_of(pid: int) -> list[int]:
    return sorted(p for p, cmd in children_of(pid).items() if " natron gateway " in cmd)


def connections_per_process(pids: list[int], port: int) -> dict[int, int]:
    accepted = tcp_inodes(port, TCP_ESTABLISHED)
    return {pid: len(socket_inodes(pid) & accepted) for pid in pids}


def listening_on(pids: list[int], port: int) -> list[int]:
    listeners = tcp_inodes(port, TCP_LISTEN)
    return [pid for pid in pids if socket_inodes(pid) & listeners]


def all_listening(parent: int, port: int, count: int) -> list[int]:
    """The gateway processes of `parent` once `count` of them listen on `port`, else []."""
    gateways = gateways_of(parent)
    return gateways if len(gateways) == count and len(listening_on(gateways, port)) == count else []


def serve_pid(http_port: int) -> int:
    """The `natron serve` process listening for `http_port` (started by the harness)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (
            "serve" in args
            and "--http-port" in args
            and args[args.index("--http-port") + 1] == str(http_port)
        ):
            return int(entry.name)
    raise AssertionError(f"no natron serve with --http-port {http_port}")


def infer_on(connection: http.client.HTTPConnection, value: float) -> list[float]:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [value] * 16}]}
    connection.request(
        "POST", "/v2/models/tiny/infer", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    text = response.read()
    assert response.status == 200, text
    data: list[float] = json.loads(text)["outputs"][0]["data"]
    return data


def requests_counted(metrics_url: str) -> float:
    """natron_gateway_requests for tiny answered 200, as one scrape of the metrics port sees it."""
    text = requests.get(metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "natron_gateway_requests":
            return sum(
                s.value
                for s in family.samples
                if s.name.endswith("_total")
                and s.labels.get("model") == "tiny"
                and s.labels["status"] == "200"
            )
    return 0.0


def fresh_connections_all_answered(url: str, count: int) -> None:
    """`count` requests, each on a connection of its own, answered correctly."""
    for index in range(count):
        body: dict[str, Any] = {
            "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [index] * 16}]
        }
        response = requests.post(f"{url}/v2/models/tiny/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [2.0 * index + 1] * 16


def concurrent_requests_over_separate_connections(host: str, port: int, pids: list[int]) -> dict[int, int]:
    """CONNECTIONS clients at once, each with REQUESTS_PER_CONNECTION requests on its own kept-alive
    connection, all answered 2x+1; and how many of those connections each gateway process holds."""
    connections = [http.client.HTTPConnection(host, port, timeout=30) for _ in range(CONNECTIONS)]
    try:

        def client(index: int) -> None:
            for n in range(REQUESTS_PER_CONNECTION):
                value = float(index * REQUESTS_PER_CONNECTION + n)
                assert infer_on(connections[index], value) == [2 * value + 1] * 16

        with ThreadPoolExecutor(CONNECTIONS) as pool:
            list(pool.map(client, range(CONNECTIONS)))
        # Every connection is still open: each sits in the process that accepted it.
        return connections_per_process(pids, port)
    finally:
        for connection in connections:
            connection.close()


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, int]]:
    repository = tmp_path_factory.mktemp("repo")
    build(repository, ["tiny"])
    log_dir = tmp_path_factory.mktemp("serve")
    with natron_serve(repository, ["tiny"], log_dir, ("--http-workers", "2")) as served:
        pid = serve_pid(int(served.url.rsplit(":", 1)[1]))
        yield served, pid
    # The harness stopped it with Ctrl-C and waited: no gateway is left behind.
    assert children_of(pid) == {}
    assert "did not stop" not in served.output.read_text()


def test_two_gateway_processes_share_the_port_and_a_scrape_counts_both(
    two_gateways: tuple[Served, int],
) -> None:
    served, pid = two_gateways
    port = int(served.url.rsplit(":", 1)[1])
    metrics_port = int(served.metrics_url.split(":")[2].split("/")[0])
    # Serving begins with the first process listening; the second may still be connecting.
    gateways = wait_until(lambda: all_listening(pid, port, 2), 30, "both gateway processes listening")
    # One process serves the metrics port, for both.
    assert len(wait_until(lambda: listening_on(gateways, metrics_port), 30, "the metrics port")) == 1
    before = requests_counted(served.metrics_url)

    held = concurrent_requests_over_separate_connections("127.0.0.1", port, gateways)

    assert sum(held.values()) == CONNECTIONS
    # 16 connections hashed over two listeners all landing on one: a chance of 2 in 65536.
    assert all(count > 0 for count in held.values()), held
    assert requests_counted(served.metrics_url) - before == CONNECTIONS * REQUESTS_PER_CONNECTION


def test_a_killed_gateway_process_leaves_the_other_serving_and_is_restarted(
    two_gateways: tuple[Served, int],
) -> None:
    served, pid = two_gateways
    port = int(served.url.rsplit(":", 1)[1])
    metrics_port = int(served.metrics_url.split(":")[2].split("/")[0])
    gateways = wait_until(lambda: all_listening(pid, port, 2), 30, "both gateway processes listening")
    wait_until(lambda: listening_on(gateways, metrics_port), 30, "the metrics port")
    before = requests_counted(served.metrics_url)
    fresh_connections_all_answered(served.url, 8)
    # The harder case: the process that also serves the metrics port.
    (victim,) = listening_on(gateways, metrics_port)
    (survivor,) = [p for p in gateways if p != victim]
    listener = socket_inodes(victim) & tcp_inodes(port, TCP_LISTEN)
    os.kill(victim, signal.SIGKILL)
    # Closed with the last of its threads, which may outlive the process's zombie state.
    wait_until(lambda: not listener & tcp_inodes(port, TCP_LISTEN), 10, "the killed gateway's socket closed")

    # The kernel hands new connections only to the listener left; none is refused.
    fresh_connections_all_answered(served.url, 12)

    gateways = wait_until(lambda: all_listening(pid, port, 2), 30, "the supervisor restarting the gateway")
    assert victim not in gateways
    assert survivor in gateways
    wait_until(lambda: listening_on(gateways, metrics_port), 30, "the metrics port back")
    held = concurrent_requests_over_separate_connections("127.0.0.1", port, gateways)
    assert all(count > 0 for count in held.values()), held
    # The requests the killed process answered still count: its file outlived it.
    total = 8 + 12 + CONNECTIONS * REQUESTS_PER_CONNECTION
    assert requests_counted(served.metrics_url) - before == total
    assert "restarting" in served.output.read_text()


def test_a_standalone_gateway_runs_its_processes_and_stops_them_within_its_budget(tmp_path: Path) -> None:
    build(tmp_path / "repo", ["tiny"])
    mesh = Mesh(tmp_path / "repo")
    try:
        mesh.start_nats()
        mesh.start_router()
        mesh.start_worker("w1")
        (metrics_port,) = free_ports(1)
        group = mesh.natron(
            "gateway", "gateway", "--nats-url", mesh.nats_url, "--http-port", str(mesh.http_port),
            "--http-address", "127.0.0.1", "--metrics-port", str(metrics_port), "--http-workers", "2",
            "--shutdown-timeout-s", "10",
        )  # fmt: skip
        mesh.wait_ready("tiny")
        gateways = mesh.wait_until(
            lambda: all_listening(group.pid, mesh.http_port, 2), 30, "two gateway processes listening"
        )
        mesh.wait_until(lambda: listening_on(gateways, metrics_port), 30, "the metrics port")
        held = concurrent_requests_over_separate_connections("127.0.0.1", mesh.http_port, gateways)
        assert all(count > 0 for count in held.values()), held
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert requests_counted(metrics_url) == CONNECTIONS * REQUESTS_PER_CONNECTION
        group.send_signal(signal.SIGTERM)
        # Its budget (10 s) holds the whole group's stop.
        assert group.wait(timeout=10) == 0
        assert children_of(group.pid) == {}
        assert not any(Path(f"/proc/{g}").exists() for g in gateways)
    except BaseException:
        print(mesh.log("gateway")[-6000:])
        raise
    finally:
        mesh.stop()
