"""Files uploaded with Triton's load API (`"file:<version>/<name>": base64`), written to a
folder of their own. Every path is checked first: nothing can be written or read outside it.

A load request is bounded (UploadLimits: how many files, how many decoded bytes) and every
name is checked before anything is decoded or written, so a refused upload leaves nothing
behind and its 400 names the file, never a path of this host. The router removes a model's
folder once nothing serves from it: the model was unloaded, or another load replaced it
(router/service.py); without that every reload would leave its files on disk for good.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from natron.errors import InvalidArgument, PayloadTooLarge

log = logging.getLogger(__name__)

FILE_PREFIX: Final = "file:"
MiB: Final = 1024 * 1024
# File systems refuse longer names (NAME_MAX) and longer paths (PATH_MAX less the upload folder).
_MAX_PART_BYTES: Final = 255
_MAX_PATH_BYTES: Final = 1024
# A version folder as router/repository.py reads one: ASCII digits, no leading zero, an int64.
_VERSION: Final = re.compile(r"[1-9][0-9]{0,18}")
# Control characters make names that logs and terminals show as something else.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# The folder names write_uploads makes under <root>/<model>/.
_FOLDER: Final = re.compile(r"[0-9a-f]{32}")


@dataclass(slots=True, frozen=True)
class UploadLimits:
    """What one load request may upload: set by the router's --max-upload-files and
    --max-upload-mb."""

    max_files: int = 1000
    max_bytes: int = 1024 * MiB


def _shown(raw: str) -> str:
    """A client's file name for an error message: cut short, control characters escaped."""
    text = raw if len(raw) <= 80 else raw[:77] + "..."
    return text.encode("unicode_escape").decode("ascii") if _CONTROL.search(text) else text


def safe_relative_path(raw: str) -> PurePosixPath:
    """`<version>/<name...>`: relative, no '..', no empty or dot parts, a numeric version, parts
    a file system takes (UTF-8, at most 255 bytes, no control characters)."""
    if not isinstance(raw, str) or not raw:
        raise InvalidArgument("invalid file path '': must be relative, like '1/model.onnx'")
    shown = _shown(raw)
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \\ud800 can spell
        raise InvalidArgument(f"invalid file path '{shown}': not valid UTF-8") from None
    path = PurePosixPath(raw)
    if path.is_absolute() or "\\" in raw or _CONTROL.search(raw):
        raise InvalidArgument(
            f"invalid file path '{shown}': must be relative, like '1/model.onnx', without "
            "backslashes or control characters"
        )
    if len(encoded) > _MAX_PATH_BYTES:
        raise InvalidArgument(f"invalid file path '{shown}': longer than {_MAX_PATH_BYTES} bytes")
    parts = raw.split("/")  # not path.parts: PurePosixPath drops '.' and empty parts silently
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(f"invalid file path '{shown}': '.', '..' and empty parts are not allowed")
    if len(parts) < 2 or not _VERSION.fullmatch(parts[0]):
        raise InvalidArgument(
            f"invalid file path '{shown}': must start with a version folder (1, 2, ...), like '1/model.onnx'"
        )
    for part in parts:
        if len(part.encode("utf-8")) > _MAX_PART_BYTES:
            raise InvalidArgument(
                f"invalid file path '{shown}': a part is longer than {_MAX_PART_BYTES} bytes"
            )
    return path


def check_files(files: dict[str, str], limits: UploadLimits) -> dict[PurePosixPath, str]:
    """Every name and the total size checked, nothing decoded yet: the count first (400), then
    each name (400), then the decoded size its base64 text gives (413)."""
    if len(files) > limits.max_files:
        raise InvalidArgument(
            f"the load uploads {len(files)} files, over the limit of {limits.max_files} "
            "(the router's --max-upload-files)"
        )
    checked: dict[PurePosixPath, str] = {}
    total = 0
    for raw_path, content in files.items():
        path = safe_relative_path(raw_path)
        if not isinstance(content, str):
            raise InvalidArgument(f"file '{_shown(raw_path)}': content must be a base64 string")
        if path in checked:
            raise InvalidArgument(f"file '{_shown(raw_path)}' is uploaded twice")
        checked[path] = content
        total += len(content) // 4 * 3  # base64's decoded size, padding aside
    if total > limits.max_bytes:
        raise PayloadTooLarge(
            f"the load uploads about {total} bytes, over the limit of {limits.max_bytes} bytes "
            "(the router's --max-upload-mb)"
        )
    _check_no_file_under_file(checked)
    return checked


def _check_no_file_under_file(paths: Iterable[PurePosixPath]) -> None:
    """'1/a' and '1/a/b' cannot both be written: one would be a file and a folder."""
    files = set(paths)
    for path in files:
        for parent in path.parents:
            if parent in files:
                raise InvalidArgument(
                    f"file '{_shown(str(path))}' would sit under the file '{_shown(str(parent))}'"
                )


def write_uploads(
    upload_root: Path, model: str, files: dict[str, str], limits: UploadLimits | None = None
) -> Path:
    """Decode and write `files` (path -> base64) into a new folder; return the folder."""
    checked = check_files(files, limits or UploadLimits())
    decoded: dict[PurePosixPath, bytes] = {}
    for path, content in checked.items():
        try:
            decoded[path] = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"file '{_shown(str(path))}': content is not valid base64") from None
    folder = upload_root / model / uuid.uuid4().hex
    root = folder.resolve()
    try:
        for path, data in decoded.items():
            target = (folder / path).resolve()
            if root not in target.parents:  # belt and braces after the checks above
                raise InvalidArgument(f"file path '{_shown(str(path))}' leaves the model folder")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            except OSError as exc:
                # The reason, not the host path the OSError's text would carry.
                log.warning("upload of model '%s': cannot write %s: %s", model, target, exc)
                raise InvalidArgument(
                    f"file '{_shown(str(path))}' cannot be written: {exc.strerror or 'I/O error'}"
                ) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def is_upload(path: str | Path, upload_root: Path) -> bool:
    """Whether `path` is a folder write_uploads made under `upload_root` (<root>/<model>/<hex>):
    the only folders the router ever removes."""
    candidate = Path(path)
    root = upload_root.resolve()
    return candidate.parent.parent == root and _FOLDER.fullmatch(candidate.name) is not None


def remove_folders(folders: Iterable[Path]) -> None:
    """Remove upload folders (and a model's folder once it holds no upload)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed upload folder %s", folder)
        try:
            folder.parent.rmdir()  # the model's folder, once empty
        except OSError:
            pass


def orphans(upload_root: Path, keep: set[str]) -> list[Path]:
    """Upload folders under `upload_root` that no record in `keep` (resolved paths) uses: what a
    router that stopped left behind."""
    found: list[Path] = []
    if not upload_root.is_dir():
        return found
    for model_dir in upload_root.resolve().iterdir():
        if not model_dir.is_dir():
            continue
        for folder in model_dir.iterdir():
            if folder.is_dir() and _FOLDER.fullmatch(folder.name) and str(folder) not in keep:
                found.append(folder)
    return found
