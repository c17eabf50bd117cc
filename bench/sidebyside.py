"""natron beside NVIDIA Triton Inference Server: the same models, the same loads, cell by cell.

    python -m bench.sidebyside            # 10 s cells; writes the tables into docs/performance.md
    python -m bench.sidebyside --quick    # 3 s cells; docs untouched unless --write-docs

Both servers run at once, each on its twin of the same ONNX files (bench/anchor_models.py):
natron through its ONNX Runtime backend, Triton through a Python-backend model that runs the
same file with onnxruntime and the same session options. Only one of them is loaded at a time:
for each model (tiny, mlp), each concurrency (1, 32, 128) and each load generator (wrk with
bench/infer.lua's JSON bodies; perf_analyzer with binary tensors over HTTP and over gRPC), one
server and then the other gets the same cell, the order alternating from cell to cell so that
neither always runs on a machine the other has just warmed.

Around each cell the script reads utime + stime of every process of both servers from /proc:
the loaded one's CPU per request, by role for natron (gateway, worker, nats-server, router,
other) and in total for Triton (tritonserver and its Python stubs), and what the idle one spent
meanwhile. The load generator's own CPU comes from getrusage of this process's children.

Then it prints the tables and the targets with PASS/FAIL, writes
bench/results/sidebyside-<timestamp>.json, and (with --write-docs, the default for full runs)
replaces the text between the sidebyside markers in docs/performance.md. Without
scripts/install_triton.sh's install, natron runs alone; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.metadata
import itertools
import json
import os
import resource
import shlex
import signal
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

from rich.table import Table

from bench import anchor_models, perf_analyzer
from bench.bench import (
    REPO_ROOT,
    RESULTS_DIR,
    SERVER_READY_TIMEOUT_S,
    BenchError,
    ServerProcess,
    _target,
    _targets_table,
    check_wrk,
    console,
    default_wrk_threads,
    git_dirty,
    git_revision,
    host_info,
    http_status,
    infer_body,
    natron_command,
    ready_urls,
    run_wrk,
)
from bench.triton import (
    TritonInstall,
    TritonMissing,
    TritonPorts,
    find_install,
    server_command,
    server_metadata,
)
from broker.server import free_ports

CONCURRENCY: Final = (1, 32, 128)
LOADS: Final = ("wrk", "perf_analyzer", "perf_analyzer_grpc")
LOAD_TITLES: Final = {
    "wrk": "wrk, JSON bodies (bench/infer.lua)",
    "perf_analyzer": "perf_analyzer, binary tensors over HTTP",
    "perf_analyzer_grpc": "perf_analyzer over gRPC (raw tensors)",
}
NATRON: Final = "natron"
TRITON: Final = "Triton"
DOCS: Final = REPO_ROOT / "docs" / "performance.md"
DOCS_BEGIN: Final = "<!-- sidebyside:begin -->"
DOCS_END: Final = "<!-- sidebyside:end -->"
WARMUP_CONCURRENCY: Final = 32

TARGET_THROUGHPUT_RATIO: Final = 0.8
THROUGHPUT_TARGET_CONCURRENCY: Final = (32, 128)
TARGET_MLP_P50_RATIO: Final = 2.0
TARGET_TINY_P50_EXTRA_MS: Final = 0.3
TARGET_CPU_RATIO: Final = 1.3

# natron's process roles as the CPU table shows them; anything else counts as "other"
# (the `natron serve` supervisor, the ensemble orchestrator).
NATRON_ROLES: Final = ("gateway", "worker", "nats-server", "router")
NATRON_SUBCOMMANDS: Final = frozenset({"gateway", "worker", "router", "ensemble", "serve"})
CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")


# --- CPU time of a process tree, from /proc ---


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in clock ticks), or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def natron_role(argv: Sequence[str], parent_role: str | None) -> str:
    """A process of `natron serve`'s tree by its command line; unknown ones take their parent's."""
    if argv and Path(argv[0]).name.startswith("nats-server"):
        return "nats-server"
    for token, after in itertools.pairwise(argv):
        if Path(token).name == "natron" and after in NATRON_SUBCOMMANDS:
            return "supervisor" if after == "serve" else after
    return parent_role or "supervisor"


def triton_role(argv: Sequence[str], parent_role: str | None) -> str:
    if argv and Path(argv[0]).name == "triton_python_backend_stub":
        return "python stub"
    return parent_role or "tritonserver"


RoleOf = Callable[[Sequence[str], str | None], str]


@dataclass(frozen=True, slots=True)
class TreeSample:
    """CPU ticks and role of every process under one root at one moment."""

    ticks: dict[int, int]
    roles: dict[int, str]


def sample_tree(root: int, role_of: RoleOf) -> TreeSample:
    stats = {pid: stat for pid in _pids() if (stat := _proc_stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks: dict[int, int] = {}
    roles: dict[int, str] = {}
    pending: list[tuple[int, str | None]] = [(root, None)] if root in stats else []
    while pending:
        pid, parent_role = pending.pop()
        roles[pid] = role_of(_cmdline(pid), parent_role)
        ticks[pid] = stats[pid][1]
        pending.extend((child, roles[pid]) for child in children.get(pid, []))
    return TreeSample(ticks, roles)


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def cpu_s_by_role(before: TreeSample, after: TreeSample) -> dict[str, float]:
    """CPU seconds each role spent between the samples; a process started meanwhile counts from 0."""
    spent: dict[str, float] = {}
    for pid, ticks in after.ticks.items():
        delta = ticks - before.ticks.get(pid, 0)
        role = after.roles[pid]
        spent[role] = spent.get(role, 0.0) + delta / CLOCK_TICKS_PER_S
    return spent


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the two servers ---


@dataclass
class Side:
    name: str
    server: ServerProcess
    base_url: str
    grpc_url: str  # host:port
    role_of: RoleOf
    metadata: dict[str, Any] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # model -> why it is not measured

    def sample(self) -> TreeSample:
        process = self.server.process
        if process is None or process.poll() is not None:
            raise BenchError(
                f"{self.name} is not running; log {self.server.log_path}:\n{self.server.log_tail()}"
            )
        return sample_tree(process.pid, self.role_of)


def natron_side(repo: Path, extra: list[str], log_path: Path) -> Side:
    http_port, metrics_port, nats_port, grpc_port = free_ports(4)
    command = [
        *natron_command(), "serve", str(repo),
        "--http-address", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port), "--nats-port", str(nats_port),
        *extra,
    ]  # fmt: skip
    server = ServerProcess(NATRON, command, log_path)
    return Side(NATRON, server, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", natron_role)


def triton_side(install: TritonInstall, repo: Path, extra: list[str], log_path: Path) -> Side:
    ports = TritonPorts(*free_ports(3))
    server = ServerProcess(TRITON, server_command(install, repo, ports, extra), log_path)
    return Side(TRITON, server, f"http://127.0.0.1:{ports.http}", f"127.0.0.1:{ports.grpc}", triton_role)


@contextlib.contextmanager
def serving(sides: Sequence[Side], models: Sequence[str]) -> Iterator[None]:
    """Every side started, then waited for (they load side by side); all stopped on the way out."""
    try:
        for side in sides:
            console.print(f"[dim]starting {side.name}: {shlex.join(side.server.command)}")
            side.server.start()
        for side in sides:
            ready_s = side.server.wait_ready(ready_urls(side.base_url, models), SERVER_READY_TIMEOUT_S)
            side.metadata = server_metadata(side.base_url)
            console.print(f"[dim]{side.name} {side.metadata.get('version', '?')} ready after {ready_s:.1f} s")
        yield
    finally:
        with _signals_held():
            for side in reversed(sides):
                side.server.stop()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A second Ctrl-C while the servers stop would leave one of them running: ignore it then."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- the cells ---


@dataclass(frozen=True, slots=True)
class Cell:
    model: str
    concurrency: int
    load: str

    def matches(self, pattern: str) -> bool:
        """`model:concurrency:load`, each part a glob; missing parts match anything."""
        parts = [*pattern.split(":"), "*", "*"][:3]
        values = (self.model, str(self.concurrency), self.load)
        return all(fnmatch.fnmatchcase(value, part or "*") for value, part in zip(values, parts, strict=True))


@dataclass(frozen=True, slots=True)
class Settings:
    duration_s: int
    warmup_s: int
    wrk_threads: int
    perf_analyzer: Path | None
    perf_analyzer_env: dict[str, str]


def all_cells(patterns: Sequence[str], with_perf_analyzer: bool) -> list[Cell]:
    loads = LOADS if with_perf_analyzer else ("wrk",)
    cells = [Cell(m, c, load) for m in anchor_models.ANCHOR_MODELS for c in CONCURRENCY for load in loads]
    if patterns:
        cells = [cell for cell in cells if any(cell.matches(p) for p in patterns)]
    return cells


def warm_up(side: Side, models: Sequence[str], bodies: dict[str, Path], settings: Settings) -> None:
    """One checked request per model, then unrecorded load: lazy initialisation, arenas and
    batch queues settle before the first cell."""
    for model in models:
        status, answer = http_status(
            f"{side.base_url}/v2/models/{model}/infer", body=bodies[model].read_bytes(), timeout_s=30.0
        )
        if status != 200 or b'"outputs"' not in answer:
            side.broken[model] = f"a single {model} request answered {status}: {answer[:300]!r}"
            console.print(f"[red]{side.name}: {side.broken[model]}; its {model} cells are skipped")
            continue
        if settings.warmup_s > 0:
            run_wrk(
                side.base_url,
                model,
                bodies[model],
                WARMUP_CONCURRENCY,
                settings.warmup_s,
                settings.wrk_threads,
            )


def _load(side: Side, cell: Cell, body: Path, settings: Settings) -> dict[str, Any]:
    if cell.load == "wrk":
        raw = run_wrk(
            side.base_url, cell.model, body, cell.concurrency, settings.duration_s, settings.wrk_threads
        )
        return {
            # Only 200 answers count as served; the errors are shown beside.
            "requests_per_s": raw["samples_per_s"],
            "requests": raw["requests"],
            "errors": raw["non200"] + raw["socket_errors"],
            "p50_ms": raw["p50_ms"],
            "p99_ms": raw["p99_ms"],
            "wrk": raw,
        }
    assert settings.perf_analyzer is not None
    grpc = cell.load == "perf_analyzer_grpc"
    return perf_analyzer.run(
        settings.perf_analyzer,
        settings.perf_analyzer_env,
        side.grpc_url if grpc else side.base_url,
        cell.model,
        cell.concurrency,
        settings.duration_s,
        "grpc" if grpc else "http",
    )


def measure(side: Side, idle: Side | None, cell: Cell, body: Path, settings: Settings) -> dict[str, Any]:
    """One cell against one server, with the CPU every process of both servers spent during it."""
    point: dict[str, Any] = {
        "server": side.name,
        "model": cell.model,
        "concurrency": cell.concurrency,
        "load": cell.load,
    }
    if cell.model in side.broken:
        return {**point, "error": side.broken[cell.model]}
    console.print(
        f"[dim]{side.name}: {cell.model} c={cell.concurrency} {cell.load} ({settings.duration_s} s)"
    )
    before, idle_before, load_cpu_before = side.sample(), idle.sample() if idle else None, _children_cpu_s()
    try:
        result = _load(side, cell, body, settings)
    except BenchError as exc:
        console.print(f"[red]{side.name} {cell}: {exc}")
        return {**point, "error": str(exc)}
    after, load_cpu_s = side.sample(), _children_cpu_s() - load_cpu_before
    cpu_s = cpu_s_by_role(before, after)
    requests = max(1, int(result["requests"]))
    point.update(result)
    point["cpu_s_by_role"] = cpu_s
    point["processes_by_role"] = {role: list(after.roles.values()).count(role) for role in cpu_s}
    point["cpu_us_per_request"] = {role: s * 1e6 / requests for role, s in cpu_s.items()}
    point["cpu_us_per_request_sum"] = sum(cpu_s.values()) * 1e6 / requests
    point["load_generator_cpu_us_per_request"] = load_cpu_s * 1e6 / requests
    if idle is not None and idle_before is not None:
        point["idle_server_cpu_s"] = sum(cpu_s_by_role(idle_before, idle.sample()).values())
    return point


def run_cells(
    cells: Sequence[Cell], sides: Sequence[Side], bodies: dict[str, Path], settings: Settings
) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    for index, cell in enumerate(cells):
        # Alternate who goes first, so that neither always follows the other's load.
        order = list(sides) if index % 2 == 0 else list(reversed(sides))
        for side in order:
            idle = next((other for other in sides if other is not side), None)
            points.append(measure(side, idle, cell, bodies[cell.model], settings))
    return points


# --- comparison and targets ---


def _point(points: Sequence[dict[str, Any]], server: str, cell: Cell) -> dict[str, Any] | None:
    return next(
        (
            p
            for p in points
            if p["server"] == server
            and p["model"] == cell.model
            and p["concurrency"] == cell.concurrency
            and p["load"] == cell.load
            and "error" not in p
        ),
        None,
    )


def _note(*points: dict[str, Any] | None) -> str:
    if any(p is None for p in points):
        return "not measured"
    bad = [p for p in points if p is not None and p["errors"]]
    return "errors: " + ", ".join(f"{p['server']} {p['errors']}" for p in bad) if bad else ""


def _value(point: dict[str, Any] | None, key: str) -> float | None:
    return None if point is None else float(point[key])


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def evaluate_targets(points: Sequence[dict[str, Any]], cells: Sequence[Cell]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    for cell in cells:
        ours, theirs = _point(points, NATRON, cell), _point(points, TRITON, cell)
        note = _note(ours, theirs)
        where = f"{cell.model} c={cell.concurrency} {cell.load}"

        def compare(key: str) -> float | None:
            return _ratio(_value(ours, key), _value(theirs, key))  # noqa: B023 (used at once)

        if cell.concurrency in THROUGHPUT_TARGET_CONCURRENCY:
            targets.append(
                _target(
                    f"req/s natron / Triton, {where}",
                    compare("requests_per_s"),
                    TARGET_THROUGHPUT_RATIO,
                    True,
                    note,
                )
            )
            targets.append(
                _target(
                    f"CPU/request natron / Triton, {where}",
                    compare("cpu_us_per_request_sum"),
                    TARGET_CPU_RATIO,
                    False,
                    note,
                )
            )
        elif cell.concurrency == 1 and cell.model == "mlp":
            targets.append(
                _target(f"p50 natron / Triton, {where}", compare("p50_ms"), TARGET_MLP_P50_RATIO, False, note)
            )
        elif cell.concurrency == 1 and cell.model == "tiny":
            ours_ms, theirs_ms = _value(ours, "p50_ms"), _value(theirs, "p50_ms")
            extra = ours_ms - theirs_ms if ours_ms is not None and theirs_ms is not None else None
            targets.append(
                _target(f"p50 natron - Triton ms, {where}", extra, TARGET_TINY_P50_EXTRA_MS, False, note)
            )
    return targets


# --- output ---


def _num(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _latency(point: dict[str, Any] | None) -> str:
    return "" if point is None else f"{point['p50_ms']:.2f} / {point['p99_ms']:.2f}"


def throughput_rows(points: Sequence[dict[str, Any]], cells: Sequence[Cell], load: str) -> list[list[str]]:
    rows = []
    for cell in cells:
        if cell.load != load:
            continue
        ours, theirs = _point(points, NATRON, cell), _point(points, TRITON, cell)
        ratio = (
            ours["requests_per_s"] / theirs["requests_per_s"]
            if ours and theirs and theirs["requests_per_s"]
            else None
        )
        errors = sum(p["errors"] for p in (ours, theirs) if p)
        failed = [
            p["server"]
            for p in points
            if "error" in p and Cell(p["model"], p["concurrency"], p["load"]) == cell
        ]
        rows.append([
            cell.model,
            str(cell.concurrency),
            _num(ours["requests_per_s"] if ours else None),
            _num(theirs["requests_per_s"] if theirs else None),
            _num(ratio, 2),
            _latency(ours),
            _latency(theirs),
            ", ".join([*([f"{errors} errors"] if errors else []), *(f"{s} failed" for s in failed)]),
        ])  # fmt: skip
    return rows


THROUGHPUT_COLUMNS: Final = (
    "model", "conc", "natron req/s", "Triton req/s", "ratio",
    "natron p50/p99 ms", "Triton p50/p99 ms", "note",
)  # fmt: skip
CPU_COLUMNS: Final = (
    "load", "model", "conc", *NATRON_ROLES, "other", "natron sum", "Triton", "ratio",
    "load gen natron/Triton",
)  # fmt: skip


def cpu_rows(points: Sequence[dict[str, Any]], cells: Sequence[Cell]) -> list[list[str]]:
    rows = []
    for cell in cells:
        ours, theirs = _point(points, NATRON, cell), _point(points, TRITON, cell)
        if ours is None and theirs is None:
            continue
        ours_by_role: dict[str, float] = ours["cpu_us_per_request"] if ours else {}
        roles = [ours_by_role.get(role) if ours else None for role in NATRON_ROLES]
        other = sum(v for role, v in ours_by_role.items() if role not in NATRON_ROLES) if ours else None
        ours_sum = ours["cpu_us_per_request_sum"] if ours else None
        theirs_sum = theirs["cpu_us_per_request_sum"] if theirs else None
        ratio = ours_sum / theirs_sum if ours_sum is not None and theirs_sum else None
        load_gen = " / ".join(
            _num(p["load_generator_cpu_us_per_request"]) if p else "-" for p in (ours, theirs)
        )
        rows.append([
            cell.load, cell.model, str(cell.concurrency),
            *(_num(v) for v in roles), _num(other), _num(ours_sum), _num(theirs_sum), _num(ratio, 2),
            load_gen,
        ])  # fmt: skip
    return rows


def _rich_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "load", "note") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _targets_markdown(targets: Sequence[dict[str, Any]]) -> str:
    rows = [
        [t["name"], "" if t["value"] is None else f"{t['value']:.2f}", f"{t['comparison']} {t['target']}",
         t["result"] + (f" ({t['note']})" if t["note"] else "")]
        for t in targets
    ]  # fmt: skip
    return _markdown_table(("target", "measured", "goal", "result"), rows)


def report(results: dict[str, Any]) -> None:
    cells = [Cell(**c) for c in results["cells"]]
    points = results["points"]
    for load in LOADS:
        rows = throughput_rows(points, cells, load)
        if rows:
            console.print(_rich_table(LOAD_TITLES[load], THROUGHPUT_COLUMNS, rows))
    console.print(
        _rich_table(
            "CPU µs per request (natron by process; Triton: server + stubs)",
            CPU_COLUMNS,
            cpu_rows(points, cells),
        )
    )
    if results["targets"]:
        console.print(_targets_table(results["targets"]))
    for note in results["notes"]:
        console.print(f"[yellow]{note}")


def docs_section(results: dict[str, Any]) -> str:
    cells = [Cell(**c) for c in results["cells"]]
    points = results["points"]
    host, versions, settings = results["host"], results["versions"], results["settings"]
    serve = shlex.join(["natron", "serve", *settings["natron_args"]])
    run = "python -m bench.sidebyside" + (" --quick" if settings["quick"] else "")
    revision = (results["git_revision"] or "?") + (
        " with uncommitted changes" if results["git_dirty"] else ""
    )
    intro = (
        f"Measured {results['date']} with `{run}` ({settings['duration_s']} s per cell, the servers "
        f"alternating cell by cell) on {host['cpu_count']} cores ({host['cpu_model']}). natron "
        f"{versions['natron']} (git {revision}, `{serve}`, onnxruntime {versions['onnxruntime']}); "
        f"Triton {versions['triton']} (the server of the nvidia-pytriton {versions['nvidia-pytriton']} "
        f"wheel; its Python backend runs onnxruntime {versions['triton_onnxruntime']}); perf_analyzer "
        f"from tritonclient {versions['tritonclient']}. Both serve the same ONNX files "
        "(`bench/anchor_models.py`): one CPU instance each, dynamic batching up to 64, the same "
        "onnxruntime session options."
    )
    parts = [_wrap(intro)]
    for load in LOADS:
        rows = throughput_rows(points, cells, load)
        if rows:
            parts.append(f"**{LOAD_TITLES[load]}**\n\n" + _markdown_table(THROUGHPUT_COLUMNS, rows))
    cpu = cpu_rows(points, cells)
    if cpu:
        caption = (
            "**CPU per request**: µs of core time from /proc over the cell, divided by the requests "
            "served; natron by process, Triton for tritonserver and its Python stubs together. The last "
            "column is the load generator's own CPU per request, in natron's cell and in Triton's."
        )
        parts.append(_wrap(caption) + "\n\n" + _markdown_table(CPU_COLUMNS, cpu))
    if results["targets"]:
        parts.append("**Targets**\n\n" + _targets_markdown(results["targets"]))
    parts += [_wrap(f"Note: {note}") for note in results["notes"]]
    return "\n\n".join(parts)


def _wrap(text: str) -> str:
    # The width of the rest of docs/performance.md.
    return textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)


def write_docs(section: str, path: Path = DOCS) -> bool:
    text = path.read_text()
    begin, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if begin < 0 or end < begin:
        console.print(f"[red]{path} has no {DOCS_BEGIN} ... {DOCS_END} markers: docs not written")
        return False
    path.write_text(text[: begin + len(DOCS_BEGIN)] + "\n" + section + "\n" + text[end:])
    return True


def write_results(results: dict[str, Any], extra_path: Path | None) -> list[Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS_DIR / f"sidebyside-{results['timestamp']}.json"]
    if extra_path is not None:
        extra_path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(extra_path)
    text = json.dumps(results, indent=2) + "\n"
    for path in paths:
        path.write_text(text)
    return paths


# --- main ---


def _split_args(values: Sequence[str]) -> list[str]:
    return [part for value in values for part in shlex.split(value)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="natron beside Triton on the same ONNX models: throughput, latency and CPU per request."
    )
    parser.add_argument("--quick", action="store_true", help="3 s cells; docs are not written unless asked")
    parser.add_argument(
        "--duration-s", type=int, default=None, help="seconds per cell (default 10, 3 with --quick)"
    )
    parser.add_argument(
        "--warmup-s", type=int, default=1, help="unrecorded wrk seconds per server and model (default 1)"
    )
    parser.add_argument(
        "--natron-arg",
        action="append",
        default=[],
        help="extra `natron serve` argument(s), repeatable, split as a shell would: "
        "--natron-arg='--http-workers 2'",
    )
    parser.add_argument(
        "--triton-arg", action="append", default=[], help="extra tritonserver argument(s), likewise"
    )
    parser.add_argument(
        "--cells",
        action="append",
        default=[],
        help="only the cells matching model:concurrency:load globs, comma-separated or repeated "
        "(e.g. 'tiny', 'mlp:128', '*:1:wrk'); default all",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads on both sides (default 0: its own)",
    )
    parser.add_argument(
        "--models-dir", type=Path, default=anchor_models.DEFAULT_OUT, help="where the twin repositories go"
    )
    parser.add_argument(
        "--triton-venv", type=Path, default=None, help="the anchors' venv (default .venv-triton)"
    )
    parser.add_argument(
        "--write-docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replace the sidebyside section of docs/performance.md (default: on, off with --quick)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    if args.duration_s is None:
        args.duration_s = 3 if args.quick else 10
    if args.write_docs is None:
        args.write_docs = not args.quick
    if args.duration_s < 1 or args.warmup_s < 0 or args.intra_op_threads < 0:
        parser.error("--duration-s >= 1, --warmup-s >= 0 and --intra-op-threads >= 0")
    args.natron_arg = _split_args(args.natron_arg)
    args.triton_arg = _split_args(args.triton_arg)
    args.cells = [p.strip() for value in args.cells for p in value.split(",") if p.strip()]
    return args


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_wrk()
    now = datetime.now(UTC)
    timestamp = now.strftime("%Y%m%dT%H%M%SZ")
    notes: list[str] = []
    install: TritonInstall | None = None
    try:
        install = find_install(args.triton_venv) if args.triton_venv else find_install()
    except TritonMissing as exc:
        notes.append(f"Triton is not installed: {exc}. natron ran alone, without perf_analyzer.")
    server_missing = install.server_missing() if install else None
    pa_missing = install.perf_analyzer_missing() if install else None
    if server_missing:
        notes.append(f"Triton cannot start: {server_missing}; natron ran alone.")
    if install is not None and pa_missing:
        notes.append(f"perf_analyzer cells skipped: {pa_missing}.")
    with_triton = install is not None and server_missing is None
    with_pa = install is not None and pa_missing is None
    settings = Settings(
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        wrk_threads=default_wrk_threads(),
        perf_analyzer=install.perf_analyzer if install and with_pa else None,
        perf_analyzer_env=install.perf_analyzer_env() if install and with_pa else {},
    )
    cells = all_cells(args.cells, with_pa)
    if not cells:
        raise BenchError(f"no cell matches {args.cells}")
    models = sorted({cell.model for cell in cells})
    repos = anchor_models.build(args.models_dir.resolve(), args.intra_op_threads)
    sides = [natron_side(repos.natron, args.natron_arg, RESULTS_DIR / f"sidebyside-{timestamp}-natron.log")]
    if with_triton:
        assert install is not None
        sides.append(
            triton_side(
                install, repos.triton, args.triton_arg, RESULTS_DIR / f"sidebyside-{timestamp}-triton.log"
            )
        )
    results: dict[str, Any] = {
        "timestamp": timestamp,
        "date": now.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "git_dirty": git_dirty(),
        "host": {**host_info(), "cpu_model": _cpu_model()},
        "settings": {
            "quick": args.quick,
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "wrk_threads": settings.wrk_threads,
            "intra_op_threads": args.intra_op_threads,
            "natron_args": args.natron_arg,
            "triton_args": args.triton_arg,
            "models_dir": str(repos.natron.parent),
            "commands": {side.name: side.server.command for side in sides},
        },
        "cells": [{"model": c.model, "concurrency": c.concurrency, "load": c.load} for c in cells],
        "notes": notes,
    }
    with tempfile.TemporaryDirectory(prefix="natron-sidebyside-") as tmp:
        bodies: dict[str, Path] = {}
        for model in models:
            bodies[model] = Path(tmp) / f"{model}.json"
            bodies[model].write_bytes(infer_body(anchor_models.MODEL_INPUT_SIZES[model]))
        with serving(sides, models):
            for side in sides:
                warm_up(side, models, bodies, settings)
            points = run_cells(cells, sides, bodies, settings)
    by_name = {side.name: side for side in sides}
    triton_side_ = by_name.get(TRITON)
    results["versions"] = {
        "natron": by_name[NATRON].metadata.get("version"),
        "onnxruntime": _version("onnxruntime"),
        "triton": triton_side_.metadata.get("version") if triton_side_ else None,
        "nvidia-pytriton": install.versions.get("nvidia-pytriton") if install else None,
        "tritonclient": install.versions.get("tritonclient") if install else None,
        "triton_onnxruntime": install.versions.get("onnxruntime") if install else None,
    }
    results["server_metadata"] = {side.name: side.metadata for side in sides}
    results["points"] = points
    results["targets"] = evaluate_targets(points, cells) if with_triton else []
    return results


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: both servers are stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: both servers were stopped")
        return 130
    except BenchError as exc:
        console.print(f"[red]side-by-side benchmark failed:[/red] {exc}")
        return 1
    report(results)
    for path in write_results(results, args.json):
        console.print(f"results written to {path}")
    if args.write_docs:
        if not results["targets"]:
            console.print("[yellow]Triton did not run: docs/performance.md left as it was")
        elif write_docs(docs_section(results)):
            console.print(f"tables written between the sidebyside markers of {DOCS}")
    return 1 if any("error" in p for p in results["points"]) else 0


if __name__ == "__main__":
    sys.exit(main())
