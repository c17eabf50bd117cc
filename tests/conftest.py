"""Fixtures: a model repository built by the repo's own script, a real nats-server, and a
real `natron serve` (all processes) on free ports. Nothing mocks NATS.

Tests under tests/unit/ start no process and are marked `unit`; those under tests/mesh/ are
marked `mesh`. `pytest -m unit` runs the fast tier alone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.server import EmbeddedNatsServer
from examples.build_models import build
from tests.harness import Served, natron_serve

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = "unit" if Path(str(item.fspath)).parent.name == "unit" else "mesh"
        item.add_marker(getattr(pytest.mark, tier))
