"""natron's benchmark: served throughput and latency against the two limits that bound it.

One run measures, strictly one load at a time so the numbers share the same machine noise:

1. the compute limit: onnxruntime in-process on the same model.onnx files, batch 1..128
   (`bench/ort_limit.py` in a subprocess, while no server runs);
2. the overhead limit: a bare aiohttp+uvloop server that parses the infer JSON and answers
   without a model (`bench/bare_server.py`), loaded with the same wrk settings on `tiny`;
3. the served numbers: `natron serve` started here (or any KServe v2 server at `--url`),
   loaded by wrk with `bench/infer.lua` at each concurrency level.

Then it prints the ratios the project targets with PASS/FAIL and writes everything as JSON
to bench/results/<timestamp>.json (and `--json PATH`). See bench/README.md.

    python -m bench.bench --quick
    python -m bench.bench --url http://127.0.0.1:8000 --models tiny   # e.g. a running Triton
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from broker.server import free_port, free_ports

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
BENCH_DIR: Final = REPO_ROOT / "bench"
LUA_SCRIPT: Final = BENCH_DIR / "infer.lua"
RESULTS_DIR: Final = BENCH_DIR / "results"
DEFAULT_REPO: Final = REPO_ROOT / "examples" / "models"

# FP32 values per sample of INPUT0, for the models the benchmark knows how to feed.
MODEL_INPUT_SIZES: Final = {"tiny": 16, "mlp": 256}
ORT_BATCH_SIZES: Final = (1, 2, 4, 8, 16, 32, 64, 128)

TARGET_MLP_FRACTION_OF_ORT: Final = 0.7
TARGET_TINY_FRACTION_OF_BARE: Final = 0.4
TARGET_TINY_P50_MS: Final = 1.0
MLP_TARGET_CONCURRENCY: Final = 128
TINY_TARGET_CONCURRENCY: Final = 32

SERVER_READY_TIMEOUT_S: Final = 120.0
SERVER_STOP_GRACE_S: Final = 15.0
WRK_MARKER: Final = "NATRON_WRK_RESULT "
# wrk's default 2 s request timeout turns a slow-but-correct batched answer into an error.
WRK_REQUEST_TIMEOUT_S: Final = 10

# Piped output (CI logs, `| tee`) would otherwise be squeezed to 80 columns and truncate numbers.
console = Console(width=None if sys.stdout.isatty() else 132)


# --- small helpers ---


def http_status(url: str, *, body: bytes | None = None, timeout_s: float = 5.0) -> tuple[int | None, bytes]:
    """(status, body) of one request; status None when nothing answered."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None, b""


