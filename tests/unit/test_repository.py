"""Model repository scan, config parsing and completion, version policies, state aggregation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from natron import config as cfg
from natron.errors import InvalidArgument
from natron.records import LOADING, READY, UNAVAILABLE, ModelRecord, VersionState, WorkerReport
from router.aggregate import aggregate
from router.placement import place
from router.repository import scan_model, scan_repository

ONNX_CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
{extra}
"""


def make_model(
    repo: Path, name: str, versions: list[int], extra: str = "", config: str | None = None
) -> Path:
    model_dir = repo / name
    model_dir.mkdir(parents=True)
    text = config if config is not None else ONNX_CONFIG.format(name=name, extra=extra)
    (model_dir / "config.pbtxt").write_text(text)
    for version in versions:
        (model_dir / str(version)).mkdir()
        (model_dir / str(version) / "model.onnx").write_bytes(b"")
    return model_dir


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", ["3"]),
        ("version_policy { latest { num_versions: 2 } }", ["3", "2"]),
        ("version_policy { all { } }", ["3", "2", "1"]),
        ("version_policy { specific { versions: [1, 3] } }", ["3", "1"]),
    ],
)
def test_the_version_policy_picks_the_versions_served(
    tmp_path: Path, policy: str, expected: list[str]
) -> None:
    record = scan_model(make_model(tmp_path, "m", [1, 2, 3], extra=policy))
    assert record.reason == ""
    assert list(record.versions) == expected
    assert all(s.state == LOADING for s in record.versions.values())


def test_a_specific_version_without_a_folder_makes_the_model_unavailable(tmp_path: Path) -> None:
    record = scan_model(make_model(tmp_path, "m", [1], extra="version_policy { specific { versions: [4] } }"))
    assert "[4]" in record.reason
    assert record.versions["1"].state == UNAVAILABLE


def test_a_config_that_does_not_parse_is_unavailable_with_the_parser_message(tmp_path: Path) -> None:
    record = scan_model(make_model(tmp_path, "m", [1], config="name: 'm' max_batch_size: lots"))
    assert record.config is None
    assert "config.pbtxt" in record.reason
    assert record.versions == {"1": VersionState(UNAVAILABLE, record.reason)}


def test_a_config_naming_another_model_is_refused(tmp_path: Path) -> None:
    record = scan_model(make_model(tmp_path, "m", [1], config=ONNX_CONFIG.format(name="other", extra="")))
    assert "does not match" in record.reason


def test_a_model_without_versions_is_unavailable(tmp_path: Path) -> None:
    record = scan_model(make_model(tmp_path, "m", []))
    assert "no version folder" in record.reason


def test_names_that_cannot_be_subject_tokens_are_skipped(tmp_path: Path) -> None:
    make_model(tmp_path, "good", [1])
    make_model(tmp_path, "bad.name", [1], config=ONNX_CONFIG.format(name="bad.name", extra=""))
    (tmp_path / ".hidden").mkdir()
    assert [r.name for r in scan_repository(tmp_path)] == ["good"]


def test_a_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a directory"):
        scan_repository(tmp_path / "nope")


def test_config_json_keeps_int64_as_numbers_and_strings_as_strings() -> None:
    config = cfg.parse_config_text(
        'name: "m" max_batch_size: 4 input [{name: "x" data_type: TYPE_INT64 dims: [-1, 3]}] '
        'parameters { key: "k" value { string_value: "8" } }',
        "test",
    )
    data = cfg.config_to_json(config)
    assert data["max_batch_size"] == 4
    assert data["input"][0]["dims"] == [-1, 3]
    assert data["parameters"]["k"]["string_value"] == "8"
    assert cfg.config_from_json(data) == config


def test_preferred_batch_sizes_over_the_maximum_are_refused() -> None:
    config = cfg.parse_config_text(
        'name: "m" max_batch_size: 4 dynamic_batching { preferred_batch_size: [8] }', "test"
    )
    with pytest.raises(cfg.ConfigError, match="preferred_batch_size 8"):
        cfg.fill_defaults(config)


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
    assert aggregate(record, [draining, stranger]) == {
        "2": VersionState(UNAVAILABLE, "no live worker serves this model")
    }


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


def _fleet_worker(worker_id: str, kind: str, index: int = 0, memory: int = 0) -> WorkerReport:
    device = {"kind": kind, "index": index, "memory_total_bytes": memory, "memory_free_bytes": memory}
    return WorkerReport(id=worker_id, host="h", pid=1, devices=[device])


def _placed(
    groups: list[dict[str, Any]], workers: list[WorkerReport], size: int = 0
) -> tuple[dict[str, int], str]:
    record = ModelRecord(
        name="m", path="/x", config={"instance_group": groups}, versions={"1": VersionState(LOADING)}
    )
    return place([record], workers, {"m": size})["m"]


def test_instances_are_placed_on_every_matching_worker_count_times() -> None:
    fleet = [_fleet_worker("c1", "CPU"), _fleet_worker("c2", "CPU"), _fleet_worker("g0", "GPU", 0, 10**9)]
    assert _placed([{"kind": "KIND_CPU", "count": 2}], fleet) == ({"c1": 2, "c2": 2}, "")
    assert _placed([{"kind": "KIND_GPU", "count": 1}], fleet) == ({"g0": 1}, "")
    assert _placed([{"kind": "KIND_AUTO", "count": 1}], fleet) == ({"g0": 1}, "")
    assert _placed([{"kind": "KIND_AUTO", "count": 3}], fleet[:2]) == ({"c1": 3, "c2": 3}, "")


def test_gpu_placement_honours_the_gpus_list_and_free_memory() -> None:
    fleet = [_fleet_worker("g0", "GPU", 0, 10**9), _fleet_worker("g1", "GPU", 1, 10**6)]
    assert _placed([{"kind": "KIND_GPU", "gpus": [1]}], fleet) == ({"g1": 1}, "")
    assert _placed([{"kind": "KIND_GPU"}], fleet, size=10**7) == ({"g0": 1}, "")
    placement, reason = _placed([{"kind": "KIND_GPU"}], fleet, size=10**10)
    assert placement == {} and "device memory" in reason


def test_a_gpu_model_without_gpu_workers_says_so() -> None:
    placement, reason = _placed([{"kind": "KIND_GPU"}], [_fleet_worker("c1", "CPU")])
    assert placement == {} and "GPU" in reason
