"""`natron perf` against a real `natron serve`: every protocol drives `simple` (OUTPUT0 = a + b,
OUTPUT1 = a - b) with its answers checked, a wrong answer counts as an error, the CLI writes
perf_analyzer's CSV, request-rate mode holds its rate, an unknown model exits 1 naming it, and a
server killed mid-sweep ends the sweep with ServerGone carrying the points measured before."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from broker.auth import seed_path
from natron.perf.api import (
    CSV_COLUMNS,
    LoadGenerator,
    Measurement,
    PerfError,
    ServerGone,
    Target,
    sweep,
)
from tests.harness import ROOT, Served, child_processes, natron_serve, wait_until

# The shared server of the backend models, for the decoupled `repeat` (tests/backend_fixtures.py).
pytest_plugins = ["tests.backend_fixtures"]
pytestmark = pytest.mark.timeout(120)

WINDOW_S = 0.4
WARMUP_S = 0.1
PROTOCOLS = ["http", "http-json", "grpc", "ws", "ws-json", "nats"]


def target_for(served: Served, protocol: str, model: str = "simple", **changes: object) -> Target:
    """The served mesh over `protocol`; nats with the client role's credentials and the
    statistics over HTTP."""
    kind, _, json_mode = protocol.partition("-")
    url = {"http": served.url, "ws": served.url, "grpc": served.grpc_url, "nats": served.nats_url}[kind]
    extra: dict[str, object] = {}
    if kind == "nats":
        assert served.creds_dir is not None
        extra = {"nats_creds": seed_path(served.creds_dir, "client"), "stats_url": served.url}
    return Target(url, kind, model, binary=not json_mode, timeout_s=20.0, **{**extra, **changes})  # type: ignore[arg-type]


def simple_is_right(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> str | None:
    a, b = inputs["INPUT0"], inputs["INPUT1"]
    if not np.array_equal(outputs["OUTPUT0"], a + b):
        return "OUTPUT0 is not INPUT0 + INPUT1"
    if not np.array_equal(outputs["OUTPUT1"], a - b):
        return "OUTPUT1 is not INPUT0 - INPUT1"
    return None


def simple_multiplies(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> str | None:
    """A check `simple` must fail: it adds, it does not multiply."""
    if not np.array_equal(outputs["OUTPUT0"], inputs["INPUT0"] * inputs["INPUT1"]):
        return "OUTPUT0 is not INPUT0 * INPUT1"
    return None


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_each_protocol_measures_simple_with_every_answer_checked(served: Served, protocol: str) -> None:
    target = target_for(served, protocol, batch_size=2)
    async with LoadGenerator(target, check=simple_is_right, percentiles=[75]) as gen:
        assert gen.info.version == "1" and gen.info.max_batch_size == 8
        m = await gen.measure(concurrency=2, window_s=WINDOW_S, warmup_s=WARMUP_S)
        # The connections persist: a second point on the same generator works as well.
        again = await gen.measure(concurrency=1, window_s=WINDOW_S, warmup_s=0)
    for point in (m, again):
        assert point.errors == 0, point.error_samples
        assert point.requests > 0
        assert point.throughput_per_s == pytest.approx(point.requests * 2 / point.duration_s)
    assert m.mode == "concurrency" and m.load == 2
    assert 0 < m.latency_us["p50"] <= m.latency_us["p75"] <= m.latency_us["p99"]
    # http and ws read the statistics from their own endpoint, nats from --stats-url, gRPC over gRPC.
    assert m.server["success"] > 0, m.server
    assert m.server["compute_infer_us"] > 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_wrong_answer_counts_as_an_error(served: Served, protocol: str) -> None:
    async with LoadGenerator(target_for(served, protocol), check=simple_multiplies) as gen:
        m = await gen.measure(concurrency=1, window_s=WINDOW_S, warmup_s=WARMUP_S)
    assert m.requests == 0
    assert m.errors > 0
    assert m.error_samples == {"wrong answer: OUTPUT0 is not INPUT0 * INPUT1": m.errors}


@pytest.mark.parametrize("protocol", ["http", "grpc", "nats"])
async def test_a_version_that_does_not_exist_is_a_perf_error_naming_it(served: Served, protocol: str) -> None:
    with pytest.raises(PerfError, match="model 'simple' version 7"):
        async with LoadGenerator(target_for(served, protocol, version="7")):
            pass


@pytest.mark.parametrize("protocol", ["http", "grpc", "ws", "nats"])
async def test_a_model_that_does_not_exist_is_a_perf_error_naming_it(served: Served, protocol: str) -> None:
    with pytest.raises(PerfError, match=r"model 'no_such_model'.*not found"):
        async with LoadGenerator(target_for(served, protocol, model="no_such_model")):
            pass


@pytest.mark.parametrize("distribution", ["constant", "poisson"])
async def test_request_rate_mode_holds_the_rate_roughly(served: Served, distribution: str) -> None:
    rate = 100.0
    async with LoadGenerator(target_for(served, "http"), check=simple_is_right) as gen:
        m = await gen.measure(request_rate=rate, window_s=1.0, warmup_s=WARMUP_S, distribution=distribution)
    assert m.mode == "request_rate" and m.load == rate
    assert m.errors == 0, m.error_samples
    # Generous: a loaded 2-core machine shifts a few sends, never the rate itself.
    assert 0.6 * rate <= m.achieved_rate_per_s <= 1.4 * rate
    assert 0.5 * rate <= m.throughput_per_s <= 1.5 * rate
    assert 0 <= m.delayed <= m.sent


def perf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natron", "perf", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_a_concurrency_range_writes_perf_analyzers_csv(served: Served, tmp_path: Path) -> None:
    report = tmp_path / "perf.csv"
    # A loose stability rule: each point takes at least three windows that agree within 50%.
    done = perf("-m", "simple", "-u", served.host_port, "--concurrency-range", "1:3:2", "-p", "300",
                "--percentile", "90", "-s", "50", "-f", str(report))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "natron perf: simple over http" in done.stdout
    with report.open() as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    assert list(header) == ["Concurrency", *CSV_COLUMNS]
    assert [row["Concurrency"] for row in rows] == ["1", "3"]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0
        assert int(row["p50 latency"]) <= int(row["p99 latency"])
        assert row["Server Compute Infer"] != ""  # over HTTP the statistics are there


async def test_windows_follow_one_another_until_three_agree(served: Served) -> None:
    """perf_analyzer's trials: the measurement is the last three windows, together."""
    async with LoadGenerator(target_for(served, "http"), check=simple_is_right) as gen:
        m = await gen.measure(concurrency=1, window_s=0.3, warmup_s=WARMUP_S, stability=0.5, max_trials=10)
        once = await gen.measure(concurrency=1, window_s=0.3, warmup_s=0, stability=0.5, max_trials=2)
    assert m.stable is True and 3 <= m.trials <= 10
    assert m.duration_s == pytest.approx(0.9, rel=0.2)
    assert m.throughput_per_s == pytest.approx(m.requests / m.duration_s)
    assert m.server["success"] >= m.requests > 0  # the statistics span the three windows too
    # Fewer trials than the rule needs: one window, unchecked.
    assert once.stable is None and once.trials == 1 and once.duration_s == pytest.approx(0.3, rel=0.2)


