"""The four ways `natron perf` reaches a model: KServe v2 over HTTP (binary tensor data or JSON),
gRPC (grpc.aio; tritonclient's client for the questions), natron's WebSocket (/v2/ws) and
straight NATS (the gateway's own `Requester`).

Each client does the same four things: describe the model (its config and the version that
serves), build what it sends once, send one request and decode its answer, and read the
statistics extension. A failed request raises `RequestFailed`; `gone` marks the failures that
mean the server is not there (refused, reset, closed, the NATS connection lost), which the load
generator tells apart from a server that answers with errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from broker.auth import ClientAuth
from broker.jetstream import close_connection, connect
from broker.requester import Requester
from broker.subjects import Subjects
from natron.datatypes import (
    BINARY_ONLY,
    BYTES,
    config_to_datatype,
    deserialize_bytes,
    from_raw,
    to_numpy_dtype,
    to_raw,
)
from natron.errors import NatronError
from natron.inference import InferRequest, Tensor
from natron.perf.http1 import ConnectionFailed, Http1Pool
from natron.perf.results import PerfError
from natron.perf.target import Target
from natron.records import READY, ModelRecord

Array = npt.NDArray[Any]
Outputs = dict[str, Array]
# Input name -> (datatype, array), in the model config's input order.
Inputs = dict[str, tuple[str, Array]]

_HEADER_LENGTH: Final = "Inference-Header-Content-Length"
_LENGTH: Final = struct.Struct("<I")
# A question about the model or its statistics waits at most this long (or the target's
# timeout, when shorter): a server that does not answer them is reported, not waited for.
_QUESTION_TIMEOUT_S: Final = 10.0


class RequestFailed(Exception):
    """One request that got no good answer; `gone`: the server was not reachable at all."""

    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension; -1 for a variable one


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str  # the version requests go to (resolved when the target named none)
    max_batch_size: int
    inputs: tuple[InputSpec, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, datatype) of every output


@dataclass(slots=True)
class Answer:
    outputs: Outputs
    send_ns: int = 0  # the client's own work before the request left
    recv_ns: int = 0  # the client's own work decoding the answer


def model_info(model: str, version: str, config: Mapping[str, Any]) -> ModelInfo:
    """ModelInfo from a model config in Triton's JSON form (HTTP, gRPC's JSON, the NATS record)."""
    try:
        inputs = tuple(
            InputSpec(
                str(i["name"]), config_to_datatype(str(i["data_type"])), tuple(int(d) for d in i["dims"])
            )
            for i in config.get("input", [])
        )
        outputs = tuple(
            (str(o["name"]), config_to_datatype(str(o["data_type"]))) for o in config.get("output", [])
        )
        max_batch_size = int(config.get("max_batch_size", 0))
    except (KeyError, TypeError, ValueError, Exception) as exc:  # InvalidArgument: an unknown type
        raise PerfError(f"model '{model}' has a config natron perf cannot read: {exc}") from None
    if not inputs:
        raise PerfError(f"model '{model}' has no inputs in its config")
    return ModelInfo(model, version, max_batch_size, inputs, outputs)


def highest(versions: list[str]) -> list[str]:
    """Versions, highest first (numbers compared as numbers)."""
    return sorted(versions, key=lambda v: (int(v) if v.isdigit() else -1, v), reverse=True)


def server_stats(stats: Mapping[str, Any] | None) -> dict[str, float]:
    """The `inference_stats` of a model's statistics entry as flat counters: "<kind>_count" and
    "<kind>_ns" for success, queue and the three compute stages (missing ones are 0, as gRPC's
    JSON leaves zeros out)."""
    flat: dict[str, float] = {}
    for kind in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        entry = (stats or {}).get(kind) or {}
        flat[f"{kind}_count"] = float(entry.get("count", 0))
        flat[f"{kind}_ns"] = float(entry.get("ns", 0))
    return flat


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _decode_json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> Array:
    if datatype == BYTES:
        items = [
            d.encode() if isinstance(d, str) else bytes(d) for d in np.asarray(data, dtype=object).ravel()
        ]
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(shape)
    return np.asarray(data, dtype=to_numpy_dtype(datatype)).reshape(shape)


def decode_kserve(doc: Mapping[str, Any], binary: memoryview) -> Outputs:
    """The outputs of a KServe v2 response: each either JSON `data` or `binary_data_size` bytes
    of `binary`, in output order."""
    outputs: Outputs = {}
    offset = 0
    for output in doc.get("outputs", []):
        name, datatype, shape = output["name"], output["datatype"], [int(d) for d in output["shape"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = binary[offset : offset + int(size)]
            offset += int(size)
            if datatype == BYTES:
                outputs[name] = deserialize_bytes(chunk).reshape(shape)
            else:
                outputs[name] = from_raw(chunk, datatype, tuple(shape))
        else:
            outputs[name] = _decode_json_tensor(name, datatype, shape, output.get("data", []))
    return outputs


def _json_data(datatype: str, array: Array) -> list[Any]:
    if datatype == BYTES:
        return [bytes(x).decode("utf-8", errors="replace") for x in array.ravel()]
    return list(array.ravel().tolist())


def kserve_inputs(inputs: Inputs, binary: bool) -> tuple[list[dict[str, Any]], bytes]:
    """A KServe v2 request's `inputs` list and, with binary data, the bytes that follow it."""
    docs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, (datatype, array) in inputs.items():
        doc: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            raw = to_raw(array, datatype)
            doc["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            if datatype in BINARY_ONLY:
                raise PerfError(f"input '{name}' is {datatype}, which JSON cannot carry: drop --json")
            doc["data"] = _json_data(datatype, array)
        docs.append(doc)
    return docs, b"".join(chunks)


class ProtocolClient(ABC):
    def __init__(self, target: Target) -> None:
        self.target = target
        self.info: ModelInfo | None = None

    @property
    def question_timeout_s(self) -> float:
        return min(self.target.timeout_s, _QUESTION_TIMEOUT_S)

    @abstractmethod
    async def open(self) -> None:
        """Connect; PerfError when the server cannot be reached."""

    @abstractmethod
    async def describe(self) -> ModelInfo:
        """The model's config and the version to drive; PerfError when it is unknown or not ready."""

    @abstractmethod
    def prepare(self, info: ModelInfo, inputs: Inputs) -> None:
        """Build what every request sends, once."""

    @abstractmethod
    async def infer(self) -> Answer:
        """One request and its decoded answer; RequestFailed otherwise."""

    async def statistics(self) -> dict[str, float] | None:
        """The model version's statistics counters (see `server_stats`); None when unavailable."""
        return None

    @abstractmethod
    async def close(self) -> None:
        """Close every connection; safe to call twice."""


# -- HTTP ---------------------------------------------------------------------------------------


class _HttpQuestions:
    """Metadata, config, readiness and statistics over the HTTP API: for http and ws targets, and
    the statistics of any target given a statistics URL."""

    def __init__(self, base: str, model: str, timeout_s: float) -> None:
        self.base = base
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def get(self, path: str) -> tuple[int, Any]:
        assert self.session is not None
        try:
            async with self.session.get(self.base + path) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError) as exc:
            raise PerfError(
                f"cannot reach {self.base}: {_first_line(str(exc)) or type(exc).__name__}"
            ) from None
        except TimeoutError:
            raise PerfError(f"{self.base}{path} did not answer within {self.timeout.total} s") from None
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, {"error": body[:200].decode(errors="replace")}

    def _path(self, version: str) -> str:
        return f"/v2/models/{self.model}" + (f"/versions/{version}" if version else "")

    async def describe(self, version: str) -> ModelInfo:
        status, config = await self.get(self._path(version) + "/config")
        if status != 200:
            raise PerfError(_refusal(self.model, version, status, config))
        if not version:
            status, metadata = await self.get(self._path(""))
            if status != 200:
                raise PerfError(_refusal(self.model, version, status, metadata))
            candidates = highest([str(v) for v in metadata.get("versions", [])])
        else:
            candidates = [version]
        for candidate in candidates:
            status, _ = await self.get(self._path(candidate) + "/ready")
            if status == 200:
                return model_info(self.model, candidate, config)
        named = f"version {version} of model '{self.model}'" if version else f"model '{self.model}'"
        raise PerfError(f"{named} is not ready")

    async def statistics(self, version: str) -> dict[str, float] | None:
        try:
            status, doc = await self.get(self._path(version) + "/stats")
            if status != 200:
                return None
            return server_stats(doc["model_stats"][0]["inference_stats"])
        except (PerfError, KeyError, IndexError, TypeError, ValueError):
            return None  # statistics are a bonus: a run goes on without them


