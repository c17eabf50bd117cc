"""Which worker reports make the router place and aggregate again: changes to what placement
and state aggregation read, never a heartbeat that only refreshes statistics or telemetry. And
how the router ends a load as the reports come in: a load that fails, whether the router
refuses it at once or the workers fail it, never takes a model that serves down."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import pytest
from nats.aio.client import Client

from broker.subjects import Subjects
from natron.errors import InvalidArgument
from natron.records import LOADING, ORCHESTRATOR, READY, UNAVAILABLE, ModelRecord, VersionState, WorkerReport
from router.aggregate import RELOAD_FAILED, aggregate
from router.service import Router, RouterOptions, placement_inputs_changed


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


# -- how a load ends -------------------------------------------------------------------------
# The router's bookkeeping alone: these steps publish nothing, so no connection is needed.


def _model(config: dict[str, Any] | None, reason: str = "") -> ModelRecord:
    record = ModelRecord("m", "/models/m", config, {"1": VersionState(LOADING)}, reason=reason)
    record.generation = record.compute_generation()
    return record


def _cpu_worker(models: dict[str, dict[str, VersionState]]) -> WorkerReport:
    return WorkerReport(id="w1", host="h", pid=1, devices=[{"kind": "CPU"}], models={"m": models})


@pytest.fixture
def router(tmp_path: Path) -> Router:
    return Router(cast(Client, None), Subjects(), RouterOptions((tmp_path,), control_mode="explicit"))


@pytest.fixture
def serving(router: Router) -> ModelRecord:
    """Model m, config {"max_batch_size": 8}, READY on the one CPU worker."""
    record = _model({"max_batch_size": 8})
    record.versions = {"1": VersionState(READY)}
    record.placement = {"w1": 1}
    router.records["m"] = record
    router._workers["w1"] = _cpu_worker({record.generation: {"1": VersionState(READY)}})
    return record


def _settle(router: Router) -> None:
    workers = list(router._workers.values())
    router._place(workers)
    for attempt in router._settle_attempts(workers):
        attempt.finish(attempt.error)


def test_a_config_that_fails_to_validate_is_refused_and_the_model_serves_on(
    router: Router, serving: ModelRecord
) -> None:
    attempt = router._begin(_model(None, reason="config.pbtxt: parse error"), 0)
    assert attempt.done.is_set() and isinstance(attempt.error, InvalidArgument)
    assert "parse error" in attempt.error.message
    assert router.records["m"] is serving and serving.failure == "config.pbtxt: parse error"


def test_an_instance_group_no_worker_can_take_is_refused_and_the_model_serves_on(
    router: Router, serving: ModelRecord
) -> None:
    attempt = router._begin(_model({"instance_group": [{"kind": "KIND_GPU"}]}), 0)
    assert isinstance(attempt.error, InvalidArgument) and "GPU" in attempt.error.message
    assert router.records["m"] is serving and "GPU" in serving.failure


def test_a_load_the_workers_fail_puts_the_serving_record_back_with_the_reason(
    router: Router, serving: ModelRecord
) -> None:
    candidate = _model({"max_batch_size": 2})
    attempt = router._begin(candidate, 0)
    # Under way: the workers load the candidate, clients still see the serving config.
    assert router.records["m"] is candidate and candidate.serving_config == serving.config
    router._workers["w1"] = _cpu_worker(
        {serving.generation: {"1": VersionState(READY)}, candidate.generation: {"1": VersionState(LOADING)}}
    )
    _settle(router)
    assert not attempt.done.is_set()
    router._workers["w1"].models["m"][candidate.generation]["1"] = VersionState(UNAVAILABLE, "bad file")
    _settle(router)
    assert isinstance(attempt.error, InvalidArgument) and "version 1: bad file" in attempt.error.message
    assert router.records["m"] is serving and serving.serving_config is None
    assert serving.placement == {"w1": 1}
    assert router._failed_generation["m"] == candidate.generation  # polling won't retry it
    states = aggregate(serving, list(router._workers.values()))
    assert states == {"1": VersionState(READY, RELOAD_FAILED + "version 1: bad file")}


def test_a_load_that_succeeds_makes_its_config_the_one_clients_see(
    router: Router, serving: ModelRecord
) -> None:
    serving.failure = "version 1: bad file"  # an earlier load failed
    candidate = _model({"max_batch_size": 2})
    attempt = router._begin(candidate, 0)
    router._workers["w1"] = _cpu_worker({candidate.generation: {"1": VersionState(READY)}})
    _settle(router)
    assert attempt.done.is_set() and attempt.error is None
    assert router.records["m"] is candidate
    assert (candidate.serving_config, candidate.failure) == (None, "")


def test_a_first_load_that_fails_leaves_the_model_unavailable_with_its_reason(router: Router) -> None:
    router._workers["w1"] = _cpu_worker({})
    candidate = _model({"max_batch_size": 2})
    attempt = router._begin(candidate, 0)
    assert candidate.serving_config is None
    router._workers["w1"].models["m"] = {candidate.generation: {"1": VersionState(UNAVAILABLE, "bad file")}}
    _settle(router)
    assert isinstance(attempt.error, InvalidArgument) and "bad file" in attempt.error.message
    assert router.records["m"] is candidate
    assert aggregate(candidate, list(router._workers.values())) == {
        "1": VersionState(UNAVAILABLE, "bad file")
    }


def test_a_second_load_ends_the_first_and_still_falls_back_to_what_served(
    router: Router, serving: ModelRecord
) -> None:
    first = router._begin(_model({"max_batch_size": 2}), 0)
    second_record = _model({"max_batch_size": 4})
    second = router._begin(second_record, 0)
    assert first.done.is_set() and first.error is not None and "loaded again" in first.error.message
    router._workers["w1"].models["m"][second_record.generation] = {"1": VersionState(UNAVAILABLE, "bad")}
    _settle(router)
    assert second.error is not None and router.records["m"] is serving
