"""A worker's copies of model files from the model store (broker/objects.py), on its own disk,
and where a worker finds the folder of a version it loads.

ModelCache keeps whole versions under a root folder, bounded in bytes:

    <root>/<digest>/<model>/<version>/...   one version's files, exactly those of its manifest
    <root>/.partial/<id>/<version>/          a fetch under way
    <root>/.trash/<id>/                      an evicted version, being removed
    <root>/.lock                             held (flock) by the one process that uses the root

A version takes its final name only by an atomic rename once every file is fetched and checked,
so a folder found there is complete. At start, what a crash left in .partial and .trash is
removed and the index is rebuilt from the folders, least recently used first by their
modification time, which every use touches. A version folder is named after its version inside
a folder named after its model, as in a repository, so a Python model's
`args["model_repository"]` and `args["model_version"]` name what they name under Triton.

Eviction takes whole versions, least recently used first, when a fetch needs room. A pinned
version (one a worker has loaded or is loading) is never evicted; a version that does not fit
even with every unpinned one gone is refused with the sizes rather than squeezed in. Concurrent
asks for one version share one fetch, a task the cache owns: it runs on for the others when one
asker is cancelled, and `close` cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from nats.aio.client import Client

from broker.objects import GiB, Manifest, ModelFiles, human_bytes
from broker.subjects import check_name
from natron.errors import InvalidArgument, Unavailable
from natron.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# A worker's cache unless told otherwise: room for a few models of a few GiB each, or one large
# one, next to the OS and the framework on a typical 100 GB worker disk. Larger models need a
# larger bound (the worker's --model-cache-gb), and the refusal says so.
DEFAULT_CACHE_BYTES = 32 * GiB

ModelFilesMode = Literal["auto", "path", "store"]
MODEL_FILES_MODES: tuple[ModelFilesMode, ...] = ("auto", "path", "store")

_PARTIAL = ".partial"
_TRASH = ".trash"
_LOCK = ".lock"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Fetches still running when the cache closes get this long to end after their cancellation.
_CLOSE_TIMEOUT_S = 5.0

# (digest, model, version): one cached version.
Key = tuple[str, str, str]


class VersionSource(Protocol):
    """Where missing versions come from: broker.objects.ModelFiles, or a stand-in in tests."""

    async def manifest(self, model: str, version: str, digest: str) -> Manifest: ...

    async def fetch_version(
        self, model: str, version: str, digest: str, into: Path, manifest: Manifest | None = None
    ) -> Manifest: ...


@dataclass(slots=True)
class _Entry:
    path: Path
    size_bytes: int
    last_use: int


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _folder_bytes(folder: Path) -> int:
    return sum(
        (Path(directory) / name).stat().st_size for directory, _, names in os.walk(folder) for name in names
    )


class ModelCache:
    """`await cache.start()` (or `async with`), then `path_for` / `unpin`; `close` at the end."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self._root = root
        self._max_bytes = max_bytes
        self._entries: dict[Key, _Entry] = {}
        self._pins: dict[Key, int] = {}
        self._fetches: dict[Key, asyncio.Task[None]] = {}
        self._reserved_bytes = 0
        self._uses = itertools.count()
        self._lock_fd: int | None = None

    async def __aenter__(self) -> ModelCache:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def root(self) -> Path:
        return self._root

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the versions cached now (not counting fetches under way)."""
        return sum(entry.size_bytes for entry in self._entries.values())

    def versions(self) -> list[tuple[str, str, str]]:
        """(model, version, digest) of every cached version, least recently used first."""
        ordered = sorted(self._entries.items(), key=lambda item: item[1].last_use)
        return [(model, version, digest) for (digest, model, version), _ in ordered]

    def pins(self, model: str, version: str, digest: str) -> int:
        return self._pins.get((digest, model, version), 0)

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the root (one process at a time), clear what a crash left, rebuild the index
        from the folders, and evict down to the bound if it was lowered since."""
        if self._max_bytes < 1:
            raise InvalidArgument(f"model cache bound {self._max_bytes}: must be at least 1 byte")
        found = await asyncio.to_thread(self._open)
        for _, key, path, size in sorted(found):  # oldest modification first
            self._entries[key] = _Entry(path, size, next(self._uses))
        trash = self._evict(0, "the model cache at start")
        await self._remove(trash)
        log.info(
            "model cache %s: %d version(s), %s of %s",
            self._root,
            len(self._entries),
            human_bytes(self.used_bytes),
            human_bytes(self._max_bytes),
        )

    async def close(self) -> None:
        """Cancel fetches under way and let the root go; safe to call twice."""
        fetches = list(self._fetches.values())
        if fetches:
            await cancel_and_wait(fetches, _CLOSE_TIMEOUT_S, "the model cache is closing")
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _open(self) -> list[tuple[int, Key, Path, int]]:
        """Blocking: lock the root, clear leftovers, list the cached versions."""
        self._root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise Unavailable(
                    f"model cache '{self._root}' is in use by process {holder}: give each worker a "
                    "cache folder of its own (--model-cache-dir)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        for leftover in (_PARTIAL, _TRASH):
            shutil.rmtree(self._root / leftover, ignore_errors=True)
        found: list[tuple[int, Key, Path, int]] = []
        for digest_dir in self._root.iterdir():
            if (
                digest_dir.name.startswith(".")
                or not digest_dir.is_dir()
                or not _DIGEST.match(digest_dir.name)
            ):
                continue
            for model_dir in digest_dir.iterdir():
                for version_dir in model_dir.iterdir() if model_dir.is_dir() else ():
                    try:
                        key = self._key(model_dir.name, version_dir.name, digest_dir.name)
                    except InvalidArgument:
                        log.warning("model cache: ignoring %s, which it did not write", version_dir)
                        continue
                    if version_dir.is_dir():
                        stat = version_dir.stat()
                        found.append((stat.st_mtime_ns, key, version_dir, _folder_bytes(version_dir)))
                with contextlib.suppress(OSError):
                    model_dir.rmdir()  # left empty by an eviction cut short
            with contextlib.suppress(OSError):
                digest_dir.rmdir()
        return found

    # -- versions ----------------------------------------------------------------------------

    @staticmethod
    def _key(model: str, version: str, digest: str) -> Key:
        check_name("model", model)
        if not version.isdigit() or int(version) < 1:
            raise InvalidArgument(f"model '{model}': invalid version '{version}'")
        if not _DIGEST.match(digest):
            raise InvalidArgument(f"model '{model}' version {version}: invalid files digest '{digest}'")
        return digest, model, version

    async def path_for(self, files: VersionSource, model: str, version: str, digest: str) -> Path:
        """The folder holding exactly `model` `version` with `digest`, fetched from `files` on a
        miss, and pinned: the caller calls `unpin` once it no longer reads from it."""
        if self._lock_fd is None:
            raise RuntimeError("the model cache is used before start() or after close()")
        key = self._key(model, version, digest)
        # Pinned before any wait: nothing can evict the version between its fetch and its use.
        self._pins[key] = self._pins.get(key, 0) + 1
        try:
            entry = self._entries.get(key)
            if entry is None:
                fetch = self._fetches.get(key)
                if fetch is None:
                    fetch = asyncio.get_running_loop().create_task(
                        self._fetch(files, key), name=f"model-cache-fetch-{model}-v{version}"
                    )
                    self._fetches[key] = fetch
                    fetch.add_done_callback(functools.partial(self._fetched, key))
                await asyncio.shield(fetch)
                entry = self._entries[key]
            entry.last_use = next(self._uses)
            # The order of use, for the index rebuilt after a restart. The time given, not the
            # kernel's own, which moves in steps of a few milliseconds and would tie.
            now_ns = time.time_ns()
            with contextlib.suppress(OSError):
                os.utime(entry.path, ns=(now_ns, now_ns))
            return entry.path
        except BaseException:
            self._unpin(key)
            raise

    def unpin(self, model: str, version: str, digest: str) -> None:
        """One `path_for` less reads this version; at none it may be evicted."""
        self._unpin(self._key(model, version, digest))

    def _unpin(self, key: Key) -> None:
        count = self._pins.get(key, 0)
        if count < 1:
            raise ValueError(f"model '{key[1]}' version {key[2]} ({key[0][:12]}) is not pinned")
        if count == 1:
            del self._pins[key]
        else:
            self._pins[key] = count - 1

    @contextlib.asynccontextmanager
    async def pinned(
        self, files: VersionSource, model: str, version: str, digest: str
    ) -> AsyncIterator[Path]:
        path = await self.path_for(files, model, version, digest)
        try:
            yield path
        finally:
            self.unpin(model, version, digest)

    def _fetched(self, key: Key, task: asyncio.Task[None]) -> None:
        if self._fetches.get(key) is task:
            del self._fetches[key]
        if not task.cancelled() and task.exception() is not None:
            # Its askers have it (or were cancelled): retrieved here so it is not reported twice.
            log.debug("model cache: fetch of %s failed: %r", key, task.exception())

    async def _fetch(self, files: VersionSource, key: Key) -> None:
        digest, model, version = key
        what = f"model '{model}' version {version}"
        manifest = await files.manifest(model, version, digest)
        size = manifest.total_bytes
        trash = self._evict(size, what)
        self._reserved_bytes += size
        partial = self._root / _PARTIAL / uuid.uuid4().hex
        stale: list[Path] = []
        try:
            await self._remove(trash)
            await files.fetch_version(model, version, digest, partial / version, manifest)
            final = self._root / digest / model / version
            # No wait from here on: an eviction (which removes emptied parent folders) cannot
            # run between making the parents and the rename, and the folder takes its final
            # name and its place in the index together.
            if final.exists():  # a folder the index does not know (not written here): replaced
                stale.append(self._discard(final))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(partial / version, final)
            self._entries[key] = _Entry(final, size, next(self._uses))
        finally:
            self._reserved_bytes -= size
            # Empty by now: fetch_version removes what it wrote when it fails.
            shutil.rmtree(partial, ignore_errors=True)
        log.info(
            "model cache: %s fetched (%s); %s of %s in use",
            what,
            human_bytes(size),
            human_bytes(self.used_bytes),
            human_bytes(self._max_bytes),
        )
        await self._remove(stale)

    def _evict(self, needed: int, what: str) -> list[Path]:
        """Make room for `needed` more bytes: the least recently used unpinned versions leave
        the index and are renamed into the trash (returned, for the caller to remove). All or
        nothing: when even every unpinned version gone would not make room, nothing is evicted
        and the refusal gives the sizes."""
        bound = human_bytes(self._max_bytes)
        if needed > self._max_bytes:
            raise Unavailable(
                f"{what} needs {human_bytes(needed)}, more than the model cache holds ({bound}; "
                "raise the worker's --model-cache-gb)"
            )
        used = self.used_bytes + self._reserved_bytes
        victims: list[Key] = []
        candidates = sorted(
            (entry.last_use, key) for key, entry in self._entries.items() if not self._pins.get(key)
        )
        for _, key in candidates:
            if used + needed <= self._max_bytes:
                break
            victims.append(key)
            used -= self._entries[key].size_bytes
        if used + needed > self._max_bytes:
            held = self.used_bytes - sum(self._entries[key].size_bytes for key in victims)
            raise Unavailable(
                f"{what} needs {human_bytes(needed)} and the model cache ({bound}) has no room: "
                f"{human_bytes(held)} held by versions in use, {human_bytes(self._reserved_bytes)} being "
                "fetched (raise the worker's --model-cache-gb)"
            )
        trash = []
        for key in victims:
            entry = self._entries.pop(key)
            log.info(
                "model cache: evicting model '%s' version %s (%s)",
                key[1],
                key[2],
                human_bytes(entry.size_bytes),
            )
            trash.append(self._discard(entry.path))
        return trash

    def _discard(self, path: Path) -> Path:
        """Rename a version folder into the trash (one quick system call, on the loop, so that a
        fetch of the same version cannot land under the name meanwhile), and drop its parents if
        that left them empty."""
        trash_dir = self._root / _TRASH
        trash_dir.mkdir(exist_ok=True)
        target = trash_dir / uuid.uuid4().hex
        os.rename(path, target)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
        return target

    @staticmethod
    async def _remove(paths: list[Path]) -> None:
        if paths:
            await asyncio.to_thread(_remove_all, paths)


# -- where a worker finds a version's files --------------------------------------------------------


class LocalVersion:
    """A version's folder on this host, and the pin that keeps it there while it is read."""

    __slots__ = ("_release", "path")

    def __init__(self, path: Path, release: Callable[[], None] | None = None) -> None:
        self.path = path
        self._release = release

    def release(self) -> None:
        """Let the folder go (an unpin, for one from the cache); safe to call twice."""
        release, self._release = self._release, None
        if release is not None:
            release()


async def local_version_dir(
    model: str,
    path: str,
    version: str,
    digest: str,
    *,
    mode: ModelFilesMode,
    cache: ModelCache | None,
    files: VersionSource | None,
) -> LocalVersion:
    """The folder to load `model` `version` from: the record's `path` / `version` when `mode`
    says to and this host has it, otherwise the cache's copy of the version with `digest`
    (pinned until `release`). `digest` is "" when the router published no files for it."""
    local = Path(path) / version
    if mode == "path" or (mode == "auto" and await asyncio.to_thread(local.is_dir)):
        return LocalVersion(local)
    if cache is None or files is None:
        raise Unavailable(f"model '{model}' version {version}: this worker has no model cache")
    if not digest:
        where = f"'{local}' is not on this host and " if mode == "auto" else ""
        raise Unavailable(
            f"model '{model}' version {version}: {where}the router published no files of it to the "
            "model store (is its --model-files-store off?)"
        )
    folder = await cache.path_for(files, model, version, digest)
    return LocalVersion(folder, functools.partial(cache.unpin, model, version, digest))


class WorkerModelFiles:
    """A worker's way to its versions' files, by `mode`: "auto", the record's folder where this
    host has it and the model store otherwise; "path", the record's folder only (every host sees
    the repository at the same path); "store", the store only (a host whose folders of the same
    name may hold other files). The cache lives in `cache_dir`, or in a temporary folder removed
    on close when none is given."""

    def __init__(
        self,
        nc: Client,
        bucket: str,
        mode: ModelFilesMode = "auto",
        cache_dir: Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._nc = nc
        self._bucket = bucket
        self._mode = mode
        self._cache_dir = cache_dir
        self._cache_bytes = cache_bytes
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._cache: ModelCache | None = None
        self._files: ModelFiles | None = None

    @property
    def cache(self) -> ModelCache | None:
        return self._cache

    async def start(self) -> None:
        if self._mode not in MODEL_FILES_MODES:
            raise InvalidArgument(f"model files mode '{self._mode}': expected one of auto, path, store")
        if self._mode == "path":
            return
        root = self._cache_dir
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="natron-model-cache-")
            root = Path(self._tmp.name)
        cache = ModelCache(root, self._cache_bytes)
        await cache.start()
        self._cache = cache
        self._files = ModelFiles(self._nc, self._bucket)

    async def close(self) -> None:
        """After the versions are unloaded; safe to call twice, and after a failed start."""
        cache, self._cache = self._cache, None
        if cache is not None:
            await cache.close()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            await asyncio.to_thread(tmp.cleanup)

    async def version_dir(self, model: str, path: str, version: str, digest: str) -> LocalVersion:
        return await local_version_dir(
            model, path, version, digest, mode=self._mode, cache=self._cache, files=self._files
        )
