"""router.placement: which workers run a model's instances, following its `instance_group`, the
workers' devices and roles, and the device memory the models already placed have taken."""

from __future__ import annotations

from typing import Any

from natron.records import (
    LOADING,
    NO_ORCHESTRATOR,
    NO_WORKER,
    ORCHESTRATOR,
    ModelRecord,
    VersionState,
    WorkerReport,
)
from router.placement import place

ENSEMBLE = {"platform": "ensemble", "ensemble_scheduling": {"step": []}}


def _fleet_worker(
    worker_id: str,
    kind: str,
    index: int = 0,
    memory: int = 0,
    *,
    role: str = "worker",
    stopping: bool = False,
) -> WorkerReport:
    device = {"kind": kind, "index": index, "memory_total_bytes": memory, "memory_free_bytes": memory}
    return WorkerReport(id=worker_id, host="h", pid=1, devices=[device], role=role, stopping=stopping)


def _model(name: str, config: dict[str, Any] | None, reason: str = "") -> ModelRecord:
    return ModelRecord(name, "/x", config, {"1": VersionState(LOADING)}, reason=reason)


def _placed(
    groups: list[dict[str, Any]], workers: list[WorkerReport], size: int = 0
) -> tuple[dict[str, int], str]:
    return place([_model("m", {"instance_group": groups})], workers, {"m": size})["m"]


def test_instances_are_placed_on_every_matching_worker_count_times() -> None:
    fleet = [_fleet_worker("c1", "CPU"), _fleet_worker("c2", "CPU"), _fleet_worker("g0", "GPU", 0, 10**9)]
    assert _placed([{"kind": "KIND_CPU", "count": 2}], fleet) == ({"c1": 2, "c2": 2}, "")
    assert _placed([{"kind": "KIND_GPU", "count": 1}], fleet) == ({"g0": 1}, "")
    assert _placed([{"kind": "KIND_AUTO", "count": 1}], fleet) == ({"g0": 1}, "")
    assert _placed([{"kind": "KIND_AUTO", "count": 3}], fleet[:2]) == ({"c1": 3, "c2": 3}, "")


def test_a_model_without_instance_group_is_one_auto_instance_per_worker() -> None:
    fleet = [_fleet_worker("c1", "CPU"), _fleet_worker("g0", "GPU", 0, 10**9)]
    assert _placed([], fleet) == ({"g0": 1}, "")
    assert _placed([], fleet[:1]) == ({"c1": 1}, "")


def test_kind_cpu_runs_on_gpu_workers_when_the_fleet_has_no_cpu_worker() -> None:
    fleet = [_fleet_worker("g0", "GPU", 0, 10**9), _fleet_worker("g1", "GPU", 1, 10**9)]
    assert _placed([{"kind": "KIND_CPU"}], fleet) == ({"g0": 1, "g1": 1}, "")


def test_groups_of_both_kinds_add_up_per_worker() -> None:
    fleet = [_fleet_worker("c1", "CPU"), _fleet_worker("g0", "GPU", 0, 10**9)]
    groups: list[dict[str, Any]] = [
        {"kind": "KIND_GPU", "count": 2},
        {"kind": "KIND_CPU", "count": 1},
        {"kind": "KIND_GPU"},
    ]
    assert _placed(groups, fleet) == ({"g0": 3, "c1": 1}, "")


def test_gpu_placement_honours_the_gpus_list_and_free_memory() -> None:
    fleet = [_fleet_worker("g0", "GPU", 0, 10**9), _fleet_worker("g1", "GPU", 1, 10**6)]
    assert _placed([{"kind": "KIND_GPU", "gpus": [1]}], fleet) == ({"g1": 1}, "")
    assert _placed([{"kind": "KIND_GPU"}], fleet, size=10**7) == ({"g0": 1}, "")
    placement, reason = _placed([{"kind": "KIND_GPU"}], fleet, size=10**10)
    assert placement == {} and "device memory" in reason


