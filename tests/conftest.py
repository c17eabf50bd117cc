"""Fixtures: a model repository built by the repo's own script, a real nats-server, and a
real `natron serve` (all processes) on free ports. Nothing mocks NATS.

Tests under tests/unit/ start no process and are marked `unit`; those under tests/mesh/ are
marked `mesh`. `pytest -m unit` runs the fast tier alone.

Hypothesis runs the `fast` profile unless NATRON_HYPOTHESIS_PROFILE names another: `thorough`
tries ten times as many examples per property, for a nightly run or after touching a codec."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from broker.server import EmbeddedNatsServer
from tests.harness import Served, natron_serve

# No deadline: a loaded 2-core machine makes per-example timings noise, not signal. The fast
# profile's 100 examples per property (Hypothesis's own default) keep the unit tier within
# seconds; failures found once are replayed first from Hypothesis's example database anyway.
_UNTIMED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fast", _UNTIMED, max_examples=100)
settings.register_profile("thorough", _UNTIMED, max_examples=1000)
settings.load_profile(os.environ.get("NATRON_HYPOTHESIS_PROFILE", "fast"))

# Every natron process a test starts serves gRPC on a free port unless the test names one:
# processes of concurrent tests would otherwise all ask for Triton's 8001.
os.environ.setdefault("NATRON_GRPC_PORT", "0")

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
    # Imported here: onnx is needed to build models, not to collect the unit tier.
    from examples.build_models import build

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


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # `-m unit`: the mesh modules would be imported (torch, the Triton clients, the backend
    # fixtures) only for every test in them to be deselected, which once cost the unit tier
    # more than its tests. Their marker is `mesh` by location, so nothing there can match.
    if config.getoption("markexpr") == "unit" and collection_path == ROOT / "tests" / "mesh":
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = "unit" if Path(str(item.fspath)).parent.name == "unit" else "mesh"
        item.add_marker(getattr(pytest.mark, tier))
