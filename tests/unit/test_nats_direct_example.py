"""examples/nats_direct.py, the client that skips HTTP, stays free of natron code: a user can copy
it with nats-py, msgpack and numpy alone. (It runs against a server in tests/mesh/test_direct_nats.py.)"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nats_direct.py"


def test_the_example_client_imports_nothing_but_nats_msgpack_and_numpy() -> None:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(EXAMPLE.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            modules.add((node.module or "").split(".")[0])
    third_party = modules - set(sys.stdlib_module_names)
    assert third_party == {"nats", "msgpack", "numpy"}
