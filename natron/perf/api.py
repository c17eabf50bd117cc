"""natron perf as a library: what `natron analyze` and the benches drive load with."""

from __future__ import annotations

from natron.perf.load import DISTRIBUTIONS, MODES, Check, LoadGenerator, build_inputs, check_structure, sweep
from natron.perf.protocols import ModelInfo, RequestFailed
from natron.perf.results import (
    CSV_COLUMNS,
    Measurement,
    PerfError,
    ServerGone,
    csv_header,
    latency_summary,
    percentile,
)
from natron.perf.target import PROTOCOLS, Target

__all__ = [
    "CSV_COLUMNS",
    "DISTRIBUTIONS",
    "MODES",
    "PROTOCOLS",
    "Check",
    "LoadGenerator",
    "Measurement",
    "ModelInfo",
    "PerfError",
    "RequestFailed",
    "ServerGone",
    "Target",
    "build_inputs",
    "check_structure",
    "csv_header",
    "latency_summary",
    "percentile",
    "sweep",
]
