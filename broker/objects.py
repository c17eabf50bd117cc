"""Model files in a JetStream object store: what a worker on a host without the model repository
loads a model version from.

The bucket (`<prefix>_files`) holds three kinds of object:

- `sha256/<hex>`: one file's bytes, named by their SHA-256. A file that several versions,
  models or pushes share is stored once, and a push skips every file the bucket already has.
- `manifests/<model>/<version>/<digest>`: a version's manifest, JSON with sorted keys: each
  file's path relative to the version folder, its SHA-256 and size. `digest` is the SHA-256 of
  those bytes, so a manifest read back is checked as a file is, and the digest names the
  version's exact contents (the model record carries it, see `ModelRecord.digests`).
- `signatures/<model>/<version>/<signature>`: an empty object whose description is the digest
  of the folder whose stat signature (its resolved path, every file's path, size and
  modification time) is `<signature>`. A router that rescans an unchanged folder, or restarts,
  finds the digest with one request instead of reading every file again; a changed file
  changes the signature, as it changes the repository poll's (router/repository.py).

Order is the commit: files, then the manifest, then the signature, so a manifest that exists
names files that exist, and a signature names a manifest that exists. A push cut short leaves
only unreferenced objects behind.

The object store splits each object into chunks of `chunk_bytes` (at most the server's
max_payload), one JetStream message each; a put waits for the broker's acknowledgement of
every chunk, so a large file streams without being held in memory. Writing goes through
nats-py's `ObjectStore.put`. Reading does not go through its `get`, which has no timeout,
keeps its subscription when cancelled, and holds a whole object in memory unless handed a file:
`_read_object` reads the chunks of the same layout (NATS ADR-20) from an ordered consumer with
a stall timeout, hashing and writing a few MiB at a time in a thread, and always unsubscribes.
Every file fetched is checked against its manifest's SHA-256 and size (and the store's own
digest); a fetch that fails removes what it wrote.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal, NoReturn

import nats.errors
import orjson
from nats.aio.client import Client
from nats.js.api import ObjectInfo, ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, ObjectStore

from broker.subjects import check_name
from natron.errors import InternalError, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

StoreKind = Literal["memory", "file"]

# One JetStream message per chunk, each acknowledged before the next is sent: a larger chunk
# means fewer round trips per file (a WAN between router and broker makes those count), within
# the server's max_payload, which caps it (1 MiB by default, natron's embedded server 16 MiB).
DEFAULT_CHUNK_BYTES = 1 * MiB
# A fetch whose next chunk does not arrive within this long has stalled (the ordered consumer
# re-creates itself after two missed 5 s heartbeats, so this leaves it room to recover once).
DEFAULT_STALL_TIMEOUT_S = 30.0
# Chunks gathered before one hash-and-write in a thread: few thread hops, little memory.
_WRITE_BYTES = 8 * MiB
# A manifest is read into memory: 10,000 files make about 1.5 MB of JSON.
_MAX_MANIFEST_BYTES = 64 * MiB

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_PREFIX = "SHA-256="


@dataclass(slots=True, frozen=True)
class FilesLimits:
    """Bounds on one version, checked before anything is read or sent, and again on a manifest
    read back. A Triton model version is one to a few files; ten thousand is a virtualenv or a
    data set dropped into a version folder by mistake. 64 GiB holds a 30-billion-parameter model
    in 16-bit weights; a larger one says so by raising the bound."""

    max_files: int = 10_000
    max_version_bytes: int = 64 * GiB


@dataclass(slots=True, frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(slots=True, frozen=True)
class Manifest:
    """A version's files: path relative to the version folder (POSIX) -> content and size."""

    files: dict[str, FileEntry]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def encode(self) -> bytes:
        files = {path: {"sha256": e.sha256, "size": e.size} for path, e in self.files.items()}
        return orjson.dumps({"files": files}, option=orjson.OPT_SORT_KEYS)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    @staticmethod
    def decode(data: bytes, limits: FilesLimits) -> Manifest:
        """A manifest read back; raises ValueError naming what is wrong. Its paths are checked
        as strictly as uploaded ones: whoever can write the bucket must not be able to make a
        worker write outside its cache."""
        raw = orjson.loads(data)
        if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
            raise ValueError("not a manifest: expected an object with 'files'")
        items: dict[str, Any] = raw["files"]
        if len(items) > limits.max_files:
            raise ValueError(f"{len(items)} files, more than the {limits.max_files} a version may hold")
        files: dict[str, FileEntry] = {}
        for path, entry in items.items():
            check_relative_path(path)
            if not isinstance(entry, dict):
                raise ValueError(f"file '{path}': expected an object")
            sha, size = entry.get("sha256"), entry.get("size")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise ValueError(f"file '{path}': 'sha256' is not a SHA-256 in hex")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"file '{path}': 'size' is not a byte count")
            files[path] = FileEntry(sha, size)
        manifest = Manifest(files)
        if manifest.total_bytes > limits.max_version_bytes:
            raise ValueError(
                f"{human_bytes(manifest.total_bytes)}, more than the {human_bytes(limits.max_version_bytes)} "
                "a version may hold"
            )
        return manifest