def infer_body(input_size: int) -> bytes:
    """A fixed batch-1 KServe v2 JSON body; same bytes every run so results compare."""
    import numpy as np

    values = np.random.default_rng(42).uniform(-1.0, 1.0, input_size)
    body = {
        "inputs": [
            {
                "name": "INPUT0",
                "shape": [1, input_size],
                "datatype": "FP32",
                "data": [round(float(v), 4) for v in values],
            }
        ]
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _git(*args: str) -> str | None:
    """What `git <args>` prints in the checkout; None when it cannot say (no git, no commits,
    not a checkout)."""
    try:
        result = subprocess.run(
            ["git", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_revision() -> str | None:
    return _git("rev-parse", "--short", "HEAD") or None


def git_dirty() -> bool:
    """Whether tracked files differ from the revision reported (the figures are then the tree's)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def host_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}


class BenchError(RuntimeError):
    pass


# --- servers we start ---


@dataclass
class ServerProcess:
    """A server subprocess in its own session, so its shutdown is ours to drive (`stop_signal`, by
    default SIGINT, then SIGKILL)."""

    name: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    stop_signal: signal.Signals = signal.SIGINT

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()  # the child holds its own descriptor

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, ready_urls: Sequence[str], timeout_s: float) -> float:
        """Poll until every URL answers 200; returns the seconds it took."""
        assert self.process is not None
        start = time.monotonic()
        pending = list(ready_urls)
        while pending:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with code {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() - start > timeout_s:
                raise BenchError(
                    f"{self.name} not ready after {timeout_s:.0f} s (waiting for {pending[0]}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            status, _ = http_status(pending[0], timeout_s=2.0)
            if status == 200:
                pending.pop(0)
            else:
                time.sleep(0.25)
        return time.monotonic() - start

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=SERVER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            ignored = f"{self.stop_signal.name} for {SERVER_STOP_GRACE_S:.0f} s"
            console.print(f"[yellow]{self.name} ignored {ignored}: SIGKILL")
            # Its own session: the group holds the server and any workers it forked, nothing else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def running(server: ServerProcess, ready_urls: Sequence[str], timeout_s: float) -> Iterator[float]:
    server.start()
    try:
        yield server.wait_ready(ready_urls, timeout_s)
    finally:
        server.stop()


def natron_command() -> list[str]:
    script = Path(sys.executable).parent / "natron"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "natron"]


def ready_urls(base_url: str, models: Sequence[str]) -> list[str]:
    return [f"{base_url}/v2/health/ready", *(f"{base_url}/v2/models/{m}/ready" for m in models)]


# --- load generation ---


@dataclass(frozen=True)
class LoadSettings:
    duration_s: int
    concurrency: tuple[int, ...]
    wrk_threads: int
    warmup_s: int


def default_wrk_threads() -> int:
    # On a small machine the server needs the other core more than wrk needs a second thread.
    return 1 if (os.cpu_count() or 1) <= 2 else 2


def check_wrk() -> None:
    if shutil.which("wrk") is None:
        console.print("[red]wrk is not installed. Install it with:[/red]\n    apt-get install -y wrk")
        raise SystemExit(2)


def run_wrk(
    base_url: str, model: str, body_path: Path, concurrency: int, duration_s: int, wrk_threads: int
) -> dict[str, Any]:
    threads = max(1, min(wrk_threads, concurrency))  # wrk needs connections >= threads
    command = [
        "wrk",
        "-t", str(threads),
        "-c", str(concurrency),
        "-d", f"{duration_s}s",
        "--timeout", f"{WRK_REQUEST_TIMEOUT_S}s",
        "--latency",
        "-s", str(LUA_SCRIPT),
        base_url,
        "--",
        f"/v2/models/{model}/infer",
        str(body_path),
    ]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(WRK_MARKER)), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    raw: dict[str, Any] = json.loads(line[len(WRK_MARKER) :])
    elapsed_s = raw["duration_us"] / 1e6
    ok_responses = raw["requests"] - raw["non200"]
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeout_errors"]
    return {
        "model": model,
        "concurrency": concurrency,
        "wrk_threads": threads,
        "duration_s": elapsed_s,
        "requests": raw["requests"],
        "requests_per_s": raw["requests"] / elapsed_s,
        # One sample per request (batch 1); only 200 answers count as samples served.
        "samples_per_s": ok_responses / elapsed_s,
        "p50_ms": raw["latency_p50_us"] / 1e3,
        "p90_ms": raw["latency_p90_us"] / 1e3,
        "p99_ms": raw["latency_p99_us"] / 1e3,
        "mean_ms": raw["latency_mean_us"] / 1e3,
        "max_ms": raw["latency_max_us"] / 1e3,
        "non200": raw["non200"],
        "non200_by_status": raw["non200_by_status"],
        "socket_errors": socket_errors,
        "wrk": raw,
    }


def load_series(
    label: str, base_url: str, models: Sequence[str], bodies: dict[str, Path], settings: LoadSettings
) -> list[dict[str, Any]]:
    """Every (model, concurrency) point against one server, in order."""
    points: list[dict[str, Any]] = []
    for model in models:
        body = bodies[model].read_bytes()
        status, answer = http_status(f"{base_url}/v2/models/{model}/infer", body=body, timeout_s=30.0)
        if status != 200 or b'"outputs"' not in answer:
            message = f"{label}: a single {model} request answered {status}: {answer[:300]!r}"
            console.print(f"[red]{message}; skipping {model}")
            points.append({"server": label, "model": model, "error": message})
            continue
        if settings.warmup_s > 0:
            # Unrecorded: lets lazy initialisation, arenas and batch queues settle first.
            run_wrk(
                base_url,
                model,
                bodies[model],
                max(settings.concurrency),
                settings.warmup_s,
                settings.wrk_threads,
            )
        for concurrency in settings.concurrency:
            console.print(f"[dim]{label}: {model} at concurrency {concurrency} for {settings.duration_s} s")
            point = run_wrk(
                base_url, model, bodies[model], concurrency, settings.duration_s, settings.wrk_threads
            )
            point["server"] = label
            points.append(point)
    return points


# --- the limits ---


def measure_ort(repo: Path, models: Sequence[str], duration_s: float, threads: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model in models:
        model_path = repo / model / "1" / "model.onnx"
        console.print(
            f"[dim]in-process onnxruntime: {model}, batch {ORT_BATCH_SIZES[0]}..{ORT_BATCH_SIZES[-1]}"
        )
        command = [
            sys.executable, "-m", "bench.ort_limit",
            "--model", str(model_path),
            "--batch-sizes", ",".join(str(b) for b in ORT_BATCH_SIZES),
            "--duration-s", str(duration_s),
            "--threads", str(threads),
        ]  # fmt: skip
        result = subprocess.run(
            command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            raise BenchError(f"bench.ort_limit failed for {model}:\n{result.stderr}")
        results[model] = json.loads(result.stdout)
    return results


def measure_bare(bodies: dict[str, Path], settings: LoadSettings, log_path: Path) -> list[dict[str, Any]]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        "bare server", [sys.executable, "-m", "bench.bare_server", "--port", str(port)], log_path
    )
    with running(server, ready_urls(base_url, []), timeout_s=30.0):
        return load_series("bare aiohttp", base_url, ["tiny"], bodies, settings)


# --- targets ---


def _served_point(points: Sequence[dict[str, Any]], model: str, concurrency: int) -> dict[str, Any] | None:
    return next((p for p in points if p["model"] == model and p.get("concurrency") == concurrency), None)


def _target(
    name: str, value: float | None, target: float, higher_is_better: bool, note: str
) -> dict[str, Any]:
    if value is None:
        verdict = "n/a"
    elif note.startswith("errors"):
        verdict = "FAIL"  # a fast wrong answer is not throughput
    else:
        verdict = "PASS" if (value >= target if higher_is_better else value <= target) else "FAIL"
    return {
        "name": name,
        "value": value,
        "target": target,
        "comparison": ">=" if higher_is_better else "<=",
        "result": verdict,
        "note": note,
    }


def _errors_note(*points: dict[str, Any] | None) -> str:
    bad = [p for p in points if p is not None and (p["non200"] or p["socket_errors"])]
    if not bad:
        return ""
    return "errors: " + ", ".join(f"{p['server']} {p['model']} c={p['concurrency']}" for p in bad)


def evaluate_targets(
    served: Sequence[dict[str, Any]], bare: Sequence[dict[str, Any]], ort: dict[str, Any]
) -> list[dict[str, Any]]:
    served_ok = [p for p in served if "error" not in p]
    bare_ok = [p for p in bare if "error" not in p]
    targets = []

    mlp = _served_point(served_ok, "mlp", MLP_TARGET_CONCURRENCY)
    ort_mlp = ort.get("mlp")
    mlp_ratio = mlp["samples_per_s"] / ort_mlp["best_samples_per_s"] if mlp and ort_mlp else None
    targets.append(
        _target(
            f"mlp c={MLP_TARGET_CONCURRENCY} / in-process ORT best",
            mlp_ratio,
            TARGET_MLP_FRACTION_OF_ORT,
            True,
            _errors_note(mlp),
        )
    )

    tiny = _served_point(served_ok, "tiny", TINY_TARGET_CONCURRENCY)
    bare_tiny = _served_point(bare_ok, "tiny", TINY_TARGET_CONCURRENCY)
    tiny_ratio = (
        tiny["samples_per_s"] / bare_tiny["samples_per_s"]
        if tiny and bare_tiny and bare_tiny["samples_per_s"]
        else None
    )
    targets.append(
        _target(
            f"tiny c={TINY_TARGET_CONCURRENCY} / bare aiohttp c={TINY_TARGET_CONCURRENCY}",
            tiny_ratio,
            TARGET_TINY_FRACTION_OF_BARE,
            True,
            _errors_note(tiny, bare_tiny),
        )
    )

    tiny_c1 = _served_point(served_ok, "tiny", 1)
    targets.append(
        _target(
            "tiny p50 ms at c=1",
            tiny_c1["p50_ms"] if tiny_c1 else None,
            TARGET_TINY_P50_MS,
            False,
            _errors_note(tiny_c1),
        )
    )
    return targets


# --- output ---


def _load_table(title: str, points: Sequence[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in (
        "server",
        "model",
        "conc",
        "req/s",
        "samples/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "non-200",
        "sock err",
    ):
        table.add_column(column, justify="left" if column in ("server", "model") else "right")
    for p in points:
        if "error" in p:
            table.add_row(p["server"], p["model"], "", "", "", "", "", "", "", "", style="red")
            continue
        bad = bool(p["non200"] or p["socket_errors"])
        table.add_row(
            p["server"],
            p["model"],
            str(p["concurrency"]),
            f"{p['requests_per_s']:,.0f}",
            f"{p['samples_per_s']:,.0f}",
            f"{p['p50_ms']:.2f}",
            f"{p['p90_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            str(p["non200"]),
            str(p["socket_errors"]),
            style="red" if bad else None,
        )
    return table


def _ort_table(ort: dict[str, Any]) -> Table:
    table = Table(title="compute limit: onnxruntime in-process, samples/s by batch size")
    table.add_column("model")
    for batch in ORT_BATCH_SIZES:
        table.add_column(f"b={batch}", justify="right")
    table.add_column("best", justify="right")
    for model, result in ort.items():
        by_batch = {int(p["batch_size"]): p["samples_per_s"] for p in result["points"]}
        cells = [f"{by_batch[b]:,.0f}" if b in by_batch else "" for b in ORT_BATCH_SIZES]
        best = f"{result['best_samples_per_s']:,.0f} (b={result['best_batch_size']})"
        table.add_row(model, *cells, best)
    return table


def _targets_table(targets: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="targets")
    for column in ("ratio", "value", "target", "result", "note"):
        table.add_column(column, justify="right" if column in ("value", "target") else "left")
    colours = {"PASS": "green", "FAIL": "red", "n/a": "yellow"}
    for t in targets:
        value = "" if t["value"] is None else f"{t['value']:.3f}"
        result = f"[{colours[t['result']]}]{t['result']}[/]"
        table.add_row(t["name"], value, f"{t['comparison']} {t['target']}", result, t["note"])
    return table


# --- main ---


def parse_csv_ints(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark natron (or any KServe v2 server) against in-process onnxruntime "
        "and a bare aiohttp server.",
    )
    parser.add_argument(
        "--models",
        default="tiny,mlp",
        help=f"comma-separated, from {sorted(MODEL_INPUT_SIZES)} (default tiny,mlp)",
    )
    parser.add_argument(
        "--concurrency",
        type=parse_csv_ints,
        default=(1, 8, 32, 128),
        help="wrk connection counts (default 1,8,32,128)",
    )
    parser.add_argument(
        "--duration-s", type=int, default=None, help="seconds per load point (default 10, 3 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s points, 1 s per ORT batch size: a smoke run"
    )
    parser.add_argument(
        "--skip-limits", action="store_true", help="skip in-process ORT and the bare aiohttp server"
    )
    parser.add_argument(
        "--url", default=None, help="measure this running KServe v2 server instead of starting natron"
    )
    parser.add_argument(
        "--repo", type=Path, default=None, help=f"model repository (default {DEFAULT_REPO}, built if missing)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    parser.add_argument(
        "--wrk-threads", type=int, default=None, help="wrk threads (default 1 on <= 2 cores, else 2)"
    )
    parser.add_argument(
        "--warmup-s",
        type=int,
        default=1,
        help="seconds of unrecorded wrk per model before its points, 0 for none (default 1)",
    )
    parser.add_argument(
        "--ort-threads",
        type=int,
        default=2,
        help="onnxruntime intra-op threads for the compute limit (default 2)",
    )
    parser.add_argument(
        "--ort-duration-s",
        type=float,
        default=None,
        help="seconds per ORT batch size (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `natron serve`, repeatable; write --server-arg=--flag",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODEL_INPUT_SIZES]
    if unknown or not args.models:
        parser.error(f"unknown model(s) {unknown}; the benchmark feeds {sorted(MODEL_INPUT_SIZES)}")
    if args.duration_s is None:
        args.duration_s = 3 if args.quick else 10
    if args.ort_duration_s is None:
        args.ort_duration_s = 1.0 if args.quick else 3.0
    if args.wrk_threads is None:
        args.wrk_threads = default_wrk_threads()
    if args.url is not None:
        args.url = args.url.rstrip("/")
    return args


def ensure_models(repo: Path | None, models: Sequence[str]) -> Path:
    """The repository holding `models`; the default one is built on demand, a given one never written."""
    target = DEFAULT_REPO if repo is None else repo.resolve()
    missing = [
        m
        for m in models
        if not (target / m / "config.pbtxt").is_file() or not (target / m / "1" / "model.onnx").is_file()
    ]
    if missing:
        if repo is not None:
            raise BenchError(
                f"{target} lacks model(s) {missing}; run examples/build_models.py --out {target}"
            )
        # Imported here: it pulls in onnx, which a --url --skip-limits run never needs.
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from examples.build_models import build

        console.print(f"[dim]building {', '.join(missing)} into {target}")
        build(target, missing)
    return target


def bench_repo(source: Path, models: Sequence[str], into: Path) -> Path:
    """A repository of symlinks to just the benchmarked models, so natron loads nothing else."""
    into.mkdir()
    for model in models:
        (into / model).symlink_to(source / model, target_is_directory=True)
    return into


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_wrk()
    timestamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    settings = LoadSettings(args.duration_s, tuple(args.concurrency), args.wrk_threads, args.warmup_s)
    needs_repo = args.url is None or not args.skip_limits
    repo = ensure_models(args.repo, args.models) if needs_repo else None
    results: dict[str, Any] = {
        "timestamp": timestamp,
        "git_revision": git_revision(),
        "host": host_info(),
        "settings": {
            "models": args.models,
            "concurrency": list(settings.concurrency),
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "wrk_threads": settings.wrk_threads,
            "ort_threads": args.ort_threads,
            "ort_duration_s": args.ort_duration_s,
            "url": args.url,
            "repo": None if repo is None else str(repo),
        },
        "ort": {},
        "bare": [],
        "served": [],
    }
    with tempfile.TemporaryDirectory(prefix="natron-bench-") as tmp:
        tmp_dir = Path(tmp)
        bodies: dict[str, Path] = {}
        for model in sorted({*args.models, "tiny"}):
            bodies[model] = tmp_dir / f"{model}.json"
            bodies[model].write_bytes(infer_body(MODEL_INPUT_SIZES[model]))

        # Limits first, each alone on the machine; nothing else is running yet.
        if not args.skip_limits:
            assert repo is not None
            results["ort"] = measure_ort(repo, args.models, args.ort_duration_s, args.ort_threads)
            results["bare"] = measure_bare(bodies, settings, RESULTS_DIR / f"{timestamp}-bare.log")

        if args.url is not None:
            label = "url"  # the address itself is in settings.url; it would crowd the table
            for url in ready_urls(args.url, args.models):
                status, _ = http_status(url)
                if status != 200:
                    raise BenchError(f"{url} answered {status}: is the server up with {args.models} loaded?")
            results["served"] = load_series(label, args.url, args.models, bodies, settings)
        else:
            assert repo is not None
            served_repo = bench_repo(repo, args.models, tmp_dir / "repo")
            # All at once: the OS may hand a just-released port back to the next free_port().
            http_port, metrics_port = free_ports(2)
            base_url = f"http://127.0.0.1:{http_port}"
            command = [
                *natron_command(), "serve", str(served_repo),
                "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                *args.server_arg,
            ]  # fmt: skip
            log_path = RESULTS_DIR / f"{timestamp}-natron.log"
            console.print(f"[dim]starting {' '.join(command)} (log {log_path})")
            server = ServerProcess("natron", command, log_path)
            with running(server, ready_urls(base_url, args.models), SERVER_READY_TIMEOUT_S) as ready_s:
                console.print(f"[dim]natron ready after {ready_s:.1f} s")
                results["natron_ready_s"] = ready_s
                results["served"] = load_series("natron", base_url, args.models, bodies, settings)

    results["targets"] = evaluate_targets(results["served"], results["bare"], results["ort"])
    return results


def report(results: dict[str, Any]) -> None:
    if results["ort"]:
        console.print(_ort_table(results["ort"]))
    if results["bare"]:
        console.print(
            _load_table("overhead limit: bare aiohttp+uvloop, JSON parse + numpy, no model", results["bare"])
        )
    served_by = results["settings"]["url"] or "natron"
    console.print(_load_table(f"served by {served_by} (batch 1 per request)", results["served"]))
    console.print(_targets_table(results["targets"]))


def write_json(results: dict[str, Any], extra_path: Path | None, suffix: str = "") -> list[Path]:
    """bench/results/<timestamp><suffix>.json, and a copy at `extra_path` when given."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS_DIR / f"{results['timestamp']}{suffix}.json"]
    if extra_path is not None:
        extra_path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(extra_path)
    text = json.dumps(results, indent=2) + "\n"
    for path in paths:
        path.write_text(text)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 1
    report(results)
    for path in write_json(results, args.json):
        console.print(f"results written to {path}")
    if args.strict and any(t["result"] == "FAIL" for t in results["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
