"""Running one ensemble request: Triton's `ensemble_scheduling` as a data-flow graph.

Every step starts as soon as all of its inputs exist, so independent steps run in parallel;
each step is an ordinary inference request to the step model's subject, resolved to its
highest READY version when `model_version` is -1. A failing step fails the request with an error
naming the step and its model (and the step's own status); other requests are untouched.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as pb

from broker.registry import ModelRegistry
from broker.requester import Requester
from natron.errors import DeadlineExceeded, InvalidArgument, NatronError
from natron.inference import InferRequest, Tensor
from workers.backends import ResponseSink


@dataclass(slots=True, frozen=True)
class Step:
    index: int
    model: str
    version: int  # -1: the highest READY version at the time of the request
    input_map: dict[str, str]  # step model input -> ensemble tensor
    output_map: dict[str, str]  # step model output -> ensemble tensor


@dataclass(slots=True, frozen=True)
class EnsembleMesh:
    """What an orchestrator gives its ensembles: the request client and the model view."""

    requester: Requester
    registry: ModelRegistry
    default_timeout_s: float = 60.0


def steps_of(config: pb.ModelConfig) -> list[Step]:
    return [
        Step(i, s.model_name, int(s.model_version), dict(s.input_map), dict(s.output_map))
        for i, s in enumerate(config.ensemble_scheduling.step)
    ]


def check_graph(config: pb.ModelConfig) -> list[Step]:
    """Every step's inputs are produced by the ensemble's inputs or an earlier-ready step, and
    every ensemble output by some step: raise InvalidArgument naming what is missing."""
    name = config.name
    steps = steps_of(config)
    if not steps:
        raise InvalidArgument(f"ensemble '{name}' has no ensemble_scheduling steps")
    available = {i.name for i in config.input}
    remaining = list(steps)
    while remaining:
        ready = [s for s in remaining if set(s.input_map.values()) <= available]
        if not ready:
            blocked = remaining[0]
            missing = sorted(set(blocked.input_map.values()) - available)
            raise InvalidArgument(
                f"ensemble '{name}' step {blocked.index} (model '{blocked.model}') needs {missing}, "
                "which no input or step produces"
            )
        for step in ready:
            available |= set(step.output_map.values())
            remaining.remove(step)
    missing_outputs = sorted({o.name for o in config.output} - available)
    if missing_outputs:
        raise InvalidArgument(f"ensemble '{name}' outputs {missing_outputs} are produced by no step")
    return steps


def composing_models(config: pb.ModelConfig) -> list[str]:
    return sorted({s.model_name for s in config.ensemble_scheduling.step})


class EnsembleBackend:
    def __init__(self, config: pb.ModelConfig, steps: list[Step], mesh: EnsembleMesh) -> None:
        self._name = config.name
        self._steps = steps
        self._outputs = [o.name for o in config.output]
        self._mesh = mesh

    @staticmethod
    def load(config: pb.ModelConfig, mesh: EnsembleMesh | None) -> EnsembleBackend:
        if mesh is None:
            raise InvalidArgument(
                f"ensemble '{config.name}' can only run on an orchestrator (natron ensemble)"
            )
        return EnsembleBackend(config, check_graph(config), mesh)

    async def execute_async(
        self, requests: list[InferRequest], sink: ResponseSink, deadlines_ns: list[int]
    ) -> None:
        await asyncio.gather(
            *(self._run(i, r, sink, d) for i, (r, d) in enumerate(zip(requests, deadlines_ns, strict=True)))
        )

    async def _run(self, index: int, request: InferRequest, sink: ResponseSink, deadline_ns: int) -> None:
        tensors = {t.name: t for t in request.inputs}
        pending = list(self._steps)
        running: dict[asyncio.Task[list[Tensor]], Step] = {}
        try:
            while pending or running:
                for step in [s for s in pending if set(s.input_map.values()) <= tensors.keys()]:
                    pending.remove(step)
                    task = asyncio.create_task(self._call(step, request, tensors, deadline_ns))
                    running[task] = step
                if not running:
                    raise InvalidArgument(
                        f"ensemble '{self._name}': steps {[s.index for s in pending]} cannot run"
                    )
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step = running.pop(task)
                    for tensor in task.result():
                        produced = step.output_map.get(tensor.name)
                        if produced is not None:
                            tensors[produced] = Tensor(produced, tensor.datatype, tensor.shape, tensor.data)
        except NatronError as exc:
            sink(index, exc, True)
            return
        finally:
            for task in running:
                task.cancel()
        wanted = request.outputs or self._outputs
        sink(index, [tensors[name] for name in wanted if name in tensors], True)

    async def _call(
        self, step: Step, request: InferRequest, tensors: dict[str, Tensor], deadline_ns: int
    ) -> list[Tensor]:
        mesh = self._mesh
        try:
            version = str(step.version) if step.version > 0 else ""
            target = mesh.registry.get(step.model).resolve(version)
            inputs = [
                Tensor(model_input, tensors[source].datatype, tensors[source].shape, tensors[source].data)
                for model_input, source in step.input_map.items()
            ]
            timeout_s = (deadline_ns - time.time_ns()) / 1e9 if deadline_ns else mesh.default_timeout_s
            if timeout_s <= 0:
                raise DeadlineExceeded("the ensemble request's deadline passed")
            step_request = InferRequest(
                id=f"{request.id}.{step.index}", model=step.model, version=target, inputs=inputs,
                outputs=list(step.output_map),
            )  # fmt: skip
            response = await mesh.requester.infer(step_request, target, timeout_s)
        except NatronError as exc:
            error = NatronError.from_status(
                exc.status, f"ensemble '{self._name}' step {step.index} (model '{step.model}'): {exc.message}"
            )
            raise error from None
        return response.outputs

    def close(self) -> None:
        pass