def check_relative_path(path: str) -> PurePosixPath:
    """A file's path inside a version folder: relative, POSIX, no '.', '..' or empty part."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise ValueError(f"file path '{path}' is not a relative POSIX path")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"file path '{path}': '.', '..' and empty parts are not allowed")
    return PurePosixPath(path)


# -- object names --------------------------------------------------------------------------


def file_object(sha256: str) -> str:
    return f"sha256/{sha256}"


def manifest_object(model: str, version: str, digest: str) -> str:
    return f"manifests/{model}/{version}/{digest}"


def signature_object(model: str, version: str, signature: str) -> str:
    return f"signatures/{model}/{version}/{signature}"


def _check_version(model: str, version: str) -> None:
    check_name("model", model)
    if not version.isdigit() or int(version) < 1:
        raise InvalidArgument(f"model '{model}': invalid version '{version}'")


def _check_digest(digest: str) -> None:
    if not _SHA256.match(digest):
        raise InvalidArgument(f"invalid model files digest '{digest}': expected a SHA-256 in hex")


def human_bytes(count: int) -> str:
    if count >= GiB:
        return f"{count / GiB:.1f} GiB"
    if count >= MiB:
        return f"{count / MiB:.1f} MiB"
    return f"{count} bytes"


# -- reading a folder (blocking; run in a thread) ------------------------------------------


@dataclass(slots=True, frozen=True)
class _Listed:
    relative: str
    path: Path
    size: int
    mtime_ns: int


def _list_folder(folder: Path, what: str, limits: FilesLimits) -> tuple[list[_Listed], str]:
    """Every regular file under `folder` (symbolic links followed, as a local load would), and
    the folder's stat signature. Over the limits, raises InvalidArgument before any file is
    read: the count bound also ends a walk that a link loop would make endless."""
    if not folder.is_dir():
        raise InvalidArgument(f"{what}: '{folder}' is not a directory")
    listed: list[_Listed] = []
    total = 0

    def unreadable(exc: OSError) -> NoReturn:
        # A folder left out would be a version published without some of its files.
        raise InvalidArgument(f"{what}: cannot read '{exc.filename}': {exc.strerror}")

    for directory, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            path = Path(directory) / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # a dangling link, or removed during the walk
            except OSError as exc:
                unreadable(exc)
            if not path.is_file():
                continue  # a socket or a FIFO: nothing a model loads
            listed.append(_Listed(path.relative_to(folder).as_posix(), path, stat.st_size, stat.st_mtime_ns))
            total += stat.st_size
            if len(listed) > limits.max_files:
                raise InvalidArgument(f"{what}: more than the {limits.max_files} files a version may hold")
    if total > limits.max_version_bytes:
        raise InvalidArgument(
            f"{what}: {human_bytes(total)} of files, more than the {human_bytes(limits.max_version_bytes)} "
            "a version may hold"
        )
    lines = [str(folder.resolve())] + [f"{f.relative}:{f.size}:{f.mtime_ns}" for f in listed]
    signature = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]
    return listed, signature


def _hash_file(path: Path) -> FileEntry:
    """The file's SHA-256 and its size as read (not as stat said: it may have changed since)."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
            size += count
    return FileEntry(digest.hexdigest(), size)


