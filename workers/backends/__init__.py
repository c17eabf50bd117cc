"""Model backends. Each loads one instance of one model version and runs whole batches.

A backend's `execute` is blocking and is called from a worker thread, never on the event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt
from tritonclient.grpc import model_config_pb2 as pb

from natron.errors import Unsupported
from workers.devices import Device


class Backend(Protocol):
    def execute(self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch; return the requested outputs (all when `outputs` is empty)."""
        ...

    def close(self) -> None: ...


def load_backend(config: pb.ModelConfig, version_dir: Path, device: Device) -> Backend:
    """Load one instance; raises with the real reason when the model cannot load."""
    key = config.platform or config.backend
    if key in ("onnxruntime_onnx", "onnxruntime"):
        from workers.backends.onnx import OnnxRuntimeBackend

        return OnnxRuntimeBackend.load(config, version_dir, device)
    raise Unsupported(f"model '{config.name}': platform/backend '{key}' is not supported by this worker")
