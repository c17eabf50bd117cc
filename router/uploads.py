"""Files uploaded with Triton's load API (`"file:<version>/<name>": base64`), written to a
folder of their own. Every path is checked first: nothing can be written or read outside it.
"""

from __future__ import annotations

import base64
import binascii
import shutil
import uuid
from pathlib import Path, PurePosixPath

from natron.errors import InvalidArgument

FILE_PREFIX = "file:"


def safe_relative_path(raw: str) -> PurePosixPath:
    """`<version>/<name...>`: relative, no '..', no empty or dot parts, a numeric version."""
    path = PurePosixPath(raw)
    if not raw or path.is_absolute() or "\\" in raw or "\0" in raw:
        raise InvalidArgument(f"invalid file path '{raw}': must be relative, like '1/model.onnx'")
    parts = raw.split("/")  # not path.parts: PurePosixPath drops '.' and empty parts silently
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(f"invalid file path '{raw}': '.', '..' and empty parts are not allowed")
    if len(parts) < 2 or not parts[0].isdigit() or int(parts[0]) < 1:
        raise InvalidArgument(
            f"invalid file path '{raw}': must start with a version folder, like '1/model.onnx'"
        )
    return path


def write_uploads(upload_root: Path, model: str, files: dict[str, str]) -> Path:
    """Decode and write `files` (path -> base64) into a new folder; return the folder."""
    decoded: dict[PurePosixPath, bytes] = {}
    for raw_path, content in files.items():
        path = safe_relative_path(raw_path)
        if not isinstance(content, str):
            raise InvalidArgument(f"file '{raw_path}': content must be a base64 string")
        try:
            decoded[path] = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"file '{raw_path}': content is not valid base64") from None
    folder = upload_root / model / uuid.uuid4().hex
    root = folder.resolve()
    try:
        for path, data in decoded.items():
            target = (folder / path).resolve()
            if root not in target.parents:  # belt and braces after the checks above
                raise InvalidArgument(f"file path '{path}' leaves the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
