"""What a conversion is asked for: tensor specs (`NAME:DTYPE:DIMS`), precisions with their
tolerances, the sample inputs every format is checked on, and the one error the tool reports.

DIMS use -1 for a dynamic axis; a -1 first axis on every input is the batch axis (the model
batches, and config.pbtxt lists dims without it). Random samples are drawn with a fixed seed, so
a conversion checks the same numbers every time: floats from a standard normal, integers in
[0, 16), booleans fair; a dynamic axis other than the batch axis gets DYNAMIC_AXIS_SIZE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from natron import datatypes

SEED = 0
DYNAMIC_AXIS_SIZE = 8
# Random samples are checked at batch 1 and at this batch (or max_batch_size when smaller), so
# both ends of a dynamic batch axis are exercised.
SAMPLE_BATCH = 5

Arrays = dict[str, npt.NDArray[Any]]


class ConvertError(Exception):
    """A conversion that cannot go on: its message is the one line the user sees."""


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Triton's: FP32, INT64, ...
    dims: tuple[int, ...]  # with the batch axis, -1 where dynamic


@dataclass(slots=True, frozen=True)
class Tolerance:
    rtol: float
    atol: float


# Per precision: fp32 allows only reordered float arithmetic; fp16 keeps about 3 significant
# digits; int8 quantises activations to 256 levels.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-3, atol=1e-4),
    "fp16": Tolerance(rtol=1e-2, atol=1e-2),
    "int8": Tolerance(rtol=1e-1, atol=1e-1),
}
PRECISIONS = tuple(TOLERANCES)


def tolerance(precision: str, rtol: float | None, atol: float | None) -> Tolerance:
    base = TOLERANCES[precision]
    return Tolerance(base.rtol if rtol is None else rtol, base.atol if atol is None else atol)


_DATATYPES = sorted(datatypes.DATATYPES - {"BYTES", "BF16"})


def parse_tensor_spec(text: str, flag: str, *, need_type: bool = True) -> TensorSpec:
    """`NAME:DTYPE:DIMS` (or, with need_type False, `NAME` alone) -> TensorSpec; ConvertError
    naming the flag and the text otherwise."""
    parts = text.split(":")
    if not need_type and len(parts) == 1 and parts[0]:
        return TensorSpec(parts[0], "", ())
    form = "NAME:DTYPE:DIMS" if need_type else "NAME[:DTYPE:DIMS]"
    if len(parts) != 3 or not parts[0]:
        raise ConvertError(f"{flag} '{text}': expected {form}, e.g. INPUT0:FP32:-1,64")
    name, datatype, dims_text = parts
    datatype = datatype.upper().removeprefix("TYPE_")
    if datatype not in _DATATYPES:
        raise ConvertError(f"{flag} '{text}': unknown datatype '{parts[1]}' (one of {', '.join(_DATATYPES)})")
    try:
        dims = tuple(int(d) for d in dims_text.split(",")) if dims_text else ()
    except ValueError:
        raise ConvertError(
            f"{flag} '{text}': dims must be integers separated by commas, got '{dims_text}'"
        ) from None
    if not dims or any(d == 0 or d < -1 for d in dims):
        raise ConvertError(f"{flag} '{text}': dims must be positive sizes or -1 (dynamic), at least one")
    return TensorSpec(name, datatype, dims)


def batching(inputs: list[TensorSpec]) -> bool:
    """Whether the inputs share a batch axis: -1 first on all of them. Some but not all is an
    error: Triton batches every input of a model or none."""
    first = [spec.dims[0] == -1 for spec in inputs]
    if any(first) and not all(first):
        odd = [spec.name for spec, dynamic in zip(inputs, first, strict=True) if not dynamic]
        raise ConvertError(
            f"--input: the batch axis (-1 first) must be on every input or none; {', '.join(odd)} has none"
        )
    return all(first)


def random_inputs(inputs: list[TensorSpec], batch: int | None, rng: np.random.Generator) -> Arrays:
    """One sample per input: `batch` rows on the batch axis (None: not batching)."""
    arrays: Arrays = {}
    for spec in inputs:
        dims = list(spec.dims)
        if batch is not None:
            dims[0] = batch
        shape = tuple(DYNAMIC_AXIS_SIZE if d == -1 else d for d in dims)
        dtype = datatypes.to_numpy_dtype(spec.datatype)
        if dtype == np.bool_:
            arrays[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            arrays[spec.name] = rng.integers(0, 16, shape).astype(dtype)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
    return arrays


def sample_sets(inputs: list[TensorSpec], max_batch_size: int, path: Path | None) -> list[Arrays]:
    """The samples every format is checked on: the .npz's arrays (and, when batching, their
    first row alone), else random ones at batch 1 and SAMPLE_BATCH."""
    batched = max_batch_size > 0
    if path is None:
        rng = np.random.default_rng(SEED)
        if not batched:
            return [random_inputs(inputs, None, rng)]
        sizes = sorted({1, min(SAMPLE_BATCH, max_batch_size)})
        return [random_inputs(inputs, size, rng) for size in sizes]
    arrays = load_npz(path, inputs)
    if not batched:
        return [arrays]
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1 or next(iter(rows)) > max_batch_size:
        raise ConvertError(
            f"--sample-inputs {path}: every array needs the same batch size, at most max_batch_size "
            f"{max_batch_size}; got {sorted(rows)}"
        )
    one = {name: array[:1] for name, array in arrays.items()}
    return [one, arrays] if next(iter(rows)) > 1 else [arrays]


def load_npz(path: Path, inputs: list[TensorSpec]) -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise ConvertError(f"--sample-inputs {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConvertError(f"--sample-inputs {path}: not a readable .npz ({exc})") from None
    wanted = {spec.name: spec for spec in inputs}
    if set(arrays) != set(wanted):
        raise ConvertError(
            f"--sample-inputs {path}: has arrays {sorted(arrays)}, the inputs are {sorted(wanted)}"
        )
    for name, array in arrays.items():
        spec = wanted[name]
        dtype = datatypes.to_numpy_dtype(spec.datatype)
        if array.dtype != dtype:
            raise ConvertError(f"--sample-inputs {path}: '{name}' is {array.dtype}, the input is {dtype}")
        if len(array.shape) != len(spec.dims) or any(
            d != -1 and d != s for d, s in zip(spec.dims, array.shape, strict=True)
        ):
            raise ConvertError(
                f"--sample-inputs {path}: '{name}' has shape {list(array.shape)}, the input's dims "
                f"are {list(spec.dims)}"
            )
    return {spec.name: arrays[spec.name] for spec in inputs}
