"""Model repository scan (one repository or several), config parsing and completion, version
policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from natron import config as cfg
from natron.errors import InvalidArgument
from natron.records import LOADING, UNAVAILABLE, VersionState
from router.repository import find_model, scan_folders, scan_model, scan_repositories

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
    assert [r.name for r in scan_repositories([tmp_path])] == ["good"]


def test_a_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a directory"):
        scan_repositories([tmp_path / "nope"])


def test_a_missing_repository_among_several_fails_the_whole_scan(tmp_path: Path) -> None:
    # Not "every model of the missing one was removed": a poll would unload them all.
    make_model(tmp_path / "a", "m", [1])
    with pytest.raises(InvalidArgument, match=f"'{tmp_path / 'b'}' is not a directory"):
        scan_repositories([tmp_path / "a", tmp_path / "b"])


def test_two_repositories_scan_as_one_sorted_by_name(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_model(a, "zeta", [1])
    make_model(a, "alpha", [1, 2])
    make_model(b, "mid", [3])
    records = scan_repositories([a, b])
    assert [r.name for r in records] == ["alpha", "mid", "zeta"]
    assert all(r.reason == "" for r in records)
    paths = {r.name: Path(r.path) for r in records}
    assert paths == {
        "alpha": (a / "alpha").resolve(),
        "mid": (b / "mid").resolve(),
        "zeta": (a / "zeta").resolve(),
    }
    assert list(next(r for r in records if r.name == "mid").versions) == ["3"]
    # The order the repositories are given in does not change what is served.
    assert [r.to_json() for r in scan_repositories([b, a])] == [r.to_json() for r in records]


def test_a_name_in_two_repositories_is_unavailable_naming_both(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_model(a, "twice", [1])
    make_model(b, "twice", [2])
    make_model(b, "once", [1])
    c.mkdir()
    records = {r.name: r for r in scan_repositories([a, b, c])}
    assert records["once"].reason == ""
    twice = records["twice"]
    assert twice.reason == f"not unique across the model repositories: in {a}, {b}"
    # Not served from either: no config, no version, nothing a worker could load.
    assert twice.config is None and twice.versions == {}
    assert twice.generation == twice.compute_generation() != ""


def test_a_duplicate_changes_generation_when_the_repositories_holding_it_change(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for repo in (a, b, c):
        make_model(repo, "m", [1])
    in_ab = scan_folders("m", find_model([a, b], "m"))
    assert in_ab.generation == scan_folders("m", find_model([a, b], "m")).generation
    in_ac = scan_folders("m", find_model([a, c], "m"))
    assert in_ac.reason.endswith(f"in {a}, {c}")
    assert in_ac.generation != in_ab.generation


def test_find_model_looks_in_every_repository_in_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_model(a, "first", [1])
    make_model(b, "second", [1])
    make_model(b, "first", [1])
    (a / "not_a_model").write_text("a file, not a folder")
    assert find_model([a, b], "second") == [b / "second"]
    assert find_model([a, b], "first") == [a / "first", b / "first"]
    assert find_model([a, b], "missing") == []
    assert find_model([a, b], "not_a_model") == []
    record = scan_folders("second", find_model([a, b], "second"))
    assert record.reason == "" and Path(record.path) == (b / "second").resolve()


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
