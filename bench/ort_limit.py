"""The compute limit: onnxruntime in-process, no server, on one model at several batch sizes.

bench.py runs this as a subprocess while no server is running, so it has the cores to itself.
It prints one JSON object on stdout:

    {"model": ..., "threads": 2, "points": [{"batch_size": 1, "samples_per_s": ...}, ...],
     "best_samples_per_s": ..., "best_batch_size": ...}

    python -m bench.ort_limit --model examples/models/mlp/1/model.onnx --duration-s 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def make_session(model_path: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def measure(session: ort.InferenceSession, batch_size: int, duration_s: float) -> dict[str, float]:
    meta = session.get_inputs()[0]
    # The sample width comes from the graph: every dim after the batch dim must be fixed.
    sample_dims = [int(d) for d in meta.shape[1:]]
    rng = np.random.default_rng(0)
    feeds = {meta.name: rng.standard_normal((batch_size, *sample_dims), dtype=np.float32)}
    # Warm-up: first runs allocate arenas and pick kernels; they are not steady state.
    warmup_deadline = time.perf_counter() + min(0.5, duration_s / 4)
    for _ in range(3):
        session.run(None, feeds)
    while time.perf_counter() < warmup_deadline:
        session.run(None, feeds)
    calls = 0
    start = time.perf_counter()
    deadline = start + duration_s
    now = start
    # At least 3 calls so that a huge batch on a slow machine still gives a number.
    while now < deadline or calls < 3:
        session.run(None, feeds)
        calls += 1
        now = time.perf_counter()
    elapsed_s = now - start
    return {
        "batch_size": batch_size,
        "calls": calls,
        "elapsed_s": elapsed_s,
        "latency_ms": elapsed_s / calls * 1e3,
        "samples_per_s": calls * batch_size / elapsed_s,
    }


def run(
    model_path: Path, batch_sizes: Sequence[int], duration_s: float, intra_op_threads: int
) -> dict[str, Any]:
    session = make_session(model_path, intra_op_threads)
    points = [measure(session, batch_size, duration_s) for batch_size in batch_sizes]
    best = max(points, key=lambda p: p["samples_per_s"])
    return {
        "model_path": str(model_path),
        "intra_op_threads": intra_op_threads,
        "duration_s_per_point": duration_s,
        "points": points,
        "best_samples_per_s": best["samples_per_s"],
        "best_batch_size": int(best["batch_size"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="onnxruntime in-process throughput by batch size")
    parser.add_argument("--model", type=Path, required=True, help="path to model.onnx")
    parser.add_argument(
        "--batch-sizes", default=",".join(str(b) for b in DEFAULT_BATCH_SIZES), help="comma-separated"
    )
    parser.add_argument("--duration-s", type=float, default=2.0, help="measured seconds per batch size")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    result = run(args.model, batch_sizes, args.duration_s, args.threads)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
