"""Model backends. Each loads one instance of one model version.

Three shapes of backend exist, each served by its runner in `workers.runners`:

* `Backend` runs whole batches: the instance concatenates the inputs of the requests it
  batches, calls `execute` once, and splits the outputs back (ONNX Runtime, PyTorch, TensorRT).
* `RequestBackend` takes the requests themselves, as Triton's Python backend hands a model a
  list of requests, and answers each through a `ResponseSink`: exactly once with `final=True`
  for an ordinary model; 0..N times, the last with `final=True`, for a decoupled one, possibly
  after `execute_requests` has returned and from any thread.

`execute` and `execute_requests` block and are called from the instance's thread, never on the
event loop (quick batches aside, see `workers.runners.BatchRunner`). An `AsyncBackend` (ensembles)
runs on the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt
from tritonclient.grpc import model_config_pb2 as pb

from broker.auth import ClientAuth
from natron.errors import NatronError, Unsupported
from natron.inference import InferRequest, Tensor
from workers.devices import Device


class Backend(Protocol):
    def execute(self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch; return the requested outputs (all when `outputs` is empty)."""
        ...

    def close(self) -> None: ...


class ResponseSink(Protocol):
    def __call__(self, index: int, outputs: list[Tensor] | NatronError | None, final: bool) -> None:
        """Answer request `index` of the call: outputs, an error, or (None) only the final flag."""
        ...


class RequestBackend(Protocol):
    def execute_requests(self, requests: list[InferRequest], sink: ResponseSink) -> None: ...

    def close(self) -> None: ...


class AsyncBackend(Protocol):
    """A backend that waits on the mesh rather than a device (ensembles): its requests run as
    tasks on the event loop, and it answers each through the sink before returning."""

    async def execute_async(
        self, requests: list[InferRequest], sink: ResponseSink, deadlines_ns: list[int]
    ) -> None: ...

    def close(self) -> None: ...


AnyBackend = Backend | RequestBackend | AsyncBackend


@dataclass(slots=True, frozen=True)
class BackendContext:
    """What a backend may need beyond its files: its device, and how model code reaches the mesh
    (BLS calls from Python models)."""

    device: Device
    nats_url: str = ""
    # The worker's identity on the broker, and its inboxes' prefix (broker/auth.py).
    nats_auth: ClientAuth | None = None
    inbox_prefix: str = ""
    prefix: str = "natron"
    # Intra-op threads for CPU execution when the model does not say; 0: the framework's own.
    cpu_threads: int = 0


# Loads one instance of a model version: its config, its version folder, the worker's context.
Loader = Callable[[pb.ModelConfig, Path, BackendContext], "AnyBackend"]


def on_gpu(config: pb.ModelConfig, device: Device) -> bool:
    """Whether an instance of this model runs on the worker's GPU.

    Triton's KIND_AUTO (the default) and KIND_GPU mean the GPU when there is one; only groups
    that all say KIND_CPU keep a model on the CPU of a GPU worker.
    """
    if device.kind != "GPU":
        return False
    groups = list(config.instance_group)
    return not groups or any(g.kind != pb.ModelInstanceGroup.KIND_CPU for g in groups)


def _onnx(config: pb.ModelConfig, version_dir: Path, context: BackendContext) -> AnyBackend:
    from workers.backends.onnx import OnnxRuntimeBackend

    return OnnxRuntimeBackend.load(config, version_dir, context.device, context.cpu_threads)


def _pytorch(config: pb.ModelConfig, version_dir: Path, context: BackendContext) -> AnyBackend:
    from workers.backends.pytorch import load_pytorch

    return load_pytorch(config, version_dir, context.device)


def _tensorrt(config: pb.ModelConfig, version_dir: Path, context: BackendContext) -> AnyBackend:
    from workers.backends.tensorrt import TensorRTBackend

    return TensorRTBackend.load(config, version_dir, context.device)


def _python(config: pb.ModelConfig, version_dir: Path, context: BackendContext) -> AnyBackend:
    from workers.backends.python import PythonBackend

    return PythonBackend.load(config, version_dir, context)


# platform or backend name -> loader. Each framework is imported only when a model needs it, so
# a worker without torch or tensorrt still serves every other model. Other roles add their own
# (the orchestrator adds "ensemble") through `load_backend`'s `loaders`.
LOADERS: Mapping[str, Loader] = {
    "onnxruntime_onnx": _onnx,
    "onnxruntime": _onnx,
    "pytorch_libtorch": _pytorch,
    "pytorch": _pytorch,
    "tensorrt_plan": _tensorrt,
    "tensorrt": _tensorrt,
    "python": _python,
}


def load_backend(
    config: pb.ModelConfig,
    version_dir: Path,
    context: BackendContext,
    loaders: Mapping[str, Loader] = LOADERS,
) -> AnyBackend:
    """Load one instance; raises with the real reason when the model cannot load."""
    key = config.platform or config.backend
    loader = loaders.get(key)
    if loader is None:
        raise Unsupported(f"model '{config.name}': platform/backend '{key}' is not supported by this worker")
    return loader(config, version_dir, context)
