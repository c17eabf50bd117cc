"""The worker's side of tensors by reference: it maps the client's POSIX shared memory objects
itself, reads inputs from them and writes outputs into them, so those bytes never cross the
broker (docs/wire-format.md, "tensors by reference"; gateway/sharedmemory.py decides when a
request travels so).

A reference names an object by its key, an absolute window of it and the host scope of the
process that made it (natron/inference.py host_scope()). The worker takes one only when:

1. the scope is its own (`WorkerSharedMemory.scope`; None: this worker maps no client memory),
2. the key names an object it can open (the client may have unlinked it since registering), and
3. the window lies within the object as it is now.

It answers any other with a 400 that says why; one that fails (1) or (2) says "shared memory
region ... not reachable from worker ...", the words on which the gateway that sent it sends
the request again with its bytes (a worker placed on another host meanwhile, or a key unlinked
that the gateway still has mapped). These checks run when the request is decoded, before it is
admitted: a request that cannot be answered runs nothing.

Mappings are kept, at most `max_mappings` of them, least recently used dropped first: mapping
an object is cheap (tens of microseconds) but its first touch of every page is not (a 16 MiB
window is 4,096 page faults: summing it through a fresh mapping took 3.9-5.0 ms on a 2-core
test VM, through a kept one 1.3-1.5 ms), and a client uses the same region request after
request. The worker hears nothing of unregisters, so every use checks the key again
(`os.stat`: same device and inode, and large enough), and maps anew when the object was
replaced or grew past the mapping. A mapping dropped while a request still holds a view of it
is unmapped with the last view.

What the checks cannot prevent: a client that shrinks its object while a backend reads from it
makes that read fault (SIGBUS), as it would the gateway that reads it by value; a client does
that only to its own requests' worker, and the worker's supervisor restarts it.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from natron import datatypes
from natron.errors import InternalError, InvalidArgument
from natron.inference import SHM_DIR, SHM_UNREACHABLE, InferRequest, ShmRef, Tensor, host_scope

# Objects mapped at once by one worker: each costs address space only, but a client that
# cycles through keys must not make the worker hold every object it ever saw.
MAX_MAPPINGS: Final = 64
_NAME_MAX: Final = 255
# Triton's own objects (its Python backend's), which it refuses too.
_RESERVED_PREFIX: Final = "triton_python_backend_shm_region_"


@dataclass(slots=True)
class _Mapping:
    mapped: mmap.mmap
    device: int
    inode: int


class WorkerSharedMemory:
    """The shared memory this worker reaches: `codec.ShmAccess` for decoding requests, and
    `place_outputs` for their answers. Used from the event loop only."""

    def __init__(self, worker_id: str, scope: str | None, max_mappings: int = MAX_MAPPINGS) -> None:
        self.worker_id = worker_id
        self.scope = scope
        self._max_mappings = max_mappings
        self._mappings: collections.OrderedDict[str, _Mapping] = collections.OrderedDict()

    @staticmethod
    def of_host(worker_id: str, enabled: bool = True) -> WorkerSharedMemory:
        """This host's scope, or none when the worker is told not to map clients' memory."""
        return WorkerSharedMemory(worker_id, host_scope() if enabled else None)

    @property
    def mapped(self) -> int:
        """Objects mapped now (for tests and the bound)."""
        return len(self._mappings)

    # -- codec.ShmAccess -------------------------------------------------------------------

    def read(self, ref: ShmRef, name: str, datatype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """Input `name` as a read-only view of the client's object (a copy only for BOOL bytes
        other than 0 and 1, which backends expect as 0/1, as the gateway does)."""
        window = self._window(ref).toreadonly()
        try:
            array = datatypes.from_raw(window, datatype, shape)
        except InvalidArgument as exc:
            raise InvalidArgument(f"input '{name}' in shared memory '{ref.key}': {exc.message}") from None
        if datatype == "BOOL" and array.size:
            raw = np.frombuffer(window, dtype=np.uint8)
            if raw.max() > 1:
                array = (raw != 0).reshape(shape)
        return array

    def check_output(self, ref: ShmRef, name: str) -> None:
        self._window(ref)

    # -- answers ---------------------------------------------------------------------------

    def place_outputs(self, request: InferRequest, outputs: list[Tensor]) -> list[Tensor]:
        """`outputs`, those the request asked for in shared memory written there and carried
        as references (their bytes stay out of the answer). InvalidArgument when a window is
        too small for its output, as Triton words it."""
        refs = request.output_refs
        if not refs:
            return outputs
        return [self._write(refs[t.name], t) if t.name in refs else t for t in outputs]

    def _write(self, ref: ShmRef, tensor: Tensor) -> Tensor:
        if tensor.data.size != datatypes.element_count(tensor.shape):
            raise InternalError(
                f"output '{tensor.name}' holds {tensor.data.size} elements "
                f"but its shape {list(tensor.shape)} needs {datatypes.element_count(tensor.shape)}"
            )
        chunk: Any
        if tensor.datatype == datatypes.BYTES:
            chunk = datatypes.serialize_bytes(tensor.data)
        else:
            dtype = datatypes.to_numpy_dtype(tensor.datatype)
            chunk = np.ascontiguousarray(tensor.data, dtype=dtype).reshape(-1).view(np.uint8)
        size = len(chunk)
        if size > ref.byte_size:
            raise InvalidArgument(
                f"shared memory size specified with the request for output '{tensor.name}' "
                f"({ref.byte_size} bytes) should be at least {size} bytes to hold the results"
            )
        self._window(ref)[:size] = chunk
        written = ShmRef(ref.key, ref.offset, size, ref.scope)
        return Tensor(tensor.name, tensor.datatype, tensor.shape, tensor.data, written)

    # -- mappings --------------------------------------------------------------------------

    def _unreachable(self, ref: ShmRef, why: str) -> InvalidArgument:
        return InvalidArgument(
            f"shared memory region '{ref.key}' is {SHM_UNREACHABLE} '{self.worker_id}': {why}"
        )

    def _window(self, ref: ShmRef) -> memoryview:
        """A writable view of `ref`'s window, checked as the module docstring says."""
        if self.scope is None:
            raise self._unreachable(ref, "this worker maps no client shared memory")
        if ref.scope != self.scope:
            raise self._unreachable(
                ref, f"the region is in host scope '{ref.scope}', the worker in '{self.scope}'"
            )
        name = _object_name(ref.key)
        path = SHM_DIR / name
        try:
            info = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            self._drop(name)
            raise self._unreachable(ref, f"cannot open its key: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"Invalid shared memory region: '{ref.key}' is not a shared memory object")
        end = ref.offset + ref.byte_size
        if end > info.st_size:
            raise InvalidArgument(
                f"shared memory region '{ref.key}' is {info.st_size} bytes, short of offset "
                f"{ref.offset} + byte_size {ref.byte_size}"
            )
        mapping = self._mappings.get(name)
        if mapping is not None and (
            (mapping.device, mapping.inode) != (info.st_dev, info.st_ino) or len(mapping.mapped) < end
        ):
            self._drop(name)  # replaced by another object under the same key, or grown
            mapping = None
        if mapping is None:
            mapping = self._map(ref, name)
        else:
            self._mappings.move_to_end(name)
        if end == 0:
            return memoryview(b"")
        return memoryview(mapping.mapped)[ref.offset : end]

    def _map(self, ref: ShmRef, name: str) -> _Mapping:
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise self._unreachable(ref, f"cannot open its key: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if info.st_size == 0:  # mmap cannot map an empty object; nothing to read anyway
                raise InvalidArgument(f"shared memory region '{ref.key}' is empty")
            mapped = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"cannot map shared memory region '{ref.key}': {exc}") from None
        finally:
            os.close(fd)  # the mapping stays valid without it
        mapping = _Mapping(mapped, info.st_dev, info.st_ino)
        self._mappings[name] = mapping
        while len(self._mappings) > self._max_mappings:
            _, oldest = self._mappings.popitem(last=False)
            _close(oldest)
        return mapping

    def _drop(self, name: str) -> None:
        mapping = self._mappings.pop(name, None)
        if mapping is not None:
            _close(mapping)

    def close(self) -> None:
        """Unmap every object no request holds a view of (the others with their last view)."""
        for mapping in self._mappings.values():
            _close(mapping)
        self._mappings.clear()


def _close(mapping: _Mapping) -> None:
    # A request that still holds a view keeps the pages: they are unmapped with its last view.
    with contextlib.suppress(BufferError):
        mapping.mapped.close()


def _object_name(key: str) -> str:
    """The file name in SHM_DIR that `shm_open(key)` opens, with the gateway's checks."""
    stripped = key.lstrip("/")
    if (
        not stripped
        or "/" in stripped
        or "\0" in stripped
        or stripped in (".", "..")
        or len(stripped.encode()) > _NAME_MAX
        or stripped.startswith(_RESERVED_PREFIX)
    ):
        raise InvalidArgument(f"invalid shared memory key '{key}'")
    return stripped