def _refusal(model: str, version: str, status: int, doc: Any) -> str:
    message = doc.get("error", "") if isinstance(doc, dict) else ""
    named = f"model '{model}'" + (f" version {version}" if version else "")
    if status == 404:
        return f"{named} not found: {message}" if message else f"{named} not found"
    return f"{named}: HTTP {status} {message}".rstrip()


class HttpClient(ProtocolClient):
    """KServe v2 over HTTP/1.1 with keep-alive: a connection per request in flight, kept, so
    `concurrency` N settles on N connections, as perf_analyzer's. The infer requests go through
    natron/perf/http1.py's lean client (the questions before the run through aiohttp)."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.questions = _HttpQuestions(target.http_base, target.model, self.question_timeout_s)
        self.pool: Http1Pool | None = None
        self.url = ""
        self.request = b""

    async def open(self) -> None:
        await self.questions.open()
        self.pool = Http1Pool(self.target.http_base, self.target.timeout_s)

    async def describe(self) -> ModelInfo:
        return await self.questions.describe(self.target.version)

    def prepare(self, info: ModelInfo, inputs: Inputs) -> None:
        assert self.pool is not None
        self.info = info
        path = f"/v2/models/{info.name}/versions/{info.version}/infer"
        self.url = self.target.http_base + path
        docs, data = kserve_inputs(inputs, self.target.binary)
        doc: dict[str, Any] = {"inputs": docs}
        if self.target.binary:
            doc["parameters"] = {"binary_data_output": True}
            head = orjson.dumps(doc)
            headers = {_HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
            self.request = self.pool.request(path, headers, head + data)
        else:
            self.request = self.pool.request(path, {"Content-Type": "application/json"}, orjson.dumps(doc))

    async def infer(self) -> Answer:
        assert self.pool is not None
        try:
            response = await self.pool.post(self.request)
        except ConnectionFailed as exc:  # refused, reset, closed mid-answer
            raise RequestFailed(f"connection failed: {exc}", gone=True) from None
        except TimeoutError:
            raise RequestFailed(f"no answer within {self.target.timeout_s} s") from None
        started = time.perf_counter_ns()
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {_error_text(response.body)}")
        view = memoryview(response.body)
        length = response.header_length if response.header_length is not None else len(view)
        outputs = decode_kserve(orjson.loads(view[:length]), view[length:])
        return Answer(outputs, recv_ns=time.perf_counter_ns() - started)

    async def statistics(self) -> dict[str, float] | None:
        assert self.info is not None
        return await self.questions.statistics(self.info.version)

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
        await self.questions.close()


def _connection_error(exc: Exception) -> str:
    # aiohttp's messages name the host and the OS error; the class name alone says less.
    text = _first_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_text(data: bytes) -> str:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data[:200].decode(errors="replace")
    return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)


# -- the WebSocket ------------------------------------------------------------------------------


class _StreamCall:
    """A request on a stream (the WebSocket, a gRPC stream): its answers until its final one."""

    __slots__ = ("future", "outputs", "recv_ns")

    def __init__(self, future: asyncio.Future[Answer]) -> None:
        self.future = future
        self.outputs: Outputs | None = None
        self.recv_ns = 0


class WebSocketClient(ProtocolClient):
    """natron's /v2/ws: every request over one WebSocket, matched to its answer by id. One
    reader task owns the socket's incoming side; a socket that closes fails what is in flight
    (as gone) and the next request opens a new one."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.questions = _HttpQuestions(target.http_base, target.model, self.question_timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.connecting = asyncio.Lock()
        self.calls: dict[str, _StreamCall] = {}
        self.ids = itertools.count(1)
        self.prefix = b""
        self.suffix = b""
        self.data = b""

    async def open(self) -> None:
        await self.questions.open()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def describe(self) -> ModelInfo:
        return await self.questions.describe(self.target.version)

    def prepare(self, info: ModelInfo, inputs: Inputs) -> None:
        self.info = info
        docs, self.data = kserve_inputs(inputs, self.target.binary)
        doc: dict[str, Any] = {"id": "\x00", "model": info.name, "version": info.version, "inputs": docs}
        if self.target.binary:
            doc["parameters"] = {"binary_data_output": True}
        # The header differs per request only in its id: split once around a placeholder.
        self.prefix, self.suffix = orjson.dumps(doc).split(b'"\\u0000"', 1)

    async def _connected(self) -> aiohttp.ClientWebSocketResponse:
        if self.ws is not None and not self.ws.closed:
            return self.ws
        async with self.connecting:
            if self.ws is not None and not self.ws.closed:
                return self.ws
            await self._stop_reader()
            assert self.session is not None
            url = self.target.url + "/v2/ws"
            try:
                self.ws = await self.session.ws_connect(
                    url, timeout=aiohttp.ClientWSTimeout(ws_close=self.question_timeout_s), max_msg_size=0
                )
            except aiohttp.WSServerHandshakeError as exc:
                raise RequestFailed(f"WebSocket refused: HTTP {exc.status} {exc.message}") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise RequestFailed(f"connection failed: {_connection_error(exc)}", gone=True) from None
            self.reader = asyncio.create_task(self._read(self.ws), name="natron-perf-ws-reader")
            return self.ws

    async def infer(self) -> Answer:
        ws = await self._connected()
        request_id = str(next(self.ids))
        started = time.perf_counter_ns()
        head = b'%s"%s"%s' % (self.prefix, request_id.encode(), self.suffix)
        call = _StreamCall(asyncio.get_running_loop().create_future())
        self.calls[request_id] = call  # before sending: the answer may come at once
        try:
            if self.target.binary:
                frame = b"".join((_LENGTH.pack(len(head)), head, self.data))
                send_ns = time.perf_counter_ns() - started
                await ws.send_bytes(frame)
            else:
                send_ns = time.perf_counter_ns() - started
                await ws.send_str(head.decode())
            answer = await asyncio.wait_for(call.future, self.target.timeout_s)
        except TimeoutError:
            with contextlib.suppress(Exception):  # the socket may be closing: nothing to cancel
                await ws.send_str(json.dumps({"id": request_id, "cancel": True}))
            raise RequestFailed(f"no answer within {self.target.timeout_s} s") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise RequestFailed(f"connection failed: {_connection_error(exc)}", gone=True) from None
        finally:
            self.calls.pop(request_id, None)
        answer.send_ns = send_ns
        return answer

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._on_frame(message.data.encode(), binary=False)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    self._on_frame(message.data, binary=True)
                elif message.type == aiohttp.WSMsgType.ERROR:
                    break
        finally:
            failure = RequestFailed("connection failed: the WebSocket closed", gone=True)
            for call in list(self.calls.values()):
                if not call.future.done():
                    call.future.set_exception(failure)

    def _on_frame(self, data: bytes, *, binary: bool) -> None:
        started = time.perf_counter_ns()
        view = memoryview(data)
        try:
            if binary:
                (length,) = _LENGTH.unpack_from(view)
                doc = orjson.loads(view[4 : 4 + length])
                rest = view[4 + length :]
            else:
                doc, rest = orjson.loads(view), memoryview(b"")
        except (orjson.JSONDecodeError, struct.error):
            return  # not a frame of this protocol: no request to pin it on
        call = self.calls.get(str(doc.get("id"))) if isinstance(doc, dict) else None
        if call is None or call.future.done():
            return  # an answer to a request that timed out, or an error without an id
        if "error" in doc:
            call.future.set_exception(RequestFailed(f"{doc.get('status', '?')}: {doc['error']}"))
            return
        if "outputs" in doc:
            try:
                call.outputs = decode_kserve(doc, rest)
            except Exception as exc:  # a malformed answer is this request's error, not the reader's
                call.future.set_exception(RequestFailed(f"undecodable answer: {exc}"))
                return
        call.recv_ns += time.perf_counter_ns() - started
        if doc.get("final"):
            if call.outputs is None:
                call.future.set_exception(RequestFailed("the request ended without an answer"))
            else:
                call.future.set_result(Answer(call.outputs, recv_ns=call.recv_ns))

    async def statistics(self) -> dict[str, float] | None:
        assert self.info is not None
        return await self.questions.statistics(self.info.version)

    async def _stop_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        await self._stop_reader()
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        await self.questions.close()


