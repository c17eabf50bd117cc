"""`natron convert SOURCE --input NAME:DTYPE:DIMS ... --out REPO/NAME`: a PyTorch or TensorFlow
model to a checked Triton model folder (ONNX, ONNX Runtime-optimised ONNX, and on a GPU TensorRT),
Helm values to serve it, and a summary of every format tried.

Exit status: 0 when a format passed and was written, 1 on an error (one line, naming it) or when
no format passed its check, 2 on bad flags (argparse's own).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from natron import datatypes
from natron.convert import formats, repository, sources
from natron.convert.formats import Candidate
from natron.convert.spec import (
    PRECISIONS,
    Arrays,
    ConvertError,
    TensorSpec,
    batching,
    parse_tensor_spec,
    sample_sets,
    tolerance,
)

PROG = "natron convert"
# max_batch_size when the inputs have a batch axis and --max-batch-size is not given.
DEFAULT_MAX_BATCH_SIZE = 8
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a PyTorch or TensorFlow model into a checked Triton model folder.",
    )
    parser.add_argument(
        "source",
        help="pkg.module:callable returning a torch nn.Module, a TorchScript .pt/.ts, an exported "
        "program .pt2, a TensorFlow SavedModel folder or a .keras file",
    )
    parser.add_argument(
        "--input", action="append", required=True, metavar="NAME:DTYPE:DIMS",
        help="a model input, in forward()'s order; -1 first is the batch axis (e.g. INPUT0:FP32:-1,64)",
    )  # fmt: skip
    parser.add_argument(
        "--output", action="append", default=[], metavar="NAME[:DTYPE:DIMS]",
        help="name (and check) the outputs, in order; default OUTPUT0, OUTPUT1, ...",
    )  # fmt: skip
    parser.add_argument(
        "--out", required=True, type=Path, metavar="REPO/NAME", help="the model folder to write"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None,
        help=f"default {DEFAULT_MAX_BATCH_SIZE} when the inputs have a batch axis, else 0",
    )  # fmt: skip
    parser.add_argument("--instances", type=int, default=1, help="instance_group count (default 1)")
    parser.add_argument(
        "--kind", choices=("auto", "cpu", "gpu"), default="auto",
        help="instance_group kind; auto: GPU for GPU formats and on a GPU host, else CPU",
    )  # fmt: skip
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="TensorRT's precision")
    parser.add_argument("--sample-inputs", type=Path, metavar="FILE.npz", help="inputs to check on")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default per precision)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default per precision)")
    parser.add_argument("--analyze", action="store_true", help="serve each passing format; keep the fastest")
    parser.add_argument("--max-configs", type=int, default=4, help="--analyze: configs tried per format")
    parser.add_argument("--latency-budget-ms", type=float, help="--analyze: p99 latency bound")
    parser.add_argument("--chart", type=Path, metavar="DIR", help="also copy the natron Helm chart here")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)  # bad flags: exit 2 with argparse's message
    console = Console(highlight=False)
    try:
        return convert(args, console)
    except ConvertError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, never a traceback
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


@dataclass(slots=True, frozen=True)
class Plan:
    """The checked flags."""

    repository: Path
    name: str
    inputs: list[TensorSpec]
    max_batch_size: int
    gpu: bool


def _plan(args: argparse.Namespace) -> Plan:
    name = args.out.name
    if not _NAME.match(name):
        raise ConvertError(
            f"--out {args.out}: the model name '{name}' must be letters, digits, '_', '.', '-'"
        )
    inputs = [parse_tensor_spec(text, "--input") for text in args.input]
    names = [spec.name for spec in inputs]
    if len(set(names)) != len(names):
        raise ConvertError(f"--input: names repeat: {names}")
    batched = batching(inputs)
    max_batch_size = args.max_batch_size
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if batched else 0
    if max_batch_size < 0:
        raise ConvertError(f"--max-batch-size {max_batch_size}: must be >= 0")
    if max_batch_size > 0 and not batched:
        raise ConvertError(
            f"--max-batch-size {max_batch_size}: the inputs have no batch axis (-1 first in DIMS)"
        )
    if args.instances < 1:
        raise ConvertError(f"--instances {args.instances}: must be >= 1")
    if args.chart is not None:
        repository.check_chart(args.chart)
    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if value is not None and not value >= 0:
            raise ConvertError(f"{flag} {value}: must be >= 0")
    return Plan(args.out.parent, name, inputs, max_batch_size, formats.gpu_available())


def _output_specs(
    args: argparse.Namespace, expected: list[list[Any]], max_batch_size: int
) -> list[TensorSpec]:
    """The outputs' names, datatypes and dims: seen on the samples (an axis whose size differs
    between them is dynamic), checked against any --output DTYPE:DIMS given."""
    given = [parse_tensor_spec(text, "--output", need_type=False) for text in args.output]
    count = len(expected[0])
    if given and len(given) != count:
        raise ConvertError(f"--output: {len(given)} given, the model has {count} output(s)")
    specs = []
    for index in range(count):
        arrays = [outputs[index] for outputs in expected]
        shapes = {a.shape for a in arrays}
        if len({len(s) for s in shapes}) != 1:
            raise ConvertError(f"output {index} changes rank between samples: {sorted(shapes)}")
        dims = tuple(
            -1
            if (axis == 0 and max_batch_size > 0) or len({s[axis] for s in shapes}) > 1
            else arrays[0].shape[axis]
            for axis in range(arrays[0].ndim)
        )
        try:
            datatype = datatypes.from_numpy_dtype(arrays[0].dtype)
        except Exception:
            raise ConvertError(f"output {index} is {arrays[0].dtype}, which natron cannot carry") from None
        name = given[index].name if given else f"OUTPUT{index}"
        if given and given[index].datatype:
            want = given[index]
            if (
                want.datatype != datatype
                or len(want.dims) != len(dims)
                or any(w != -1 and w != d for w, d in zip(want.dims, dims, strict=True))
            ):
                raise ConvertError(
                    f"--output {args.output[index]}: the model's output {index} is {datatype} {list(dims)}"
                )
            dims = tuple(w if w != -1 else d for w, d in zip(want.dims, dims, strict=True))
        specs.append(TensorSpec(name, datatype, dims))
    if len({spec.name for spec in specs}) != len(specs):
        raise ConvertError(f"--output: names repeat: {[spec.name for spec in specs]}")
    return specs


def _candidates(
    plan: Plan, precision: str, onnx_path: Path, work: Path, samples: list[Arrays]
) -> list[Candidate]:
    """Build every format this host can make; a build that fails is a candidate in error."""
    out: list[Candidate] = []
    plain = Candidate(
        "onnx", "fp32", "onnxruntime_onnx", "model.onnx", formats.stage(work, "onnx", "model.onnx", onnx_path)
    )
    out.append(plain)
    optimized_dir = work / "onnx-ort" / "1"
    optimized_dir.mkdir(parents=True)
    optimized = Candidate("onnx-ort", "fp32", "onnxruntime_onnx", "model.onnx", optimized_dir)
    formats.optimize_onnx(onnx_path, optimized_dir / "model.onnx")
    out.append(optimized)
    if not plan.gpu:
        return out
    plan_dir = work / "tensorrt" / "1"
    plan_dir.mkdir(parents=True)
    engine = Candidate("tensorrt", precision, "tensorrt_plan", "model.plan", plan_dir)
    try:
        formats.build_plan(
            onnx_path, plan_dir / "model.plan", plan.inputs, plan.max_batch_size, precision,
            _calibration(plan, samples) if precision == "int8" else [],
        )  # fmt: skip
    except ConvertError as exc:
        engine.status, engine.message = "error", str(exc)
    out.append(engine)
    if precision != "int8":  # ONNX Runtime's TensorRT provider needs a calibration table for INT8
        trt_ep = Candidate(
            "onnx-trt", precision, "onnxruntime_onnx", "model.onnx",
            formats.stage(work, "onnx-trt", "model.onnx", onnx_path),
            accelerator={
                "precision_mode": precision.upper(),
                "max_workspace_size_bytes": str(formats.TRT_WORKSPACE_BYTES),
            },
        )  # fmt: skip
        out.append(trt_ep)
    return out


def _calibration(plan: Plan, samples: list[Arrays]) -> list[Arrays]:
    """INT8 calibration batches of one shape: the largest sample, and random ones like it."""
    from natron.convert.spec import random_inputs

    largest = max(samples, key=lambda s: next(iter(s.values())).shape[0] if s else 0)
    rows = next(iter(largest.values())).shape[0] if plan.max_batch_size > 0 else None
    rng = np.random.default_rng(1)
    return [largest] + [random_inputs(plan.inputs, rows, rng) for _ in range(formats.CALIBRATION_BATCHES - 1)]


def _kind(args: argparse.Namespace, plan: Plan, candidate: Candidate) -> str:
    if args.kind != "auto":
        return str(args.kind)
    return "gpu" if candidate.on_gpu or plan.gpu else "cpu"


def _check(
    candidate: Candidate,
    config: Any,
    samples: list[Arrays],
    expected: list[list[Any]],
    outputs: list[str],
    tol: Any,
) -> None:
    """Load the format with natron's own backend and compare with the source on every sample."""
    from workers.backends import BackendContext, load_backend
    from workers.devices import CPU, discover_gpus

    gpus = discover_gpus() if config.instance_group[0].kind == config.instance_group[0].KIND_GPU else []
    device = gpus[0] if gpus else CPU
    try:
        backend = load_backend(config, candidate.version_dir, BackendContext(device=device))
    except Exception as exc:  # NatronError or the framework's own: the format is in error
        candidate.status, candidate.message = "error", f"does not load: {exc}"
        return
    try:
        worst = (0.0, 0.0, "")
        for sample, want in zip(samples, expected, strict=True):
            got = backend.execute(dict(sample), [])  # type: ignore[union-attr]
            passed, abs_error, rel_error, name, why = formats.compare(want, got, outputs, tol)
            worst = max(worst, (abs_error, rel_error, name))
            if not passed:
                candidate.status, candidate.message = "failed", why
                break
        else:
            candidate.status = "passed"
        candidate.max_abs_error, candidate.max_rel_error, candidate.worst_output = worst
    except Exception as exc:
        candidate.status, candidate.message = "error", f"fails to run: {exc}"
    finally:
        backend.close()


