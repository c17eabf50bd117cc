"""The values an inference carries between services: tensors, requests and responses.

These are protocol-neutral: the gateway builds them from HTTP, `broker.codec` moves them over
NATS, and backends consume and produce them.

A tensor may also travel by reference (`ShmRef`): a window of a POSIX shared memory object that
the sender and the receiver both see, instead of its bytes (docs/wire-format.md, "tensors by
reference"). `host_scope()` names the processes that see the same objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy.typing as npt

# Where POSIX shared memory objects live (`shm_open(key)` opens SHM_DIR / key on Linux).
SHM_DIR: Final = Path("/dev/shm")
_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
# Words of the 400 a worker answers for a reference it cannot reach: the gateway that sent it
# sends the request again with the bytes (gateway/sharedmemory.py).
SHM_UNREACHABLE: Final = "not reachable from worker"


def host_scope(shm_dir: Path = SHM_DIR) -> str | None:
    """Which processes see the same POSIX shared memory objects: one boot of one host (its boot
    id) and one mount of `shm_dir` (its device number; a container has a mount of its own).
    None when this host has no `shm_dir`: system shared memory is then unsupported."""
    try:
        device = os.stat(shm_dir).st_dev
    except OSError:
        return None
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:  # not Linux: the host name is the best identity left
        boot = os.uname().nodename
    return f"{key_safe(boot)}-{device:x}"


def key_safe(text: str) -> str:
    """`text` with every character a KV key or subject token would refuse replaced by '_'."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in text)


@dataclass(slots=True, frozen=True)
class ShmRef:
    """A tensor's bytes by reference: `byte_size` bytes at `offset` of the POSIX shared memory
    object `key` (an absolute offset in the object, not in a registered region), as seen by the
    processes of host scope `scope`."""

    key: str
    offset: int
    byte_size: int
    scope: str


@dataclass(slots=True)
class Tensor:
    """A named tensor; `data` already has `shape` and the numpy dtype of `datatype`."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]
    # Set: the tensor travels as this reference rather than as bytes (an input, the gateway
    # sending it), or was written there already (an output, coming back from a worker).
    ref: ShmRef | None = None


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
    # Output name -> where the worker writes that output (answering with its metadata only).
    output_refs: dict[str, ShmRef] = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    id: str
    model: str
    version: str
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
