"""`natron analyze` end to end, as a user runs it: real `natron serve` processes, real load, the
report's files read back, and the failure paths (a budget nobody meets, a server that goes
away, Ctrl-C, a model that is not there)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from tests.harness import ROOT, Served, child_processes, natron_serve

pytestmark = pytest.mark.mesh

# Short windows and few levels: the tests prove the tool's behaviour, bench/ measures.
# One window per level (fewer trials than the stability rule needs), except where a test says.
QUICK = ("--window-s", "0.4", "--max-trials", "1", "--concurrency", "1,4", "--instance-counts", "1,2")


def _analyze(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natron", "analyze", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture
def simple_repo(model_repository: Path, tmp_path: Path) -> Path:
    """A repository of `simple` alone (INT32 add/sub, max_batch_size 8): the analysis writes
    next to the model, so each test has its own copy."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "simple", repo / "simple")
    return repo


@pytest.fixture(scope="module")
def explicit_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A running mesh in explicit mode, shared by the module's tests: each analysis gives the
    model back its own config at the end (a test checks that)."""
    repo = tmp_path_factory.mktemp("explicit") / "repo"
    shutil.copytree(model_repository / "simple", repo / "simple")
    flags = ("--model-control-mode", "explicit", "--load-model", "simple")
    with natron_serve(repo, ["simple"], tmp_path_factory.mktemp("explicit-serve"), flags) as served:
        yield served


def test_a_repository_is_analyzed_into_a_report_and_a_chosen_config(
    simple_repo: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    # natron perf's stability rule per level, loose enough to be met: three windows at least.
    done = _analyze(
        "simple", "--repository", str(simple_repo), "--report", str(report), "--max-configs", "3", *QUICK,
        "--max-trials", "4", "--stability-percentage", "60",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    html = (report / "index.html").read_text()
    assert "throughput_vs_latency.png" in html and "memory.png" in html
    assert (report / "throughput_vs_latency.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((report / "measurements.csv").open()))
    configs = {row["config"] for row in rows}
    assert len(configs) == 3, rows
    for row in rows:
        assert row["failure"] == "" and int(row["errors"]) == 0
        assert float(row["throughput_per_s"]) > 0 and float(row["p99_ms"]) > 0
        assert float(row["rss_mb"]) > 20  # a worker with ONNX Runtime loaded: tens of MB at least
        # The server's own figures, from the statistics extension over the windows.
        assert float(row["server_compute_us"]) > 0
        assert row["stable"] in ("True", "False") and 3 <= int(row["windows"]) <= 4
    chosen = text_format.Parse((report / "config.pbtxt").read_text(), pb.ModelConfig())
    assert chosen.name == "simple" and chosen.max_batch_size in (1, 2, 4, 8)
    assert chosen.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    # The chosen one is the config with the most throughput (no constraint given).
    best = max(rows, key=lambda row: float(row["throughput_per_s"]))
    assert f"i{chosen.instance_group[0].count}-" in best["config"]
    # Next to the model, without touching the model's own config.
    assert (simple_repo / "simple" / "config.analyzed.pbtxt").read_text() == (
        report / "config.pbtxt"
    ).read_text()
    assert "dynamic_batching" in (simple_repo / "simple" / "config.pbtxt").read_text()
    assert "chosen:" in done.stdout


def test_a_budget_no_config_meets_names_the_closest_and_still_writes_the_report(
    simple_repo: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    done = _analyze(
        "simple", "--repository", str(simple_repo), "--report", str(report), "--max-configs", "2",
        "--latency-budget-ms", "0.001", *QUICK,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no config meets p99 <= 0.001 ms; the closest is CPU i" in done.stderr
    assert "Traceback" not in done.stderr
    assert (report / "index.html").exists() and not (report / "config.pbtxt").exists()
    assert len(list(csv.DictReader((report / "measurements.csv").open()))) >= 2
    assert not (simple_repo / "simple" / "config.analyzed.pbtxt").exists()


def test_a_running_server_is_analyzed_and_given_back_its_own_config(
    explicit_server: Served, tmp_path: Path
) -> None:
    before = requests.get(f"{explicit_server.url}/v2/models/simple/config", timeout=10).json()
    done = _analyze(
        "simple", "--url", explicit_server.url, "--metrics-url", explicit_server.metrics_url,
        "--report", str(tmp_path / "report"), "--max-configs", "2", *QUICK,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    after = requests.get(f"{explicit_server.url}/v2/models/simple/config", timeout=10).json()
    assert after["instance_group"] == before["instance_group"]
    assert after["max_batch_size"] == before["max_batch_size"] == 8
    # A running server's repository is not ours to write to.
    assert not (explicit_server.repository / "simple" / "config.analyzed.pbtxt").exists()


def test_request_rates_can_be_swept_instead_of_concurrency(explicit_server: Served, tmp_path: Path) -> None:
    report = tmp_path / "report"
    done = _analyze(
        "simple", "--url", explicit_server.url, "--metrics-url", explicit_server.metrics_url,
        "--report", str(report), "--max-configs", "1", "--request-rates", "40,80", "--window-s", "1",
        "--max-trials", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader((report / "measurements.csv").open()))
    assert [(row["concurrency"], row["request_rate"]) for row in rows] == [("", "40"), ("", "80")]
    # An open-loop rate well under capacity is served at that rate (generous bounds: a shared box).
    for row, rate in zip(rows, (40, 80), strict=True):
        assert 0.7 * rate < float(row["throughput_per_s"]) < 1.3 * rate, row


def test_a_server_that_takes_no_config_is_refused_after_one_try(served: Served, tmp_path: Path) -> None:
    """The session's server runs in control mode none: a load with a config is refused, and the
    analysis says why at once rather than failing every candidate alike."""
    done = _analyze(
        "tiny",
        "--url",
        served.url,
        "--metrics-url",
        served.metrics_url,
        "--report",
        str(tmp_path / "r"),
        *QUICK,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "natron analyze: error: 'tiny' does not load with a config override:" in done.stderr
    assert "not allowed in model control mode" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.count("measured ") == 0
    assert requests.get(f"{served.url}/v2/models/tiny/ready", timeout=10).status_code == 200


def test_a_model_that_is_not_there_is_a_one_line_error(
    explicit_server: Served, simple_repo: Path, tmp_path: Path
) -> None:
    done = _analyze(
        "nosuch", "--url", explicit_server.url, "--metrics-url", explicit_server.metrics_url, *QUICK
    )
    assert done.returncode == 1
    assert "natron analyze: error:" in done.stderr and "nosuch" in done.stderr
    assert "Traceback" not in done.stderr
    done = _analyze("nosuch", "--repository", str(simple_repo))
    assert done.returncode == 2 and f"no model 'nosuch' in {simple_repo}" in done.stderr


class _Running:
    """`natron analyze` in the background, its output read as it comes."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "natron", "analyze", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_measured(self, timeout_s: float = 120) -> None:
        """Until a config has been measured (the analysis prints a line for each)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "".join(self.lines)
            if any(line.startswith("measured ") for line in self.lines):
                return
            time.sleep(0.2)
        raise AssertionError("nothing measured in time: " + "".join(self.lines))

    def finish(self, timeout_s: float = 120) -> tuple[int, str, str]:
        assert self.process.stderr is not None
        try:
            self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(10)
        return self.process.returncode, "".join(self.lines), self.process.stderr.read()


def test_a_server_that_goes_away_mid_run_keeps_what_was_measured(simple_repo: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    with natron_serve(
        simple_repo,
        ["simple"],
        tmp_path,
        ("--model-control-mode", "explicit", "--load-model", "simple"),
    ) as served:
        running = _Running(
            "simple", "--url", served.url, "--metrics-url", served.metrics_url, "--report", str(report),
            "--max-configs", "12", "--window-s", "1", "--max-trials", "1", "--concurrency", "1,2,4,8",
        )  # fmt: skip
        running.wait_measured()
        # The whole mesh goes at once: every process of natron serve.
        for pid, _ in child_processes(served.pid):
            os.kill(pid, signal.SIGKILL)
        os.kill(served.pid, signal.SIGKILL)
        code, out, err = running.finish()
    assert code == 1, out + err
    assert "stopped early: the server went away" in err and "Traceback" not in err
    rows = list(csv.DictReader((report / "measurements.csv").open()))
    assert rows and float(rows[0]["throughput_per_s"]) > 0


def test_ctrl_c_writes_the_report_and_stops_the_private_server(simple_repo: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    running = _Running(
        "simple", "--repository", str(simple_repo), "--report", str(report), "--max-configs", "12",
        "--window-s", "1", "--max-trials", "1", "--concurrency", "1,2,4,8",
    )  # fmt: skip
    running.wait_measured()
    servers = [pid for pid, command in child_processes(running.process.pid) if "serve" in command]
    assert servers
    running.process.send_signal(signal.SIGINT)
    code, out, err = running.finish()
    assert code == 130, out + err
    assert "Traceback" not in err
    assert list(csv.DictReader((report / "measurements.csv").open()))
    assert (report / "index.html").exists()
    for pid in servers:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
