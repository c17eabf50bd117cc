"""router.aggregate: a model's fleet-wide state from its placed workers' reports, and ensembles
gated on their composing models, and how a load of a model ends."""

from __future__ import annotations

from natron.records import LOADING, NO_WORKER, READY, UNAVAILABLE, ModelRecord, VersionState, WorkerReport
from router.aggregate import RELOAD_FAILED, aggregate, gate_ensembles, settle


def _record() -> ModelRecord:
    record = ModelRecord(name="m", path="/x", config={}, versions={"2": VersionState(LOADING)})
    record.generation = record.compute_generation()
    record.placement = {"a": 1, "b": 1, "d": 1, "o": 1}
    return record


def _worker(name: str, record: ModelRecord, state: VersionState, stopping: bool = False) -> WorkerReport:
    return WorkerReport(
        id=name,
        host="h",
        pid=1,
        devices=[],
        models={"m": {record.generation: {"2": state}}},
        stopping=stopping,
    )


def test_a_version_is_ready_when_any_placed_worker_serves_it() -> None:
    record = _record()
    workers = [
        _worker("a", record, VersionState(UNAVAILABLE, "out of memory")),
        _worker("b", record, VersionState(READY)),
    ]
    assert aggregate(record, workers) == {"2": VersionState(READY)}


def test_a_version_every_worker_failed_is_unavailable_with_the_reason() -> None:
    record = _record()
    states = aggregate(record, [_worker("a", record, VersionState(UNAVAILABLE, "bad file"))])
    assert states == {"2": VersionState(UNAVAILABLE, "bad file")}


def test_draining_workers_and_unplaced_workers_do_not_count() -> None:
    record = _record()
    draining = _worker("d", record, VersionState(READY), stopping=True)
    stranger = _worker("x", record, VersionState(READY))
    assert aggregate(record, [draining, stranger]) == {"2": VersionState(UNAVAILABLE, NO_WORKER)}


def test_an_older_generation_keeps_a_version_ready_during_and_after_a_failed_reload() -> None:
    record = _record()
    both = {"old": {"2": VersionState(READY)}, record.generation: {"2": VersionState(LOADING)}}
    reloading = WorkerReport(id="a", host="h", pid=1, devices=[], models={"m": both})
    assert aggregate(record, [reloading]) == {"2": VersionState(READY)}
    both[record.generation]["2"] = VersionState(UNAVAILABLE, "bad file")
    state = aggregate(record, [reloading])["2"]
    assert state.state == READY
    assert "reload failed" in state.reason and "bad file" in state.reason


def test_a_model_without_placement_is_unavailable_with_the_placement_reason() -> None:
    record = _record()
    record.placement = {}
    record.placement_reason = "no GPU worker has joined"
    assert aggregate(record, []) == {"2": VersionState(UNAVAILABLE, "no GPU worker has joined")}


def test_a_version_still_loading_somewhere_is_loading_until_one_worker_is_ready() -> None:
    record = _record()
    loading = _worker("a", record, VersionState(LOADING))
    failed = _worker("b", record, VersionState(UNAVAILABLE, "bad file"))
    assert aggregate(record, [loading, failed]) == {"2": VersionState(LOADING)}


def test_a_placed_worker_that_has_not_reported_yet_keeps_the_version_loading() -> None:
    record = _record()
    failed = _worker("a", record, VersionState(UNAVAILABLE, "bad file"))
    silent = WorkerReport(id="b", host="h", pid=1, devices=[])
    assert aggregate(record, [failed, silent]) == {"2": VersionState(LOADING)}


def test_a_model_level_reason_keeps_the_scanned_states() -> None:
    record = _record()
    record.reason = "unloaded"
    record.versions = {"2": VersionState(UNAVAILABLE, "unloaded")}
    assert aggregate(record, [_worker("a", record, VersionState(READY))]) == record.versions


