"""Model files through JetStream's object store (broker/objects.py), against a real nats-server:
a version pushed and fetched back byte for byte, files stored once, corruption and stalls caught
with the file named, the limits; and a worker with no repository serving from the store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from nats.aio.client import Client
from nats.js.object_store import ObjectStore

from broker import jetstream
from broker.objects import (
    FilesLimits,
    ModelFiles,
    file_object,
    manifest_object,
)
from broker.server import EmbeddedNatsServer
from examples.build_models import build
from natron.cli.push import push_repository
from natron.errors import InternalError, InvalidArgument, NotFound, Unavailable
from tests.harness import Mesh

MiB = 1024 * 1024


@pytest.fixture
async def nc(nats_server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    client = await jetstream.connect(nats_server.url, name="test-objects")
    yield client
    await jetstream.close_connection(client)


@pytest.fixture
def bucket() -> str:
    # A bucket per test keeps the tests' objects apart on one server.
    return f"t{uuid.uuid4().hex[:8]}_files"


@pytest.fixture
async def files(nc: Client, bucket: str) -> ModelFiles:
    model_files = ModelFiles(nc, bucket)
    await model_files.ensure_bucket("file", 1)
    return model_files


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("object_store_models")
    build(repository, ["tiny", "versioned"], quiet=True)
    return repository


def read_tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


async def object_names(nc: Client, bucket: str, prefix: str) -> set[str]:
    store = await nc.jetstream().object_store(bucket)
    return {info.name for info in await store.list(ignore_deletes=True) if info.name.startswith(prefix)}


async def test_a_pushed_version_is_fetched_back_byte_for_byte(
    files: ModelFiles, tiny_repository: Path, tmp_path: Path
) -> None:
    folder = tiny_repository / "tiny" / "1"
    digest = await files.push_version("tiny", "1", folder)
    manifest = await files.manifest("tiny", "1", digest)
    assert manifest.digest == digest
    assert sorted(manifest.files) == sorted(read_tree(folder))
    into = tmp_path / "fetched" / "1"
    await files.fetch_version("tiny", "1", digest, into)
    assert read_tree(into) == read_tree(folder)
    # The same folder again: the same digest, found by its stat signature.
    assert await files.push_version("tiny", "1", folder) == digest
    # A fetch never writes over a folder that exists.
    with pytest.raises(InvalidArgument, match="exists already"):
        await files.fetch_version("tiny", "1", digest, into)


async def test_a_file_the_store_holds_is_not_stored_again(
    nc: Client, bucket: str, files: ModelFiles, tiny_repository: Path, tmp_path: Path
) -> None:
    digest = await files.push_version("tiny", "1", tiny_repository / "tiny" / "1")
    stored = await object_names(nc, bucket, "sha256/")
    # The same files elsewhere, under another name: another signature, the same contents.
    copy = tmp_path / "copy" / "1"
    shutil.copytree(tiny_repository / "tiny" / "1", copy)
    assert await files.push_version("tiny_copy", "1", copy) == digest
    assert await object_names(nc, bucket, "sha256/") == stored
    assert await object_names(nc, bucket, "manifests/") == {
        manifest_object("tiny", "1", digest),
        manifest_object("tiny_copy", "1", digest),
    }
    # A changed file: a new digest, and only that file is added.
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    changed = await files.push_version("tiny_copy", "1", copy)
    assert changed != digest
    assert len(await object_names(nc, bucket, "sha256/") - stored) == 1


@pytest.mark.parametrize("replacement", [b"not the model", b"x" * 100_000], ids=["smaller", "larger"])
async def test_a_corrupt_object_fails_the_fetch_naming_the_file_and_leaves_no_folder(
    nc: Client, bucket: str, files: ModelFiles, tiny_repository: Path, tmp_path: Path, replacement: bytes
) -> None:
    digest = await files.push_version("tiny", "1", tiny_repository / "tiny" / "1")
    entry = (await files.manifest("tiny", "1", digest)).files["model.onnx"]
    store = await nc.jetstream().object_store(bucket)
    await store.put(file_object(entry.sha256), replacement)  # other bytes under its name
    into = tmp_path / "fetched" / "1"
    with pytest.raises(InternalError, match=r"model 'tiny' version 1: file 'model\.onnx'.* is corrupt"):
        await ModelFiles(nc, bucket).fetch_version("tiny", "1", digest, into)
    assert not into.exists()


async def test_a_missing_object_or_manifest_is_not_found_and_leaves_no_folder(
    nc: Client, bucket: str, files: ModelFiles, tiny_repository: Path, tmp_path: Path
) -> None:
    digest = await files.push_version("tiny", "1", tiny_repository / "tiny" / "1")
    entry = (await files.manifest("tiny", "1", digest)).files["model.onnx"]
    store = await nc.jetstream().object_store(bucket)
    await store.delete(file_object(entry.sha256))
    into = tmp_path / "fetched" / "1"
    with pytest.raises(NotFound, match=r"file 'model\.onnx' .* is not in the model store"):
        await files.fetch_version("tiny", "1", digest, into)
    assert not into.exists()
    with pytest.raises(NotFound, match="no manifest"):
        await files.manifest("tiny", "2", digest)
    with pytest.raises(Unavailable, match="no model store bucket"):
        await ModelFiles(nc, f"{bucket}_none").manifest("tiny", "1", digest)


async def test_a_multi_mib_file_streams_in_small_chunks(nc: Client, bucket: str, tmp_path: Path) -> None:
    folder = tmp_path / "big" / "1"
    folder.mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(5 * MiB + 123)
    (folder / "model.bin").write_bytes(payload)
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "nested" / "deeper" / "empty.txt").write_bytes(b"")
    files = ModelFiles(nc, bucket, chunk_bytes=64 * 1024)
    await files.ensure_bucket("memory", 1)
    digest = await files.push_version("big", "1", folder)
    sha = (await files.manifest("big", "1", digest)).files["model.bin"].sha256
    info = await (await nc.jetstream().object_store(bucket)).get_info(file_object(sha))
    assert info.chunks == -(-len(payload) // (64 * 1024))  # 81 chunks of 64 KiB
    into = tmp_path / "fetched" / "1"
    await ModelFiles(nc, bucket).fetch_version("big", "1", digest, into)
    assert read_tree(into) == read_tree(folder)


async def test_a_fetch_whose_chunks_never_come_ends_at_the_stall_timeout(
    nc: Client, bucket: str, files: ModelFiles, tmp_path: Path
) -> None:
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"x" * 300_000)
    digest = await files.push_version("m", "1", folder)
    sha = (await files.manifest("m", "1", digest)).files["model.bin"].sha256
    js = nc.jetstream()
    info = await (await js.object_store(bucket)).get_info(file_object(sha))
    # The chunks gone, the object's description left: a reader would wait for ever.
    await js.purge_stream(f"OBJ_{bucket}", subject=f"$O.{bucket}.C.{info.nuid}")
    into = tmp_path / "fetched" / "1"
    subscriptions = len(nc._subs)
    with pytest.raises(
        Unavailable, match=r"file 'model\.bin': no data from the model store for 1 s after 0 of 300000 bytes"
    ):
        await ModelFiles(nc, bucket, stall_timeout_s=1.0).fetch_version("m", "1", digest, into)
    assert not into.exists()
    assert len(nc._subs) == subscriptions  # the reader's subscription went with it


async def test_versions_over_the_limits_are_refused_before_anything_is_sent(
    nc: Client, bucket: str, tmp_path: Path
) -> None:
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (folder / name).write_bytes(b"0123456789")
    few = ModelFiles(nc, bucket, limits=FilesLimits(max_files=2))
    await few.ensure_bucket()
    with pytest.raises(InvalidArgument, match=r"model 'm' version 1: more than the 2 files"):
        await few.push_version("m", "1", folder)
    small = ModelFiles(nc, bucket, limits=FilesLimits(max_version_bytes=20))
    with pytest.raises(InvalidArgument, match=r"30 bytes of files, more than the 20 bytes"):
        await small.push_version("m", "1", folder)
    with pytest.raises(InvalidArgument, match="is not a directory"):
        await few.push_version("m", "2", folder / "missing")
    store = await nc.jetstream().object_store(bucket)
    assert (await store.status()).size == 0  # nothing was sent


async def test_a_manifest_naming_a_path_outside_its_folder_is_refused(
    nc: Client, bucket: str, files: ModelFiles, tmp_path: Path
) -> None:
    body = json.dumps({"files": {"../escape": {"sha256": "0" * 64, "size": 0}}}, sort_keys=True).encode()
    digest = hashlib.sha256(body).hexdigest()
    store: ObjectStore = await nc.jetstream().object_store(bucket)
    await store.put(manifest_object("m", "1", digest), body)
    with pytest.raises(InternalError, match=r"manifest .* is invalid: file path '\.\./escape'"):
        await files.fetch_version("m", "1", digest, tmp_path / "fetched" / "1")
    assert not (tmp_path / "fetched").exists()
    assert not (tmp_path / "escape").exists()


async def test_push_repository_pushes_every_version_of_every_model(
    nats_server: EmbeddedNatsServer, nc: Client, bucket: str, tiny_repository: Path, tmp_path: Path
) -> None:
    pushed = await push_repository(nats_server.url, bucket, tiny_repository)
    assert sorted(pushed) == ["tiny", "versioned"]
    assert sorted(pushed["versioned"]) == ["1", "2", "3"]
    files = ModelFiles(nc, bucket)
    for model, versions in pushed.items():
        for version, digest in versions.items():
            into = tmp_path / model / version
            await files.fetch_version(model, version, digest, into)
            assert read_tree(into) == read_tree(tiny_repository / model / version)


async def test_concurrent_fetches_of_one_version_each_get_a_whole_copy(
    files: ModelFiles, tiny_repository: Path, tmp_path: Path
) -> None:
    digest = await files.push_version("tiny", "1", tiny_repository / "tiny" / "1")
    targets = [tmp_path / str(i) / "1" for i in range(4)]
    await asyncio.gather(*(files.fetch_version("tiny", "1", digest, t) for t in targets))
    for target in targets:
        assert read_tree(target) == read_tree(tiny_repository / "tiny" / "1")


# -- a worker without the repository ---------------------------------------------------------------

# A Python model that reads a file of its version folder the way Triton's models do, through
# args["model_repository"] and args["model_version"]: served from the cache, they must point there.
PY_WEIGHTS_MODEL = """
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "weights.txt")
        with open(path) as f:
            self.offset = float(f.read())

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + self.offset).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

