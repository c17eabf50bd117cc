"""natron.stats: what a worker counts per model version (latency sketches and the
first-response histogram included), the statistics query's codec, the fleet's sum of the
workers' JSON statistics, and Triton's statistics-extension shape."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.fleet import FleetStats
from natron.stats import (
    SKETCH_PRECISION,
    ModelStats,
    StatsQuery,
    empty_stats,
    failure_reason,
    merge,
    progress,
    read_stats_answer,
    sketch_index,
    sketch_value,
    stats_answer,
    to_triton,
)


def test_an_execution_counts_its_rows_and_charges_each_request_the_whole_execution() -> None:
    stats = ModelStats()
    stats.executed(rows=3, input_ns=30, infer_ns=300, output_ns=3, requests=2)
    stats.executed(rows=3, input_ns=10, infer_ns=100, output_ns=1, requests=3)
    stats.executed(rows=1, input_ns=-5, infer_ns=50, output_ns=2)  # a clock step back counts 0 ns
    assert (stats.executions, stats.inferences) == (3, 7)
    # Triton's way: compute counts requests, and each is charged its execution's time.
    assert stats.compute_infer.to_json() == {"count": 6, "ns": 2 * 300 + 3 * 100 + 50}
    assert stats.compute_input.to_json() == {"count": 6, "ns": 2 * 30 + 3 * 10}
    assert stats.batches[3].compute_infer.to_json() == {"count": 2, "ns": 400}
    assert stats.batches[1].compute_infer.to_json() == {"count": 1, "ns": 50}
    assert stats.last_inference_ms > 0


def test_merging_two_workers_adds_every_counter_and_keeps_the_latest_inference() -> None:
    one, two = ModelStats(), ModelStats()
    one.executed(rows=2, input_ns=1, infer_ns=10, output_ns=1, requests=2)
    one.success.add(100, count=2)
    one.failed("BACKEND", 5)
    two.executed(rows=2, input_ns=2, infer_ns=20, output_ns=2, requests=2)
    two.executed(rows=8, input_ns=4, infer_ns=80, output_ns=4, requests=8)
    two.success.add(300, count=10)
    two.failed("BACKEND", 7)
    two.failed("CANCELED", 9)
    second = two.to_json()
    second["last_inference_ms"] = one.last_inference_ms + 1000
    total = empty_stats()
    merge(total, one.to_json())
    merge(total, second)
    assert (total["executions"], total["inferences"]) == (3, 12)
    assert total["last_inference_ms"] == one.last_inference_ms + 1000
    assert total["success"] == {"count": 12, "ns": 400}
    assert total["compute_infer"] == {"count": 12, "ns": 10 * 2 + 20 * 2 + 80 * 8}
    assert total["fail"] == {"BACKEND": {"count": 2, "ns": 12}, "CANCELED": {"count": 1, "ns": 9}}
    assert total["batches"]["2"]["compute_infer"] == {"count": 2, "ns": 30}
    assert total["batches"]["8"]["compute_output"] == {"count": 1, "ns": 4}


def test_merging_a_report_from_an_older_worker_without_some_fields_counts_what_is_there() -> None:
    total = empty_stats()
    merge(total, {"executions": 1, "success": {"count": 1, "ns": 5}})
    assert total["executions"] == 1 and total["inferences"] == 0
    assert total["success"] == {"count": 1, "ns": 5}
    assert total["queue"] == {"count": 0, "ns": 0}


def test_tritons_shape_sums_the_failures_and_sorts_batch_sizes_as_numbers() -> None:
    stats = ModelStats()
    for rows in (10, 2, 1):
        stats.executed(rows=rows, input_ns=1, infer_ns=rows, output_ns=1)
    stats.failed("BACKEND", 4)
    stats.failed("REJECTED", 6)
    total = empty_stats()
    merge(total, stats.to_json())
    triton = to_triton("m", "1", total)
    assert (triton["name"], triton["version"]) == ("m", "1")
    assert (triton["inference_count"], triton["execution_count"]) == (13, 3)
    assert triton["last_inference"] == stats.last_inference_ms
    assert triton["inference_stats"]["fail"] == {"count": 2, "ns": 10}
    assert triton["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    assert [b["batch_size"] for b in triton["batch_stats"]] == [1, 2, 10]
    assert triton["batch_stats"][2]["compute_infer"] == {"count": 1, "ns": 10}


def test_an_empty_sum_is_a_valid_triton_answer_of_zeros() -> None:
    triton = to_triton("m", "1", empty_stats())
    assert triton["inference_count"] == 0
    assert triton["inference_stats"]["success"] == {"count": 0, "ns": 0}
    assert triton["batch_stats"] == []


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (504, "CANCELED"),
        (400, "REJECTED"),
        (404, "REJECTED"),
        (413, "REJECTED"),
        (503, "REJECTED"),
        (500, "BACKEND"),
        (501, "BACKEND"),
    ],
)
def test_an_answers_status_names_tritons_failure_reason(status: int, reason: str) -> None:
    assert failure_reason(status) == reason


# -- latency sketches, the first-response histogram, the statistics query ---------------------


@given(st.floats(min_value=1, max_value=1e12, allow_nan=False))
def test_a_sketch_bucket_stands_for_its_durations_within_a_percent(ns: float) -> None:
    value = sketch_value(sketch_index(ns))
    assert abs(value - ns) / ns <= 1 / (2 * SKETCH_PRECISION)


def test_sketch_buckets_grow_with_the_duration_and_zero_has_its_own() -> None:
    indexes = [sketch_index(ns) for ns in (0, 0.5, 1, 2, 1000, 1100, 10**9)]
    assert indexes[:2] == [0, 0] and sketch_value(0) == 0.0
    assert indexes[2:] == sorted(indexes[2:]) and len(set(indexes[2:])) == 5


def test_sketches_are_kept_only_once_asked_for_and_only_in_the_answer() -> None:
    stats = ModelStats()
    stats.success.add(1000)
    assert stats.success.sketch is None
    assert stats.to_json(sketches=True)["sketches"] == {}  # none kept yet
    stats.keep_sketches()
    stats.success.add(1000)
    stats.executed(rows=4, input_ns=10, infer_ns=5000, output_ns=10, requests=2)
    assert stats.success.to_json() == {"count": 2, "ns": 2000}  # the counts saw everything
    sketches = stats.to_json(sketches=True)["sketches"]
    assert sketches["success"] == [[sketch_index(1000), 1]]
    assert sketches["compute_infer"] == [[sketch_index(5000), 2]]  # each request charged 5000
    assert "sketches" not in stats.to_json()  # a heartbeat carries none
    assert orjson.loads(orjson.dumps(stats.to_json(sketches=True)))["sketches"]["success"] == [
        [sketch_index(1000), 1]
    ]


def test_the_first_response_histogram_counts_by_triton_bucket_and_merges() -> None:
    stats = ModelStats()
    for ms in (50, 100, 300, 10_000):
        stats.first_response.add(ms * 1_000_000)
    assert stats.first_response.to_json() == {
        "count": 4,
        "ns": 10_450 * 1_000_000,
        "buckets": [2, 1, 0, 0, 1],
    }
    total = empty_stats()
    merge(total, stats.to_json())
    merge(total, stats.to_json())
    assert total["first_response"]["buckets"] == [4, 2, 0, 0, 2]
    assert total["first_response"]["count"] == 8
    merge(total, {"first_response": {"count": 3, "ns": 1, "buckets": [1, 2]}})  # other bounds
    assert total["first_response"]["buckets"] == [4, 2, 0, 0, 5]


def test_a_statistics_query_and_answer_travel_both_ways() -> None:
    assert StatsQuery.from_json(StatsQuery("m", True).to_json()) == StatsQuery("m", True)
    assert StatsQuery.from_json(b"") == StatsQuery()
    stats = {"m/1": ModelStats().to_json()}
    assert read_stats_answer(stats_answer("w", 42, stats)) == ("w", 42, stats)


@pytest.mark.parametrize(
    "data", [b"[]", b"not json", b'{"model": 3}'], ids=["not an object", "not json", "model not a string"]
)
def test_a_malformed_query_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        StatsQuery.from_json(data)


@pytest.mark.parametrize("data", [b"{}", b'{"worker": 1}', b'{"worker": "w", "stats": []}', b"\xff"])
def test_a_malformed_answer_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        read_stats_answer(data)


def test_progress_orders_two_copies_of_one_workers_statistics() -> None:
    stats = ModelStats()
    earlier = stats.to_json()
    stats.queue.add(5)
    stats.failed("BACKEND", 1)
    assert progress(stats.to_json()) > progress(earlier) == 0
    assert progress({}) == 0


def test_the_fleets_statistics_sum_answers_and_name_their_sketches() -> None:
    one, two = ModelStats(), ModelStats()
    one.success.add(10)
    two.success.add(30, count=2)
    two.keep_sketches()
    two.queue.add(7)
    fleet = FleetStats(
        {"a": {"m/1": one.to_json()}, "b": {"m/1": two.to_json(sketches=True), "n/2": two.to_json()}},
        stale={"a"},
    )
    assert fleet.total("m", "1")["success"] == {"count": 3, "ns": 40}
    assert fleet.total("x", "1") == empty_stats()
    assert fleet.keys() == {("m", "1"), ("n", "2")}
    assert fleet.sketches() == {
        "b": {
            "m/1": {"queue": [[sketch_index(7), 1]]}
            | {name: [] for name in ("success", "compute_input", "compute_infer", "compute_output")}
        }
    }
