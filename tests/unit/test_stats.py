"""natron.stats: what a worker counts per model version, the fleet's sum of the workers' JSON
statistics, and Triton's statistics-extension shape."""

from __future__ import annotations

import pytest

from natron.stats import ModelStats, empty_stats, failure_reason, merge, to_triton


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
