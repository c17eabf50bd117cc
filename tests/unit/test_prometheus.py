"""natron.prometheus: the fleet's statistics in Triton's metric names, GPU telemetry from the
workers' heartbeats, and the telemetry a worker samples with pynvml absent and with a fake one."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from natron.prometheus import QueueInfo, render_fleet
from natron.records import WorkerReport
from natron.stats import ModelStats, empty_stats, merge
from workers.devices import CPU, Device
from workers.telemetry import GpuTelemetry

KEY = 'model="m",version="1"'


def samples(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def fleet_stats() -> dict[str, Any]:
    """Two workers' statistics of m/1, summed as the gateway sums them."""
    one, two = ModelStats(), ModelStats()
    one.executed(rows=1, input_ns=1_000, infer_ns=10_000, output_ns=1_000)
    one.executed(rows=4, input_ns=2_000, infer_ns=40_000, output_ns=2_000)
    one.success.add(60_000, count=5)
    two.executed(rows=4, input_ns=2_000, infer_ns=30_000, output_ns=2_000)
    two.success.add(40_000, count=4)
    two.failed("CANCELED", 7_000)
    two.queue.add(9_000, count=9)
    total = empty_stats()
    merge(total, one.to_json())
    merge(total, two.to_json())
    return total


def test_model_families_carry_the_summed_counts_and_durations_in_microseconds() -> None:
    text = render_fleet([("m", "1")], {("m", "1"): fleet_stats()}, {}, {"m": 2}, [], True)
    values = samples(text)
    assert values[f"nv_inference_request_success{{{KEY}}}"] == 9
    assert values[f'nv_inference_request_failure{{{KEY},reason="CANCELED"}}'] == 1
    assert values[f"nv_inference_count{{{KEY}}}"] == 9
    assert values[f"nv_inference_exec_count{{{KEY}}}"] == 3
    assert values[f"nv_inference_request_duration_us{{{KEY}}}"] == (100_000 + 7_000) // 1000
    assert values[f"nv_inference_queue_duration_us{{{KEY}}}"] == 9
    assert values[f"nv_inference_compute_infer_duration_us{{{KEY}}}"] == 80
    assert values['natron_workers_up{model="m"}'] == 2
    assert values["natron_nats_connected"] == 1


def test_the_batch_size_histogram_is_cumulative_over_the_executions() -> None:
    values = samples(render_fleet([("m", "1")], {("m", "1"): fleet_stats()}, {}, {}, [], False))
    assert values[f'natron_batch_size_bucket{{{KEY},le="1"}}'] == 1
    assert values[f'natron_batch_size_bucket{{{KEY},le="2"}}'] == 1
    assert values[f'natron_batch_size_bucket{{{KEY},le="4"}}'] == 3
    assert values[f'natron_batch_size_bucket{{{KEY},le="+Inf"}}'] == 3
    assert values[f"natron_batch_size_count{{{KEY}}}"] == 3
    assert values[f"natron_batch_size_sum{{{KEY}}}"] == 1 + 4 + 4
    assert values["natron_nats_connected"] == 0


def test_pending_counts_the_queue_and_the_requests_in_hand_while_depth_counts_the_queue() -> None:
    text = render_fleet([("m", "1")], {}, {("m", "1"): QueueInfo(pending=5, in_hand=3)}, {}, [], True)
    values = samples(text)
    assert values[f"nv_inference_pending_request_count{{{KEY}}}"] == 8
    assert values[f"natron_queue_depth{{{KEY}}}"] == 5
    assert f"nv_inference_count{{{KEY}}}" not in values  # no statistics yet: nothing invented


def test_label_values_are_escaped() -> None:
    text = render_fleet([('a"b\\c', "1")], {}, {('a"b\\c', "1"): QueueInfo(1, 0)}, {}, [], True)
    assert 'natron_queue_depth{model="a\\"b\\\\c",version="1"} 1' in text


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
