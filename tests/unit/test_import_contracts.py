"""The import contracts in pyproject.toml cover every module of the vocabulary: a new module in
natron/ that the contracts did not name would be free to import any service."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_every_vocabulary_module_is_named_by_the_layers_and_the_forbidden_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    in_layer = {name.strip() for name in layers[-1].split(":")}
    forbidden = next(
        c for c in config["contracts"] if c["name"].startswith("the vocabulary imports no service")
    )
    modules = {
        f"natron.{path.stem}"
        for path in (ROOT / "natron").glob("*.py")
        if path.stem not in ("__init__", "__main__")
    }
    assert in_layer == modules
    assert set(forbidden["source_modules"]) == modules
