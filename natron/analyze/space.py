"""The configuration space of one model: the dimensions Model Analyzer searches, as they apply to
the model's config, and the candidate configs they make.

A candidate is a point: one value index per dimension. The config it stands for is the model's
own config (the server's completed JSON form) with each dimension's value applied, so whatever
the dimensions do not touch (inputs, outputs, version policy, parameters) stays as the user wrote
it. Dimensions that do not apply to a model are left out rather than swept to no effect:
- max_batch_size and dynamic batching only for a model that batches (max_batch_size > 0), and
  only up to the max_batch_size it declares, the bound its author knows the model takes;
- ONNX Runtime's options only for an ONNX model: the intra-op thread count on a CPU, the
  TensorRT execution provider (FP16) on a GPU.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

Config = dict[str, Any]
Point = tuple[int, ...]

DEFAULT_INSTANCE_COUNTS = (1, 2, 4)
# Dynamic batching's delays, in µs; None leaves dynamic batching off.
DEFAULT_QUEUE_DELAYS_US: tuple[int | None, ...] = (None, 0, 100, 1000)


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """Workers of one kind of device: the CPU, or one GPU model (a MIG profile is its own)."""

    kind: str  # "CPU" or "GPU"
    name: str  # "cpu (16 cores)", "NVIDIA H100 80GB HBM3", "MIG 1g.10gb"
    workers: tuple[str, ...] = ()
    gpu_indices: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return "CPU" if self.kind == "CPU" else self.name

    def instance_group(self, count: int) -> list[dict[str, Any]]:
        """Triton's instance_group that places `count` instances on this class's workers only."""
        if self.kind == "CPU":
            return [{"kind": "KIND_CPU", "count": count}]
        return [{"kind": "KIND_GPU", "count": count, "gpus": list(self.gpu_indices)}]


@dataclass(frozen=True, slots=True)
class Dimension:
    name: str
    values: tuple[Any, ...]
    apply: Callable[[Config, Any], None]

    def describe(self, index: int) -> str:
        value = self.values[index]
        if self.name == "dynamic_batching":
            return "off" if value is None else f"{value}us"
        if self.name == "preferred_batch_size":
            return "-" if not value else ",".join(map(str, value))
        if value is None:
            return "default"
        return str(value)


@dataclass(slots=True)
class Space:
    base: Config
    device: DeviceClass
    dimensions: list[Dimension] = field(default_factory=list)

    @property
    def size(self) -> int:
        total = 1
        for dimension in self.dimensions:
            total *= len(dimension.values)
        return total

    def points(self) -> Iterator[Point]:
        return itertools.product(*(range(len(d.values)) for d in self.dimensions))

    def start(self) -> Point:
        """The point nearest the model's own config: where a quick search begins."""
        start = []
        for dimension in self.dimensions:
            index = 0
            if dimension.name == "max_batch_size":
                index = len(dimension.values) - 1  # the declared maximum
            elif dimension.name == "dynamic_batching" and self.base.get("dynamic_batching") is not None:
                index = min(1, len(dimension.values) - 1)
            start.append(index)
        return tuple(start)

    def config(self, point: Point) -> Config:
        config = copy.deepcopy(self.base)
        config["instance_group"] = self.device.instance_group(1)
        for dimension, index in zip(self.dimensions, point, strict=True):
            dimension.apply(config, dimension.values[index])
        return config

    def describe(self, point: Point) -> dict[str, str]:
        return {d.name: d.describe(i) for d, i in zip(self.dimensions, point, strict=True)}

    def name(self, point: Point) -> str:
        """A short, file-safe name of a candidate, `i2-b8-d100us`: instances, max batch size,
        dynamic batching's delay, then only the options that differ from the model's default
        (`p8` preferred batch size 8, `t1` one intra-op thread, `trt` the TensorRT provider)."""
        parts = []
        for dimension, index in zip(self.dimensions, point, strict=True):
            value = dimension.values[index]
            if dimension.name == "instance_count":
                parts.append(f"i{value}")
            elif dimension.name == "max_batch_size":
                parts.append(f"b{value}")
            elif dimension.name == "dynamic_batching":
                parts.append("doff" if value is None else f"d{value}us")
            elif dimension.name == "preferred_batch_size" and value:
                parts.append("p" + "_".join(map(str, value)))
            elif dimension.name == "intra_op_thread_count" and value is not None:
                parts.append(f"t{value}")
            elif dimension.name == "tensorrt_fp16" and value:
                parts.append("trt")
        return "-".join(parts)


