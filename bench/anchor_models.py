"""The twin model repositories of bench/sidebyside.py: the same ONNX files served by natron and
by Triton.

    python -m bench.anchor_models [--out bench/results/anchor-models] [--intra-op-threads N]

writes

    <out>/natron/<model>/config.pbtxt     platform onnxruntime_onnx
    <out>/natron/<model>/1/model.onnx
    <out>/triton/<model>/config.pbtxt     backend python, same inputs, outputs and batching
    <out>/triton/<model>/1/model.py       onnxruntime on the same file, one run per batch
    <out>/triton/<model>/1/model.onnx     a hard link to natron's file (a copy where links fail)

for two models:

- `tiny`: FP32 INPUT0 [16] -> OUTPUT0 = 2x + 1, max_batch_size 64, a 500 µs batching window;
- `mlp`:  FP32 INPUT0 [256] -> 512 -> 512 -> 10 OUTPUT0 with ReLU between, max_batch_size 64.

Triton's own ONNX Runtime backend is not in the wheel the benchmark installs (only the Python
backend is), so Triton's twin runs onnxruntime through the Python backend. Both configurations
carry the same ORT parameters (`allow_spinning` off, as natron's worker defaults to, and
`intra_op_thread_count` when given), which natron's ONNX backend and the twin's model.py both
read, so each side runs the graph with the same threads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import onnx

from examples.build_models import (
    INSTANCE_GROUP_CPU,
    TINY_SIZE,
    TensorSpec,
    mlp_model,
    render_config,
    scale_shift_model,
    tensor_list,
)

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_OUT: Final = REPO_ROOT / "bench" / "results" / "anchor-models"

MAX_BATCH_SIZE: Final = 64
MLP_SIZES: Final = (256, 512, 512, 10)
MODEL_INPUT_SIZES: Final = {"tiny": TINY_SIZE, "mlp": MLP_SIZES[0]}
ANCHOR_MODELS: Final = tuple(MODEL_INPUT_SIZES)


@dataclass(frozen=True, slots=True)
class AnchorRepos:
    natron: Path
    triton: Path


# The Triton twin: the same ONNX file through onnxruntime, one session.run per batch that
# Triton's dynamic batcher hands over, with the session options natron's ONNX backend uses.
TWIN_MODEL_PY: Final = '''\
"""Triton Python-backend twin of a natron ONNX model (written by bench/anchor_models.py)."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if params.get("allow_spinning") == "1" else "0"
        )
        if params.get("intra_op_thread_count"):
            options.intra_op_num_threads = int(params["intra_op_thread_count"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = [entry["name"] for entry in config["input"]]
        self.outputs = [entry["name"] for entry in config["output"]]

    def execute(self, requests):
        parts = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.inputs
        }
        rows = [array.shape[0] for array in parts[self.inputs[0]]]
        feed = {
            name: arrays[0] if len(arrays) == 1 else np.concatenate(arrays) for name, arrays in parts.items()
        }
        results = self.session.run(self.outputs, feed)
        responses = []
        start = 0
        for count in rows:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result[start : start + count]))
                for name, result in zip(self.outputs, results)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += count
        return responses
'''


def _mlp_graph() -> onnx.ModelProto:
    return mlp_model(MLP_SIZES, seed=2024, scale=0.05)


def _graph(model: str) -> onnx.ModelProto:
    if model == "tiny":
        return scale_shift_model("INPUT0", "OUTPUT0", ["batch", TINY_SIZE], 2.0, 1.0)
    return _mlp_graph()


def _batching(model: str) -> str:
    if model == "tiny":
        return "dynamic_batching {\n  max_queue_delay_microseconds: 500\n}\n"
    return "dynamic_batching { }\n"


def _parameters(intra_op_threads: int) -> str:
    params = {"allow_spinning": "0"}
    if intra_op_threads:
        params["intra_op_thread_count"] = str(intra_op_threads)
    return "".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        for key, value in params.items()
    )


def _specs(model: str) -> tuple[TensorSpec, TensorSpec]:
    out_size = TINY_SIZE if model == "tiny" else MLP_SIZES[-1]
    return (
        TensorSpec("INPUT0", "TYPE_FP32", (MODEL_INPUT_SIZES[model],)),
        TensorSpec("OUTPUT0", "TYPE_FP32", (out_size,)),
    )


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def build(out: Path, intra_op_threads: int = 0) -> AnchorRepos:
    """Writes both repositories under `out`, replacing what a previous build left there."""
    repos = AnchorRepos(out / "natron", out / "triton")
    for repo in (repos.natron, repos.triton):
        if repo.exists():
            shutil.rmtree(repo)
    for model in ANCHOR_MODELS:
        spec_in, spec_out = _specs(model)
        extra = INSTANCE_GROUP_CPU + _batching(model) + _parameters(intra_op_threads)

        natron_dir = repos.natron / model
        (natron_dir / "1").mkdir(parents=True)
        onnx_path = natron_dir / "1" / "model.onnx"
        onnx_path.write_bytes(_graph(model).SerializeToString())
        config = render_config(model, MAX_BATCH_SIZE, [spec_in], [spec_out], extra)
        (natron_dir / "config.pbtxt").write_text(config, encoding="utf-8")

        twin_dir = repos.triton / model
        (twin_dir / "1").mkdir(parents=True)
        _link_or_copy(onnx_path, twin_dir / "1" / "model.onnx")
        (twin_dir / "1" / "model.py").write_text(TWIN_MODEL_PY, encoding="utf-8")
        twin_config = (
            f'name: "{model}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
            + tensor_list("input", [spec_in])
            + tensor_list("output", [spec_out])
            + extra
        )
        (twin_dir / "config.pbtxt").write_text(twin_config, encoding="utf-8")
    return repos


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build natron's and Triton's twin model repositories.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads in both configs (default 0: onnxruntime's choice, as natron's)",
    )
    args = parser.parse_args(argv)
    if args.intra_op_threads < 0:
        parser.error(f"--intra-op-threads must be >= 0, got {args.intra_op_threads}")
    repos = build(args.out.resolve(), args.intra_op_threads)
    print(f"natron: {repos.natron}\ntriton: {repos.triton}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