def convert(args: argparse.Namespace, console: Console) -> int:
    plan = _plan(args)
    sources.python_path(Path.cwd())
    source = sources.load_source(args.source)
    samples = sample_sets(plan.inputs, plan.max_batch_size, args.sample_inputs)
    expected = [source.run(sample) for sample in samples]
    outputs = _output_specs(args, expected, plan.max_batch_size)
    if args.precision != "fp32" and not plan.gpu:
        console.print(
            f"[yellow]note:[/] --precision {args.precision} applies to TensorRT; no GPU with TensorRT "
            "here, so only the fp32 ONNX formats are made"
        )
    with tempfile.TemporaryDirectory(prefix="natron-convert-") as tmp:
        work = Path(tmp)
        onnx_path = work / "exported.onnx"
        source.export_onnx(
            onnx_path, plan.inputs, [o.name for o in outputs], samples[-1], plan.max_batch_size > 0
        )
        for note in source.notes:
            console.print(f"[yellow]exporter warning:[/] {note}", soft_wrap=True)
        candidates = _candidates(plan, args.precision, onnx_path, work, samples)
        configs = {}
        for candidate in candidates:
            config = repository.make_config(
                plan.name, candidate, plan.inputs, outputs, plan.max_batch_size, args.instances,
                _kind(args, plan, candidate),
            )  # fmt: skip
            configs[candidate.format] = config
            if candidate.status == "pending":
                tol = tolerance(candidate.precision, args.rtol, args.atol)
                _check(candidate, config, samples, expected, [o.name for o in outputs], tol)
        passed = [c for c in candidates if c.status == "passed"]
        chosen, config = None, None
        if passed:
            if args.analyze:
                chosen, config = _analyze(args, plan, passed, configs, console)
            else:
                chosen = min(passed, key=lambda c: formats.PREFERENCE.index(c.format))
                config = configs[chosen.format]
        written = None
        if chosen is not None and config is not None:
            written = repository.write_model(plan.repository, config, chosen)
            chosen.extras["written"] = True
        _summary(console, source.description, candidates)
        if written is None or chosen is None:
            print(f"{PROG}: error: no format passed its check; nothing written", file=sys.stderr)
            return 1
        values, chart = repository.write_helm(plan.repository, plan.name, chosen, args.chart)
    # Paths print whole on one line (no wrapping, no markup), for scripts and copy-paste.
    console.print(f"wrote {written} ({chosen.format}, {chosen.precision})", markup=False, soft_wrap=True)
    console.print(
        f"wrote {values}" + (f" and the chart {chart}" if chart else ""), markup=False, soft_wrap=True
    )
    return 0


