"""The worker's model cache (workers/model_cache.py): its policy, against a stand-in for the model
store that writes local files. The store itself is tested against nats-server in
tests/mesh/test_object_store.py."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pytest

from broker.objects import FileEntry, Manifest
from natron.errors import InternalError, InvalidArgument, Unavailable
from workers.model_cache import ModelCache, local_version_dir

pytestmark = pytest.mark.unit


class FakeStore:
    """Versions as files in memory; counts fetches; a fetch can be held at a gate or fail."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.fetches: Counter[tuple[str, str, str]] = Counter()
        self.gate: asyncio.Event | None = None
        self.failures = 0  # the next this many fetches fail halfway

    def add(self, model: str, version: str, files: dict[str, bytes]) -> str:
        digest = self._manifest(files).digest
        self.files[digest] = files
        return digest

    @staticmethod
    def _manifest(files: dict[str, bytes]) -> Manifest:
        return Manifest({p: FileEntry(hashlib.sha256(b).hexdigest(), len(b)) for p, b in files.items()})

    async def manifest(self, model: str, version: str, digest: str) -> Manifest:
        return self._manifest(self.files[digest])

    async def fetch_version(
        self, model: str, version: str, digest: str, into: Path, manifest: Manifest | None = None
    ) -> Manifest:
        self.fetches[(model, version, digest)] += 1
        if self.gate is not None:
            await self.gate.wait()
        try:
            for index, (path, data) in enumerate(sorted(self.files[digest].items())):
                write(into / path, data)
                if self.failures and index == 0:
                    self.failures -= 1
                    raise InternalError(f"file '{path}' is corrupt")
                await asyncio.sleep(0)
        except BaseException:
            shutil.rmtree(into, ignore_errors=True)
            raise
        return self._manifest(self.files[digest])


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def version_of(size: int, tag: str) -> dict[str, bytes]:
    """`size` bytes in two files, one of them in a subfolder, different for each tag."""
    data = (tag.encode() * size)[:size]
    return {"model.onnx": data[: size // 2], "sub/weights.bin": data[size // 2 :]}


def partials(root: Path) -> list[Path]:
    return [p for p in (root / ".partial").rglob("*") if p.is_file()] if (root / ".partial").exists() else []


async def test_a_miss_fetches_the_version_and_a_hit_reads_the_same_folder(tmp_path: Path) -> None:
    store = FakeStore()
    digest = store.add("m", "1", version_of(100, "a"))
    async with ModelCache(tmp_path / "cache", 1000) as cache:
        path = await cache.path_for(store, "m", "1", digest)
        again = await cache.path_for(store, "m", "1", digest)
        assert path == again == tmp_path / "cache" / digest / "m" / "1"
        # Laid out as a repository: a Python model's model_repository/model_version hold.
        assert path.name == "1" and path.parent.name == "m"
        assert (path / "sub" / "weights.bin").read_bytes() == version_of(100, "a")["sub/weights.bin"]
        assert store.fetches[("m", "1", digest)] == 1
        assert cache.pins("m", "1", digest) == 2
        assert cache.used_bytes == 100


async def test_concurrent_asks_for_one_version_share_one_fetch(tmp_path: Path) -> None:
    store = FakeStore()
    digest = store.add("m", "1", version_of(100, "a"))
    store.gate = asyncio.Event()
    async with ModelCache(tmp_path, 1000) as cache:
        asks = [asyncio.create_task(cache.path_for(store, "m", "1", digest)) for _ in range(3)]
        await asyncio.sleep(0.01)
        store.gate.set()
        paths = await asyncio.gather(*asks)
        assert len(set(paths)) == 1
        assert store.fetches[("m", "1", digest)] == 1
        assert cache.pins("m", "1", digest) == 3


async def test_an_asker_cancelled_mid_fetch_leaves_the_fetch_to_the_others(tmp_path: Path) -> None:
    store = FakeStore()
    digest = store.add("m", "1", version_of(100, "a"))
    store.gate = asyncio.Event()
    async with ModelCache(tmp_path, 1000) as cache:
        first = asyncio.create_task(cache.path_for(store, "m", "1", digest))
        second = asyncio.create_task(cache.path_for(store, "m", "1", digest))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        store.gate.set()
        path = await second
        assert (path / "model.onnx").exists()
        assert cache.pins("m", "1", digest) == 1  # the cancelled ask's pin was given back
        assert store.fetches[("m", "1", digest)] == 1


async def test_least_recently_used_unpinned_versions_are_evicted_to_stay_under_the_bound(
    tmp_path: Path,
) -> None:
    store = FakeStore()
    a, b, c = (store.add("m", v, version_of(100, v)) for v in ("1", "2", "3"))
    async with ModelCache(tmp_path, 250) as cache:
        async with cache.pinned(store, "m", "1", a):
            pass
        async with cache.pinned(store, "m", "2", b) as b_path:
            pass
        async with cache.pinned(store, "m", "1", a):  # a used again: b is now the least recent
            pass
        async with cache.pinned(store, "m", "3", c):
            assert cache.versions() == [("m", "1", a), ("m", "3", c)]
            assert cache.used_bytes == 200
        assert not b_path.exists()
        assert not (tmp_path / b).exists()  # its emptied parents went with it
        assert not any((tmp_path / ".trash").iterdir())


async def test_a_pinned_version_is_never_evicted_and_a_version_without_room_is_refused(
    tmp_path: Path,
) -> None:
    store = FakeStore()
    a, b, c = (store.add("m", v, version_of(100, v)) for v in ("1", "2", "3"))
    async with ModelCache(tmp_path, 250) as cache:
        a_path = await cache.path_for(store, "m", "1", a)
        b_path = await cache.path_for(store, "m", "2", b)
        with pytest.raises(Unavailable, match=r"no room: 200 bytes held by versions in use"):
            await cache.path_for(store, "m", "3", c)
        assert a_path.exists() and b_path.exists()
        assert store.fetches[("m", "3", c)] == 0  # refused before fetching anything
        assert cache.pins("m", "3", c) == 0
        cache.unpin("m", "2", b)
        await cache.path_for(store, "m", "3", c)
        assert a_path.exists() and not b_path.exists()


async def test_a_version_larger_than_the_cache_is_refused_with_the_sizes(tmp_path: Path) -> None:
    store = FakeStore()
    digest = store.add("big", "1", version_of(100, "a"))
    async with ModelCache(tmp_path, 50) as cache:
        with pytest.raises(
            Unavailable, match=r"model 'big' version 1 needs 100 bytes, more than the model cache"
        ):
            await cache.path_for(store, "big", "1", digest)


async def test_a_failed_fetch_leaves_no_partial_folder_and_is_tried_again(tmp_path: Path) -> None:
    store = FakeStore()
    digest = store.add("m", "1", version_of(100, "a"))
    store.failures = 1
    async with ModelCache(tmp_path, 1000) as cache:
        with pytest.raises(InternalError, match="corrupt"):
            await cache.path_for(store, "m", "1", digest)
        assert partials(tmp_path) == []
        assert not (tmp_path / digest).exists()
        assert cache.pins("m", "1", digest) == 0 and cache.used_bytes == 0
        path = await cache.path_for(store, "m", "1", digest)
        assert (path / "model.onnx").exists()
        assert store.fetches[("m", "1", digest)] == 2


async def test_closing_cancels_a_fetch_under_way_and_leaves_no_partial_folder(tmp_path: Path) -> None:
    store = FakeStore()
    digest = store.add("m", "1", version_of(100, "a"))
    store.gate = asyncio.Event()
    cache = ModelCache(tmp_path, 1000)
    await cache.start()
    ask = asyncio.create_task(cache.path_for(store, "m", "1", digest))
    await asyncio.sleep(0.01)
    await cache.close()
    await cache.close()  # twice is fine
    with pytest.raises(asyncio.CancelledError):
        await ask
    assert partials(tmp_path) == []
    assert not (tmp_path / digest).exists()


async def test_the_cache_survives_a_restart_with_its_order_of_use(tmp_path: Path) -> None:
    store = FakeStore()
    a, b, c = (store.add("m", v, version_of(100, v)) for v in ("1", "2", "3"))
    async with ModelCache(tmp_path, 1000) as cache:
        for version, digest in (("1", a), ("2", b), ("3", c), ("1", a)):
            async with cache.pinned(store, "m", version, digest):
                pass
    # What a crash leaves: a fetch cut short, an eviction cut short, an empty parent.
    (tmp_path / ".partial" / "x" / "1").mkdir(parents=True)
    (tmp_path / ".partial" / "x" / "1" / "model.onnx").write_bytes(b"half")
    (tmp_path / ".trash" / "y").mkdir(parents=True)
    (tmp_path / ("0" * 64) / "m").mkdir(parents=True)
    async with ModelCache(tmp_path, 1000) as cache:
        assert cache.versions() == [("m", "2", b), ("m", "3", c), ("m", "1", a)]
        assert cache.used_bytes == 300
        assert not (tmp_path / ".partial").exists() and not (tmp_path / ".trash").exists()
        assert not (tmp_path / ("0" * 64)).exists()
        await cache.path_for(store, "m", "2", b)
        assert sum(store.fetches.values()) == 3  # each version fetched once, before the restart
    # A bound lowered since: the least recently used go at start (2 was used last now).
    async with ModelCache(tmp_path, 200) as cache:
        assert cache.versions() == [("m", "1", a), ("m", "2", b)]
        assert cache.used_bytes == 200


async def test_one_cache_folder_serves_one_process_at_a_time(tmp_path: Path) -> None:
    async with ModelCache(tmp_path, 1000):
        with pytest.raises(Unavailable, match=r"in use by process .*--model-cache-dir"):
            await ModelCache(tmp_path, 1000).start()
    async with ModelCache(tmp_path, 1000):  # free again once closed
        pass


@pytest.mark.parametrize(
    ("model", "version", "digest"),
    [("../up", "1", "a" * 64), ("m", "0", "a" * 64), ("m", "x", "a" * 64), ("m", "1", "../" + "a" * 61)],
)
async def test_names_that_could_leave_the_cache_are_refused(
    tmp_path: Path, model: str, version: str, digest: str
) -> None:
    async with ModelCache(tmp_path, 1000) as cache:
        with pytest.raises(InvalidArgument):
            await cache.path_for(FakeStore(), model, version, digest)


async def test_unpinning_what_is_not_pinned_is_an_error(tmp_path: Path) -> None:
    async with ModelCache(tmp_path, 1000) as cache:
        with pytest.raises(ValueError, match="not pinned"):
            cache.unpin("m", "1", "a" * 64)


async def test_where_a_worker_finds_a_version_by_mode(tmp_path: Path) -> None:
    store = FakeStore()
    digest = store.add("m", "1", version_of(100, "a"))
    repository = tmp_path / "repo" / "m"
    (repository / "1").mkdir(parents=True)
    gone = str(tmp_path / "elsewhere" / "m")
    async with ModelCache(tmp_path / "cache", 1000) as cache:
        local = await local_version_dir(
            "m", str(repository), "1", digest, mode="auto", cache=cache, files=store
        )
        assert local.path == repository / "1" and store.fetches[("m", "1", digest)] == 0
        fetched = await local_version_dir("m", gone, "1", digest, mode="auto", cache=cache, files=store)
        assert fetched.path == tmp_path / "cache" / digest / "m" / "1"
        assert cache.pins("m", "1", digest) == 1
        fetched.release()
        fetched.release()  # twice is fine
        assert cache.pins("m", "1", digest) == 0
        stored = await local_version_dir(
            "m", str(repository), "1", digest, mode="store", cache=cache, files=store
        )
        assert stored.path == fetched.path
        stored.release()
        as_is = await local_version_dir("m", gone, "1", digest, mode="path", cache=cache, files=store)
        assert as_is.path == Path(gone) / "1"  # the backend says what is missing, as before
        with pytest.raises(Unavailable, match="is not on this host and the router published no files"):
            await local_version_dir("m", gone, "1", "", mode="auto", cache=cache, files=store)
