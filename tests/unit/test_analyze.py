"""natron analyze's parts that start no process: the config space, the two searches, scoring
under constraints, the fleet read from metrics, and the report's files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from natron.analyze import fleet, report, search
from natron.analyze.search import Candidate, Constraints, LoadPoint
from natron.analyze.space import DeviceClass, Point, build_space, powers_of_two_up_to
from natron.prometheus import render_fleet
from natron.records import WorkerReport

pytestmark = pytest.mark.unit

CPU = DeviceClass("CPU", "cpu", ("w1",))
GPU = DeviceClass("GPU", "NVIDIA H100", ("g0", "g1"), (0, 1))

ONNX_BATCHING = {
    "name": "m",
    "platform": "onnxruntime_onnx",
    "max_batch_size": 8,
    "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
    "instance_group": [{"kind": "KIND_AUTO", "count": 1}],
    "parameters": {"keep": {"string_value": "me"}},
}


def test_a_batching_onnx_model_on_a_cpu_sweeps_every_dimension_that_applies() -> None:
    space = build_space(ONNX_BATCHING, CPU)
    names = [d.name for d in space.dimensions]
    assert names == [
        "instance_count",
        "max_batch_size",
        "dynamic_batching",
        "preferred_batch_size",
        "intra_op_thread_count",
    ]
    assert space.dimensions[1].values == (1, 2, 4, 8)  # never above the declared maximum
    assert space.size == 3 * 4 * 4 * 2 * 2


def test_a_config_keeps_what_no_dimension_touches_and_places_on_its_device_class() -> None:
    space = build_space(ONNX_BATCHING, GPU)
    assert [d.name for d in space.dimensions][-1] == "tensorrt_fp16"  # the GPU's option, not the CPU's
    point = (1, 2, 2, 1, 1)  # 2 instances, batch 4, 100 µs, preferred [8], TensorRT
    config = space.config(point)
    assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}]
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    # A preferred size above the max batch size would be refused by the server: dropped.
    assert config["dynamic_batching"]["preferred_batch_size"] == []
    accelerator = config["optimization"]["execution_accelerators"]["gpu_execution_accelerator"]
    assert accelerator == [{"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]
    assert config["input"] == ONNX_BATCHING["input"] and config["parameters"] == {
        "keep": {"string_value": "me"}
    }
    assert ONNX_BATCHING["instance_group"] == [{"kind": "KIND_AUTO", "count": 1}]  # the base is not changed
    assert space.name(point) == "i2-b4-d100us-p8-trt"
    assert len({space.name(p) for p in space.points()}) == space.size  # every name says which


def test_every_candidate_is_a_config_the_server_schema_accepts() -> None:
    space = build_space(ONNX_BATCHING, CPU)
    for point in space.points():
        text = report.config_text(space.config(point))
        parsed = text_format.Parse(text, pb.ModelConfig())
        assert parsed.max_batch_size in (1, 2, 4, 8)


def test_a_model_that_does_not_batch_only_sweeps_instances() -> None:
    python_model = {"name": "p", "backend": "python", "max_batch_size": 0}
    space = build_space(python_model, CPU, instance_counts=(1, 3))
    assert [d.name for d in space.dimensions] == ["instance_count"]
    assert [space.config(p)["instance_group"] for p in space.points()] == [
        [{"kind": "KIND_CPU", "count": 1}],
        [{"kind": "KIND_CPU", "count": 3}],
    ]
    assert powers_of_two_up_to(12) == (1, 2, 4, 8, 12)


def _candidate(name: str, points: list[tuple[int, float, float]], rss: float = 100.0) -> Candidate:
    return Candidate(
        name=name,
        device="CPU",
        settings={},
        config={},
        points=[LoadPoint(c, tput, p99 / 2, p99, p99, p99 / 2) for c, tput, p99 in points],
        rss_mb=rss,
    )


def test_scoring_honours_the_budget_the_minimum_the_memory_and_the_objective() -> None:
    fast = _candidate("fast", [(1, 100, 2), (4, 300, 9), (16, 400, 40)])
    lean = _candidate("lean", [(1, 80, 1), (4, 250, 5)], rss=50)
    assert search.winner([fast, lean], Constraints()) is fast  # 400 infer/s with no budget
    assert search.winner([fast, lean], Constraints(latency_budget_ms=10)) is fast  # 300 at p99 9 ms
    assert search.winner([fast, lean], Constraints(latency_budget_ms=8)) is lean  # only 250 at 5 ms fits
    assert search.winner([fast, lean], Constraints(max_memory_mb=60)) is lean
    latency = Constraints(min_throughput=90, objective=search.LATENCY)
    assert search.winner([fast, lean], latency) is fast  # 2 ms at 100 infer/s; lean's 1 ms is 80
    # A budget nobody meets: no winner, and the closest is the one that misses by least.
    tight = Constraints(latency_budget_ms=1.5, min_throughput=200)
    assert search.winner([fast, lean], tight) is None
    assert search.closest([fast, lean], tight) is lean
    # A point with errors never counts, whatever its figures.
    broken = _candidate("broken", [(1, 10_000, 0.1)])
    broken.points[0].errors = 3
    assert search.winner([broken], Constraints()) is None


async def _evaluate_by(table: dict[Point, float]) -> search.Evaluate:
    async def evaluate(point: Point) -> Candidate:
        return _candidate(str(point), [(1, table[point], 1.0)])

    return evaluate


async def test_brute_measures_every_point_within_the_budget_and_quick_climbs_to_the_best() -> None:
    space = build_space(ONNX_BATCHING, CPU, instance_counts=(1, 2, 4), queue_delays_us=(None, 100))
    # Throughput grows with instances and batch size, and with dynamic batching on; the
    # preferred size and the thread count do nothing: the best is i4-b8-d100us.
    table = {p: 10.0 * (p[0] + 1) * (p[1] + 1) * (1 + p[2]) for p in space.points()}
    evaluate = await _evaluate_by(table)
    every = await search.brute(space, evaluate, max_configs=10_000)
    assert len(every) == space.size
    assert search.choose_strategy(space, 10, "auto") == "quick"
    found = await search.quick(space, evaluate, max_configs=20, constraints=Constraints())
    assert len(found) <= 20 < space.size
    best = max(found, key=lambda p: table[p])
    assert table[best] == max(table.values())
    capped = await search.brute(space, evaluate, max_configs=5)
    assert len(capped) == 5


def test_the_fleet_is_read_from_the_gateway_metrics_with_memory_per_worker() -> None:
    workers = [
        WorkerReport("w1", "host-a", 11, [{"kind": "CPU", "name": "cpu (2 cores)"}], rss_bytes=300 * 2**20),
        WorkerReport(
            "g0",
            "host-b",
            12,
            [
                {
                    "kind": "GPU",
                    "name": "NVIDIA H100",
                    "index": 0,
                    "uuid": "GPU-0",
                    "telemetry": {"memory_used_bytes": 2048 * 2**20},
                }
            ],
            rss_bytes=900 * 2**20,
        ),
        WorkerReport("o1", "host-a", 13, [{"kind": "CPU"}], role="orchestrator"),
    ]
    text = render_fleet([], {}, {}, {}, workers, True)
    reading = fleet.parse(text)
    assert [(c.kind, c.name, c.workers, c.gpu_indices) for c in reading.classes] == [
        ("GPU", "NVIDIA H100", ("g0",), (0,)),
        ("CPU", "cpu", ("w1",), ()),  # the orchestrator runs no model instance: not a class
    ]
    assert reading.memory_mb(reading.classes[0]) == (900.0, 2048.0)
    assert reading.memory_mb(reading.classes[1]) == (300.0, 0.0)
    clash = [DeviceClass("GPU", "A", ("x",), (0,)), DeviceClass("GPU", "B", ("y",), (0, 1))]
    assert fleet.overlapping(clash) == ["GPU index 0 is A on one host and B on another"]


def test_the_report_writes_html_plots_csv_and_the_chosen_config(tmp_path: Path) -> None:
    space = build_space(ONNX_BATCHING, CPU, instance_counts=(1, 2))
    chosen_point = (1, 3, 1, 0, 0)
    good = _candidate(space.name(chosen_point), [(1, 100, 2), (2, 180, 3)])
    good.config = space.config(chosen_point)
    failed = _candidate("i1-b1-doff", [])
    failed.failure = "not loaded: 400 bad config"
    result = report.DeviceResult("CPU", 1, [good, failed])
    result.best = good
    written = report.write(
        report.Report("m", Constraints(latency_budget_ms=5), [result], target_rate=1000), tmp_path
    )
    html = written["html"].read_text()
    assert report.THROUGHPUT_PLOT in html and report.MEMORY_PLOT in html
    assert "not loaded: 400 bad config" in html
    for plot in (report.THROUGHPUT_PLOT, report.MEMORY_PLOT):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(written["csv"].open()))
    assert [(r["config"], r["concurrency"], r["feasible"]) for r in rows] == [
        (good.name, "1", "True"),
        (good.name, "2", "True"),
        (failed.name, "", "False"),
    ]
    config = text_format.Parse(written["config"].read_text(), pb.ModelConfig())
    assert config.instance_group[0].count == 2 and config.max_batch_size == 8
    # 180 infer/s per worker: 6 workers for 1000 infer/s.
    assert report.sizing(report.Report("m", Constraints(), [result], target_rate=1000)) == [
        ("CPU", good.name, 180.0, 3.0, 6)
    ]


def test_a_workers_resident_memory_counts_its_model_processes(tmp_path: Path) -> None:
    from workers.telemetry import _PAGE_BYTES, resident_bytes

    # A worker (pid 10) with a Python stub (11) that has a child of its own (12), and a thread
    # (13) whose children file lists nothing; pid 99 is gone.
    for pid, resident, tasks in ((10, 50, {10: "11 99", 13: ""}), (11, 5, {11: "12"}), (12, 2, {12: ""})):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "statm").write_text(f"1000 {resident} 3 4 0 5 0\n")
        for task, children in tasks.items():
            (tmp_path / str(pid) / "task" / str(task)).mkdir(parents=True)
            (tmp_path / str(pid) / "task" / str(task) / "children").write_text(children)
    assert resident_bytes(10, tmp_path) == (50 + 5 + 2) * _PAGE_BYTES
    assert resident_bytes(99, tmp_path) == 0
    assert resident_bytes(os.getpid()) > 10 * 2**20  # this interpreter, from the real /proc
