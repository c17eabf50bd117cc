"""Triton's metrics and statistics, summed over the fleet, after known traffic. (Rendering and
GPU telemetry alone: tests/unit/test_prometheus.py.)"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.harness import Served, wait_until


def scrape(served: Served) -> dict[str, float]:
    text = requests.get(served.metrics_url, timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def stats_of(served: Served, model: str) -> dict[str, Any]:
    body = requests.get(f"{served.url}/v2/models/{model}/versions/1/stats", timeout=10).json()
    entry: dict[str, Any] = body["model_stats"][0]
    return entry


def simple_inputs(rows: int) -> list[httpclient.InferInput]:
    inputs = [httpclient.InferInput(n, [rows, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for inp in inputs:
        inp.set_data_from_numpy(np.ones((rows, 16), dtype=np.int32))
    return inputs


def test_metrics_and_statistics_count_known_traffic(served: Served) -> None:
    client = httpclient.InferenceServerClient(served.host_port)
    key = 'model="simple",version="1"'
    before_metrics = scrape(served)
    before = stats_of(served, "simple")
    for rows in (1, 2, 3):
        client.infer("simple", simple_inputs(rows))
    for _ in range(2):  # expired before they ran: failures the worker counts as CANCELED
        with pytest.raises(InferenceServerException, match=r"timed out|expired"):
            client.infer("simple", simple_inputs(1), timeout=1)

    def arrived() -> bool:
        now = stats_of(served, "simple")
        return (
            now["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] >= 3
            and now["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] >= 2
        )

    # The successes count at once; an expired request counts when the worker drops it from its
    # queue, which may come after the client gave up.
    wait_until(arrived, 15, "the expired requests counted")
    after = stats_of(served, "simple")
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 2
    assert after["inference_count"] - before["inference_count"] == 1 + 2 + 3
    assert after["execution_count"] > before["execution_count"]
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert after["last_inference"] >= before["last_inference"]
    assert {b["batch_size"] for b in after["batch_stats"]} >= {1}

    metrics = scrape(served)
    delta = lambda name: metrics[name] - before_metrics.get(name, 0.0)  # noqa: E731
    assert delta(f"nv_inference_request_success{{{key}}}") == 3
    assert delta(f"nv_inference_count{{{key}}}") == 6
    assert delta(f'nv_inference_request_failure{{{key},reason="CANCELED"}}') == 2
    assert delta(f'nv_inference_request_failure{{{key},reason="BACKEND"}}') == 0  # there at 0
    assert metrics[f"nv_inference_exec_count{{{key}}}"] == after["execution_count"]
    assert metrics[f"nv_inference_compute_infer_duration_us{{{key}}}"] > 0
    assert metrics[f'natron_batch_size_bucket{{{key},le="+Inf"}}'] == after["execution_count"]
    assert metrics[f"natron_queue_depth{{{key}}}"] == 0
    assert metrics['natron_workers_up{model="simple"}'] == 1
    assert metrics["natron_nats_connected"] == 1
    assert not any(name.startswith("nv_gpu_") for name in metrics)  # no GPU here


def test_metric_families_use_tritons_names_and_types(served: Served) -> None:
    text = requests.get(served.metrics_url, timeout=10).text
    for name, kind in [
        ("nv_inference_request_success", "counter"),
        ("nv_inference_request_failure", "counter"),
        ("nv_inference_count", "counter"),
        ("nv_inference_exec_count", "counter"),
        ("nv_inference_request_duration_us", "counter"),
        ("nv_inference_queue_duration_us", "counter"),
        ("nv_inference_compute_input_duration_us", "counter"),
        ("nv_inference_compute_infer_duration_us", "counter"),
        ("nv_inference_compute_output_duration_us", "counter"),
        ("nv_inference_pending_request_count", "gauge"),
        ("nv_cpu_utilization", "gauge"),
        ("nv_cpu_memory_total_bytes", "gauge"),
        ("nv_cpu_memory_used_bytes", "gauge"),
        ("natron_batch_size", "histogram"),
        ("natron_gateway_request_duration_seconds", "histogram"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text, name
    assert re.search(r'^nv_inference_count\{model="tiny",version="1"\} \d+$', text, re.M)


def test_statistics_of_all_models_and_unknown_ones(served: Served) -> None:
    every = requests.get(f"{served.url}/v2/models/stats", timeout=10).json()["model_stats"]
    assert {"tiny", "simple"} <= {entry["name"] for entry in every}
    assert requests.get(f"{served.url}/v2/models/nope/stats", timeout=10).status_code == 404
    assert requests.get(f"{served.url}/v2/models/simple/versions/9/stats", timeout=10).status_code == 404
