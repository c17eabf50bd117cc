"""natron.records: the JSON documents of the models and workers buckets, the contract between
router, gateways and workers: both directions, defaults for older writers, generations, and how
readers present a record (the config clients see, whether its load has settled)."""

from __future__ import annotations

import orjson

from broker.view import ModelRegistry
from natron.records import (
    LOADING,
    NO_ORCHESTRATOR,
    NO_WORKER,
    ORCHESTRATOR,
    READY,
    UNAVAILABLE,
    UNLOADING,
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
    reloading = _record()
    reloading.serving_config = {"name": "m", "max_batch_size": 4}
    reloading.failure = "version 1: bad file"
    assert ModelRecord.from_json(reloading.to_json()) == reloading


def test_a_model_record_from_an_older_router_takes_defaults_for_what_it_lacks() -> None:
    minimal = {"name": "m", "path": "/p", "config": {}, "versions": {"1": {"state": "LOADING"}}}
    record = ModelRecord.from_json(orjson.dumps(minimal))
    assert record.versions == {"1": VersionState(LOADING, "")}
    assert (record.reason, record.generation, record.placement, record.files) == ("", "", {}, "")
    assert (record.serving_config, record.failure, record.digests) == (None, "", {})


def test_the_generation_changes_with_what_a_worker_loads_and_only_with_that() -> None:
    record = _record()
    before = record.compute_generation()
    record.versions["1"] = VersionState(LOADING)
    record.placement = {"w3": 1}
    record.placement_reason = "anything"
    record.serving_config = {"name": "m"}
    record.failure = "version 1: bad file"
    assert record.compute_generation() == before  # states, placement, what serves: no reload
    for change in (
        lambda r: setattr(r, "files", "other"),
        lambda r: setattr(r, "digests", {"1": "a" * 64}),
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


# -- readers -------------------------------------------------------------------------------


def _io_config(max_batch_size: int) -> dict[str, object]:
    return {
        "name": "m",
        "max_batch_size": max_batch_size,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}],
    }


def test_clients_see_the_serving_config_while_a_load_is_under_way() -> None:
    record = ModelRecord("m", "/p", _io_config(2), {"1": VersionState(READY)})
    record.serving_config = _io_config(8)
    registry = ModelRegistry()
    registry.put(record)
    view = registry.get("m")
    assert view.record.config == _io_config(8)
    assert view.spec is not None and view.spec.max_batch_size == 8
    record.serving_config = None  # the load succeeded: its own config is what clients see
    registry.put(record)
    view = registry.get("m")
    assert view.record.config == _io_config(2)
    assert view.spec is not None and view.spec.max_batch_size == 2


def _states(*states: VersionState, reason: str = "") -> ModelRecord:
    return ModelRecord("m", "/p", {}, {str(i + 1): s for i, s in enumerate(states)}, reason=reason)


def test_a_model_has_settled_once_it_serves_or_failed_for_good() -> None:
    for record in (
        _states(VersionState(READY), VersionState(UNAVAILABLE, "bad file")),
        _states(VersionState(UNAVAILABLE, "bad file")),
        _states(VersionState(READY, "reload failed, the previous model serves: bad file")),
        _states(VersionState(UNLOADING)),
        _states(reason="unloaded"),  # explicit mode, never loaded
        _states(VersionState(UNAVAILABLE, "unloaded"), reason="unloaded"),
        _states(VersionState(UNAVAILABLE, "parse error"), reason="parse error"),
        _states(VersionState(UNAVAILABLE, "asks for a GPU and no GPU worker has joined")),
    ):
        assert record.settled(), record


def test_a_model_that_loads_or_waits_for_a_worker_has_not_settled() -> None:
    for record in (
        _states(VersionState(READY), VersionState(LOADING)),
        _states(VersionState(UNAVAILABLE, NO_WORKER)),
        _states(VersionState(UNAVAILABLE, NO_ORCHESTRATOR)),
    ):
        assert not record.settled(), record