def test_a_gpu_model_without_gpu_workers_says_so() -> None:
    placement, reason = _placed([{"kind": "KIND_GPU"}], [_fleet_worker("c1", "CPU")])
    assert placement == {} and "GPU" in reason


def test_the_largest_model_is_placed_first_so_the_smaller_one_fits_the_gap() -> None:
    # Smallest first, `small` would take room on both GPUs and `big` would fit neither.
    fleet = [_fleet_worker("g0", "GPU", 0, 100), _fleet_worker("g1", "GPU", 1, 60)]
    gpu = {"instance_group": [{"kind": "KIND_GPU"}]}
    result = place([_model("small", gpu), _model("big", gpu)], fleet, {"small": 50, "big": 80})
    assert result == {"big": ({"g0": 1}, ""), "small": ({"g1": 1}, "")}


def test_memory_promised_to_one_model_is_not_offered_to_the_next() -> None:
    fleet = [_fleet_worker("g0", "GPU", 0, 100)]
    gpu = {"instance_group": [{"kind": "KIND_GPU"}]}
    result = place([_model("a", gpu), _model("b", gpu)], fleet, {"a": 70, "b": 60})
    assert result["a"] == ({"g0": 1}, "")
    assert result["b"][0] == {} and "60 bytes of device memory" in result["b"][1]


def test_a_device_filled_to_the_last_byte_takes_no_further_model() -> None:
    fleet = [_fleet_worker("g0", "GPU", 0, 100)]
    gpu = {"instance_group": [{"kind": "KIND_GPU"}]}
    result = place([_model("a", gpu), _model("b", gpu)], fleet, {"a": 100, "b": 60})
    assert result["a"] == ({"g0": 1}, "")
    assert result["b"][0] == {} and "60 bytes of device memory" in result["b"][1]


def test_a_device_that_reports_no_memory_holds_nothing_back() -> None:
    fleet = [_fleet_worker("g0", "GPU", 0, 0)]
    gpu = {"instance_group": [{"kind": "KIND_GPU"}]}
    result = place([_model("a", gpu), _model("b", gpu)], fleet, {"a": 100, "b": 60})
    assert result == {"a": ({"g0": 1}, ""), "b": ({"g0": 1}, "")}


def test_ensembles_go_to_every_orchestrator_and_nothing_else_does() -> None:
    fleet = [
        _fleet_worker("c1", "CPU"),
        _fleet_worker("o1", "CPU", role=ORCHESTRATOR),
        _fleet_worker("o2", "CPU", role=ORCHESTRATOR),
    ]
    result = place([_model("m", {}), _model("e", ENSEMBLE)], fleet, {})
    assert result["m"] == ({"c1": 1}, "")
    assert result["e"] == ({"o1": 1, "o2": 1}, "")


def test_an_ensemble_without_an_orchestrator_says_so() -> None:
    placement, reason = place([_model("e", ENSEMBLE)], [_fleet_worker("c1", "CPU")], {})["e"]
    assert (placement, reason) == ({}, NO_ORCHESTRATOR)


def test_a_fleet_of_orchestrators_only_has_no_live_worker_for_a_model() -> None:
    fleet = [_fleet_worker("o1", "CPU", role=ORCHESTRATOR)]
    assert place([_model("m", {})], fleet, {})["m"] == ({}, NO_WORKER)


def test_stopping_workers_get_nothing() -> None:
    fleet = [_fleet_worker("c1", "CPU", stopping=True), _fleet_worker("c2", "CPU")]
    assert _placed([{"kind": "KIND_CPU"}], fleet) == ({"c2": 1}, "")
    assert _placed([{"kind": "KIND_CPU"}], fleet[:1]) == ({}, NO_WORKER)


def test_a_model_that_failed_to_scan_is_not_placed_and_keeps_its_own_reason() -> None:
    fleet = [_fleet_worker("c1", "CPU")]
    result = place([_model("bad", {}, reason="config.pbtxt: parse error"), _model("none", None)], fleet, {})
    assert result == {"bad": ({}, ""), "none": ({}, "")}
