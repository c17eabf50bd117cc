"""Triton's `model_warmup`: sample requests run on every instance before a version is READY,
so the first real request does not pay for lazy initialisation (allocations, kernel choice).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import model_config_pb2 as pb

from natron import datatypes
from natron.errors import InvalidArgument
from natron.inference import InferRequest, Tensor
from natron.spec import ModelSpec
from workers.backends import AnyBackend

log = logging.getLogger(__name__)


def _sample(
    name: str, raw: pb.ModelWarmup.Input, batch_size: int, spec: ModelSpec, version_dir: Path
) -> npt.NDArray[Any]:
    datatype = datatypes.config_to_datatype(pb.DataType.Name(raw.data_type))
    dims = [int(d) for d in raw.dims]
    shape = ([batch_size] if spec.batching else []) + dims
    count = datatypes.element_count(shape)
    kind = raw.WhichOneof("input_data_type")
    if kind == "input_data_file":
        path = (version_dir / "warmup" / raw.input_data_file).resolve()
        if (version_dir / "warmup").resolve() not in path.parents:
            raise InvalidArgument(
                f"warm-up input '{name}': file '{raw.input_data_file}' leaves the warmup folder"
            )
        one = datatypes.from_raw(path.read_bytes(), datatype, tuple(dims))
        return np.stack([one] * batch_size) if spec.batching else one
    if datatype == datatypes.BYTES:
        items = np.empty(count, dtype=np.object_)
        items[:] = [b"0" * 4] * count if kind == "random_data" else [b""] * count
        return items.reshape(shape)
    dtype = datatypes.to_numpy_dtype(datatype)
    if kind == "random_data":
        rng = np.random.default_rng(0)
        if dtype == np.bool_:
            return rng.integers(0, 2, shape).astype(np.bool_)
        return rng.random(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def run_warmup(backend: AnyBackend, config: pb.ModelConfig, spec: ModelSpec, version_dir: Path) -> None:
    """Run every warm-up sample `count` times; a failing sample fails the load with its name.

    Ensembles are not warmed up (as in Triton): their composing models warm themselves."""
    if hasattr(backend, "execute_async"):
        return
    for warmup in config.model_warmup:
        batch_size = max(1, int(warmup.batch_size))
        try:
            feeds = {
                name: _sample(name, raw, batch_size, spec, version_dir) for name, raw in warmup.inputs.items()
            }
            for _ in range(max(1, int(warmup.count))):
                if hasattr(backend, "execute_requests"):
                    tensors = [
                        Tensor(n, datatypes.from_numpy_dtype(a.dtype), tuple(a.shape), a)
                        for n, a in feeds.items()
                    ]
                    request = InferRequest(f"warmup-{warmup.name}", spec.name, "", tensors)
                    backend.execute_requests([request], lambda index, outputs, final: None)
                else:
                    backend.execute(feeds, [])
        except Exception as exc:
            raise InvalidArgument(
                f"warm-up sample '{warmup.name}' failed: {type(exc).__name__}: {exc}"
            ) from exc
        log.info(
            "model '%s': warm-up sample '%s' ran %d time(s)", spec.name, warmup.name, max(1, warmup.count)
        )