# -- gRPC ---------------------------------------------------------------------------------------


class GrpcClient(ProtocolClient):
    """gRPC over one channel (HTTP/2 multiplexes the requests in flight). The questions go
    through tritonclient's asyncio client; the infer request is built and serialized once, and
    each call sends those bytes on a ModelInfer stub of its own and reads the raw outputs, as
    the HTTP client does: tritonclient's per-call request building and answer wrapping cost
    several times the server's own time per request for a small model."""

    _MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.client: Any = None
        self.questions: _HttpQuestions | None = None
        self._channel: Any = None
        self._call: Any = None
        self._payload = b""
        if target.stats_url:
            self.questions = _HttpQuestions(target.statistics_base, target.model, self.question_timeout_s)

    async def open(self) -> None:
        import grpc
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.grpc import service_pb2

        self.client = grpcaio.InferenceServerClient(self.target.grpc_address)
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.aio.insecure_channel(self.target.grpc_address, options=unlimited)
        # No request serializer: the call takes the bytes `prepare` made.
        self._call = self._channel.unary_unary(
            self._MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
        )
        if self.questions is not None:
            await self.questions.open()

    async def _ask(self, what: str, call: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return await asyncio.wait_for(call, self.question_timeout_s)
        except InferenceServerException as exc:
            status, message = str(exc.status()), _first_line(str(exc.message()))
            if "UNAVAILABLE" in status:
                raise PerfError(f"cannot reach {self.target.url}: {message}") from None
            if "NOT_FOUND" in status:
                raise PerfError(f"{what} not found: {message}") from None
            raise PerfError(f"{what}: {status} {message}") from None
        except TimeoutError:
            raise PerfError(f"{self.target.url} did not answer within {self.question_timeout_s} s") from None

    async def describe(self) -> ModelInfo:
        model, version = self.target.model, self.target.version
        named = f"model '{model}'" + (f" version {version}" if version else "")
        config = await self._ask(named, self.client.get_model_config(model, version, as_json=True))
        if version:
            candidates = [version]
        else:
            metadata = await self._ask(named, self.client.get_model_metadata(model, as_json=True))
            candidates = highest([str(v) for v in metadata.get("versions", [])])
        for candidate in candidates:
            if await self._ask(named, self.client.is_model_ready(model, candidate)):
                return model_info(model, candidate, config.get("config", {}))
        raise PerfError(f"{named} is not ready")

    def prepare(self, info: ModelInfo, inputs: Inputs) -> None:
        from tritonclient.grpc import service_pb2

        self.info = info
        request = service_pb2.ModelInferRequest(model_name=info.name, model_version=info.version)
        for name, (datatype, array) in inputs.items():
            request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            request.raw_input_contents.append(to_raw(array, datatype))
        self._payload = request.SerializeToString()

    async def infer(self) -> Answer:
        import grpc

        assert self.info is not None and self._call is not None
        try:
            response = await self._call(self._payload, timeout=self.target.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code, message = exc.code(), _first_line(exc.details() or "")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RequestFailed(f"no answer within {self.target.timeout_s} s") from None
            # Refused or reset, not a 503 answer: the server is not there.
            gone = code == grpc.StatusCode.UNAVAILABLE and "onnect" in message
            raise RequestFailed(f"{code.name}: {message}", gone=gone) from None
        started = time.perf_counter_ns()
        outputs = _grpc_outputs(response)
        return Answer(outputs, recv_ns=time.perf_counter_ns() - started)

    async def statistics(self) -> dict[str, float] | None:
        assert self.info is not None
        if self.questions is not None:
            return await self.questions.statistics(self.info.version)
        try:
            doc = await asyncio.wait_for(
                self.client.get_inference_statistics(self.info.name, self.info.version, as_json=True),
                self.question_timeout_s,
            )
            return server_stats(doc["model_stats"][0].get("inference_stats", {}))
        except Exception:  # statistics are a bonus: a run goes on without them
            return None

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        if self.questions is not None:
            await self.questions.close()


class GrpcStreamClient(GrpcClient):
    """perf_analyzer's `--streaming`: every request on one ModelStreamInfer stream, each asking
    for the final-response flag (`triton_enable_empty_final_response`), so that a decoupled
    model's request ends at its flag, however many answers it had. A request's latency runs to
    its final answer; its outputs are its last answer's. The request is serialized once; each
    send appends its own id (protobuf merges concatenated messages). A stream that breaks fails
    the requests on it, and the next request opens another."""

    _MODEL_STREAM_INFER: Final = "/inference.GRPCInferenceService/ModelStreamInfer"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._calls: dict[str, _StreamCall] = {}
        self._ids = itertools.count(1)
        self._opening = asyncio.Lock()
        # grpc.aio takes one write at a time on a stream: the slots take turns.
        self._writing = asyncio.Lock()

    def prepare(self, info: ModelInfo, inputs: Inputs) -> None:
        from tritonclient.grpc import service_pb2

        super().prepare(info, inputs)
        flag = service_pb2.ModelInferRequest()
        flag.parameters["triton_enable_empty_final_response"].bool_param = True
        self._payload += flag.SerializeToString()

    async def _opened(self) -> Any:
        if self._stream is not None and not self._stream.done():
            return self._stream
        async with self._opening:
            if self._stream is not None and not self._stream.done():
                return self._stream
            from tritonclient.grpc import service_pb2

            assert self._channel is not None
            self._stream = self._channel.stream_stream(
                self._MODEL_STREAM_INFER,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
            )()
            self._reader = asyncio.create_task(self._read(self._stream), name="natron-perf-grpc-stream")
            return self._stream

    async def infer(self) -> Answer:
        import grpc
        from tritonclient.grpc import service_pb2

        stream = await self._opened()
        request_id = str(next(self._ids))
        started = time.perf_counter_ns()
        payload = self._payload + service_pb2.ModelInferRequest(id=request_id).SerializeToString()
        call = _StreamCall(asyncio.get_running_loop().create_future())
        self._calls[request_id] = call  # before sending: the answer may come at once
        try:
            send_ns = time.perf_counter_ns() - started
            async with self._writing:
                await stream.write(payload)
            answer = await asyncio.wait_for(call.future, self.target.timeout_s)
        except TimeoutError:
            raise RequestFailed(f"no answer within {self.target.timeout_s} s") from None
        except RequestFailed:
            raise
        except grpc.aio.AioRpcError as exc:  # the stream ended while this was written
            gone = exc.code() == grpc.StatusCode.UNAVAILABLE
            raise RequestFailed(f"{exc.code().name}: {_first_line(exc.details() or '')}", gone=gone) from None
        except Exception as exc:  # the stream is closing (grpc.aio's usage errors)
            raise RequestFailed(f"the stream failed: {type(exc).__name__}: {exc}", gone=True) from None
        finally:
            self._calls.pop(request_id, None)
        answer.send_ns = send_ns
        return answer

    async def _read(self, stream: Any) -> None:
        import grpc

        failure = RequestFailed("connection failed: the stream ended", gone=True)
        try:
            async for message in stream:
                self._on_response(message)
        except grpc.aio.AioRpcError as exc:
            gone = exc.code() == grpc.StatusCode.UNAVAILABLE
            failure = RequestFailed(f"{exc.code().name}: {_first_line(exc.details() or '')}", gone=gone)
        except Exception as exc:  # anything else ends this stream too; its requests are told
            failure = RequestFailed(f"the stream failed: {type(exc).__name__}: {exc}", gone=True)
        finally:
            for call in list(self._calls.values()):
                if not call.future.done():
                    call.future.set_exception(failure)

    def _on_response(self, message: Any) -> None:
        started = time.perf_counter_ns()
        response = message.infer_response
        call = self._calls.get(response.id)
        if call is None or call.future.done():
            return  # an answer to a request that timed out
        if message.error_message:
            call.future.set_exception(RequestFailed(_first_line(message.error_message)))
            return
        if response.outputs:
            try:
                call.outputs = _grpc_outputs(response)
            except Exception as exc:  # a malformed answer is this request's error, not the reader's
                call.future.set_exception(RequestFailed(f"undecodable answer: {exc}"))
                return
        call.recv_ns += time.perf_counter_ns() - started
        if response.parameters["triton_final_response"].bool_param:
            if call.outputs is None:
                call.future.set_exception(RequestFailed("the request ended without an answer"))
            else:
                call.future.set_result(Answer(call.outputs, recv_ns=call.recv_ns))

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.done_writing()
            stream.cancel()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        await super().close()


def _grpc_outputs(response: Any) -> Outputs:
    """A ModelInferResponse's outputs as arrays: from its raw contents (what Triton and natron
    send), else through tritonclient's reading of the typed contents."""
    raw = response.raw_output_contents
    if len(raw) != len(response.outputs):
        from tritonclient.grpc import InferResult

        result = InferResult(response)
        return {output.name: result.as_numpy(output.name) for output in response.outputs}
    return {
        output.name: from_raw(raw[index], output.datatype, tuple(output.shape))
        for index, output in enumerate(response.outputs)
    }


# -- NATS ---------------------------------------------------------------------------------------


class NatsClient(ProtocolClient):
    """Straight into the work queue with the gateway's `Requester`, as a Python client with the
    client role's credentials does (examples/nats_direct.py): the version comes from the models
    bucket, requests of one turn share a message up to the model's max_batch_size rows."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.nc: Any = None  # nats.aio.client.Client
        self.subjects = Subjects(target.prefix)  # checked by Target
        self.requester: Requester | None = None
        self.request = InferRequest("", target.model, "", [])
        self.rows = 1
        self.max_rows = 1
        self.ids = itertools.count(1)
        self.questions: _HttpQuestions | None = None
        if target.stats_url:
            self.questions = _HttpQuestions(target.statistics_base, target.model, self.question_timeout_s)

    async def open(self) -> None:
        t = self.target
        auth = ClientAuth(t.nats_creds, t.nats_tls_ca, t.nats_tls_cert, t.nats_tls_key)
        try:
            auth.connect_options()  # reads the credentials now: a bad file fails here, in one line
        except (ValueError, OSError) as exc:
            raise PerfError(str(exc)) from None
        try:
            # broker.jetstream.connect retries for ever (services outlive a broker restart);
            # a first connection that does not come within the bound is a server not there.
            self.nc = await asyncio.wait_for(
                connect(t.url, "natron-perf", auth=auth, connect_timeout_s=self.question_timeout_s),
                self.question_timeout_s,
            )
        except TimeoutError:
            raise PerfError(f"cannot connect to {t.url} within {self.question_timeout_s} s") from None
        except Exception as exc:  # refused, unreachable, refused credentials, not a NATS server
            raise PerfError(
                f"cannot connect to {t.url}: {_first_line(str(exc)) or type(exc).__name__}"
            ) from None
        self.requester = Requester(self.nc, self.subjects)
        await self.requester.start()
        if self.questions is not None:
            await self.questions.open()

    async def describe(self) -> ModelInfo:
        model, version = self.target.model, self.target.version
        try:
            kv = await self.nc.jetstream().key_value(self.subjects.models_bucket)
            entry = await kv.get(model)
            record = ModelRecord.from_json(entry.value or b"{}")
        except KeyNotFoundError:
            raise PerfError(f"model '{model}' not found in bucket {self.subjects.models_bucket}") from None
        except (BucketNotFoundError, NotFoundError):
            raise PerfError(
                f"no bucket {self.subjects.models_bucket} on {self.target.url}: is natron running, "
                f"is the prefix '{self.target.prefix}' right?"
            ) from None
        except Exception as exc:  # a permission refused, a timeout, an undecodable record
            raise PerfError(f"cannot read model '{model}' from {self.target.url}: {exc}") from None
        config = record.presented_config()
        if config is None:
            raise PerfError(f"model '{model}' has no usable config: {record.reason}")
        if version:
            if version not in record.versions:
                raise PerfError(f"model '{model}' version {version} not found")
            if record.versions[version].state != READY:
                raise PerfError(f"model '{model}' version {version} is not ready")
            return model_info(model, version, config)
        ready = record.ready_versions()
        if not ready:
            raise PerfError(f"model '{model}' is not ready: {record.reason or 'no READY version'}")
        return model_info(model, ready[0], config)

    def prepare(self, info: ModelInfo, inputs: Inputs) -> None:
        self.info = info
        tensors = [
            Tensor(name, datatype, tuple(array.shape), array) for name, (datatype, array) in inputs.items()
        ]
        self.request = InferRequest("", info.name, info.version, tensors)
        self.rows = self.target.batch_size if info.max_batch_size > 0 else 1
        self.max_rows = max(info.max_batch_size, 1)

    async def infer(self) -> Answer:
        assert self.info is not None and self.requester is not None
        if not self.nc.is_connected:
            # nats-py would buffer the request until the connection returns: no answer can come
            # while it is away, so say so now instead of after the timeout.
            await asyncio.sleep(0)
            raise RequestFailed("connection failed: the NATS connection is down", gone=True)
        request = replace(self.request, id=str(next(self.ids)))
        try:
            response = await self.requester.infer(
                request, self.info.version, self.target.timeout_s, rows=self.rows, max_rows=self.max_rows
            )
        except NatronError as exc:
            gone = not self.nc.is_connected
            raise RequestFailed(f"{exc.status}: {exc}", gone=gone) from None
        return Answer({t.name: t.data for t in response.outputs})

    async def statistics(self) -> dict[str, float] | None:
        assert self.info is not None
        if self.questions is None:
            return None
        return await self.questions.statistics(self.info.version)

    async def close(self) -> None:
        requester, self.requester = self.requester, None
        if requester is not None:
            await requester.close()
        nc, self.nc = self.nc, None
        if nc is not None:
            await close_connection(nc)
        if self.questions is not None:
            await self.questions.close()


def client_for(target: Target) -> ProtocolClient:
    if target.streaming:
        return GrpcStreamClient(target)
    clients: dict[str, type[ProtocolClient]] = {
        "http": HttpClient,
        "ws": WebSocketClient,
        "grpc": GrpcClient,
        "nats": NatsClient,
    }
    return clients[target.protocol](target)
