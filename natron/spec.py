"""A model's typed interface, built once from its config, and the checks a request must pass.

The gateway checks requests here before publishing (so a client mistake costs no queue slot
and no worker time), and the worker checks them again for clients that publish to NATS directly.
"""

from __future__ import annotations

from dataclasses import dataclass

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
class ModelSpec:
    name: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    dynamic_batching: bool
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    decoupled: bool

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
