"""The analysis's outputs: a CSV of every measurement, PNG plots, an HTML page that holds them,
the chosen config as config.pbtxt, and the summary printed at the end.

Plots are drawn with matplotlib's Agg backend (no display): throughput against p99 latency, one
line per config over its load levels, and memory per config. The HTML page is static and
self-contained apart from the PNGs beside it, so a report directory can be copied or archived.
"""

from __future__ import annotations

import csv
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from rich.console import Console
from rich.table import Table

from natron.analyze.search import Candidate, Constraints
from natron.config import config_from_json

CSV_NAME = "measurements.csv"
HTML_NAME = "index.html"
CONFIG_NAME = "config.pbtxt"
THROUGHPUT_PLOT = "throughput_vs_latency.png"
MEMORY_PLOT = "memory.png"

CSV_COLUMNS = (
    "device",
    "config",
    "settings",
    "concurrency",
    "request_rate",
    "throughput_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "avg_ms",
    "server_queue_us",
    "server_compute_us",
    "errors",
    "stable",
    "windows",
    "rss_mb",
    "gpu_mb",
    "workers",
    "feasible",
    "failure",
)


@dataclass(slots=True)
class DeviceResult:
    """One device class's search: every candidate, the winner (or the closest one)."""

    device: str
    workers: int
    candidates: list[Candidate] = field(default_factory=list)
    best: Candidate | None = None
    closest: Candidate | None = None


