"""Input hardening against a real `natron serve`: a huge request cannot freeze the gateway, a
body or header that does not decode is a 400, the metrics count what the client got, uploads
are bounded and named safely and leave no folder behind, and a load's config names no file
outside the model's folder."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Served, natron_serve

pytestmark = pytest.mark.mesh

TINY_INPUT = {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}
INFER = "/v2/models/tiny/infer"


def raw_request(address: str, request: bytes, timeout_s: float = 30) -> tuple[int, bytes]:
    """One request over a socket of its own: the status and the rest of the answer."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed without an answer: {answer!r}"
            answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head.split(b" ")[1]), rest


def post_raw(served: Served, body: bytes, *headers: bytes, path: str = INFER) -> tuple[int, str]:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (path.encode(), len(body))
    status, rest = raw_request(
        served.host_port, head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    )
    return status, rest.decode(errors="replace")


def counted(served: Served, model: str, status: int) -> float:
    text = requests.get(served.metrics_url, timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "natron_gateway_requests":
            return sum(
                sample.value
                for sample in family.samples
                if sample.name.endswith("_total")
                and sample.labels.get("model") == model
                and sample.labels.get("status") == str(status)
            )
    return 0.0


# -- one request cannot freeze the gateway ---------------------------------------------------


class LivenessProbe:
    """Polls /v2/health/live on connections of its own while a test runs; the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest_s = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert session.get(f"{self.url}/v2/health/live", timeout=60).status_code == 200
                self.slowest_s = max(self.slowest_s, time.perf_counter() - started)
                self.answers += 1
                time.sleep(0.005)

    def __enter__(self) -> LivenessProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_a_hundred_thousand_outputs_neither_freeze_the_gateway_nor_go_unanswered(
    served: Served, encoding: str
) -> None:
    # 2 MB naming 100,000 outputs once held the event loop for 57 s. Plain, the request takes
    # the infer fast path; gzipped, aiohttp's route.
    doc = {"inputs": [TINY_INPUT], "outputs": [{"name": f"OUTPUT{i}"} for i in range(100_000)]}
    body = json.dumps(doc).encode()
    headers = {"Content-Type": "application/json"}
    if encoding == "gzip":
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    with LivenessProbe(served.url) as probe:
        time.sleep(0.1)
        for _ in range(5):
            response = requests.post(f"{served.url}{INFER}", data=body, headers=headers, timeout=60)
            assert response.status_code == 400, response.text[:500]
            assert "lists 100000 tensors, but model 'tiny' has only 1 outputs" in response.json()["error"]
        time.sleep(0.1)
    assert probe.answers > 0
    # Generous: proves "not blocked" (57 s before), not a latency figure (bench/ has those).
    assert probe.slowest_s < 1.0


# -- malformed at the HTTP or encoding level: a 400, counted as one ----------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_body_that_does_not_decode_is_a_400_counted_as_400(served: Served, encoding: str) -> None:
    before = counted(served, "tiny", 400)
    data, headers = b"this is not " + encoding.encode(), {"Content-Encoding": encoding}
    response = requests.post(f"{served.url}{INFER}", data=data, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "body" in error and "internal" not in error and "Error" not in error.split(":")[0]
    assert counted(served, "tiny", 400) == before + 1
    assert counted(served, "tiny", 500) == 0


def test_a_body_that_decodes_is_served_whatever_its_encoding(served: Served) -> None:
    body = json.dumps({"inputs": [TINY_INPUT]}).encode()
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        response = requests.post(
            f"{served.url}{INFER}", data=data, headers={"Content-Encoding": encoding}, timeout=30
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "aiohttp"])
@pytest.mark.parametrize("header", [b"traceparent", b"tracestate", b"Inference-Header-Content-Length"])
def test_a_header_value_that_is_not_utf8_is_a_400_naming_it(
    served: Served, fast: bool, header: bytes
) -> None:
    body = json.dumps({"inputs": [TINY_INPUT]}).encode()
    extra = [] if fast else [b"Content-Encoding: identity"]  # any Content-Encoding goes to aiohttp
    status, rest = post_raw(served, body, header + b": 00-\xff\xfe-01", *extra)
    assert status == 400, rest
    assert f"header '{header.decode()}'" in rest or "Inference-Header-Content-Length" in rest, rest


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
@pytest.mark.parametrize("header", [b"traceparent", b"tracestate"])
def test_a_trace_header_that_is_not_utf8_is_a_400_on_the_generate_routes(
    served: Served, route: str, header: bytes
) -> None:
    body = json.dumps({"INPUT0": list(range(16)), "INPUT1": [1] * 16}).encode()
    status, rest = post_raw(served, body, header + b": 00-\xff\xfe-01", path=f"/v2/models/simple/{route}")
    assert status == 400, rest
    assert f"header '{header.decode()}' is not valid UTF-8" in rest, rest


@pytest.mark.parametrize("header", [b"traceparent", b"tracestate"])
def test_a_websocket_upgrade_with_a_trace_header_that_is_not_utf8_is_refused_with_a_400(
    served: Served, header: bytes
) -> None:
    head = (
        b"GET /v2/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    status, rest = raw_request(served.host_port, head + header + b": 00-\xff\xfe-01\r\n\r\n")
    assert status == 400, rest
    assert f"header '{header.decode()}' is not valid UTF-8" in rest.decode(errors="replace")
    # The same upgrade with a good header is taken.
    status, _ = raw_request(served.host_port, head + header + b": 00-ok-01\r\n\r\n")
    assert status == 101


def test_a_body_over_the_limit_is_a_413_naming_the_flag_and_counted_as_413(served: Served) -> None:
    before = counted(served, "tiny", 413)
    response = requests.post(f"{served.url}{INFER}", data=b" " * (9 * 1024 * 1024), timeout=60)
    assert response.status_code == 413, response.text
    assert "--max-body-mb" in response.json()["error"]
    assert counted(served, "tiny", 413) == before + 1
    assert counted(served, "tiny", 500) == 0


# -- uploads and config overrides --------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, Path]]:
    uploads = tmp_path_factory.mktemp("uploads")
    args = (
        "--model-control-mode", "explicit", "--load-model", "tiny", "--upload-dir", str(uploads),
        "--max-upload-files", "20", "--max-payload-mb", "8",
    )  # fmt: skip
    with natron_serve(model_repository, ["tiny"], tmp_path_factory.mktemp("explicit"), args) as served:
        yield served, uploads


UPLOADED_CONFIG = {
    "name": "uploaded",
    "platform": "onnxruntime_onnx",
    "max_batch_size": 4,
    "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
}


def load(served: Served, model: str, parameters: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{served.url}/v2/repository/models/{model}/load", json={"parameters": parameters}, timeout=120
    )


def upload(served: Served, model: str, files: dict[str, bytes], config: dict[str, Any]) -> requests.Response:
    parameters: dict[str, Any] = {"config": json.dumps({**config, "name": model})}
    parameters.update({f"file:{path}": base64.b64encode(data).decode() for path, data in files.items()})
    return load(served, model, parameters)


def folders(uploads: Path, model: str) -> list[Path]:
    return sorted((uploads / model).iterdir()) if (uploads / model).exists() else []


@pytest.mark.parametrize(
    ("path", "fragment"),
    [("²/x", "version folder"), ("1/" + "n" * 300, "longer than 255 bytes"), ("1/a\u0007", "control")],
)
def test_a_bad_upload_name_is_a_400_naming_the_file_without_host_paths(
    explicit: tuple[Served, Path], path: str, fragment: str
) -> None:
    served, uploads = explicit
    response = upload(served, "badname", {path: b"x"}, UPLOADED_CONFIG)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error and "invalid file path" in error
    assert str(uploads) not in error and "/tmp" not in error
    assert folders(uploads, "badname") == []


def test_an_upload_over_the_file_count_is_a_400_naming_the_flag(explicit: tuple[Served, Path]) -> None:
    served, uploads = explicit
    response = upload(served, "many", {f"1/f{i}": b"x" for i in range(21)}, UPLOADED_CONFIG)
    assert response.status_code == 400, response.text
    assert "21 files" in response.json()["error"] and "--max-upload-files" in response.json()["error"]
    assert folders(uploads, "many") == []


def test_reloads_and_unloads_leave_no_upload_folder_behind(
    explicit: tuple[Served, Path], model_repository: Path
) -> None:
    served, uploads = explicit
    onnx = (model_repository / "tiny" / "1" / "model.onnx").read_bytes()
    for _ in range(3):
        response = upload(served, "uploaded", {"1/model.onnx": onnx}, UPLOADED_CONFIG)
        assert response.status_code == 200, response.text
        # The load that replaced the model answered: only its own folder is left.
        assert len(folders(uploads, "uploaded")) == 1
    serving = folders(uploads, "uploaded")
    # A load that fails leaves the model serving from its folder, and its own folder goes.
    response = upload(served, "uploaded", {"1/model.onnx": b"not an onnx file"}, UPLOADED_CONFIG)
    assert response.status_code == 400, response.text
    assert folders(uploads, "uploaded") == serving
    body = {"inputs": [TINY_INPUT]}
    assert requests.post(f"{served.url}/v2/models/uploaded/infer", json=body, timeout=30).status_code == 200
    response = requests.post(f"{served.url}/v2/repository/models/uploaded/unload", timeout=120)
    assert response.status_code == 200, response.text
    assert folders(uploads, "uploaded") == []


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"default_model_filename": "../../../x/1/model.py"}, "inside the version folder"),
        ({"parameters": {"EXECUTION_ENV_PATH": {"string_value": "/tmp/env.tar.gz"}}}, "EXECUTION_ENV_PATH"),
    ],
)
def test_a_load_config_naming_a_file_outside_the_model_is_refused(
    explicit: tuple[Served, Path],
    model_repository: Path,
    tmp_path: Path,
    override: dict[str, Any],
    fragment: str,
) -> None:
    served, _ = explicit
    # A python model where ../../../x/1/model.py leads from tiny/1/, outside every model
    # folder, which would leave a mark if it ever ran.
    marker = tmp_path / "ran"
    outside = model_repository.parent / "x" / "1"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = {"name": "tiny", "backend": "python", "max_batch_size": 4, **override}
    response = load(served, "tiny", {"config": json.dumps(config)})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    assert not marker.exists()
    # The model serves on as it was.
    assert requests.post(f"{served.url}{INFER}", json={"inputs": [TINY_INPUT]}, timeout=30).status_code == 200