PY_WEIGHTS_CONFIG = """name: "py_weights"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Path]]:
    """Router, gateway and a worker that reads no repository: started in an empty folder, told to
    take every version from the model store (`--model-files store`), its cache in a folder of
    its own. The router serves a repository with a Python model, in explicit mode."""
    repository = tmp_path_factory.mktemp("remote_models")
    (repository / "py_weights" / "1").mkdir(parents=True)
    (repository / "py_weights" / "config.pbtxt").write_text(PY_WEIGHTS_CONFIG)
    (repository / "py_weights" / "1" / "model.py").write_text(PY_WEIGHTS_MODEL)
    (repository / "py_weights" / "1" / "weights.txt").write_text("10.0")
    cwd, cache = tmp_path_factory.mktemp("empty_cwd"), tmp_path_factory.mktemp("worker_cache")
    mesh = Mesh(repository, ["--model-control-mode", "explicit", "--load-model", "py_weights"])
    try:
        mesh.start_nats()
        mesh.start_router()
        log = (mesh.logs / "remote.log").open("ab")
        mesh.processes["remote"] = subprocess.Popen(
            [
                sys.executable, "-m", "natron", "worker", "--nats-url", mesh.nats_url,
                "--worker-id", "remote", "--model-files", "store", "--model-cache-dir", str(cache),
                "--nats-creds", str(mesh.creds("worker")), "--log-level", "info",
            ],
            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=os.environ.copy(),
        )  # fmt: skip
        mesh.start_gateway()
        mesh.wait_ready("py_weights")
        yield mesh, cache
    finally:
        mesh.stop()  # the remote worker with the rest: it is one of mesh.processes


def test_a_worker_without_the_repository_serves_a_python_model_from_the_store(
    remote: tuple[Mesh, Path],
) -> None:
    mesh, cache = remote
    body = {"inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    response = requests.post(f"{mesh.url}/v2/models/py_weights/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [11.0, 12.0, 13.0, 14.0]
    # Its files came through the cache, laid out as a repository.
    assert [p.relative_to(cache).parts[1:] for p in cache.rglob("weights.txt")] == [
        ("py_weights", "1", "weights.txt")
    ]


def test_a_worker_without_the_repository_serves_a_model_loaded_by_upload(
    remote: tuple[Mesh, Path], tmp_path: Path
) -> None:
    mesh, cache = remote
    build(tmp_path, ["tiny"], quiet=True)
    client = httpclient.InferenceServerClient(mesh.url.removeprefix("http://"), network_timeout=120)
    config = {
        "name": "uploaded",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
    }
    onnx_bytes = (tmp_path / "tiny" / "1" / "model.onnx").read_bytes()
    client.load_model("uploaded", config=json.dumps(config), files={"file:1/model.onnx": onnx_bytes})
    inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.full((1, 16), 3.0, dtype=np.float32))
    out = client.infer("uploaded", [inp]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((1, 16), 7.0, dtype=np.float32))
    assert [p.read_bytes() for p in cache.rglob("model.onnx")] == [onnx_bytes]


async def test_natron_push_prints_the_digests_workers_fetch(
    nats_server: EmbeddedNatsServer, nc: Client, tiny_repository: Path, tmp_path: Path
) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "natron", "push", str(tiny_repository), "--nats-url", nats_server.url]
    process = await asyncio.create_subprocess_exec(
        *command, "--prefix", prefix, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    pushed = json.loads(out)
    assert sorted(pushed["versioned"]) == ["1", "2", "3"]
    into = tmp_path / "tiny" / "1"
    await ModelFiles(nc, f"{prefix}_files").fetch_version("tiny", "1", pushed["tiny"]["1"], into)
    assert read_tree(into) == read_tree(tiny_repository / "tiny" / "1")
    # A repository that is not there is refused by name, before anything connects.
    process = await asyncio.create_subprocess_exec(
        *command[:4], str(tmp_path / "nowhere"), *command[5:], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and b"is not a directory" in err
