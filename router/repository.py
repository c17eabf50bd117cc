"""Scan a Triton model repository into ModelRecords: configs parsed and completed, the
version policy applied, and every problem turned into an UNAVAILABLE state with its reason.
"""

from __future__ import annotations

import hashlib
import logging
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


def scan_repository(repository: Path) -> list[ModelRecord]:
    if not repository.is_dir():
        raise InvalidArgument(f"model repository '{repository}' is not a directory")
    records: list[ModelRecord] = []
    for model_dir in sorted(repository.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        try:
            check_name("model", model_dir.name)
        except InvalidArgument as exc:
            log.warning("skipping %s: %s", model_dir, exc.message)
            continue
        records.append(scan_model(model_dir))
    return records
