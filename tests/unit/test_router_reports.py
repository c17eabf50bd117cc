"""Which worker reports make the router place and aggregate again: changes to what placement
and state aggregation read, never a heartbeat that only refreshes statistics or telemetry."""

from __future__ import annotations

import copy

from natron.records import LOADING, ORCHESTRATOR, READY, VersionState, WorkerReport
from router.service import placement_inputs_changed


def report() -> WorkerReport:
    return WorkerReport(
        id="w1",
        host="h",
        pid=1,
        devices=[{"kind": "GPU", "index": 0, "memory_free_bytes": 100, "telemetry": {"utilization": 0.1}}],
        models={"tiny": {"g1": {"1": VersionState(LOADING)}}},
        stats={"tiny/1": {"inferences": 1}},
    )


def test_a_heartbeat_with_new_statistics_and_telemetry_changes_nothing_to_place() -> None:
    before, after = report(), report()
    after.stats = {"tiny/1": {"inferences": 500}}
    after.devices[0]["telemetry"] = {"utilization": 0.9, "energy_j": 12.0}
    assert not placement_inputs_changed(before, after)


def test_a_version_that_changed_state_is_aggregated_again() -> None:
    before, after = report(), report()
    after.models["tiny"]["g1"]["1"] = VersionState(READY)
    assert placement_inputs_changed(before, after)


def test_a_new_model_generation_is_aggregated_again() -> None:
    before, after = report(), report()
    after.models["tiny"]["g2"] = {"1": VersionState(LOADING)}
    assert placement_inputs_changed(before, after)


def test_stopping_role_and_devices_are_placed_again() -> None:
    before = report()
    for change in (
        lambda r: setattr(r, "stopping", True),
        lambda r: setattr(r, "role", ORCHESTRATOR),
        lambda r: r.devices[0].update(memory_free_bytes=50),
    ):
        after = copy.deepcopy(before)
        change(after)
        assert placement_inputs_changed(before, after)
