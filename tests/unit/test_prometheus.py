"""natron.prometheus: the fleet's statistics in Triton's metric names (latency summaries and
the first-response histogram as --metrics-config asks), the config's parser, quantiles over a
sliding window, GPU telemetry from the workers' heartbeats, the host's CPU and memory, and the
telemetry a worker samples with pynvml absent and with a fake one."""

from __future__ import annotations

import math
import random
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from natron.prometheus import (
    HostMeter,
    HostReading,
    LatencyWindows,
    MetricsConfig,
    QueueInfo,
    cpu_families,
    decode_sketches,
    parse_metrics_config,
    render_fleet,
    sketch_quantile,
)
from natron.records import WorkerReport
from natron.stats import ModelStats, empty_stats, merge, sketch_index
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


# -- --metrics-config ------------------------------------------------------------------------


def test_the_metrics_config_defaults_to_tritons_and_reads_every_setting() -> None:
    assert parse_metrics_config(()) == MetricsConfig()
    assert MetricsConfig().counter_latencies and not MetricsConfig().summary_latencies
    config = parse_metrics_config(
        (
            "summary_latencies=true",
            "histogram_latencies=TRUE",
            "counter_latencies=false",
            "summary_quantiles=0.5:0.05, 0.9:0.01,0.99:0.001",
            "summary_max_age=30",
            "summary_age_buckets=3",
            "summary_age_buckets=6",  # a later setting wins, as in Triton
        )
    )
    assert config == MetricsConfig(
        counter_latencies=False,
        summary_latencies=True,
        histogram_latencies=True,
        summary_quantiles=((0.5, 0.05), (0.9, 0.01), (0.99, 0.001)),
        summary_max_age_s=30.0,
        summary_age_buckets=6,
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("summary_latency=true", "unknown setting 'summary_latency'"),
        ("summary_latencies", "expected <setting>=<value>"),
        ("=true", "expected <setting>=<value>"),
        ("summary_latencies=yes", "expected true or false"),
        ("summary_quantiles=0.5", "is not <quantile>:<error>"),
        ("summary_quantiles=a:0.1", "is not <quantile>:<error>"),
        ("summary_quantiles=", "is not <quantile>:<error>"),
        ("summary_quantiles=1.5:0.1", "must lie in [0, 1]"),
        ("summary_quantiles=0.5:0.1,0.5:0.01", "given twice"),
        ("summary_max_age=0", "positive"),
        ("summary_max_age=inf", "positive"),
        ("summary_max_age=soon", "not a number"),
        ("summary_age_buckets=2.5", "not a number"),
    ],
)
def test_a_bad_metrics_setting_is_refused_with_its_name(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        parse_metrics_config((entry,))
    assert entry in str(raised.value)


# -- quantiles and their window --------------------------------------------------------------


def _sketch(values: list[float]) -> dict[int, int]:
    sketch: dict[int, int] = {}
    for value in values:
        sketch[sketch_index(value)] = sketch.get(sketch_index(value), 0) + 1
    return sketch


def test_a_sketch_quantile_is_within_a_percent_of_the_exact_one() -> None:
    values = sorted(random.Random(7).lognormvariate(11, 1.5) for _ in range(5000))
    sketch = _sketch(values)
    for quantile in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
        exact = values[max(1, math.ceil(quantile * len(values))) - 1]
        assert abs(sketch_quantile(sketch, quantile) - exact) / exact < 0.01, quantile
    assert math.isnan(sketch_quantile({}, 0.5))


def test_the_window_holds_what_came_after_a_snapshot_about_max_age_old() -> None:
    windows = LatencyWindows(max_age_s=60, age_buckets=3)  # a snapshot every 20 s
    first = {"w": {"m/1": {"queue": _sketch([1000] * 5)}}}
    assert windows.observe(0, first) == {"m/1": {"queue": _sketch([1000] * 5)}}  # since sketching began
    windows.observe(20, {"w": {"m/1": {"queue": _sketch([1000] * 5 + [2000] * 2)}}})
    later = {"w": {"m/1": {"queue": _sketch([1000] * 5 + [2000] * 2 + [4000] * 3)}}}
    assert windows.observe(50, later) == {"m/1": {"queue": _sketch([2000] * 2 + [4000] * 3)}}
    # At 70 s the first snapshot is older than max_age: the one taken at 20 s is the baseline.
    assert windows.observe(70, later) == {"m/1": {"queue": _sketch([4000] * 3)}}


def test_the_window_counts_a_new_or_restarted_worker_whole_and_sums_workers() -> None:
    windows = LatencyWindows(max_age_s=10, age_buckets=1)
    windows.observe(0, {"w": {"m/1": {"queue": _sketch([1000] * 9)}}})
    now = {
        "w": {"m/1": {"queue": _sketch([1000] * 2)}},  # fewer than before: it started again
        "v": {"m/1": {"queue": _sketch([3000])}},  # new since the snapshot
    }
    assert windows.observe(5, now) == {"m/1": {"queue": _sketch([1000] * 2 + [3000])}}


def test_answered_sketches_decode_to_buckets() -> None:
    assert decode_sketches({"w": {"m/1": {"queue": [[64, 2], [70, 1]]}}}) == {
        "w": {"m/1": {"queue": {64: 2, 70: 1}}}
    }


# -- rendering the latency families ----------------------------------------------------------


def test_failure_counters_carry_every_reason_from_the_start() -> None:
    values = samples(render_fleet([("m", "1")], {("m", "1"): empty_stats()}, {}, {}, [], True))
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        assert values[f'nv_inference_request_failure{{{KEY},reason="{reason}"}}'] == 0
    stats = empty_stats()
    stats["fail"] = {"BACKEND": {"count": 2, "ns": 5}, "ODD": {"count": 1, "ns": 1}}
    values = samples(render_fleet([("m", "1")], {("m", "1"): stats}, {}, {}, [], True))
    assert values[f'nv_inference_request_failure{{{KEY},reason="BACKEND"}}'] == 2
    assert values[f'nv_inference_request_failure{{{KEY},reason="ODD"}}'] == 1


def test_summaries_render_window_quantiles_with_cumulative_count_and_sum() -> None:
    config = MetricsConfig(summary_latencies=True, summary_quantiles=((0.5, 0.05), (0.99, 0.001)))
    window = {"m/1": {"queue": _sketch([10_000] * 99 + [1_000_000])}}
    text = render_fleet(
        [("m", "1")], {("m", "1"): fleet_stats()}, {}, {}, [], True, config=config, windows=window
    )
    values = samples(text)
    assert "# TYPE nv_inference_queue_summary_us summary" in text
    assert abs(values[f'nv_inference_queue_summary_us{{{KEY},quantile="0.5"}}'] - 10) < 0.1
    assert abs(values[f'nv_inference_queue_summary_us{{{KEY},quantile="0.99"}}'] - 10) < 0.1
    assert values[f"nv_inference_queue_summary_us_count{{{KEY}}}"] == 9  # cumulative: the counter's
    assert values[f"nv_inference_queue_summary_us_sum{{{KEY}}}"] == 9
    # No observation in the window: NaN, as a Prometheus summary says it.
    assert f'nv_inference_compute_infer_summary_us{{{KEY},quantile="0.5"}} NaN' in text
    assert values[f"nv_inference_request_summary_us_count{{{KEY}}}"] == 9
    assert "nv_inference_first_response_histogram_ms" not in text  # off unless asked for


def test_latency_counters_can_be_turned_off_and_summaries_are_off_by_default() -> None:
    text = render_fleet([("m", "1")], {("m", "1"): fleet_stats()}, {}, {}, [], True)
    assert "nv_inference_queue_duration_us" in text and "summary" not in text
    off = render_fleet(
        [("m", "1")],
        {("m", "1"): fleet_stats()},
        {},
        {},
        [],
        True,
        config=MetricsConfig(counter_latencies=False),
    )
    assert "_duration_us" not in off
    assert "nv_inference_request_success" in off


def test_the_first_response_histogram_is_for_decoupled_versions_alone() -> None:
    stats = ModelStats()
    for ms in (50, 300, 700, 9000):
        stats.first_response.add(ms * 1_000_000)
    total = empty_stats()
    merge(total, stats.to_json())
    config = MetricsConfig(histogram_latencies=True)
    both = {("m", "1"): total, ("s", "1"): total}
    text = render_fleet(both, both, {}, {}, [], True, config=config, decoupled=frozenset({("m", "1")}))
    values = samples(text)
    name = "nv_inference_first_response_histogram_ms"
    assert [values[f'{name}_bucket{{{KEY},le="{le}"}}'] for le in ("100", "500", "2000", "5000", "+Inf")] == [
        1,
        2,
        3,
        3,
        4,
    ]
    assert values[f"{name}_count{{{KEY}}}"] == 4
    assert values[f"{name}_sum{{{KEY}}}"] == 50 + 300 + 700 + 9000
    assert not any(key.startswith(name) and 'model="s"' in key for key in values)


# -- the host --------------------------------------------------------------------------------


def _proc(tmp_path: Path, idle: int, busy: int) -> Path:
    # user nice system idle iowait irq softirq steal guest guest_nice
    (tmp_path / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 7 7\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    (tmp_path / "meminfo").write_text(
        "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n"
    )
    return tmp_path


def test_the_host_meter_reads_utilization_between_readings_and_memory(tmp_path: Path) -> None:
    meter = HostMeter(_proc(tmp_path, idle=100, busy=100), min_interval_s=0)
    first = meter.read()
    assert first == HostReading(0.0, 1000 * 1024, 400 * 1024)
    _proc(tmp_path, idle=130, busy=190)  # 30 idle ticks, 90 busy since
    reading = meter.read()
    assert reading is not None and reading.cpu_utilization == 0.75
    text = "\n".join(line for family in cpu_families(reading) for line in family.lines)
    assert "# TYPE nv_cpu_utilization gauge" in text
    assert samples(text) == {
        "nv_cpu_utilization": 0.75,
        "nv_cpu_memory_total_bytes": 1024000,
        "nv_cpu_memory_used_bytes": 409600,
    }


def test_the_host_meter_without_proc_reads_nothing(tmp_path: Path) -> None:
    assert HostMeter(tmp_path / "missing").read() is None
    assert cpu_families(None) == []
    assert "nv_cpu" not in render_fleet([], {}, {}, {}, [], True)
