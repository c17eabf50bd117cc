"""natron.records: the JSON documents of the models and workers buckets, the contract between
router, gateways and workers: both directions, defaults for older writers, generations."""

from __future__ import annotations

import orjson

from natron.records import (
    LOADING,
    ORCHESTRATOR,
    READY,
    UNAVAILABLE,
    WORKER,
    ModelRecord,
    VersionState,
    WorkerReport,
)


def _record() -> ModelRecord:
    record = ModelRecord(
        name="m",
        path="/models/m",
        config={"name": "m", "max_batch_size": 8, "input": [{"name": "x", "dims": [-1, 3]}]},
        versions={"1": VersionState(READY), "2": VersionState(UNAVAILABLE, "bad file")},
        placement={"w1": 2, "w2": 1},
        placement_reason="",
        files="sig",
    )
    record.generation = record.compute_generation()
    return record


def test_a_model_record_survives_its_json_form() -> None:
    record = _record()
    assert ModelRecord.from_json(record.to_json()) == record
    broken = ModelRecord("b", "/models/b", None, {"1": VersionState(UNAVAILABLE, "parse error")}, "bad")
    assert ModelRecord.from_json(broken.to_json()) == broken


def test_a_model_record_from_an_older_router_takes_defaults_for_what_it_lacks() -> None:
    minimal = {"name": "m", "path": "/p", "config": {}, "versions": {"1": {"state": "LOADING"}}}
    record = ModelRecord.from_json(orjson.dumps(minimal))
    assert record.versions == {"1": VersionState(LOADING, "")}
    assert (record.reason, record.generation, record.placement, record.files) == ("", "", {}, "")


def test_the_generation_changes_with_what_a_worker_loads_and_only_with_that() -> None:
    record = _record()
    before = record.compute_generation()
    record.versions["1"] = VersionState(LOADING)
    record.placement = {"w3": 1}
    record.placement_reason = "anything"
    assert record.compute_generation() == before  # states and placement: no reload
    for change in (
        lambda r: setattr(r, "files", "other"),
        lambda r: setattr(r, "path", "/elsewhere"),
        lambda r: r.config.update(max_batch_size=4),
        lambda r: r.versions.update({"3": VersionState(LOADING)}),
    ):
        changed = ModelRecord.from_json(_record().to_json())
        change(changed)
        assert changed.compute_generation() != before


def test_ready_versions_are_sorted_as_numbers_highest_first() -> None:
    record = ModelRecord(
        "m",
        "/p",
        {},
        {
            "9": VersionState(READY),
            "10": VersionState(READY),
            "2": VersionState(READY),
            "11": VersionState(UNAVAILABLE, "x"),
        },
    )
    assert record.ready_versions() == ["10", "9", "2"]


def test_a_worker_report_survives_its_json_form() -> None:
    report = WorkerReport(
        id="w1",
        host="h",
        pid=42,
        devices=[{"kind": "GPU", "index": 0, "telemetry": {"utilization": 0.5}}],
        models={"m": {"gen-a": {"1": VersionState(READY)}, "gen-b": {"1": VersionState(LOADING)}}},
        stopping=True,
        role=ORCHESTRATOR,
        stats={"m/1": {"executions": 3}},
    )
    assert WorkerReport.from_json(report.to_json()) == report


def test_a_worker_report_from_an_older_worker_is_a_live_worker_with_no_statistics() -> None:
    minimal = {"id": "w", "host": "h", "pid": 1, "devices": [], "models": {}}
    report = WorkerReport.from_json(orjson.dumps(minimal))
    assert (report.stopping, report.role, report.stats) == (False, WORKER, {})