@dataclass(slots=True)
class Report:
    model: str
    constraints: Constraints
    results: list[DeviceResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target_rate: float | None = None
    interrupted: str = ""  # why the run ended early, when it did

    @property
    def best(self) -> Candidate | None:
        """The winner over every device class."""
        best = [r.best for r in self.results if r.best is not None]
        if not best:
            return None
        return max(best, key=lambda c: c.score(self.constraints) or -math.inf)


def config_text(config: dict[str, Any]) -> str:
    """A config as config.pbtxt, through the same protobuf schema the server parses it with."""
    return str(text_format.MessageToString(config_from_json(config)))


def write_csv(report: Report, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in report.results:
            for candidate in result.candidates:
                feasible = {id(p) for p in candidate.feasible(report.constraints)}
                base = {
                    "device": result.device,
                    "config": candidate.name,
                    "settings": " ".join(f"{k}={v}" for k, v in candidate.settings.items()),
                    "rss_mb": f"{candidate.rss_mb:.1f}",
                    "gpu_mb": f"{candidate.gpu_mb:.1f}",
                    "workers": candidate.workers,
                    "failure": candidate.failure,
                }
                if not candidate.points:
                    writer.writerow(base | {"feasible": False})
                for point in candidate.points:
                    writer.writerow(
                        base
                        | {
                            "concurrency": point.concurrency or "",
                            "request_rate": f"{point.request_rate:g}" if point.request_rate else "",
                            "throughput_per_s": f"{point.throughput_per_s:.2f}",
                            "p50_ms": f"{point.p50_ms:.3f}",
                            "p95_ms": f"{point.p95_ms:.3f}",
                            "p99_ms": f"{point.p99_ms:.3f}",
                            "avg_ms": f"{point.avg_ms:.3f}",
                            "server_queue_us": f"{point.server_queue_us:.1f}",
                            "server_compute_us": f"{point.server_compute_us:.1f}",
                            "errors": point.errors,
                            "stable": "" if point.stable is None else point.stable,
                            "windows": point.windows,
                            "feasible": id(point) in feasible,
                        }
                    )


def _plots(report: Report, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for result in report.results:
        for candidate in result.candidates:
            if not candidate.points:
                continue
            points = sorted(candidate.points, key=lambda p: p.order)
            label = candidate.name if len(report.results) == 1 else f"{result.device}: {candidate.name}"
            is_best = candidate is result.best
            axes.plot(
                [p.p99_ms for p in points],
                [p.throughput_per_s for p in points],
                marker="o",
                linewidth=3.0 if is_best else 1.0,
                # The chosen one stands out; the others take the colour cycle.
                color="black" if is_best else None,
                zorder=3 if is_best else 2,
                label=label + (" (chosen)" if is_best else ""),
            )
    if report.constraints.latency_budget_ms is not None:
        axes.axvline(
            report.constraints.latency_budget_ms, color="red", linestyle="--", label="latency budget"
        )
    axes.set_xlabel("p99 latency (ms)")
    axes.set_ylabel("throughput (infer/s)")
    axes.set_title(f"{report.model}: throughput against p99 latency, per config")
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(directory / THROUGHPUT_PLOT, dpi=110)
    plt.close(figure)
    written.append(THROUGHPUT_PLOT)

    measured = [(r, c) for r in report.results for c in r.candidates if not c.failure]
    if measured:
        figure, axes = plt.subplots(figsize=(9, max(3.0, 0.35 * len(measured) + 1.5)))
        labels = [c.name if len(report.results) == 1 else f"{r.device}: {c.name}" for r, c in measured]
        rss = [c.rss_mb for _, c in measured]
        gpu = [c.gpu_mb for _, c in measured]
        rows = range(len(measured))
        axes.barh([y - 0.2 for y in rows], rss, height=0.4, label="host RSS per worker (MB)")
        if any(gpu):
            axes.barh([y + 0.2 for y in rows], gpu, height=0.4, label="GPU memory per device (MB)")
        axes.set_yticks(list(rows), labels, fontsize="small")
        axes.set_xlabel("MB")
        axes.set_title(f"{report.model}: memory per config")
        if report.constraints.max_memory_mb is not None:
            axes.axvline(report.constraints.max_memory_mb, color="red", linestyle="--", label="memory limit")
        # Below the bars: inside, it would hide the longest of them.
        axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
        figure.tight_layout()
        figure.savefig(directory / MEMORY_PLOT, dpi=110)
        plt.close(figure)
        written.append(MEMORY_PLOT)
    return written


def capacity(candidate: Candidate, constraints: Constraints) -> float:
    """Throughput one worker of the class gives within the constraints."""
    point = candidate.best_point(constraints)
    if point is None:
        return 0.0
    return point.throughput_per_s / max(1, candidate.workers)


def sizing(report: Report) -> list[tuple[str, str, float, float, int | None]]:
    """Per device class: (device, chosen config, infer/s per worker, p99 ms, workers for the
    target rate): how many of which device serve N req/s at this p99."""
    rows = []
    for result in report.results:
        if result.best is None:
            continue
        point = result.best.best_point(report.constraints)
        assert point is not None
        per_worker = capacity(result.best, report.constraints)
        needed = None
        if report.target_rate is not None and per_worker > 0:
            needed = math.ceil(report.target_rate / per_worker)
        rows.append((result.device, result.best.name, per_worker, point.p99_ms, needed))
    return rows


def _html(report: Report, plots: list[str], chosen: str | None) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>natron analyze: {e(report.model)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.best{background:#e8f6e8}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>natron analyze: {e(report.model)}</h1>",
        f"<p>Constraints: {e(report.constraints.describe())}; "
        f"objective: {e(report.constraints.objective)}.</p>",
    ]
    if report.interrupted:
        parts.append(
            f"<p><strong>Stopped early:</strong> {e(report.interrupted)}. What was measured is kept.</p>"
        )
    for note in report.notes:
        parts.append(f"<p>{e(note)}</p>")
    if chosen:
        parts.append(f"<h2>Chosen</h2><p>{e(chosen)}</p>")
    rows = sizing(report)
    if rows:
        parts.append("<h2>Sizing: how many of which device</h2><table><tr><th class='l'>device</th>")
        parts.append("<th class='l'>config</th><th>infer/s per worker</th><th>p99 ms</th>")
        target = f"workers for {report.target_rate:g} infer/s" if report.target_rate else "workers"
        parts.append(f"<th>{e(target)}</th></tr>")
        for device, name, per_worker, p99, needed in rows:
            parts.append(
                f"<tr><td class='l'>{e(device)}</td><td class='l'>{e(name)}</td><td>{per_worker:.1f}</td>"
                f"<td>{p99:.2f}</td><td>{'-' if needed is None else needed}</td></tr>"
            )
        parts.append("</table>")
    for plot in plots:
        parts.append(f"<p><img src='{e(plot)}' alt='{e(plot)}'></p>")
    for result in report.results:
        parts.append(f"<h2>{e(result.device)} ({result.workers} worker(s))</h2><table><tr>")
        parts.append(
            "<th class='l'>config</th><th class='l'>settings</th><th>best infer/s</th><th>p99 ms</th>"
            "<th>load</th><th>RSS MB</th><th>GPU MB</th><th class='l'>verdict</th></tr>"
        )
        for candidate in result.candidates:
            point = candidate.best_point(report.constraints)
            verdict = candidate.failure or ("meets the constraints" if point else "misses the constraints")
            shown = point or (
                max(candidate.points, key=lambda p: p.throughput_per_s) if candidate.points else None
            )
            css = " class='best'" if candidate is result.best else ""
            settings = ", ".join(f"{k}={v}" for k, v in candidate.settings.items())
            parts.append(
                f"<tr{css}><td class='l'>{e(candidate.name)}</td><td class='l'>{e(settings)}</td>"
                f"<td>{f'{shown.throughput_per_s:.1f}' if shown else '-'}</td>"
                f"<td>{f'{shown.p99_ms:.2f}' if shown else '-'}</td>"
                f"<td>{shown.load if shown else '-'}</td><td>{candidate.rss_mb:.0f}</td>"
                f"<td>{candidate.gpu_mb:.0f}</td><td class='l'>{e(verdict)}</td></tr>"
            )
        parts.append("</table>")
    parts.append(f"<p>Every measurement: <a href='{CSV_NAME}'>{CSV_NAME}</a>.</p></body></html>")
    return "".join(parts)


def write(report: Report, directory: Path) -> dict[str, Path]:
    """Writes the report into `directory`; the paths written, by kind."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {"csv": directory / CSV_NAME}
    write_csv(report, written["csv"])
    plots = _plots(report, directory)
    for plot in plots:
        written[plot] = directory / plot
    best = report.best
    chosen = None
    if best is not None:
        written["config"] = directory / CONFIG_NAME
        written["config"].write_text(config_text(best.config))
        chosen = f"{best.device}: {best.name} ({', '.join(f'{k}={v}' for k, v in best.settings.items())})"
    written["html"] = directory / HTML_NAME
    written["html"].write_text(_html(report, plots, chosen))
    return written


def print_summary(report: Report, console: Console) -> None:
    for result in report.results:
        table = Table(title=f"{report.model} on {result.device} ({result.workers} worker(s))")
        for column in ("config", "infer/s", "p99 ms", "load", "RSS MB", "GPU MB", "verdict"):
            table.add_column(column, justify="left" if column in ("config", "verdict") else "right")
        for candidate in result.candidates:
            point = candidate.best_point(report.constraints)
            shown = point or (
                max(candidate.points, key=lambda p: p.throughput_per_s) if candidate.points else None
            )
            verdict = candidate.failure or ("ok" if point else "misses")
            if candidate is result.best:
                verdict = "chosen"
            table.add_row(
                candidate.name,
                f"{shown.throughput_per_s:.1f}" if shown else "-",
                f"{shown.p99_ms:.2f}" if shown else "-",
                shown.load if shown else "-",
                f"{candidate.rss_mb:.0f}",
                f"{candidate.gpu_mb:.0f}",
                verdict,
            )
        console.print(table)
    rows = sizing(report)
    if rows and (len(rows) > 1 or report.target_rate):
        table = Table(title="sizing")
        for column in ("device", "config", "infer/s per worker", "p99 ms", "workers needed"):
            table.add_column(column)
        for device, name, per_worker, p99, needed in rows:
            table.add_row(
                device, name, f"{per_worker:.1f}", f"{p99:.2f}", "-" if needed is None else str(needed)
            )
        console.print(table)
