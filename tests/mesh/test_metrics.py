"""Triton's metrics and statistics, summed over the fleet, after known traffic; GPU telemetry
with pynvml absent and with a fake device."""

from __future__ import annotations

import re
import sys
import time
import types
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from natron.prometheus import render_fleet
from natron.records import WorkerReport
from tests.harness import Served
from workers.devices import CPU, Device
from workers.telemetry import GpuTelemetry


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


def wait_for(check: Any, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "statistics did not arrive with the heartbeats"
        time.sleep(0.2)


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

    wait_for(arrived)
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


def _gpu_worker(telemetry: dict[str, float]) -> WorkerReport:
    device = {"kind": "GPU", "uuid": "GPU-1234", "telemetry": telemetry}
    return WorkerReport(id="g", host="h", pid=1, devices=[device])


def test_gpu_metrics_appear_only_for_gpu_workers() -> None:
    cpu = WorkerReport(id="c", host="h", pid=1, devices=[CPU.describe()])
    assert "nv_gpu" not in render_fleet([], {}, {}, {}, [cpu], True)
    text = render_fleet(
        [],
        {},
        {},
        {},
        [cpu, _gpu_worker({"utilization": 0.5, "memory_used_bytes": 1024, "energy_j": 12.5})],
        True,
    )
    assert 'nv_gpu_utilization{gpu_uuid="GPU-1234"} 0.5' in text
    assert 'nv_gpu_memory_used_bytes{gpu_uuid="GPU-1234"} 1024' in text
    assert "# TYPE nv_energy_consumption counter" in text
    assert "nv_gpu_power_usage" not in text  # not reported: not invented


def test_gpu_telemetry_without_pynvml_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert GpuTelemetry(Device("GPU", 0, "GPU-x")).sample() == {}
    assert GpuTelemetry(CPU).sample() == {}


def test_gpu_telemetry_reads_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = types.ModuleType("pynvml")
    energy = iter([5_000, 7_500])
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: uuid  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80, used=20)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetPowerUsage = lambda h: 250_000  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: next(energy)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    telemetry = GpuTelemetry(Device("GPU", 0, "GPU-x"))
    assert telemetry.sample() == {
        "utilization": 0.4,
        "memory_total_bytes": 80,
        "memory_used_bytes": 20,
        "power_usage_w": 250.0,
        "power_limit_w": 700.0,
        "energy_j": 0.0,
    }
    assert telemetry.sample()["energy_j"] == 2.5
