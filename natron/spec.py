"""A model's typed interface, built once from its config, and the checks a request must pass.

The gateway checks requests here before publishing (so a client mistake costs no queue slot
and no worker time), and the worker checks them again for clients that publish to NATS directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tritonclient.grpc import model_config_pb2 as pb

from natron import datatypes
from natron.errors import InvalidArgument
from natron.inference import InferRequest


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension; -1 matches any size
    optional: bool = False


@dataclass(slots=True, frozen=True)
class QueuePolicy:
    """Triton's `ModelQueuePolicy` for one priority level's queue."""

    max_queue_size: int = 0  # requests waiting (not yet taken by an instance); 0: no bound of its own
    default_timeout_us: int = 0  # how long a request may wait to be taken; 0: no limit
    allow_timeout_override: bool = False  # a request's `timeout` may shorten default_timeout_us
    delay: bool = False  # timeout_action DELAY: a request that waited too long still runs (REJECT: not)

    @staticmethod
    def from_config(policy: pb.ModelQueuePolicy) -> QueuePolicy:
        return QueuePolicy(
            max_queue_size=int(policy.max_queue_size),
            default_timeout_us=int(policy.default_timeout_microseconds),
            allow_timeout_override=bool(policy.allow_timeout_override),
            delay=policy.timeout_action == pb.ModelQueuePolicy.DELAY,
        )

    def timeout_us(self, requested_us: int) -> int:
        """How long a request may wait in the queue (0: no limit). Triton's rule
        (core's PriorityQueue::PolicyQueue::Enqueue): the request's `timeout` replaces the
        default only when overriding is allowed and it is non-zero and shorter, so with no
        default timeout a request cannot set one either."""
        if self.allow_timeout_override and 0 < requested_us < self.default_timeout_us:
            return requested_us
        return self.default_timeout_us


_NO_POLICIES: Mapping[int, QueuePolicy] = MappingProxyType({})


@dataclass(slots=True, frozen=True)
class Scheduling:
    """The dynamic batcher's queue: its priority levels and each level's queue policy.

    Level numbers are Triton's: 1 is the highest priority, `levels` the lowest; a model without
    priority levels has the one level 0. `configured` says whether the config names any queue
    policy: then a request's `timeout` parameter means what Triton means by it (the time it may
    wait in the queue, when the policy allows overriding), and otherwise what natron always made
    of it (the request's whole deadline)."""

    levels: int = 0
    default_level: int = 0
    default_policy: QueuePolicy = QueuePolicy()
    level_policies: Mapping[int, QueuePolicy] = field(default_factory=lambda: _NO_POLICIES)
    configured: bool = False

    @staticmethod
    def from_config(batching: pb.ModelDynamicBatching | None) -> Scheduling:
        if batching is None:
            return Scheduling()
        levels = int(batching.priority_levels)
        return Scheduling(
            levels=levels,
            default_level=int(batching.default_priority_level) if levels else 0,
            default_policy=QueuePolicy.from_config(batching.default_queue_policy),
            level_policies=MappingProxyType(
                {
                    int(level): QueuePolicy.from_config(policy)
                    for level, policy in batching.priority_queue_policy.items()
                }
            ),
            configured=batching.HasField("default_queue_policy") or bool(batching.priority_queue_policy),
        )

    def level_of(self, priority: int) -> int:
        """The level a request's `priority` parameter puts it at. As Triton's
        InferenceRequest::SetPriority: 0, or a value beyond the last level, means the default."""
        if not self.levels:
            return 0
        if priority <= 0 or priority > self.levels:
            return self.default_level
        return priority

    def policy(self, level: int) -> QueuePolicy:
        return self.level_policies.get(level, self.default_policy)

    @property
    def level_numbers(self) -> tuple[int, ...]:
        """Every level, highest priority first: (0,) without priority levels."""
        return tuple(range(1, self.levels + 1)) if self.levels else (0,)


@dataclass(slots=True, frozen=True)
class ModelSpec:
    name: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    dynamic_batching: bool
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    decoupled: bool
    scheduling: Scheduling = Scheduling()

    @staticmethod
    def from_config(config: pb.ModelConfig) -> ModelSpec:
        def tensor(entry: pb.ModelInput | pb.ModelOutput, optional: bool) -> TensorSpec:
            return TensorSpec(
                entry.name,
                datatypes.config_to_datatype(pb.DataType.Name(entry.data_type)),
                tuple(int(d) for d in entry.dims),
                optional,
            )

        batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
        return ModelSpec(
            name=config.name,
            max_batch_size=int(config.max_batch_size),
            inputs={i.name: tensor(i, i.optional) for i in config.input},
            outputs={o.name: tensor(o, False) for o in config.output},
            dynamic_batching=batching is not None,
            preferred_batch_sizes=tuple(int(s) for s in batching.preferred_batch_size) if batching else (),
            max_queue_delay_us=int(batching.max_queue_delay_microseconds) if batching else 0,
            decoupled=bool(config.model_transaction_policy.decoupled),
            scheduling=Scheduling.from_config(batching),
        )

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    @property
    def max_rows(self) -> int:
        """The most rows of requests one execution takes: what a coalesced message may hold."""
        return self.max_batch_size if self.batching else 1

    def validate(self, request: InferRequest) -> int:
        """Raise InvalidArgument naming the first mistake; return the batch size (1 if none)."""
        model = self.name
        seen: set[str] = set()
        batch_size: int | None = None
        for tensor in request.inputs:
            spec = self.inputs.get(tensor.name)
            if spec is None:
                raise InvalidArgument(
                    f"unexpected inference input '{tensor.name}' for model '{model}', "
                    f"expected one of {sorted(self.inputs)}"
                )
            if tensor.name in seen:
                raise InvalidArgument(f"input '{tensor.name}' given more than once")
            seen.add(tensor.name)
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(
                    f"input '{tensor.name}' of model '{model}' has datatype {tensor.datatype}, "
                    f"the model expects {spec.datatype}"
                )
            shape = tensor.shape
            dims = shape
            if self.batching:
                if len(shape) != len(spec.dims) + 1:
                    raise InvalidArgument(
                        f"input '{tensor.name}' of model '{model}' has shape {list(shape)}, "
                        f"expected [batch] + {list(spec.dims)}"
                    )
                size = shape[0]
                if not 1 <= size <= self.max_batch_size:
                    raise InvalidArgument(
                        f"input '{tensor.name}' batch size {size} is outside 1..{self.max_batch_size} "
                        f"(max_batch_size of model '{model}')"
                    )
                if batch_size is None:
                    batch_size = size
                elif size != batch_size:
                    raise InvalidArgument(
                        f"input '{tensor.name}' has batch size {size}, other inputs have {batch_size}"
                    )
                dims = shape[1:]
            if len(dims) != len(spec.dims) or any(
                want != -1 and got != want for got, want in zip(dims, spec.dims, strict=True)
            ):
                expected = ([-1] if self.batching else []) + list(spec.dims)
                raise InvalidArgument(
                    f"input '{tensor.name}' of model '{model}' has shape {list(shape)}, expected {expected}"
                )
        missing = [name for name, spec in self.inputs.items() if not spec.optional and name not in seen]
        if missing:
            raise InvalidArgument(f"model '{model}' expects input(s) {missing}, which the request lacks")
        for name in request.outputs:
            if name not in self.outputs:
                raise InvalidArgument(
                    f"unexpected requested output '{name}' for model '{model}', "
                    f"expected one of {sorted(self.outputs)}"
                )
        return batch_size or 1
