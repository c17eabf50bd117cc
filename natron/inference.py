"""The values an inference carries between services: tensors, requests and responses.

These are protocol-neutral: the gateway builds them from HTTP, `broker.codec` moves them over
NATS, and backends consume and produce them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt


@dataclass(slots=True)
class Tensor:
    """A named tensor; `data` already has `shape` and the numpy dtype of `datatype`."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]


@dataclass(slots=True)
class InferRequest:
    id: str
    model: str
    # "" means: the version the model's version policy makes current (highest READY).
    version: str
    inputs: list[Tensor]
    # Names of the outputs asked for; empty means every output of the model.
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    id: str
    model: str
    version: str
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
