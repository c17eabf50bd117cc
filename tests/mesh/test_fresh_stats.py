"""Statistics are fresh: a request whose answer the client has is counted by the very next
statistics request and scrape, with counts equal to the client's, for workers and the ensemble
orchestrator alike; a worker that does not answer the statistics query costs a bounded wait,
its last heartbeat standing in for it, and never makes a count go backwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
import pytest
import requests
import tritonclient.http as httpclient
from aiohttp import web

from broker.server import free_ports
from broker.subjects import Subjects
from gateway.app import create_app
from gateway.keys import GatewayOptions
from gateway.stats import create_metrics_app
from natron.prometheus import MetricsConfig
from natron.records import WorkerReport
from natron.stats import StatsQuery, read_stats_answer
from tests.harness import Mesh, Served, wait_until
from tests.mesh.test_metrics import scrape, simple_inputs

pytest_plugins = ["tests.backend_fixtures"]

KEY = 'model="simple",version="1"'


def successes(url: str, model: str = "simple") -> int:
    body = requests.get(f"{url}/v2/models/{model}/versions/1/stats", timeout=30).json()
    count: int = body["model_stats"][0]["inference_stats"]["success"]["count"]
    return count


def inferences(url: str, model: str = "simple") -> int:
    body = requests.get(f"{url}/v2/models/{model}/stats", timeout=30).json()
    count: int = body["model_stats"][0]["inference_count"]
    return count


def test_each_answered_request_is_counted_by_the_next_statistics_request(served: Served) -> None:
    client = httpclient.InferenceServerClient(served.host_port)
    before, rows_before = successes(served.url), inferences(served.url)
    before_metrics = scrape(served)
    for n in range(1, 21):
        client.infer("simple", simple_inputs(2))
        assert successes(served.url) - before == n
        assert inferences(served.url) - rows_before == 2 * n
    metrics = scrape(served)
    assert (
        metrics[f"nv_inference_request_success{{{KEY}}}"]
        - before_metrics[f"nv_inference_request_success{{{KEY}}}"]
        == 20
    )
    assert metrics[f"nv_inference_count{{{KEY}}}"] - before_metrics[f"nv_inference_count{{{KEY}}}"] == 40


def test_concurrent_clients_never_find_an_answered_request_uncounted(served: Served) -> None:
    clients, each = 6, 15
    before = successes(served.url)
    answered = 0
    lock = threading.Lock()

    def client_loop() -> list[tuple[int, int]]:
        nonlocal answered
        client = httpclient.InferenceServerClient(served.host_port)
        seen = []
        for _ in range(each):
            client.infer("simple", simple_inputs(1))
            with lock:
                answered += 1
                floor = answered
            seen.append((floor, successes(served.url) - before))
        return seen

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(lambda _: client_loop(), range(clients)) for r in rs]
    assert all(counted >= floor for floor, counted in results), results
    assert successes(served.url) - before == clients * each


def test_an_ensemble_and_its_steps_are_counted_at_once(served: Served) -> None:
    client = httpclient.InferenceServerClient(served.host_port)
    ensemble_before, simple_before = successes(served.url, "ensemble_simple"), successes(served.url)
    client.infer("ensemble_simple", simple_inputs(1))
    assert successes(served.url, "ensemble_simple") - ensemble_before == 1
    assert successes(served.url) - simple_before == 2  # the orchestrator's two steps


def test_every_ready_version_has_its_failure_counters_from_the_start(served: Served) -> None:
    metrics = scrape(served)
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        assert (
            f'nv_inference_request_failure{{model="identity_fp32",version="1",reason="{reason}"}}' in metrics
        )
    assert 0 <= metrics["nv_cpu_utilization"] <= 1
    assert 0 < metrics["nv_cpu_memory_used_bytes"] < metrics["nv_cpu_memory_total_bytes"]


# -- latency summaries, from a second gateway on the same fleet ----------------------------------


@contextlib.asynccontextmanager
async def metrics_gateway(served: Served) -> AsyncIterator[str]:
    """The metrics endpoint of a gateway started here on `served`'s fleet, with Triton's
    summaries (quantiles 0.5 and 0.99) and histograms on."""
    main = create_app(GatewayOptions(nats_url=served.nats_url, nats_auth=served.auth("gateway")))
    main_runner = web.AppRunner(main)
    await main_runner.setup()
    config = MetricsConfig(
        summary_latencies=True, histogram_latencies=True, summary_quantiles=((0.5, 0.05), (0.99, 0.001))
    )
    runner = web.AppRunner(create_metrics_app(main, config))
    try:
        await runner.setup()
        (port,) = free_ports(1)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()
        await main_runner.cleanup()


@pytest.fixture
async def summary_metrics_url(served: Served) -> AsyncIterator[str]:
    async with metrics_gateway(served) as url:
        yield url


def _values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _get(url: str) -> str:
    return requests.get(url, timeout=30).text


async def test_summaries_give_quantiles_of_the_window_and_cumulative_counts(
    served: Served, summary_metrics_url: str
) -> None:
    def infer_many() -> None:
        client = httpclient.InferenceServerClient(served.host_port)
        for _ in range(30):
            client.infer("simple", simple_inputs(1))

    # The first scrape asks the workers to keep latency sketches: the window starts there.
    await asyncio.to_thread(_get, summary_metrics_url)
    await asyncio.to_thread(infer_many)
    text = await asyncio.to_thread(_get, summary_metrics_url)
    values = _values(text)
    assert "# TYPE nv_inference_request_summary_us summary" in text
    assert "# TYPE nv_inference_first_response_histogram_ms histogram" in text
    for family in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        median = values[f'nv_inference_{family}_summary_us{{{KEY},quantile="0.5"}}']
        tail = values[f'nv_inference_{family}_summary_us{{{KEY},quantile="0.99"}}']
        assert 0 <= median <= tail, family  # NaN (an empty window) fails both
    success = values[f"nv_inference_request_success{{{KEY}}}"]
    assert values[f"nv_inference_request_summary_us_count{{{KEY}}}"] == success
    assert (
        values[f"nv_inference_queue_summary_us_sum{{{KEY}}}"]
        == values[f"nv_inference_queue_duration_us{{{KEY}}}"]
    )
    # Triton keeps the first-response histogram for decoupled models alone.
    assert not any(
        name.startswith("nv_inference_first_response_histogram_ms") and "simple" in name for name in values
    )


# -- a worker that does not answer -----------------------------------------------------------


@pytest.fixture
def mesh(model_repository: Path) -> Iterator[Mesh]:
    mesh = Mesh(model_repository)
    mesh.start_nats()
    mesh.start_router()
    mesh.start_gateway()
    mesh.start_worker("w1")
    try:
        mesh.wait_ready("simple")
        yield mesh
    finally:
        mesh.stop()


async def _reported(mesh: Mesh, worker: str) -> dict[str, Any]:
    nc = await nats.connect(mesh.nats_url, **mesh.nats_options("admin"))
    try:
        kv = await nc.jetstream().key_value(Subjects().workers_bucket)
        stats: dict[str, Any] = WorkerReport.from_json((await kv.get(worker)).value).stats
        return stats
    finally:
        await nc.close()


def test_a_worker_that_does_not_answer_leaves_its_heartbeat_counts_and_no_hang(mesh: Mesh) -> None:
    client = httpclient.InferenceServerClient(mesh.url.removeprefix("http://"))
    for _ in range(3):
        client.infer("simple", simple_inputs(1))
    mesh.wait_until(
        lambda: asyncio.run(_reported(mesh, "w1"))["simple/1"]["success"]["count"] == 3,
        15,
        "the heartbeat carrying the three requests",
    )
    for _ in range(2):
        client.infer("simple", simple_inputs(1))
    assert successes(mesh.url) == 5  # the answer: newer than the heartbeat
    pid = mesh.processes["w1"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        # The stopped worker's last answer stands in for it: nothing goes backwards.
        assert successes(mesh.url) == 5
        body = requests.get(f"{mesh.url}/v2/models/stats", timeout=30).json()
        assert "simple" in {entry["name"] for entry in body["model_stats"]}
    finally:
        os.kill(pid, signal.SIGCONT)
    client.infer("simple", simple_inputs(1))
    assert successes(mesh.url) == 6


def test_a_worker_never_answered_counts_with_its_heartbeat(mesh: Mesh) -> None:
    client = httpclient.InferenceServerClient(mesh.url.removeprefix("http://"))
    for _ in range(4):
        client.infer("simple", simple_inputs(1))
    wait_until(
        lambda: asyncio.run(_reported(mesh, "w1"))["simple/1"]["success"]["count"] == 4,
        15,
        "the heartbeat carrying the four requests",
    )
    # Stopped before any statistics request: the gateway has no answer of it to fall back on.
    pid = mesh.processes["w1"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        assert successes(mesh.url) == 4
    finally:
        os.kill(pid, signal.SIGCONT)


def test_statistics_of_unknown_models_and_versions_are_not_found(served: Served) -> None:
    for path in ("nope/stats", "simple/versions/9/stats", "simple/versions/x/stats"):
        response = requests.get(f"{served.url}/v2/models/{path}", timeout=10)
        assert response.status_code == 404, path
        assert "error" in response.json()


def test_the_statistics_query_answers_with_every_model_unless_asked_for_one(served: Served) -> None:
    async def ask(model: str | None) -> dict[str, tuple[int, dict[str, Any]]]:
        # As a gateway asks: the query to every worker, the answers on its own inbox.
        nc = await nats.connect(served.nats_url, **served.nats_options("gateway"))
        try:
            workers = await (await nc.jetstream().key_value(Subjects().workers_bucket)).keys()
            sub = await nc.subscribe(nc.new_inbox())
            await nc.publish(Subjects().stats_query, StatsQuery(model).to_json(), reply=sub.subject)
            answers = {}
            for _ in workers:  # every worker and the orchestrator answer
                worker, pid, stats = read_stats_answer((await sub.next_msg(timeout=10)).data)
                answers[worker] = (pid, stats)
            assert answers.keys() == set(workers)
            return answers
        finally:
            await nc.close()

    requests.post(
        f"{served.url}/v2/models/tiny/infer",
        json={"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]},
        timeout=30,
    ).raise_for_status()
    every = asyncio.run(ask(None))
    assert any("tiny/1" in stats for _, stats in every.values())
    assert all(pid > 0 for pid, _ in every.values())
    only = asyncio.run(ask("simple"))
    assert all(key.startswith("simple/") for _, stats in only.values() for key in stats)
    assert any(stats for _, stats in only.values())


# -- decoupled models ------------------------------------------------------------------------


async def test_a_stream_counts_one_success_and_its_first_response_at_once(backend_served: Served) -> None:
    def stream() -> list[dict[str, Any]]:
        response = requests.post(
            f"{backend_served.url}/v2/models/repeat/generate_stream",
            json={"IN": [3, 1, 4]},
            stream=True,
            timeout=30,
        )
        return [
            json.loads(line[len(b"data: ") :]) for line in response.iter_lines() if line.startswith(b"data: ")
        ]

    async with metrics_gateway(backend_served) as metrics_url:
        name, labels = "nv_inference_first_response_histogram_ms", '{model="repeat",version="1"}'
        before = _values(await asyncio.to_thread(_get, metrics_url))
        successes_before = await asyncio.to_thread(successes, backend_served.url, "repeat")
        assert len(await asyncio.to_thread(stream)) == 3
        assert await asyncio.to_thread(successes, backend_served.url, "repeat") - successes_before == 1
        after = _values(await asyncio.to_thread(_get, metrics_url))
    assert after[f"{name}_count{labels}"] - before[f"{name}_count{labels}"] == 1
    assert after[f'{name}_bucket{{model="repeat",version="1",le="+Inf"}}'] == after[f"{name}_count{labels}"]
    assert (
        after[f"nv_inference_request_success{labels}"] - before[f"nv_inference_request_success{labels}"] == 1
    )
