"""Fixtures: a model repository built by the repo's own script, a real nats-server, and a
real `natron serve` (all processes) on free ports. Nothing mocks NATS."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from broker.server import EmbeddedNatsServer, free_port
from examples.build_models import build

# Every model of examples/build_models.py but the 68 MB MLP, which only the benchmark needs.
TEST_MODELS = [
    "tiny",
    "simple",
    "autocomplete",
    "versioned",
    "no_batch",
    "broken",
    "ensemble_simple",
    "ensemble_parallel",
    "ensemble_nested",
    "ensemble_missing",
    "ensemble_failing",
    *(
        f"identity_{t}"
        for t in (
            "bool",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "fp16",
            "fp32",
            "fp64",
            "bf16",
            "bytes",
        )
    ),
]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    build(repo, TEST_MODELS)
    return repo


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:port
    host_port: str  # 127.0.0.1:port, as tritonclient wants it
    nats_url: str
    metrics_url: str
    output: Path
    repository: Path


def _wait_ready(url: str, models: list[str], process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(models)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"natron serve exited with {process.returncode}")
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                pending = [
                    m
                    for m in pending
                    if requests.get(f"{url}/v2/models/{m}/ready", timeout=1).status_code != 200
                ]
                if not pending:
                    return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"natron serve not ready within {timeout_s} s; waiting for {pending}")


@contextlib.contextmanager
def natron_serve(
    repository: Path, ready: list[str], log_dir: Path, extra_args: tuple[str, ...] = (), timeout_s: float = 90
) -> Iterator[Served]:
    """`natron serve` as users run it (embedded NATS, router, gateway, worker, orchestrator) on
    free ports, until `ready` models answer ready; stopped with Ctrl-C (SIGINT) afterwards."""
    http_port, metrics_port, nats_port = free_port(), free_port(), free_port()
    output = log_dir / "serve.log"
    with output.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "natron", "serve", str(repository),
                "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                "--nats-port", str(nats_port), "--http-address", "127.0.0.1", *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        url = f"http://127.0.0.1:{http_port}"
        try:
            _wait_ready(url, ready, process, timeout_s)
            yield Served(
                url,
                f"127.0.0.1:{http_port}",
                f"nats://127.0.0.1:{nats_port}",
                f"http://127.0.0.1:{metrics_port}/metrics",
                output,
                repository,
            )
        except BaseException:
            print(output.read_text(errors="replace")[-8000:])
            raise
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def served(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`natron serve` of the ONNX and ensemble test models."""
    ready = ["tiny", "simple", "identity_fp32"]
    with natron_serve(
        model_repository, ready, tmp_path_factory.mktemp("serve"), ("--max-payload-mb", "8")
    ) as s:
        yield s


@pytest.fixture(scope="session")
async def nats_server() -> AsyncIterator[EmbeddedNatsServer]:
    """A bare nats-server with JetStream, for tests of the broker layer."""
    async with EmbeddedNatsServer() as server:
        yield server
