"""Triton's shared memory extensions: system shared memory served, CUDA shared memory refused.

A client creates a POSIX shared memory object (`shm_open`, so `/dev/shm/<key>` on Linux),
registers a window of it under a name (`POST /v2/systemsharedmemory/region/<name>/register`
with `key`, `offset`, `byte_size`), and then names that region in an infer request instead of
sending a tensor: an input's bytes are read from the region, an output's bytes are written into
it and the answer carries the output without data. The gateway maps the object (read-write:
outputs are written into it).

How the tensors reach the worker (`SharedMemoryRegistry.infer`): when every worker that may
pull the model's messages (those its record places it on, and any that still runs it) reports
this gateway's host scope in its WorkerReport, they see the client's object too, and the request
carries references instead of bytes (docs/wire-format.md, "tensors by reference"): an input the
parse left as a view of a mapping becomes `{shm: key, offset, byte_size, scope}`, an output
asked for in a region names its window in `output_shm`, and the worker maps the object itself
(workers/sharedmemory.py), reads the inputs there, writes the outputs there and answers with
their metadata only. So neither the client's HTTP transfer nor the hop to the worker carries
the tensor. Otherwise (a worker on another host, a report from before host scopes, a worker
started with `--system-shm off`) the gateway carries the bytes over NATS as before. An input
that the parse had to copy (BYTES, BOOL bytes other than 0/1) goes by value either way.

Placement may change between the gateway's look at the fleet and the worker's pull, and a
client may unlink its key after registering (which the gateway, holding its mapping, allows,
as Triton does): a worker that cannot reach a reference answers a 400 saying "shared memory
region ... not reachable from worker ..." before running anything, and on that answer alone
the gateway sends the request once more by value. Every other error stands. A worker never
computes on memory it could not check, so no placement race gives a wrong answer.

Several gateway processes on one host (`--http-workers`) share one port, and a client's
connections land on any of them, so a region registered through one must be usable through all.
The registrations live in a KV bucket (`bucket_name`), keyed by `host_scope()` (the processes
that see the same /dev/shm: one boot of one host, one /dev/shm mount) and the region name;
gateways on other hosts see their own keys only. Each process mirrors its scope's keys with a
watch and maps a region the first time it uses it:

* Register is a KV create, atomic across processes: a duplicate name is refused whichever
  process holds the region.
* A region registered through another process an instant ago may not be in this process's
  mirror yet: its lookup raises RegionMiss, the caller awaits `refresh()` (a fresh read of the
  scope's keys) and looks again. Status reads the bucket the same way, so it is always current.
* An unregister reaches the other processes through their watch, within the broker's delivery
  delay (well under a millisecond on one host): a request through another process in that
  instant may still use the region. Triton's unregister, with one process, has no such window.
* Every process maps the object by its key on first use, so the key must exist until the region
  is unregistered; with a single process (Triton's case) a client may unlink it right after
  registering.

A request holds views of a mapping until it ends; unregistering drops the registry's reference
and the mapping goes with the last view, as Triton defers unmapping a region in use.

CUDA shared memory needs a CUDA context in the process that opens the client's IPC handle;
natron's gateway has none (tensors go to the workers as bytes over NATS). Registering a CUDA
region is a 501 that says so; status and unregister answer as Triton built without GPU support
does (no region, nothing to unregister), so that tools which clean up both kinds at start and
exit (perf_analyzer's UnregisterAllSharedMemory) work against system shared memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import mmap
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import nats.errors
import nats.js.errors
import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from broker import jetstream, recovery
from broker.recovery import Reconnects
from broker.subjects import Subjects
from gateway.keys import METRICS, NATS, OPTIONS
from gateway.middleware import json_object, json_response
from natron.errors import InternalError, InvalidArgument, NatronError, NotFound, Unavailable, Unsupported
from natron.inference import (
    SHM_DIR,
    SHM_UNREACHABLE,
    InferRequest,
    InferResponse,
    ShmRef,
    Tensor,
    host_scope,
)
from natron.records import ModelRecord, WorkerReport
from natron.tasks import EssentialTasks, cancel_and_wait

__all__ = ["SHM_DIR", "host_scope"]  # where they were before natron/inference.py had them

T = TypeVar("T")

log = logging.getLogger(__name__)

# Objects with this prefix are Triton's own (its Python backend's); Triton refuses them too.
_RESERVED_PREFIX: Final = "triton_python_backend_shm_region_"
# POSIX shared memory names are file names in SHM_DIR.
_NAME_MAX: Final = 255
# Region names become KV keys (base64url): bounded so a key stays a reasonable subject.
_MAX_REGION_NAME_BYTES: Final = 1024
# Register, unregister and status wait this long for the broker, then answer 503.
BROKER_TIMEOUT_S: Final = 5.0


def bucket_name(subjects: Subjects) -> str:
    """The KV bucket of the system shared memory registrations of this deployment."""
    return subjects.shm_bucket


class RegionMiss(InvalidArgument):
    """A region this process does not know (yet): registered through another gateway process an
    instant ago, or not at all. Await `refresh()` and look again; a second miss is the 400."""

    def __init__(self, region: str) -> None:
        super().__init__(f"Unable to find shared memory region: '{region}'")
        self.region = region


@dataclass(slots=True, frozen=True)
class SystemRegion:
    """A registration, as Triton's status reports it and as the bucket stores it."""

    name: str
    key: str
    offset: int
    byte_size: int

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    @staticmethod
    def from_json(data: bytes) -> SystemRegion:
        doc = orjson.loads(data)
        region = SystemRegion(doc["name"], doc["key"], doc["offset"], doc["byte_size"])
        if not (
            isinstance(region.name, str)
            and isinstance(region.key, str)
            and type(region.offset) is int
            and type(region.byte_size) is int
        ):
            raise ValueError(f"malformed shared memory registration {doc!r}")
        return region


