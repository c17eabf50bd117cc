"""The formats a model is converted to, and the check of each against the source.

| format     | where    | what                                                                  |
|------------|----------|-----------------------------------------------------------------------|
| `onnx`     | always   | the exported ONNX, dynamic batch axis                                 |
| `onnx-ort` | always   | the same, with ONNX Runtime's basic graph optimisations applied once   |
| `tensorrt` | GPU      | a TensorRT plan (`model.plan`) at the asked precision                  |
| `onnx-trt` | GPU      | the ONNX served by ONNX Runtime's TensorRT provider (fp32/fp16)        |

`onnx-ort` is optimised offline at ORT_ENABLE_BASIC only: those rewrites (constant folding,
redundant nodes, Conv+BatchNorm and similar fusions) keep standard ONNX ops and run before
ONNX Runtime partitions the graph, so the file stays valid for every provider and machine. The
extended and layout levels write contrib and CPU-layout ops (FusedConv, NCHWc) specific to the
provider and the CPU they were made on, so they are left to the serving host: the config keeps
Triton's default graph level (all), which applies them online there, at load.

Every format is checked as natron serves it: its config is built, its files staged in a
version folder, and natron's own backend (`workers.backends.load_backend`) loads and runs it on
each sample; its outputs must match the source's within the precision's tolerance.

Preference when several pass (and no --analyze): tensorrt > onnx-trt > onnx-ort > onnx: a plan
is compiled for the GPU it will run on; then TensorRT through ONNX Runtime; then less work at load.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from natron.convert.spec import DYNAMIC_AXIS_SIZE, Arrays, ConvertError, TensorSpec, Tolerance

PREFERENCE = ("tensorrt", "onnx-trt", "onnx-ort", "onnx")
GPU_FORMATS = frozenset({"tensorrt", "onnx-trt"})
# TensorRT's builder may use this much GPU memory for its tactics.
TRT_WORKSPACE_BYTES = 1 << 30
# INT8 calibration batches drawn when no --sample-inputs are given.
CALIBRATION_BATCHES = 8


@dataclass(slots=True)
class Candidate:
    format: str
    precision: str
    platform: str
    filename: str
    version_dir: Path  # the staged folder holding `filename`
    accelerator: dict[str, str] | None = None  # gpu_execution_accelerator parameters
    status: str = "pending"  # passed | failed | error | skipped
    message: str = ""
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    worst_output: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.format in GPU_FORMATS


def gpu_available() -> bool:
    """A CUDA device and TensorRT's Python package: what the GPU formats need."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        from workers.devices import discover_gpus

        return bool(discover_gpus())


def optimize_onnx(source: Path, target: Path) -> None:
    """ONNX Runtime's basic (portable) graph optimisations, written once (see the docstring)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConvertError(f"ONNX Runtime cannot load the exported model: {exc}") from None


def stage(work: Path, name: str, filename: str, model: Path) -> Path:
    """A version folder `work/name/1` holding `model` as `filename`."""
    version_dir = work / name / "1"
    version_dir.mkdir(parents=True)
    shutil.copyfile(model, version_dir / filename)
    return version_dir


def compare(
    expected: list[npt.NDArray[Any]], got: dict[str, npt.NDArray[Any]], names: list[str], tol: Tolerance
) -> tuple[bool, float, float, str, str]:
    """(passed, max abs error, max rel error, worst output, why not) over every output."""
    passed, max_abs, max_rel, worst, why = True, 0.0, 0.0, "", ""
    for name, want in zip(names, expected, strict=True):
        have = got.get(name)
        if have is None:
            return False, float("inf"), float("inf"), name, f"output '{name}' is missing"
        if have.shape != want.shape:
            return (
                False,
                float("inf"),
                float("inf"),
                name,
                (f"output '{name}' has shape {list(have.shape)}, the source's {list(want.shape)}"),
            )
        a, b = np.asarray(have, dtype=np.float64), np.asarray(want, dtype=np.float64)
        diff = np.abs(a - b)  # NaN where either is NaN: it fails the check below
        abs_error = float(diff.max()) if diff.size else 0.0
        rel_error = float((diff / np.maximum(np.abs(b), 1e-12)).max()) if diff.size else 0.0
        ok = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(b)))
        if passed and (not ok or abs_error >= max_abs):
            worst = name  # the first failing output, else the one with the largest error
        max_abs, max_rel = max(max_abs, abs_error), max(max_rel, rel_error)
        if passed and not ok:
            passed = False
            why = (
                f"output '{name}': max abs error {abs_error:.3g}, max rel error {rel_error:.3g} "
                f"over atol {tol.atol:g} + rtol {tol.rtol:g}"
            )
    return passed, max_abs, max_rel, worst, why


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    inputs: list[TensorSpec],
    max_batch_size: int,
    precision: str,
    calibration: list[Arrays],
) -> None:
    """A TensorRT engine from the ONNX, through TensorRT's Python API (10 and up): one
    optimization profile over batch 1..max_batch_size (other dynamic axes fixed at the samples'
    size), FP16 or INT8 (with an entropy calibrator fed `calibration`) when asked."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConvertError(f"TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, TRT_WORKSPACE_BYTES)

    def shapes(batch: int) -> dict[str, tuple[int, ...]]:
        return {
            s.name: tuple(
                batch if axis == 0 and max_batch_size > 0 else (DYNAMIC_AXIS_SIZE if d == -1 else d)
                for axis, d in enumerate(s.dims)
            )
            for s in inputs
        }

    if any(-1 in s.dims for s in inputs):
        profile = builder.create_optimization_profile()
        low, high = shapes(1), shapes(max(max_batch_size, 1))
        for name in low:
            profile.set_shape(name, low[name], high[name], high[name])
        config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        # Layers INT8 cannot take fall back to FP16 rather than FP32.
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        batch_shapes = {name: array.shape for name, array in calibration[0].items()}
        if any(-1 in s.dims for s in inputs):
            # Calibration runs at one shape: the calibration batches'.
            calib_profile = builder.create_optimization_profile()
            for name, shape in batch_shapes.items():
                calib_profile.set_shape(name, shape, shape, shape)
            config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _calibrator(trt, calibration)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConvertError(f"TensorRT could not build a {precision} engine (see its log above)")
    plan_path.write_bytes(bytes(serialized))


def _calibrator(trt: Any, batches: list[Arrays]) -> Any:
    """An IInt8EntropyCalibrator2 that hands TensorRT each batch in device memory."""
    from workers.backends.tensorrt import CudaRuntime

    cuda = CudaRuntime()

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._pending = list(batches)
            self._pointers: dict[str, int] = {}
            self._cache: bytes | None = None

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch is in the shapes

        def get_batch(self, names: list[str]) -> list[int] | None:
            if not self._pending:
                return None
            batch = self._pending.pop(0)
            pointers = []
            for name in names:
                host = np.ascontiguousarray(batch[name])
                if name not in self._pointers:
                    self._pointers[name] = cuda.malloc(host.nbytes)
                cuda.copy_async(self._pointers[name], host.ctypes.data, host.nbytes, 1, 0)
                pointers.append(self._pointers[name])
            cuda.synchronize(0)
            return pointers

        def read_calibration_cache(self) -> bytes | None:
            return self._cache

        def write_calibration_cache(self, cache: Any) -> None:
            self._cache = bytes(cache)

    return Calibrator()
