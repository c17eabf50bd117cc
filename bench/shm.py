"""System shared memory, by value against by reference: a client's 4 MiB and 16 MiB FP32 input
and output in registered regions, through a gateway and a worker on one host.

By value, the gateway reads the input out of the client's region, carries it over NATS to the
worker, and writes the output that comes back over NATS into the client's region. By
reference (docs/wire-format.md, "tensors by reference"), the worker maps the regions itself and
only the references cross the broker. The two runs differ in one flag: the worker's
`--system-shm` (`auto` reports this host's scope, so the gateway sends references; `off` makes
it "another host", so the gateway carries the bytes).

For each, one client (tritonclient.http, concurrency 1) sends requests to `identity_fp32` for
`--seconds`; the script reports requests per second, the median latency, and the bytes that
crossed nats-server per request (its /varz `in_bytes` + `out_bytes`, which also count the
heartbeats of the moment: a few hundred bytes a second).

    .venv/bin/python -m bench.shm [--seconds 5]

Prints a table and writes bench/results/shm.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import requests

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from broker.server import ServerOptions, config_text, find_nats_server, free_ports
from examples.build_models import build

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "shm.json"
MODEL = "identity_fp32"
SIZES_MIB = (4, 16)


@contextmanager
def mesh(repository: Path, system_shm: str, logs: Path) -> Iterator[tuple[str, str]]:
    """nats-server (monitored), router, worker and gateway; (HTTP address, /varz URL)."""
    nats_port, monitor_port, http_port = free_ports(3)
    conf = logs / f"nats-{system_shm}.conf"
    # Room for a 16 MiB tensor and its envelope by value (the default max_payload is 16 MiB).
    options = ServerOptions(port=nats_port, monitor_port=monitor_port, max_payload_bytes=64 * 1024 * 1024)
    conf.write_text(config_text(options, logs / f"js-{system_shm}"))
    url = f"nats://127.0.0.1:{nats_port}"
    natron = [sys.executable, "-m", "natron"]
    commands = {
        "nats": [find_nats_server(), "-c", str(conf)],
        "router": [*natron, "router", str(repository), "--nats-url", url],
        "worker": [*natron, "worker", "--nats-url", url, "--worker-id", "w1", "--system-shm", system_shm],
        "gateway": [
            *natron,
            "gateway",
            "--nats-url",
            url,
            "--http-port",
            str(http_port),
            "--http-address",
            "127.0.0.1",
        ],
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, command in commands.items():
            log = (logs / f"{name}-{system_shm}.log").open("wb")
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            if name == "nats":
                time.sleep(0.5)
        deadline = time.monotonic() + 90
        ready = f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/ready"
        while True:
            try:
                if requests.get(ready, timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{MODEL} not ready; logs in {logs}")
            time.sleep(0.2)
        yield f"127.0.0.1:{http_port}", f"http://127.0.0.1:{monitor_port}/varz"
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def broker_bytes(varz: str) -> int:
    stats = requests.get(varz, timeout=5).json()
    return int(stats["in_bytes"]) + int(stats["out_bytes"])


def run_size(address: str, varz: str, size_mib: int, seconds: float) -> dict[str, Any]:
    elements = size_mib * 1024 * 1024 // 4
    data = np.random.default_rng(size_mib).standard_normal((1, elements), dtype=np.float32)
    client = httpclient.InferenceServerClient(address, network_timeout=120)
    tag = uuid.uuid4().hex[:8]
    handles = []
    try:
        for name in ("in", "out"):
            handle = shm.create_shared_memory_region(f"{name}-{tag}", f"/bench-{name}-{tag}", data.nbytes)
            handles.append(handle)
            client.register_system_shared_memory(f"{name}-{tag}", f"/bench-{name}-{tag}", data.nbytes)
        shm.set_shared_memory_region(handles[0], [data])
        tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_shared_memory(f"in-{tag}", data.nbytes)
        output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        output.set_shared_memory(f"out-{tag}", data.nbytes)
        for _ in range(3):  # warm-up: mappings, page faults, the session's first requests
            client.infer(MODEL, [tensor], outputs=[output])
        got = shm.get_contents_as_numpy(handles[1], np.float32, data.shape)
        if not np.array_equal(got, data):
            raise AssertionError("the output differs from the input")
        latencies_s: list[float] = []
        before = broker_bytes(varz)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            client.infer(MODEL, [tensor], outputs=[output])
            latencies_s.append(time.perf_counter() - t0)
        elapsed_s = time.perf_counter() - started
        carried = broker_bytes(varz) - before
        return {
            "size_mib": size_mib,
            "requests": len(latencies_s),
            "req_per_s": len(latencies_s) / elapsed_s,
            "p50_ms": statistics.median(latencies_s) * 1e3,
            "broker_bytes_per_request": carried / len(latencies_s),
        }
    finally:
        for name in ("in", "out"):
            try:
                client.unregister_system_shared_memory(f"{name}-{tag}")
            except Exception:
                pass
        for handle in handles:
            shm.destroy_shared_memory_region(handle)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per size and mode")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="natron-bench-shm-")
    repository, logs = Path(tmp) / "models", Path(tmp)
    build(repository, [MODEL], quiet=True)
    try:
        for mode, system_shm in (("by value", "off"), ("by reference", "auto")):
            with mesh(repository, system_shm, logs) as (address, varz):
                for size_mib in SIZES_MIB:
                    rows.append({"mode": mode, **run_size(address, varz, size_mib, args.seconds)})
    except BaseException:
        print(f"failed; the processes' logs are in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp)
    print(f"{'mode':<14}{'MiB':>5}{'req/s':>9}{'p50 ms':>9}{'NATS bytes/req':>17}")
    for row in rows:
        print(
            f"{row['mode']:<14}{row['size_mib']:>5}{row['req_per_s']:>9.1f}{row['p50_ms']:>9.2f}"
            f"{row['broker_bytes_per_request']:>17,.0f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    taken = {"taken_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(), "rows": rows}
    RESULTS.write_text(json.dumps(taken, indent=2))


if __name__ == "__main__":
    main()