def test_a_point_that_never_becomes_stable_ends_the_sweep_and_exits_1(served: Served, tmp_path: Path) -> None:
    """No three windows agree within 0.001%: the first point is reported, marked, and the sweep
    stops there, as perf_analyzer stops."""
    report = tmp_path / "perf.csv"
    done = perf("-m", "simple", "-u", served.host_port, "--concurrency-range", "1:2", "-p", "200",
                "-s", "0.001", "-r", "3", "-f", str(report))  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed to obtain stable measurement within 3 measurement windows for concurrency 1" in done.stdout
    assert "3, unstable" in done.stdout
    with report.open() as f:
        assert [row["Concurrency"] for row in csv.DictReader(f)] == ["1"]


async def test_grpc_streaming_sends_every_request_on_one_stream_with_answers_checked(served: Served) -> None:
    async with LoadGenerator(target_for(served, "grpc", streaming=True), check=simple_is_right) as gen:
        m = await gen.measure(concurrency=4, window_s=WINDOW_S, warmup_s=WARMUP_S)
    assert m.errors == 0, m.error_samples
    assert m.requests > 0 and m.server["success"] > 0


async def test_a_decoupled_model_is_measured_over_a_grpc_stream_to_its_final_flag(
    backend_served: Served,
) -> None:
    """`repeat` answers once per element of IN and then sends its final flag alone: a request
    is done at the flag, its outputs are its last answer's. Unary gRPC cannot carry it at all."""

    def last_of_three(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> str | None:
        if outputs["IDX"].tolist() != [2] or outputs["OUT"].tolist() != inputs["IN"][2:].tolist():
            return f"the last answer is {outputs['OUT'].tolist()} at {outputs['IDX'].tolist()}"
        return None

    target = Target(backend_served.grpc_url, "grpc", "repeat", shapes={"IN": (3,)}, timeout_s=20.0)
    async with LoadGenerator(replace(target, streaming=True), check=last_of_three) as gen:
        m = await gen.measure(concurrency=2, window_s=WINDOW_S, warmup_s=WARMUP_S)
    assert m.errors == 0, m.error_samples
    assert m.requests > 0
    async with LoadGenerator(target) as gen:
        unary = await gen.measure(concurrency=1, window_s=WINDOW_S, warmup_s=0)
    assert unary.requests == 0 and unary.errors > 0
    assert any("is decoupled" in text for text in unary.error_samples), unary.error_samples


def test_the_cli_exits_1_naming_a_model_that_does_not_exist(served: Served) -> None:
    done = perf("-m", "no_such_model", "-u", served.host_port, "-p", "200")
    assert done.returncode == 1
    assert done.stderr.startswith("natron perf: error: model 'no_such_model' not found")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


# -- a server that dies mid-sweep ---------------------------------------------------------------


@pytest.fixture
def doomed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A `natron serve` of `tiny` alone, for a test to kill."""
    from examples.build_models import build

    repository = tmp_path_factory.mktemp("doomed-models")
    build(repository, ["tiny"])
    with natron_serve(repository, ["tiny"], tmp_path_factory.mktemp("doomed")) as served:
        yield served


def kill_tree(pid: int) -> None:
    """SIGKILL `natron serve` and everything it started: no graceful stop, no restart."""
    doomed = [pid]
    index = 0
    while index < len(doomed):
        doomed.extend(child for child, _ in child_processes(doomed[index]))
        index += 1
    for process in doomed:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def refused(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("protocol", ["http", "grpc-streaming"])
async def test_a_server_killed_mid_sweep_raises_server_gone_with_the_points_so_far(
    doomed: Served, protocol: str
) -> None:
    seen: list[Measurement] = []

    def kill_after_first(m: Measurement) -> None:
        seen.append(m)
        if len(seen) == 1:
            kill_tree(doomed.pid)
            wait_until(lambda: refused(doomed.host_port), 20, "the killed gateway's port refusing")

    if protocol == "http":
        target, gone = Target(doomed.url, "http", "tiny", timeout_s=5.0), "connection failed"
    else:  # the stream breaks under the requests on it, and a new one cannot be opened
        target, gone = Target(doomed.grpc_url, "grpc", "tiny", timeout_s=5.0, streaming=True), "UNAVAILABLE"

    async with LoadGenerator(target) as gen:
        with pytest.raises(ServerGone) as caught:
            await sweep(
                gen,
                [("concurrency", 1), ("concurrency", 2), ("concurrency", 3)],
                window_s=WINDOW_S,
                warmup_s=WARMUP_S,
                on_point=kill_after_first,
            )
    assert caught.value.measured == seen
    assert len(seen) == 1 and seen[0].requests > 0 and seen[0].errors == 0
    assert f"the server stopped answering: {gone}" in str(caught.value)