def _analyze(
    args: argparse.Namespace, plan: Plan, passed: list[Candidate], configs: dict[str, Any], console: Console
) -> tuple[Candidate | None, Any]:
    """Serve each passing format with `natron analyze` and keep the highest throughput, with the
    config analyze found best for it."""
    try:
        from natron.analyze.api import analyze_repository
        from natron.analyze.server import AnalyzeError
        from natron.perf.api import PerfError
    except ImportError as exc:
        raise ConvertError(f"--analyze needs natron.analyze, which is not available here ({exc})") from None
    from natron.config import config_from_json

    report_root = plan.repository.resolve().parent / f"natron-convert-{plan.name}-analysis"
    best: tuple[float, Candidate, Any] | None = None
    for candidate in passed:
        trial_repo = candidate.version_dir.parent.parent / "repository"
        repository.write_model(trial_repo, configs[candidate.format], candidate)
        try:
            result = analyze_repository(
                trial_repo, plan.name, report_dir=report_root / candidate.format,
                max_configs=args.max_configs, latency_budget_ms=args.latency_budget_ms,
            )  # fmt: skip
        except (AnalyzeError, PerfError) as exc:
            raise ConvertError(f"--analyze of {candidate.format}: {exc}") from None
        if result.interrupted:
            raise ConvertError(f"--analyze of {candidate.format} stopped early: {result.interrupted}")
        if result.best is None:
            console.print(f"analyze: {candidate.format}: no configuration met the bounds")
            continue
        console.print(
            f"analyze: {candidate.format}: {result.best.throughput_per_s:.1f} infer/s, "
            f"p99 {result.best.p99_ms:.2f} ms"
        )
        candidate.extras["throughput_per_s"] = result.best.throughput_per_s
        if best is None or result.best.throughput_per_s > best[0]:
            config = config_from_json(dict(result.best.config))
            config.name = plan.name
            best = (result.best.throughput_per_s, candidate, config)
    if best is None:
        return None, None
    return best[1], best[2]


def _summary(console: Console, description: str, candidates: list[Candidate]) -> None:
    table = Table(title=f"natron convert: {description}")
    for column in ("format", "precision", "status", "max abs error", "max rel error", "output", "written"):
        table.add_column(column)
    colours = {"passed": "green", "failed": "red", "error": "red"}
    for c in candidates:
        measured = c.status in ("passed", "failed")
        table.add_row(
            c.format,
            c.precision,
            f"[{colours.get(c.status, 'white')}]{c.status}[/]",
            f"{c.max_abs_error:.3g}" if measured else "-",
            f"{c.max_rel_error:.3g}" if measured else "-",
            c.worst_output or "-",
            "yes" if c.extras.get("written") else "no",
        )
    console.print(table)
    for c in candidates:
        if c.message:
            console.print(f"{c.format}: {c.status}: {c.message}", markup=False, soft_wrap=True)
