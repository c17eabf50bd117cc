"""`natron serve` as a supervisor: a crashed worker comes back, Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from broker.server import free_ports
from examples.build_models import build
from tests.harness import wait_until


def children_of(pid: int) -> dict[int, str]:
    """Processes whose command line names `--parent-pid pid` (natron serve's children)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if "--parent-pid" in args and args[args.index("--parent-pid") + 1] == str(pid):
            found[int(entry.name)] = " ".join(args)
    return found


def wait_ready(url: str, timeout_s: float = 60) -> None:
    wait_until(
        lambda: requests.get(f"{url}/v2/models/tiny/ready", timeout=1).status_code == 200,
        timeout_s,
        "tiny ready",
    )


def test_a_crashed_worker_is_restarted_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    build(tmp_path / "repo", ["tiny"])
    port, metrics_port, nats_port = free_ports(3)
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "natron", "serve", str(tmp_path / "repo"), "--http-port", str(port),
         "--metrics-port", str(metrics_port), "--nats-port", str(nats_port), "--http-address", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        children = children_of(serve.pid)
        assert sorted(cmd.split(" natron ")[1].split()[0] for cmd in children.values()) == [
            "ensemble",
            "gateway",
            "router",
            "worker",
        ]
        worker = next(pid for pid, cmd in children.items() if " natron worker " in cmd)
        os.kill(worker, signal.SIGKILL)

        def replacement() -> int | None:
            workers = [pid for pid, cmd in children_of(serve.pid).items() if " natron worker " in cmd]
            return next((pid for pid in workers if pid != worker), None)

        wait_until(replacement, 30, "the supervisor restarting the worker")
        wait_ready(url)
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
        # The replacement worker serves (the first answers may wait for the old worker's
        # requests to be redelivered; none is lost).
        response = requests.post(f"{url}/v2/models/tiny/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert "restarting" in (tmp_path / "serve.log").read_text()
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        assert children_of(serve.pid) == {}
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        for pid in children_of(serve.pid):
            os.kill(pid, signal.SIGKILL)