def _hash_files(listed: list[_Listed]) -> Manifest:
    return Manifest({f.relative: _hash_file(f.path) for f in listed})


# -- reading an object ---------------------------------------------------------------------


class _Sink:
    """Where an object's chunks go: a file (hashed and written in a thread, a few MiB at a time)
    or memory (`kept`, for a manifest)."""

    def __init__(self, file: BinaryIO | None) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self.kept = bytearray()
        self.size = 0

    async def add(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None:
            self._hash.update(data)
            self.kept += data
            return
        self._pending += data
        if len(self._pending) >= _WRITE_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._file is not None and self._pending:
            pending, self._pending = self._pending, bytearray()
            await asyncio.to_thread(self._write, self._file, pending)

    def _write(self, file: BinaryIO, data: bytearray) -> None:
        self._hash.update(data)
        file.write(data)

    def digest(self) -> bytes:
        return self._hash.digest()


def _store_digest(info: ObjectInfo) -> bytes | None:
    """The SHA-256 the object store recorded for the object's bytes, if it recorded one."""
    if not info.digest:
        return None
    encoded = info.digest.removeprefix(_DIGEST_PREFIX).removeprefix(_DIGEST_PREFIX.lower())
    try:
        return base64.urlsafe_b64decode(encoded)
    except ValueError:
        return None


class ModelFiles:
    """A model files bucket: push a version's folder, fetch it back somewhere else.

    The writer (the router, `natron push`) calls `ensure_bucket` once, which makes the bucket
    with its storage and replicas when it is missing; a reader only binds to it, on first use.
    NATS errors come out as Unavailable (the broker away, the bucket full), files over the limits
    as InvalidArgument, a manifest or object that is not there as NotFound, and bytes that are
    not what the manifest says as InternalError, each naming the model, version and file."""

    def __init__(
        self,
        nc: Client,
        bucket: str,
        *,
        limits: FilesLimits = FilesLimits(),
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._bucket_name = bucket
        self._stream = f"OBJ_{bucket}"
        self._limits = limits
        self._chunk_bytes = chunk_bytes
        self._stall_timeout_s = stall_timeout_s
        self._store: ObjectStore | None = None

    @property
    def bucket(self) -> str:
        return self._bucket_name

    @property
    def limits(self) -> FilesLimits:
        return self._limits

    @contextlib.contextmanager
    def _broker(self, what: str) -> Iterator[None]:
        try:
            yield
        except (nats.errors.Error, TimeoutError) as exc:
            if isinstance(exc, ObjectNotFoundError):
                raise
            raise Unavailable(
                f"{what}: the model store '{self._bucket_name}' failed: {type(exc).__name__}: {exc}"
            ) from None

    async def ensure_bucket(
        self, storage: StoreKind = "file", replicas: int = 1, max_bytes: int = -1
    ) -> None:
        """The writer's: the bucket, made with `storage` and `replicas` when missing (an
        existing one is used as its maker configured it)."""
        if storage not in ("memory", "file"):
            raise InvalidArgument(f"model store storage '{storage}': expected memory or file")
        if replicas < 1:
            raise InvalidArgument(f"model store replicas {replicas}: must be at least 1")
        with self._broker("opening the model store"):
            try:
                self._store = await self._js.object_store(self._bucket_name)
                return
            except BucketNotFoundError:
                pass
            config = ObjectStoreConfig(
                description="natron model files",
                storage=StorageType.FILE if storage == "file" else StorageType.MEMORY,
                replicas=replicas,
                max_bytes=max_bytes,
            )
            try:
                self._store = await self._js.create_object_store(self._bucket_name, config=config)
            except BadRequestError:
                # Made meanwhile by another writer, with another configuration: theirs holds.
                self._store = await self._js.object_store(self._bucket_name)

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            with self._broker("opening the model store"):
                try:
                    self._store = await self._js.object_store(self._bucket_name)
                except BucketNotFoundError:
                    raise Unavailable(
                        f"no model store bucket '{self._bucket_name}': the router (or `natron push`) "
                        "makes it when it publishes model files"
                    ) from None
        return self._store

    async def _exists(self, store: ObjectStore, name: str) -> ObjectInfo | None:
        try:
            return await store.get_info(name)
        except ObjectNotFoundError:
            return None

    # -- pushing ---------------------------------------------------------------------------

    async def push_versions(self, model: str, model_dir: Path, versions: Iterable[str]) -> dict[str, str]:
        """Push each of `versions` (folders of `model_dir`); version -> digest."""
        return {version: await self.push_version(model, version, model_dir / version) for version in versions}

    async def push_version(self, model: str, version: str, folder: Path) -> str:
        """Put the files of `folder` (a version folder) in the store, those it lacks only, and
        the manifest naming them; return the manifest's digest. Files are read and hashed in a
        thread, and not at all when the folder's stat signature was pushed before."""
        _check_version(model, version)
        what = f"model '{model}' version {version}"
        listed, signature = await asyncio.to_thread(_list_folder, folder, what, self._limits)
        store = await self._bucket()
        with self._broker(what):
            known = await self._exists(store, signature_object(model, version, signature))
            if known is not None and known.description and _SHA256.match(known.description):
                return known.description
            try:
                manifest = await asyncio.to_thread(_hash_files, listed)
            except OSError as exc:
                raise InvalidArgument(f"{what}: cannot read its files: {exc}") from None
            sent_files, sent_bytes = 0, 0
            sent: set[str] = set()
            for relative, entry in sorted(manifest.files.items()):
                if entry.sha256 in sent or await self._exists(store, file_object(entry.sha256)) is not None:
                    continue
                await self._put_file(store, what, folder / relative, relative, entry)
                sent.add(entry.sha256)
                sent_files, sent_bytes = sent_files + 1, sent_bytes + entry.size
            digest = manifest.digest
            name = manifest_object(model, version, digest)
            if await self._exists(store, name) is None:
                await store.put(name, manifest.encode())
            await store.put(
                signature_object(model, version, signature),
                b"",
                meta=ObjectMeta(name=signature_object(model, version, signature), description=digest),
            )
        log.info(
            "%s: %d file(s), %s, in the model store as %s (%d new, %s sent)",
            what,
            len(manifest.files),
            human_bytes(manifest.total_bytes),
            digest[:12],
            sent_files,
            human_bytes(sent_bytes),
        )
        return digest

    async def _put_file(
        self, store: ObjectStore, what: str, path: Path, relative: str, entry: FileEntry
    ) -> None:
        name = file_object(entry.sha256)
        chunk = max(1, min(self._chunk_bytes, self._nc.max_payload))
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise InvalidArgument(f"{what}: cannot read '{relative}': {exc}") from None
        try:
            info = await store.put(name, file, meta=meta)
        finally:
            await asyncio.to_thread(file.close)
        if _store_digest(info) != bytes.fromhex(entry.sha256) or info.size != entry.size:
            # The file changed between hashing and sending: what was sent is not what its name
            # says, and must not stay under that name.
            with contextlib.suppress(Exception):
                await store.delete(name)
            raise InvalidArgument(f"{what}: '{relative}' changed while it was published; try again")

    # -- fetching --------------------------------------------------------------------------

    async def manifest(self, model: str, version: str, digest: str) -> Manifest:
        """The manifest of `model` `version` with `digest`, checked against the digest."""
        _check_version(model, version)
        _check_digest(digest)
        what = f"model '{model}' version {version}"
        store = await self._bucket()
        sink = _Sink(None)
        with self._broker(what):
            try:
                name = manifest_object(model, version, digest)
                await self._read_object(store, name, sink, _MAX_MANIFEST_BYTES, f"{what}: its manifest")
            except ObjectNotFoundError:
                raise NotFound(
                    f"{what}: no manifest {digest[:12]} in the model store '{self._bucket_name}'"
                ) from None
        if sink.digest().hex() != digest:
            raise InternalError(f"{what}: the manifest read back is not the one named {digest[:12]}")
        try:
            return Manifest.decode(bytes(sink.kept), self._limits)
        except ValueError as exc:
            raise InternalError(f"{what}: manifest {digest[:12]} is invalid: {exc}") from None

    async def fetch_version(
        self, model: str, version: str, digest: str, into: Path, manifest: Manifest | None = None
    ) -> Manifest:
        """Write the files of `model` `version` `digest` under `into` (made here: it must not
        exist), checking each against its manifest; return the manifest. On any error, the
        cancellation of the fetch included, `into` is removed."""
        if manifest is None:
            manifest = await self.manifest(model, version, digest)
        what = f"model '{model}' version {version}"
        store = await self._bucket()
        try:
            await asyncio.to_thread(into.mkdir, parents=True)
        except FileExistsError:
            raise InvalidArgument(f"{what}: '{into}' exists already") from None
        try:
            for relative, entry in sorted(manifest.files.items()):
                await self._fetch_file(store, what, relative, entry, into / check_relative_path(relative))
        except BaseException:
            # Synchronous even when cancelled: a partial folder must not outlive the fetch.
            shutil.rmtree(into, ignore_errors=True)
            raise
        return manifest

    async def _fetch_file(
        self, store: ObjectStore, what: str, relative: str, entry: FileEntry, target: Path
    ) -> None:
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        file = await asyncio.to_thread(target.open, "xb")
        try:
            sink = _Sink(file)
            what_file = f"{what}: file '{relative}'"
            with self._broker(what_file):
                try:
                    info = await self._read_object(
                        store, file_object(entry.sha256), sink, entry.size, what_file
                    )
                except ObjectNotFoundError:
                    raise NotFound(
                        f"{what}: file '{relative}' (sha256 {entry.sha256[:12]}) is not in the model "
                        f"store '{self._bucket_name}'"
                    ) from None
        finally:
            await asyncio.to_thread(file.close)
        got = sink.digest()
        if sink.size != entry.size or got.hex() != entry.sha256:
            held = "other bytes" if got == _store_digest(info) else "bytes that do not match its own digest"
            raise InternalError(
                f"{what_file} from the model store is corrupt: the object named "
                f"sha256 {entry.sha256[:12]} holds {held} ({sink.size} bytes, sha256 {got.hex()[:12]}; "
                f"the manifest says {entry.size} bytes)"
            )

    async def _read_object(
        self, store: ObjectStore, name: str, sink: _Sink, max_bytes: int, what: str
    ) -> ObjectInfo:
        """Stream object `name` (`what`, in errors) into `sink`: its chunks, in order, from an
        ordered consumer that is always unsubscribed, each wait bounded by the stall timeout."""
        info = await store.get_info(name)
        size = info.size or 0
        if info.is_link() or not info.nuid or size > max_bytes:
            held = "a link" if info.is_link() else f"{size} bytes" if info.nuid else "no data"
            raise InternalError(
                f"{what} is corrupt: the model store's object {name} holds {held}, where "
                f"{max_bytes} bytes were expected at most"
            )
        if size:
            subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self._bucket_name, obj=info.nuid)
            sub = await self._js.subscribe(subject, stream=self._stream, ordered_consumer=True)
            try:
                while True:
                    try:
                        msg = await sub.next_msg(timeout=self._stall_timeout_s)
                    except nats.errors.TimeoutError:
                        raise Unavailable(
                            f"{what}: no data from the model store for {self._stall_timeout_s:.0f} s "
                            f"after {sink.size} of {size} bytes"
                        ) from None
                    await sink.add(msg.data)
                    if sink.size > size:
                        break  # more than it should hold: the caller's checks say so
                    if msg.metadata.num_pending == 0:
                        break
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        await sink.flush()
        return info