def _set_instances(config: Config, count: int) -> None:
    for group in config["instance_group"]:
        group["count"] = count


def _set_max_batch(config: Config, size: int) -> None:
    config["max_batch_size"] = size
    batching = config.get("dynamic_batching")
    if batching and batching.get("preferred_batch_size"):
        batching["preferred_batch_size"] = [s for s in batching["preferred_batch_size"] if s <= size]


def _set_dynamic_batching(config: Config, delay_us: int | None) -> None:
    if delay_us is None:
        config.pop("dynamic_batching", None)
        return
    batching = dict(config.get("dynamic_batching") or {})
    batching["max_queue_delay_microseconds"] = delay_us
    config["dynamic_batching"] = batching


def _set_preferred(config: Config, sizes: tuple[int, ...]) -> None:
    batching = config.get("dynamic_batching")
    if batching is None:
        return  # without dynamic batching there is nothing to prefer
    limit = int(config.get("max_batch_size", 0))
    batching["preferred_batch_size"] = [s for s in sizes if s <= limit]


def _set_parameter(key: str) -> Callable[[Config, Any], None]:
    def apply(config: Config, value: Any) -> None:
        parameters = config.setdefault("parameters", {})
        if value is None:
            parameters.pop(key, None)
        else:
            parameters[key] = {"string_value": str(value)}

    return apply


def _set_tensorrt(config: Config, on: bool) -> None:
    optimization = config.setdefault("optimization", {})
    accelerators = optimization.setdefault("execution_accelerators", {})
    if on:
        accelerators["gpu_execution_accelerator"] = [
            {"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}
        ]
    else:
        accelerators.pop("gpu_execution_accelerator", None)


def powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    sizes = [1]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != limit:
        sizes.append(limit)
    return tuple(sizes)


def build_space(
    base: Config,
    device: DeviceClass,
    *,
    instance_counts: Sequence[int] = DEFAULT_INSTANCE_COUNTS,
    max_batch_sizes: Sequence[int] | None = None,
    queue_delays_us: Sequence[int | None] = DEFAULT_QUEUE_DELAYS_US,
) -> Space:
    """The dimensions that apply to `base` (the model's config) on `device`."""
    space = Space(base=copy.deepcopy(base), device=device)
    # Model instances are replaced whole: the device class decides where they go.
    space.dimensions.append(Dimension("instance_count", tuple(instance_counts), _set_instances))
    declared = int(base.get("max_batch_size", 0) or 0)
    is_ensemble = base.get("platform") == "ensemble"
    if declared > 0 and not is_ensemble:
        sizes = tuple(max_batch_sizes) if max_batch_sizes else powers_of_two_up_to(declared)
        space.dimensions.append(Dimension("max_batch_size", sizes, _set_max_batch))
        space.dimensions.append(Dimension("dynamic_batching", tuple(queue_delays_us), _set_dynamic_batching))
        if declared > 1:
            preferred: tuple[tuple[int, ...], ...] = ((), (declared,))
            space.dimensions.append(Dimension("preferred_batch_size", preferred, _set_preferred))
    is_onnx = base.get("platform") == "onnxruntime_onnx" or base.get("backend") == "onnxruntime"
    if is_onnx and device.kind == "CPU":
        space.dimensions.append(
            Dimension("intra_op_thread_count", (None, 1), _set_parameter("intra_op_thread_count"))
        )
    if is_onnx and device.kind == "GPU":
        space.dimensions.append(Dimension("tensorrt_fp16", (False, True), _set_tensorrt))
    return space