def _ensemble(*steps: str) -> ModelRecord:
    config = {"platform": "ensemble", "ensemble_scheduling": {"step": [{"model_name": s} for s in steps]}}
    return ModelRecord(name="e", path="/x", config=config, versions={"1": VersionState(READY)})


def test_an_ensemble_is_ready_only_while_every_composing_model_is() -> None:
    records = {"e": _ensemble("a", "b"), "a": _record(), "b": _record()}
    computed = {
        "e": {"1": VersionState(READY)},
        "a": {"2": VersionState(READY)},
        "b": {"2": VersionState(LOADING)},
    }
    gate_ensembles(records, computed)
    assert computed["e"] == {"1": VersionState(UNAVAILABLE, "composing model 'b' is not ready")}
    assert computed["a"] == {"2": VersionState(READY)}


def test_an_ensemble_naming_an_unknown_model_is_unavailable_saying_not_found() -> None:
    computed = {"e": {"1": VersionState(READY)}}
    gate_ensembles({"e": _ensemble("ghost")}, computed)
    assert computed["e"] == {"1": VersionState(UNAVAILABLE, "composing model 'ghost' is not found")}


def test_an_ensemble_of_an_ensemble_whose_step_is_not_ready_is_unavailable_too() -> None:
    # Listed outer first: the outer one sees the inner still READY in the first round, so it
    # takes a second round to settle.
    outer = _ensemble("inner")
    outer.name = "outer"
    inner = _ensemble("a")
    inner.name = "inner"
    records = {"outer": outer, "inner": inner, "a": _record()}
    computed = {
        "outer": {"1": VersionState(READY)},
        "inner": {"1": VersionState(READY)},
        "a": {"2": VersionState(UNAVAILABLE, "bad file")},
    }
    gate_ensembles(records, computed)
    assert computed["inner"]["1"] == VersionState(UNAVAILABLE, "composing model 'a' is not ready")
    assert computed["outer"]["1"] == VersionState(UNAVAILABLE, "composing model 'inner' is not ready")


# -- how a load ends -------------------------------------------------------------------------


def test_a_load_is_under_way_while_a_placed_worker_loads_or_has_not_reported() -> None:
    record = _record()
    ready = _worker("a", record, VersionState(READY))
    assert settle(record, [ready, _worker("b", record, VersionState(LOADING))]) is None
    assert settle(record, [ready, WorkerReport(id="b", host="h", pid=1, devices=[])]) is None


def test_a_load_succeeds_once_every_version_is_ready_on_some_placed_worker() -> None:
    record = _record()
    workers = [
        _worker("a", record, VersionState(READY)),
        _worker("b", record, VersionState(UNAVAILABLE, "out of memory")),
    ]
    assert settle(record, workers) == {}


def test_a_load_fails_with_each_versions_reason_once_every_placed_worker_failed_it() -> None:
    record = _record()
    workers = [
        _worker("a", record, VersionState(UNAVAILABLE, "bad file")),
        _worker("b", record, VersionState(UNAVAILABLE, "bad file")),
    ]
    assert settle(record, workers) == {"2": "bad file"}


def test_a_load_without_placement_fails_with_the_placement_reason() -> None:
    record = _record()
    record.placement, record.placement_reason = {}, "the model's instance_group asks for a GPU"
    assert settle(record, []) == {"2": "the model's instance_group asks for a GPU"}


def test_a_load_whose_placed_workers_all_left_fails_for_want_of_a_worker() -> None:
    record = _record()
    leaving = _worker("a", record, VersionState(LOADING), stopping=True)
    assert settle(record, [leaving]) == {"2": NO_WORKER}


def test_a_model_that_serves_on_after_a_failed_load_says_why_next_to_ready() -> None:
    record = _record()
    record.failure = "version 2: bad file"
    state = aggregate(record, [_worker("a", record, VersionState(READY))])["2"]
    assert state == VersionState(READY, RELOAD_FAILED + "version 2: bad file")
