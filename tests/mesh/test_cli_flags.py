"""A Triton user's command line against the real processes: `natron serve` started with
tritonserver's flags serves, and natron's table of tritonserver's flags is the real binary's."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import requests

from examples.build_models import build
from natron.cli import triton_flags
from tests.harness import natron_serve

TRITON_FLAGS = (
    "--exit-timeout-secs=5", "--log-verbose=1", "--log-format", "ISO8601", "--strict-readiness=true",
    "--model-control-mode=none", "--model-load-thread-count=2", "--http-thread-count", "1",
    "--backend-config=onnxruntime,intra_op_thread_count=1", "--backend-config=default-max-batch-size=4",
    "--metrics-config=summary_latencies=true", "--allow-metrics=true", "--exit-on-error=false",
    "--strict-model-config=false", "--allow-sagemaker=false", "--rate-limit=off",
)  # fmt: skip


def test_serve_started_with_tritonserver_flags_serves_and_logs_as_they_say(tmp_path: Path) -> None:
    build(tmp_path / "repo", ["tiny"])
    with natron_serve(tmp_path / "repo", ["tiny"], tmp_path, TRITON_FLAGS) as served:
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
        answer = requests.post(f"{served.url}/v2/models/tiny/infer", data=json.dumps(body), timeout=30)
        assert answer.status_code == 200, answer.text
        assert requests.get(served.metrics_url, timeout=5).status_code == 200
    log = served.output.read_text(errors="replace")
    # --log-verbose=1: debug lines; --log-format ISO8601: stamped in UTC, to the second, with a Z.
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ DEBUG (router|worker|gateway)\[", log, re.M), log[
        -4000:
    ]
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", log, re.M)


def test_the_flag_table_is_the_real_tritonservers() -> None:
    """TRITONSERVER_FLAGS lists what `tritonserver --help` prints, no more and no less."""
    from bench.triton import TritonMissing, find_install

    try:
        install = find_install()
    except TritonMissing as exc:
        pytest.skip(str(exc))
    if not install.server.is_file():
        pytest.skip(f"{install.server} is missing (scripts/install_triton.sh installs it)")
    help_ = subprocess.run(
        [str(install.server), "--help"], capture_output=True, text=True, env=install.server_env(), timeout=60
    )
    listed = re.findall(r"^  (--[a-z0-9-]+)", help_.stdout + help_.stderr, re.M)
    assert listed, help_.stderr[-2000:]
    assert set(listed) - {"--help"} == set(triton_flags.TRITONSERVER_FLAGS)
