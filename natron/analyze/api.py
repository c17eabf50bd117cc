"""The analysis as a function, for `natron convert --analyze`: one repository, one model, a
short search on a private server, the chosen config and its figures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from natron.analyze import report as reports
from natron.analyze.run import Analysis, Options
from natron.analyze.search import Constraints


@dataclass(frozen=True, slots=True)
class Best:
    device: str
    name: str
    throughput_per_s: float
    p99_ms: float
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    best: Best | None
    report_dir: Path
    interrupted: str = ""


def analyze_repository(
    repository: Path,
    model: str,
    *,
    report_dir: Path,
    max_configs: int = 4,
    latency_budget_ms: float | None = None,
    concurrency: tuple[int, ...] = (1, 4, 16),
    window_s: float = 1.0,
    console: Console | None = None,
) -> AnalysisResult:
    options = Options(
        model=model,
        report_dir=report_dir,
        repository=repository,
        constraints=Constraints(latency_budget_ms=latency_budget_ms),
        max_configs=max_configs,
        concurrency=concurrency,
        window_s=window_s,
    )
    analysis = Analysis(options, console or Console(quiet=True))
    # Its own loop: the caller is a command-line tool, not a service.
    report = asyncio.run(analysis.run())
    reports.write(report, report_dir)
    chosen = report.best
    best = None
    if chosen is not None:
        point = chosen.best_point(options.constraints)
        assert point is not None
        best = Best(chosen.device, chosen.name, point.throughput_per_s, point.p99_ms, chosen.config)
    return AnalysisResult(best=best, report_dir=report_dir, interrupted=report.interrupted)
