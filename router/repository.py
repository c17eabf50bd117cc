"""Scan Triton model repositories into ModelRecords: configs parsed and completed, the
version policy applied, and every problem turned into an UNAVAILABLE state with its reason.

Several repositories serve as one, as tritonserver's repeated --model-repository does: a model
is a folder in any of them. A name must be unique across them all; a name found in more than
one is not served from any (Triton's rule), and its record says where it was found.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.subjects import check_name
from natron import config as cfg
from natron.errors import InvalidArgument
from natron.records import LOADING, UNAVAILABLE, ModelRecord, VersionState
from natron.spec import ModelSpec

log = logging.getLogger(__name__)


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Numbered version folders; anything else in the model folder is not a version."""
    found: dict[int, Path] = {}
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0:
            found[int(child.name)] = child
    return found


def files_signature(model_dir: Path, versions: list[int]) -> str:
    """Sizes and modification times of the served versions' files: a changed model file makes
    a new generation, so polling picks it up even when config.pbtxt is unchanged."""
    entries: list[str] = []
    for version in versions:
        for path in sorted((model_dir / str(version)).rglob("*")):
            if path.is_file():
                stat = path.stat()
                entries.append(f"{path.relative_to(model_dir)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def scan_model(
    model_dir: Path, config_override: dict[str, Any] | None = None, name: str | None = None
) -> ModelRecord:
    """One model folder as a record. `config_override` (Triton's JSON form) replaces its
    config.pbtxt, as Triton's load API allows; `name` names a model whose files sit elsewhere
    (an upload folder)."""
    name = name or model_dir.name
    record = ModelRecord(name=name, path=str(model_dir.resolve()), config=None)
    try:
        available = version_dirs(model_dir)
    except OSError as exc:
        record.reason = f"cannot read model folder: {exc}"
        record.generation = record.compute_generation()
        return record
    try:
        if config_override is not None:
            config = cfg.config_from_json(config_override)
            if config.name and config.name != name:
                raise cfg.ConfigError(f"config override names model '{config.name}', not '{name}'")
            config.name = name
        else:
            config = cfg.read_config(model_dir)
        infer_dirs = [available[v] for v in sorted(available, reverse=True)]
        cfg.infer_platform(config, infer_dirs)
        versions = cfg.select_versions(config, list(available))
        if not versions:
            raise cfg.ConfigError(f"model '{name}' has no version folder (1/, 2/, ...)")
        if config.platform == "onnxruntime_onnx":
            model_file = available[versions[0]] / cfg.model_filename(config)
            if model_file.exists():
                cfg.autocomplete_onnx(config, model_file)
        if config.backend == "python" and versions:
            from pystub.process import complete_config  # runs model.py in a stub process

            complete_config(config, available[versions[0]])
        cfg.fill_defaults(config)
        ModelSpec.from_config(config)  # rejects unsupported datatypes now, not at first request
        record.config = cfg.config_to_json(config)
        record.versions = {str(v): VersionState(LOADING) for v in versions}
        record.files = files_signature(model_dir, versions)
    except (InvalidArgument, OSError) as exc:
        reason = exc.message if isinstance(exc, InvalidArgument) else str(exc)
        log.warning("model '%s' is unavailable: %s", name, reason)
        record.reason = reason
        record.versions = {
            str(v): VersionState(UNAVAILABLE, reason) for v in sorted(available, reverse=True)[:1]
        }
    record.generation = record.compute_generation()
    return record


def model_folders(repository: Path) -> list[Path]:
    """The model folders of one repository, by name: hidden folders and names that cannot be a
    subject token are left out (the latter with a warning)."""
    if not repository.is_dir():
        raise InvalidArgument(f"model repository '{repository}' is not a directory")
    folders: list[Path] = []
    for model_dir in sorted(repository.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        try:
            check_name("model", model_dir.name)
        except InvalidArgument as exc:
            log.warning("skipping %s: %s", model_dir, exc.message)
            continue
        folders.append(model_dir)
    return folders


def find_model(repositories: Sequence[Path], name: str) -> list[Path]:
    """The folders named `name`, in the order of `repositories`: one when the model is there,
    several when its name is not unique, none when it is in no repository."""
    return [repository / name for repository in repositories if (repository / name).is_dir()]


def not_unique(name: str, folders: Sequence[Path]) -> ModelRecord:
    """The record of a model found in several repositories: UNAVAILABLE, naming them, and
    never placed (it has a reason and no config)."""
    where = ", ".join(str(folder.parent) for folder in folders)
    reason = f"not unique across the model repositories: in {where}"
    log.warning("model '%s' is unavailable: %s", name, reason)
    record = ModelRecord(name=name, path=str(folders[0].resolve()), config=None, reason=reason)
    # The folders found make the generation, so a rescan that finds the name elsewhere (or in
    # one repository again) sees a change.
    record.files = hashlib.sha256("\n".join(str(f.resolve()) for f in folders).encode()).hexdigest()[:16]
    record.generation = record.compute_generation()
    return record


def scan_folders(
    name: str, folders: Sequence[Path], config_override: dict[str, Any] | None = None
) -> ModelRecord:
    """The record of model `name` from the folders that hold it (see `find_model`)."""
    if len(folders) > 1:
        return not_unique(name, folders)
    return scan_model(folders[0], config_override, name)


def scan_repositories(repositories: Sequence[Path]) -> list[ModelRecord]:
    """Every model of `repositories`, by name. A repository that is not a directory is an
    error for the whole scan: a repository gone for a moment (an unmounted volume) must not
    read as every one of its models removed."""
    found: dict[str, list[Path]] = {}
    for repository in repositories:
        for model_dir in model_folders(repository):
            found.setdefault(model_dir.name, []).append(model_dir)
    return [scan_folders(name, folders) for name, folders in sorted(found.items())]
