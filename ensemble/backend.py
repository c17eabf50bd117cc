"""Running one ensemble request: Triton's `ensemble_scheduling` as a data-flow graph.

Every step starts as soon as all of its inputs exist, so independent steps run in parallel;
each step is an ordinary inference request to the step model's subject, resolved to its
highest READY version when `model_version` is -1. A failing step fails the request with an error
naming the step and its model (and the step's own status); other requests are untouched.
A decoupled (streaming) step makes the ensemble stream: each of its answers flows on through the
steps after it and out to the client as it comes; such an ensemble must itself be decoupled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from broker.requester import Requester
from broker.view import ModelRegistry
from natron.errors import DeadlineExceeded, InvalidArgument, NatronError
from natron.inference import InferRequest, Tensor
from workers.backends import BackendContext, Loader, ResponseSink


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


class EnsembleBackend:
    def __init__(self, config: pb.ModelConfig, steps: list[Step], mesh: EnsembleMesh) -> None:
        self._name = config.name
        self._steps = steps
        self._outputs = [o.name for o in config.output]
        self._mesh = mesh
        self._decoupled = bool(config.model_transaction_policy.decoupled)

    @staticmethod
    def load(config: pb.ModelConfig, mesh: EnsembleMesh) -> EnsembleBackend:
        return EnsembleBackend(config, check_graph(config), mesh)

    async def execute_async(
        self, requests: list[InferRequest], sink: ResponseSink, deadlines_ns: list[int]
    ) -> None:
        await asyncio.gather(
            *(self._run(i, r, sink, d) for i, (r, d) in enumerate(zip(requests, deadlines_ns, strict=True)))
        )

    async def _run(self, index: int, request: InferRequest, sink: ResponseSink, deadline_ns: int) -> None:
        try:
            results = self._flow(request, {t.name: t for t in request.inputs}, list(self._steps), deadline_ns)
            last: list[Tensor] = []
            async for outputs in results:
                if self._decoupled:
                    sink(index, outputs, False)  # each streamed answer, as soon as it is through
                else:
                    last = outputs
            sink(index, None if self._decoupled else last, True)
        except NatronError as exc:
            sink(index, exc, True)

    async def _flow(
        self, request: InferRequest, tensors: dict[str, Tensor], pending: list[Step], deadline_ns: int
    ) -> AsyncIterator[list[Tensor]]:
        """Run `pending` steps on `tensors`; yield the ensemble's outputs once per path through
        the graph: once, or once per answer of a decoupled (streaming) step."""
        running: dict[asyncio.Task[list[Tensor]], Step] = {}
        try:
            while pending or running:
                ready = [s for s in pending if set(s.input_map.values()) <= tensors.keys()]
                streaming = next((s for s in ready if self._is_decoupled(s)), None)
                if streaming is not None and not running:
                    # Each answer of a streaming step flows on through the steps after it and
                    # out to the client as it comes, not after the last one.
                    pending.remove(streaming)
                    async for outputs in self._stream(streaming, request, tensors, deadline_ns):
                        branch = {**tensors, **self._produced(streaming, outputs)}
                        async for result in self._flow(request, branch, list(pending), deadline_ns):
                            yield result
                    return
                for step in ready:
                    if step is streaming:
                        continue  # waits until the steps running now have finished
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
                    tensors.update(self._produced(step, task.result()))
        finally:
            for task in running:
                task.cancel()
        wanted = request.outputs or self._outputs
        yield [tensors[name] for name in wanted if name in tensors]

    @staticmethod
    def _produced(step: Step, outputs: list[Tensor]) -> dict[str, Tensor]:
        produced: dict[str, Tensor] = {}
        for tensor in outputs:
            name = step.output_map.get(tensor.name)
            if name is not None:
                produced[name] = Tensor(name, tensor.datatype, tensor.shape, tensor.data)
        return produced

    def _is_decoupled(self, step: Step) -> bool:
        try:
            spec = self._mesh.registry.get(step.model).spec
        except NatronError:
            return False  # the call reports the missing model
        return bool(spec and spec.decoupled)

    def _coalescing(self, step: Step, step_request: InferRequest) -> tuple[int, int]:
        """(rows, max_rows) for the requester: concurrent pipelines' calls of a batching step
        model share broker messages, as the gateway's do. The worker validates the request;
        a wrong row count here only fails that request there."""
        try:
            spec = self._mesh.registry.get(step.model).spec
        except NatronError:
            return 1, 1
        if spec is None or not spec.batching or not step_request.inputs or not step_request.inputs[0].shape:
            return 1, 1
        return max(1, step_request.inputs[0].shape[0]), spec.max_batch_size

    def _step_request(
        self, step: Step, request: InferRequest, tensors: dict[str, Tensor], deadline_ns: int
    ) -> tuple[InferRequest, str, float]:
        mesh = self._mesh
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
        return step_request, target, timeout_s

    def _step_error(self, step: Step, exc: NatronError) -> NatronError:
        message = f"ensemble '{self._name}' step {step.index} (model '{step.model}'): {exc.message}"
        return NatronError.from_status(exc.status, message)

    async def _call(
        self, step: Step, request: InferRequest, tensors: dict[str, Tensor], deadline_ns: int
    ) -> list[Tensor]:
        try:
            step_request, target, timeout_s = self._step_request(step, request, tensors, deadline_ns)
            rows, max_rows = self._coalescing(step, step_request)
            response = await self._mesh.requester.infer(
                step_request, target, timeout_s, rows=rows, max_rows=max_rows
            )
        except NatronError as exc:
            raise self._step_error(step, exc) from None
        return response.outputs

    async def _stream(
        self, step: Step, request: InferRequest, tensors: dict[str, Tensor], deadline_ns: int
    ) -> AsyncIterator[list[Tensor]]:
        if not self._decoupled:
            raise InvalidArgument(
                f"ensemble '{self._name}' step {step.index} (model '{step.model}') streams: the ensemble "
                "needs model_transaction_policy { decoupled: true }"
            )
        try:
            step_request, target, timeout_s = self._step_request(step, request, tensors, deadline_ns)
            async for answer in self._mesh.requester.stream(step_request, target, timeout_s):
                yield answer.outputs
        except NatronError as exc:
            raise self._step_error(step, exc) from None

    def close(self) -> None:
        pass


def ensemble_loader(mesh: EnsembleMesh) -> Loader:
    """The "ensemble" loader an orchestrator adds to its worker's loaders."""

    def load(config: pb.ModelConfig, version_dir: Path, context: BackendContext) -> EnsembleBackend:
        return EnsembleBackend.load(config, mesh)

    return load