class MappedRegion:
    """A region mapped into this process, read-write. The object's descriptor stays open so
    that every use can check the object still holds the region: touching a mapped page past
    the end of an object the client truncated would kill the process with SIGBUS."""

    __slots__ = ("_fd", "_map", "_start", "address", "region")

    def __init__(self, region: SystemRegion, fd: int, mapped: mmap.mmap, start: int) -> None:
        self.region = region
        self._fd = fd
        self._map = mapped
        self._start = start  # the region's first byte within the mapping
        # Where the mapping lies in this process: an array parsed from the region is a view at
        # an address within it, which `reference` turns back into the object's window.
        probe = np.frombuffer(mapped, dtype=np.uint8)
        self.address: int = probe.ctypes.data
        del probe  # its export of the mapping would keep `close` from unmapping

    def reference(self, address: int, byte_size: int, scope: str) -> ShmRef | None:
        """The object's window holding `byte_size` bytes at `address`, if this mapping's
        region holds them."""
        first = self.address + self._start
        if not first <= address or address + byte_size > first + self.region.byte_size:
            return None
        return ShmRef(self.region.key, self.region.offset + address - first, byte_size, scope)

    @staticmethod
    def open(region: SystemRegion) -> MappedRegion:
        """Map `region`; InvalidArgument in Triton's words when its key cannot be used."""
        name, key = region.name, region.key
        try:
            fd = os.open(SHM_DIR / _object_name(name, key), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(f"Unable to open shared memory region: '{key}': {exc.strerror}") from None
        try:
            size = _object_size(fd, key)
            end = region.offset + region.byte_size
            if end > size:
                raise InvalidArgument(
                    f"failed to register shared memory region '{name}': invalid args: offset "
                    f"{region.offset} + byte_size {region.byte_size} runs past the {size} bytes of '{key}'"
                )
            # mmap's offset must be a multiple of the allocation granularity.
            base = region.offset - region.offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapped = mmap.mmap(
                    fd, end - base, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base
                )
            except (OSError, ValueError, OverflowError) as exc:
                raise InvalidArgument(f"failed to register shared memory region '{name}': {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return MappedRegion(region, fd, mapped, region.offset - base)

    def window(self, offset: int, byte_size: int) -> memoryview:
        """`byte_size` bytes from `offset` within the region, checked against it (Triton's
        checks and messages) and against the object as it is now."""
        region = self.region
        name = region.name
        if offset >= region.byte_size:
            raise InvalidArgument(
                f"Invalid offset for shared memory region: '{name}': offset {offset} is not within "
                f"its {region.byte_size} bytes"
            )
        if offset + byte_size > region.byte_size:
            raise InvalidArgument(
                f"Invalid offset + byte size for shared memory region: '{name}': offset {offset} + "
                f"byte size {byte_size} runs past its {region.byte_size} bytes"
            )
        size = _object_size(self._fd, region.key)
        if region.offset + region.byte_size > size:
            raise InvalidArgument(
                f"shared memory region '{name}' is no longer usable: its key '{region.key}' was cut "
                f"to {size} bytes, short of the registered offset {region.offset} + byte_size "
                f"{region.byte_size}"
            )
        start = self._start + offset
        return memoryview(self._map)[start : start + byte_size]

    def close(self) -> None:
        """Unmap now unless a request still holds a view: then with the last view."""
        os.close(self._fd)
        with contextlib.suppress(BufferError):
            self._map.close()


def _object_name(name: str, key: str) -> str:
    """The file name in SHM_DIR that `shm_open(key)` opens, with Triton's checks of the key."""
    stripped = key.lstrip("/")
    if not stripped:
        raise InvalidArgument(f"cannot register shared memory region '{name}' - invalid shm key '{key}'")
    if stripped.startswith(_RESERVED_PREFIX):
        raise InvalidArgument(
            f"cannot register shared memory region '{name}' with key '{key}' as the key contains "
            f"the reserved prefix '{_RESERVED_PREFIX}'"
        )
    # shm_open refuses the same: a name is one path component, below NAME_MAX.
    if "/" in stripped or "\0" in stripped or stripped in (".", "..") or len(stripped.encode()) > _NAME_MAX:
        raise InvalidArgument(
            f"cannot register shared memory region '{name}' - invalid shm key '{key}': a key is "
            f"'/' and a name of at most {_NAME_MAX} bytes without '/'"
        )
    return stripped


def _object_size(fd: int, key: str) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"Invalid shared memory region: '{key}' is not a shared memory object")
    return info.st_size


def region_key(scope: str, name: str) -> str:
    """The KV key of region `name` in `scope`: the name in base64url, which KV keys allow."""
    return f"{scope}.{base64.urlsafe_b64encode(name.encode()).decode().rstrip('=')}"


def region_name(kv_key: str) -> str:
    """The region name a KV key holds; ValueError when it is not such a key."""
    try:
        token = kv_key.split(".", 1)[1]
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (IndexError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a shared memory region key: {kv_key!r}") from exc


@dataclass(slots=True)
class _Entry:
    region: SystemRegion
    mapping: MappedRegion | None = None  # mapped on first use in this process


class SharedMemoryRegistry:
    """The system shared memory regions of this host's gateways, as this process sees them.

    The interface for the HTTP and gRPC servers: `register_system`, `unregister_system` and
    `system_status` (Triton's JSON) for the extension's calls; `window` (no I/O, raises
    RegionMiss for a region this process has not heard of yet) or `lookup` (awaits a refresh on a
    miss) for tensors; `read` and `write` for a tensor's bytes in one call. The CUDA calls
    answer as described in the module docstring."""

    def __init__(self, count: Callable[[str, str], None] | None = None) -> None:
        self._kv: KeyValue | None = None
        self._scope: str | None = None
        # count(model, how): each request naming regions, by how its tensors were sent.
        self._count = count or (lambda model, how: None)
        self._regions: dict[str, _Entry] = {}
        # The revision last applied per name, deletions included: the watch and `refresh` both
        # deliver entries, and an older one must not undo a newer one.
        self._revisions: dict[str, int] = {}
        self._refresh_lock = asyncio.Lock()
        self._refreshes_started = 0
        self._refreshes_done = 0  # the number of the last refresh that completed
        self.tasks = EssentialTasks("shared memory")

    # -- life ------------------------------------------------------------------------------

    async def start(self, kv: KeyValue, scope: str | None, reconnects: Reconnects | None = None) -> None:
        """Follow `scope`'s registrations in `kv`; `scope` None: system shared memory is
        unsupported on this host (no /dev/shm). With `reconnects`, the watch is opened again
        after each reconnect."""
        self._kv = kv
        self._scope = scope
        if scope is None:
            return
        watcher = await kv.watch(f"{scope}.>")
        self.tasks.spawn(self._follow(watcher, reconnects), "follow-shared-memory")

    async def stop(self) -> None:
        """Stop following and unmap every region no request holds. Safe to call twice."""
        await self.tasks.stop()
        for entry in self._regions.values():
            if entry.mapping is not None:
                entry.mapping.close()
        self._regions.clear()

    async def _follow(self, watcher: KeyValue.KeyWatcher, reconnects: Reconnects | None) -> None:
        epoch = reconnects.count if reconnects is not None else 0
        while True:
            watching = asyncio.ensure_future(self._watch(watcher))
            if reconnects is None:
                await watching
            bumped = asyncio.ensure_future(reconnects.wait_after(epoch) if reconnects else asyncio.sleep(0))
            try:
                await asyncio.wait((watching, bumped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait([watching, bumped], 2.0)
            if bumped.cancelled():
                if not watching.cancelled() and watching.exception() is not None:
                    raise watching.exception()  # type: ignore[misc]
                raise RuntimeError("the shared memory registrations watch ended")
            assert reconnects is not None and self._kv is not None
            epoch = reconnects.count
            # A broker that lost its state numbers revisions anew: what the new watch delivers
            # is current, whatever its revision. A region lost with that state is registered
            # again by its client (a request naming it gets a 400 meanwhile).
            self._revisions.clear()
            while True:
                try:
                    watcher = await self._kv.watch(f"{self._scope}.>")
                    break
                except Exception as exc:  # the bucket is not back yet
                    log.info("shared memory watch not opened again yet: %r", exc)
                    await asyncio.sleep(0.5)

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is not None:
                    self._apply(entry.key, entry.value, entry.operation, entry.revision)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        raise RuntimeError("the shared memory registrations watch ended")

    def _apply(self, kv_key: str, value: bytes | None, operation: str | None, revision: int) -> None:
        try:
            name = region_name(kv_key)
        except ValueError:
            log.warning("ignoring a shared memory registration under a malformed key %r", kv_key)
            return
        if revision <= self._revisions.get(name, 0):
            return
        self._revisions[name] = revision
        if operation in (KV_DEL, KV_PURGE) or not value:
            self._drop(name)
            return
        try:
            region = SystemRegion.from_json(value)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("ignoring a malformed shared memory registration %r: %s", kv_key, exc)
            self._drop(name)
            return
        current = self._regions.get(name)
        if current is not None and current.region == region:
            return  # this process's own registration coming back: keep its mapping
        self._drop(name)
        self._regions[name] = _Entry(region)

    def _drop(self, name: str) -> None:
        entry = self._regions.pop(name, None)
        if entry is not None and entry.mapping is not None:
            entry.mapping.close()

    # -- the bucket ------------------------------------------------------------------------

    def _bucket(self) -> tuple[KeyValue, str]:
        if self._kv is None:
            raise Unavailable("the gateway has not connected its shared memory registry yet")
        if self._scope is None:
            raise Unsupported(
                f"system shared memory is not supported on this host: it has no {SHM_DIR} for "
                "POSIX shared memory objects"
            )
        return self._kv, self._scope

    def _kv_key(self, name: str) -> str:
        _, scope = self._bucket()
        return region_key(scope, name)

    async def refresh(self) -> None:
        """Read this host's registrations from the bucket now. Requests that miss at the same
        moment share one read: a caller is served by any read that began after it asked (one
        that began before may have missed the registration the caller is looking for)."""
        kv, scope = self._bucket()
        wanted = self._refreshes_started + 1
        async with self._refresh_lock:
            if self._refreshes_done >= wanted:
                return
            self._refreshes_started += 1
            number = self._refreshes_started
            with _broker("read the shared memory registrations"):
                # A fresh watch delivers every key's last entry, deletions included, then None.
                watcher = await kv.watch(f"{scope}.>")
                try:
                    async with asyncio.timeout(BROKER_TIMEOUT_S):
                        async for entry in watcher:
                            if entry is None:
                                break
                            self._apply(entry.key, entry.value, entry.operation, entry.revision)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            self._refreshes_done = number

    # -- tensors ---------------------------------------------------------------------------

    def window(self, region: str, offset: int, byte_size: int) -> memoryview:
        """A writable view of `byte_size` bytes at `offset` in `region`, checked against the
        region. RegionMiss when this process does not know the region; InvalidArgument when the
        window does not fit or the object can no longer be used. The view keeps the mapping
        alive for as long as it is held."""
        entry = self._regions.get(region)
        if entry is None:
            raise RegionMiss(region)
        if entry.mapping is None:
            entry.mapping = MappedRegion.open(entry.region)
        return entry.mapping.window(offset, byte_size)

    async def parse(self, parse: Callable[[Callable[[str, int, int], memoryview]], T]) -> T:
        """`parse(window)`, the infer parsers of HTTP and gRPC alike: a region registered
        through another gateway process an instant ago is not yet in this one's copy of the
        registrations, so a miss reads them and parses once more (a second miss is the 400)."""
        try:
            return parse(self.window)
        except RegionMiss:
            await self.refresh()
            return parse(self.window)

    async def lookup(self, region: str, offset: int, byte_size: int) -> memoryview:
        """`window`, reading the bucket once when this process has not heard of `region`."""
        try:
            return self.window(region, offset, byte_size)
        except RegionMiss:
            await self.refresh()
            return self.window(region, offset, byte_size)

    async def read(self, region: str, offset: int, byte_size: int) -> memoryview:
        """A read-only view of a tensor's bytes in `region` (an input)."""
        return (await self.lookup(region, offset, byte_size)).toreadonly()

    async def write(self, region: str, offset: int, data: bytes | memoryview) -> None:
        """Copy `data` into `region` at `offset` (an output)."""
        source = memoryview(data).cast("B")
        (await self.lookup(region, offset, len(source)))[:] = source

    # -- tensors by reference --------------------------------------------------------------

    def reaches(self, record: ModelRecord, workers: list[WorkerReport]) -> bool:
        """Whether every worker that may pull `record`'s messages sees this host's objects: the
        workers it is placed on and those that still run it (a placement that just moved),
        each reporting this gateway's host scope. A worker without a report, or whose report
        has no scope (an older worker, `--system-shm off`), is another host."""
        scope = self._scope
        if scope is None or not record.placement:
            return False
        reports = {worker.id: worker for worker in workers}
        pullers = set(record.placement)
        pullers.update(worker.id for worker in workers if record.name in worker.models)
        return all(
            (report := reports.get(each)) is not None and report.host_scope == scope for each in pullers
        )

    def _reference(self, array: npt.NDArray[Any]) -> ShmRef | None:
        """Where `array`'s bytes are in a client's object, when it is a contiguous view of a
        region this process has mapped (what the parse makes of an input in shared memory)."""
        scope = self._scope
        if scope is None or array.dtype.hasobject or not array.flags.c_contiguous:
            return None
        address, nbytes = array.ctypes.data, array.nbytes
        for entry in self._regions.values():
            if entry.mapping is not None:
                ref = entry.mapping.reference(address, nbytes, scope)
                if ref is not None:
                    return ref
        return None

    def by_reference(self, request: InferRequest, shm_outputs: dict[str, memoryview]) -> InferRequest | None:
        """`request` with its inputs from shared memory as references and `shm_outputs` (output
        name -> its window, as parsed) as output windows; None when nothing goes by reference."""
        inputs: list[Tensor] = []
        found = False
        for tensor in request.inputs:
            ref = self._reference(tensor.data) if tensor.data.nbytes else None
            if ref is not None:
                found = True
                tensor = Tensor(tensor.name, tensor.datatype, tensor.shape, tensor.data, ref)
            inputs.append(tensor)
        output_refs: dict[str, ShmRef] = {}
        for name, window in shm_outputs.items():
            ref = self._reference(np.frombuffer(window, dtype=np.uint8)) if len(window) else None
            if ref is not None:
                output_refs[name] = ref
        if not found and not output_refs:
            return None
        return InferRequest(
            request.id,
            request.model,
            request.version,
            inputs,
            request.outputs,
            request.parameters,
            output_refs,
        )

    async def infer(
        self,
        request: InferRequest,
        shm_outputs: dict[str, memoryview],
        record: ModelRecord,
        workers: list[WorkerReport],
        send: Callable[[InferRequest], Awaitable[InferResponse]],
    ) -> InferResponse:
        """`send(request)`, by reference when the model's workers share this host (see the
        module docstring), else by value; by value again when a worker could not reach the
        references. `shm_outputs`: output name -> its window in the client's region."""
        # The cheap test first: most requests name no region, and then the fleet is not looked at.
        referenced = self.by_reference(request, shm_outputs) if self._regions else None
        if referenced is None:
            return await send(request)
        if not self.reaches(record, workers):
            self._count(record.name, "by_value")
            return await send(request)
        self._count(record.name, "by_reference")
        try:
            response = await send(referenced)
        except NatronError as exc:
            if exc.status != 400 or SHM_UNREACHABLE not in exc.message:
                raise
            self._count(record.name, "by_value_again")
            log.info("request id=%s sent again by value: %s", request.id, exc.message)
            return await send(request)
        for tensor in response.outputs:
            if tensor.ref is not None and tensor.name not in referenced.output_refs:
                raise InternalError(f"output '{tensor.name}' came back in shared memory, which was not asked")
        return response

    # -- the extension's calls -------------------------------------------------------------

    async def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Register `byte_size` bytes at `offset` of the object `key` as `name`."""
        kv, _ = self._bucket()
        if not name:
            raise InvalidArgument("'region name' is necessary to register system shared memory region")
        if len(name.encode()) > _MAX_REGION_NAME_BYTES:
            raise InvalidArgument(
                f"shared memory region name is {len(name.encode())} bytes long; at most "
                f"{_MAX_REGION_NAME_BYTES} are supported"
            )
        if byte_size <= 0:
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': byte_size must be positive, "
                f"got {byte_size}"
            )
        _object_name(name, key)  # Triton checks the key before the name
        if name in self._regions:
            await self.refresh()  # unregistered through another process an instant ago?
            if name in self._regions:
                raise InvalidArgument(f"shared memory region '{name}' already in manager")
        region = SystemRegion(name, key, offset, byte_size)
        mapping = MappedRegion.open(region)
        try:
            with _broker(f"register shared memory region '{name}'"):
                revision = await kv.create(self._kv_key(name), orjson.dumps(region.status()))
        except nats.js.errors.KeyWrongLastSequenceError:
            mapping.close()
            raise InvalidArgument(f"shared memory region '{name}' already in manager") from None
        except BaseException:
            mapping.close()
            raise
        if revision > self._revisions.get(name, 0):
            self._revisions[name] = revision
            self._drop(name)
            self._regions[name] = _Entry(region, mapping)
            return
        # The watch delivered it first (or something newer): keep what it installed.
        entry = self._regions.get(name)
        if entry is not None and entry.region == region and entry.mapping is None:
            entry.mapping = mapping
        else:
            mapping.close()

    async def unregister_system(self, name: str | None) -> None:
        """Unregister `name`, or every system region of this host when None. An unknown name is
        no error, as in Triton."""
        kv, _ = self._bucket()
        if name is None or name not in self._regions:
            await self.refresh()
        names = list(self._regions) if name is None else [name] if name in self._regions else []
        for each in names:
            with _broker(f"unregister shared memory region '{each}'"):
                await kv.delete(self._kv_key(each))
            self._drop(each)

    async def system_status(self, name: str | None) -> list[dict[str, Any]]:
        """Triton's status: every system region of this host (by name), or the one named (404
        when unknown)."""
        self._bucket()
        if name is None or name not in self._regions:
            await self.refresh()
        if name is None:
            return [self._regions[each].region.status() for each in sorted(self._regions)]
        entry = self._regions.get(name)
        if entry is None:
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        return [entry.region.status()]

    async def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        raise Unsupported(
            f"CUDA shared memory is not supported: natron's gateway holds no CUDA context (tensors "
            f"travel to the workers as bytes over NATS), so it cannot open the CUDA IPC handle of "
            f"region '{name}'; use system shared memory (/v2/systemsharedmemory) instead"
        )

    async def unregister_cuda(self, name: str | None) -> None:
        """Nothing to do: no CUDA region can be registered."""

    async def cuda_status(self, name: str | None) -> list[dict[str, Any]]:
        """No CUDA region can be registered: [] for all, 404 for a name, as Triton words it."""
        if name is None:
            return []
        if self._scope is not None and self._kv is not None:
            if name not in self._regions:
                await self.refresh()
            if name in self._regions:
                raise NotFound(
                    f"The region named '{name}' is registered as system shared memory, not CUDA shared memory"
                )
        raise NotFound(f"Unable to find cuda shared memory region: '{name}'")


@contextlib.contextmanager
def _broker(what: str) -> Iterator[None]:
    """A broker that does not answer in time is a 503 naming what could not be done."""
    try:
        yield
    except (nats.errors.Error, TimeoutError) as exc:
        if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
            raise
        raise Unavailable(f"could not {what}: the broker did not answer ({type(exc).__name__})") from None


# -- HTTP ------------------------------------------------------------------------------------

SHARED_MEMORY: web.AppKey[SharedMemoryRegistry] = web.AppKey("shared-memory", SharedMemoryRegistry)


def _uint(body: dict[str, Any], field: str, *, default: int | None = None) -> int:
    if field not in body:
        if default is None:
            raise InvalidArgument(f"Shared memory register request has no '{field}' field")
        return default
    value = body[field]
    if type(value) is not int or value < 0:
        raise InvalidArgument(
            f"shared memory register request '{field}' must be a non-negative integer, got {value!r:.60}"
        )
    return value


async def _system_register(request: web.Request) -> web.Response:
    body = json_object(await request.read(), "shared memory register")
    if "key" not in body:
        raise InvalidArgument("Shared memory register request has no 'key' field")
    key = body["key"]
    if not isinstance(key, str):
        raise InvalidArgument(f"shared memory register request 'key' must be a string, got {key!r:.60}")
    offset = _uint(body, "offset", default=0)
    byte_size = _uint(body, "byte_size")
    await request.app[SHARED_MEMORY].register_system(request.match_info["name"], key, offset, byte_size)
    return web.Response(status=200)


async def _system_unregister(request: web.Request) -> web.Response:
    await request.app[SHARED_MEMORY].unregister_system(request.match_info.get("name"))
    return web.Response(status=200)


async def _system_status(request: web.Request) -> web.Response:
    return json_response(await request.app[SHARED_MEMORY].system_status(request.match_info.get("name")))


async def _cuda_register(request: web.Request) -> web.Response:
    await request.app[SHARED_MEMORY].register_cuda(request.match_info["name"], b"", 0, 0)
    return web.Response(status=200)


async def _cuda_unregister(request: web.Request) -> web.Response:
    await request.app[SHARED_MEMORY].unregister_cuda(request.match_info.get("name"))
    return web.Response(status=200)


async def _cuda_status(request: web.Request) -> web.Response:
    return json_response(await request.app[SHARED_MEMORY].cuda_status(request.match_info.get("name")))


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    registry = app[SHARED_MEMORY]
    options = app[OPTIONS]
    kv = await jetstream.ensure_bucket(app[NATS].jetstream(), bucket_name(options.subjects), options.storage)
    await registry.start(kv, host_scope(), recovery.reconnects_of(app[NATS]))
    try:
        yield
    finally:
        await registry.stop()


def add_routes(app: web.Application) -> None:
    """The registry (under SHARED_MEMORY, opened after the NATS connection) and the extension's
    routes, system and CUDA."""
    app[SHARED_MEMORY] = SharedMemoryRegistry(app[METRICS].shared_memory_sent)
    app.cleanup_ctx.append(_registry_ctx)
    for kind, register, unregister, status in (
        ("systemsharedmemory", _system_register, _system_unregister, _system_status),
        ("cudasharedmemory", _cuda_register, _cuda_unregister, _cuda_status),
    ):
        app.router.add_get(f"/v2/{kind}/status", status)
        app.router.add_get(f"/v2/{kind}/region/{{name}}/status", status)
        app.router.add_post(f"/v2/{kind}/region/{{name}}/register", register)
        app.router.add_post(f"/v2/{kind}/unregister", unregister)
        app.router.add_post(f"/v2/{kind}/region/{{name}}/unregister", unregister)
