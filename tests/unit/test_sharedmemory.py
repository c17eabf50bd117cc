"""gateway.sharedmemory without a broker: mapping a client's POSIX shared memory object, the
checks on keys, offsets and sizes, and the bucket's key layout. The registry itself, whose
registrations live in a KV bucket, is tested against a real nats-server in
tests/mesh/test_shared_memory.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sharedmemory import (
    SHM_DIR,
    MappedRegion,
    RegionMiss,
    SharedMemoryRegistry,
    SystemRegion,
    host_scope,
    region_key,
    region_name,
)
from natron.errors import InvalidArgument, NotFound, Unavailable, Unsupported

pytestmark = pytest.mark.unit


@pytest.fixture
def shm_object() -> Iterator[Path]:
    """A 64 KiB POSIX shared memory object (what shm_open + ftruncate make), removed after."""
    path = SHM_DIR / f"natron-test-{uuid.uuid4().hex}"
    with path.open("wb") as f:
        f.truncate(65536)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def region(path: Path, offset: int = 0, byte_size: int = 64, name: str = "r") -> SystemRegion:
    return SystemRegion(name, "/" + path.name, offset, byte_size)


def test_a_window_reads_and_writes_the_object_at_the_regions_offset(shm_object: Path) -> None:
    # An offset that is no multiple of the page size: the mapping starts below it.
    mapped = MappedRegion.open(region(shm_object, offset=5000, byte_size=100))
    try:
        window = mapped.window(10, 4)
        window[:] = b"abcd"
        with shm_object.open("rb") as f:
            f.seek(5010)
            assert f.read(4) == b"abcd"
            f.seek(0)
            assert f.read(5010) == bytes(5010)
        with shm_object.open("r+b") as f:
            f.seek(5000)
            f.write(b"wxyz")
        assert bytes(mapped.window(0, 4)) == b"wxyz"
    finally:
        mapped.close()


def test_a_missing_key_cannot_be_opened_in_tritons_words() -> None:
    with pytest.raises(InvalidArgument, match="Unable to open shared memory region: '/natron-no-such-key'"):
        MappedRegion.open(SystemRegion("r", "/natron-no-such-key", 0, 8))


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("/", "cannot register shared memory region 'r' - invalid shm key '/'"),
        ("///", "invalid shm key '///'"),
        (
            "/triton_python_backend_shm_region_1",
            "contains the reserved prefix 'triton_python_backend_shm_region_'",
        ),
        ("/../etc/passwd", "invalid shm key '/../etc/passwd': a key is '/' and a name"),
        ("/a/b", "invalid shm key '/a/b'"),
        ("/..", "invalid shm key '/..'"),
        ("/" + "k" * 256, "a name of at most 255 bytes"),
        ("/a\0b", "invalid shm key"),
    ],
)
def test_keys_that_are_no_shared_memory_object_name_are_refused(key: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        MappedRegion.open(SystemRegion("r", key, 0, 8))


def test_a_key_without_its_leading_slash_names_the_same_object(shm_object: Path) -> None:
    MappedRegion.open(SystemRegion("r", shm_object.name, 0, 8)).close()


def test_a_region_past_the_end_of_its_object_is_refused(shm_object: Path) -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"failed to register shared memory region 'r': invalid args: offset 65000 \+ byte_size 1000 "
        r"runs past the 65536 bytes",
    ):
        MappedRegion.open(region(shm_object, offset=65000, byte_size=1000))


def test_a_directory_is_no_shared_memory_object() -> None:
    path = SHM_DIR / f"natron-test-{uuid.uuid4().hex}"
    path.mkdir()
    try:
        with pytest.raises(
            InvalidArgument, match=r"Unable to open shared memory region|not a shared memory object"
        ):
            MappedRegion.open(SystemRegion("r", "/" + path.name, 0, 8))
    finally:
        path.rmdir()


def test_a_symlink_in_the_shared_memory_directory_is_not_followed(shm_object: Path) -> None:
    link = SHM_DIR / f"natron-test-{uuid.uuid4().hex}"
    link.symlink_to(shm_object)
    try:
        with pytest.raises(InvalidArgument, match="Unable to open shared memory region"):
            MappedRegion.open(SystemRegion("r", "/" + link.name, 0, 8))
    finally:
        link.unlink()


@pytest.mark.parametrize(
    ("offset", "byte_size", "match"),
    [
        (64, 0, r"Invalid offset for shared memory region: 'r': offset 64 is not within its 64 bytes"),
        (2**70, 1, "Invalid offset for shared memory region: 'r'"),
        (60, 8, r"Invalid offset \+ byte size for shared memory region: 'r': offset 60 \+ byte size 8"),
        (0, 65, r"Invalid offset \+ byte size for shared memory region: 'r'"),
        (1, 2**64, r"Invalid offset \+ byte size for shared memory region: 'r'"),
    ],
)
def test_windows_outside_the_region_are_refused(
    shm_object: Path, offset: int, byte_size: int, match: str
) -> None:
    mapped = MappedRegion.open(region(shm_object))
    try:
        with pytest.raises(InvalidArgument, match=match):
            mapped.window(offset, byte_size)
        assert len(mapped.window(0, 64)) == 64
        assert len(mapped.window(63, 1)) == 1
        assert len(mapped.window(10, 0)) == 0
    finally:
        mapped.close()


def test_an_object_cut_short_after_registering_is_refused_not_a_crash(shm_object: Path) -> None:
    # Touching a mapped page past the end of the object would be SIGBUS for the whole process.
    mapped = MappedRegion.open(region(shm_object, offset=8192, byte_size=4096))
    try:
        os.truncate(shm_object, 4096)
        with pytest.raises(
            InvalidArgument,
            match=r"shared memory region 'r' is no longer usable: its key .* was cut to 4096 bytes",
        ):
            mapped.window(0, 8)
    finally:
        mapped.close()


def test_a_view_in_use_keeps_the_mapping_after_close(shm_object: Path) -> None:
    mapped = MappedRegion.open(region(shm_object))
    window = mapped.window(0, 4)
    mapped.close()  # unregistered while a request holds a view: unmapped with the last view
    window[:] = b"live"
    with shm_object.open("rb") as f:
        assert f.read(4) == b"live"
    window.release()


def test_the_host_scope_is_stable_and_a_valid_key_token(tmp_path: Path) -> None:
    scope = host_scope()
    assert scope is not None
    assert scope == host_scope()
    assert all(c.isalnum() or c in "-_" for c in scope)
    assert host_scope(tmp_path / "absent") is None
    # Another mount (here: another file system) is another scope.
    assert host_scope(tmp_path) != scope or os.stat(tmp_path).st_dev == os.stat(SHM_DIR).st_dev


@given(name=st.text(min_size=1, max_size=40))
def test_any_region_name_makes_a_valid_kv_key_and_comes_back(name: str) -> None:
    key = region_key("scope-1b", name)
    token = key.split(".", 1)[1]
    assert key.startswith("scope-1b.")
    assert token and all(c.isalnum() or c in "-_" for c in token)
    assert region_name(key) == name


def test_a_key_that_holds_no_region_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a shared memory region key"):
        region_name("no-dot")
    with pytest.raises(ValueError, match="not a shared memory region key"):
        region_name("scope.____")  # decodes to bytes that are not UTF-8


def test_a_registration_round_trips_through_json_and_malformed_ones_are_refused() -> None:
    import orjson

    original = SystemRegion("r", "/k", 8, 64)
    assert SystemRegion.from_json(orjson.dumps(original.status())) == original
    with pytest.raises(ValueError, match="malformed"):
        SystemRegion.from_json(orjson.dumps({"name": "r", "key": 3, "offset": 0, "byte_size": 1}))
    with pytest.raises(KeyError):
        SystemRegion.from_json(orjson.dumps({"name": "r"}))


async def test_a_registry_not_started_answers_unavailable_and_knows_no_region() -> None:
    registry = SharedMemoryRegistry()
    with pytest.raises(RegionMiss, match="Unable to find shared memory region: 'r'"):
        registry.window("r", 0, 8)
    with pytest.raises(Unavailable, match="has not connected its shared memory registry"):
        await registry.register_system("r", "/k", 0, 8)
    with pytest.raises(Unavailable):
        await registry.system_status(None)
    await registry.stop()


async def test_cuda_shared_memory_is_a_501_that_says_why_and_has_no_regions() -> None:
    registry = SharedMemoryRegistry()
    with pytest.raises(Unsupported, match=r"CUDA shared memory is not supported: .*no CUDA context"):
        await registry.register_cuda("g", b"\0" * 64, 0, 1024)
    assert await registry.cuda_status(None) == []
    with pytest.raises(NotFound, match="Unable to find cuda shared memory region: 'g'"):
        await registry.cuda_status("g")
    await registry.unregister_cuda(None)
    await registry.unregister_cuda("g")
