"""BLS from inside a stub process: requests to other models travel through natron's own mesh.

The stub opens its NATS connection on the first BLS call only (most models never make one), on
an event loop in a thread of its own, so that a model's synchronous `exec()` can wait on it
while the stub's main thread runs `execute`. A model whose `execute` is a coroutine runs on that
same loop, where `await request.async_exec()` proceeds without hopping threads.

"Latest version" is resolved as the gateway resolves it, with the same model view: a watch on
the models KV bucket (broker.view), so a reload is seen at once and a call costs no lookup.
Errors come back inside the InferenceResponse, as in Triton; they are never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from nats.aio.client import Client

from broker import jetstream
from broker.auth import ClientAuth
from broker.requester import Requester
from broker.subjects import Subjects
from broker.view import ModelRegistry
from natron import datatypes
from natron.errors import InvalidArgument, NatronError, Unavailable
from natron.inference import InferRequest, InferResponse
from natron.inference import Tensor as WireTensor
from pystub import triton_python_backend_utils as pb

T = TypeVar("T")

# A BLS request without its own `timeout` waits this long, as the gateway's default deadline.
DEFAULT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0


class Mesh:
    def __init__(
        self, nats_url: str, prefix: str, auth: ClientAuth | None = None, inbox_prefix: str | None = None
    ) -> None:
        self._nats_url = nats_url
        # The worker's identity: a Python model's calls to other models are the worker's.
        self._auth = auth
        self._inbox_prefix = inbox_prefix
        self._subjects = Subjects(prefix)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._requester: Requester | None = None
        self._registry: ModelRegistry | None = None
        self._connecting: asyncio.Lock | None = None

    # -- the loop -----------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="bls-loop", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the mesh loop and wait for it (from any other thread)."""
        loop = self.loop
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise pb.TritonModelException(
                "exec() blocks, and this code runs on the event loop: use 'await request.async_exec()'"
            )
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._disconnect(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)

    async def _disconnect(self) -> None:
        if self._requester is not None:
            await self._requester.close()
        if self._registry is not None:
            await self._registry.stop()
        if self._nc is not None:
            await jetstream.close_connection(self._nc)

    async def _connected(self) -> tuple[Client, Requester, ModelRegistry]:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._nc is None or self._requester is None or self._registry is None:
                if not self._nats_url:
                    raise Unavailable("BLS needs the worker's NATS URL, and this worker has none")
                nc = await jetstream.connect(
                    self._nats_url,
                    name="natron-bls",
                    auth=self._auth,
                    inbox_prefix=self._inbox_prefix,
                    connect_timeout_s=CONNECT_TIMEOUT_S,
                )
                requester = Requester(nc, self._subjects)
                await requester.start()
                registry = ModelRegistry()
                await registry.start(await nc.jetstream().key_value(self._subjects.models_bucket))
                # The first call needs the current records, not an empty view.
                await asyncio.wait_for(registry.synced.wait(), CONNECT_TIMEOUT_S)
                self._nc, self._requester, self._registry = nc, requester, registry
            return self._nc, self._requester, self._registry

    # -- the calls pb_utils makes -------------------------------------------------------------

    def exec(self, request: pb.InferenceRequest, decoupled: bool) -> Any:
        if not decoupled:
            return self.run(self._infer(request))
        return self._iterate(self._stream(request))

    async def async_exec(self, request: pb.InferenceRequest, decoupled: bool) -> Any:
        if not decoupled:
            return await self._on_mesh_loop(self._infer(request))
        return self._aiterate(self._stream(request))

    async def _on_mesh_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if asyncio.get_running_loop() is self.loop:
            return await coroutine
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def _infer(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        try:
            _, requester, registry = await self._connected()
            natron_request, version, timeout_s = self._prepare(request, registry)
            answer = await requester.infer(natron_request, version, timeout_s)
        except NatronError as exc:
            return _error_response(exc)
        return _to_response(answer)

    @staticmethod
    def _prepare(request: pb.InferenceRequest, registry: ModelRegistry) -> tuple[InferRequest, str, float]:
        name = request.model_name
        if not name:
            raise InvalidArgument("a BLS request needs a model_name")
        version = registry.get(name).resolve(str(request.model_version) if request.model_version > 0 else "")
        inputs = [
            WireTensor(t.name(), t.datatype(), tuple(t.as_numpy().shape), t.as_numpy())
            for t in request.inputs()
        ]
        natron_request = InferRequest(
            id=request.request_id(),
            model=name,
            version=version,
            inputs=inputs,
            outputs=list(request.requested_output_names()),
            parameters=request.parameters_dict(),
        )
        timeout_s = request.timeout() / 1e6 if request.timeout() > 0 else DEFAULT_TIMEOUT_S
        return natron_request, version, timeout_s

    # -- decoupled models: a stream of answers ------------------------------------------------

    async def _stream(self, request: pb.InferenceRequest) -> AsyncIterator[pb.InferenceResponse]:
        """The answers of a decoupled model as they come (on the mesh loop); an error ends it."""
        try:
            _, requester, registry = await self._connected()
            natron_request, version, timeout_s = self._prepare(request, registry)
            async for answer in requester.stream(natron_request, version, timeout_s):
                yield _to_response(answer)
        except NatronError as exc:
            yield _error_response(exc)

    def _iterate(self, answers: AsyncIterator[pb.InferenceResponse]) -> Iterator[pb.InferenceResponse]:
        """Drive the stream from a thread that is not the loop's, one answer at a time. A model
        that stops iterating early closes the stream, which cancels the request."""
        try:
            while True:
                try:
                    yield self.run(_next(answers))
                except StopAsyncIteration:
                    return
        finally:
            self.run(_close(answers))

    async def _aiterate(
        self, answers: AsyncIterator[pb.InferenceResponse]
    ) -> AsyncIterator[pb.InferenceResponse]:
        try:
            while True:
                try:
                    yield await self._on_mesh_loop(_next(answers))
                except StopAsyncIteration:
                    return
        finally:
            await self._on_mesh_loop(_close(answers))


async def _next(answers: AsyncIterator[pb.InferenceResponse]) -> pb.InferenceResponse:
    return await answers.__anext__()


async def _close(answers: AsyncIterator[pb.InferenceResponse]) -> None:
    close = getattr(answers, "aclose", None)
    if close is not None:
        await close()


def _to_response(answer: InferResponse) -> pb.InferenceResponse:
    return pb.InferenceResponse([pb.Tensor(t.name, _typed(t)) for t in answer.outputs])


def _typed(tensor: WireTensor) -> Any:
    if tensor.datatype == datatypes.BYTES:
        return tensor.data
    return tensor.data.astype(datatypes.to_numpy_dtype(tensor.datatype), copy=False)


def _error_response(error: NatronError) -> pb.InferenceResponse:
    return pb.InferenceResponse([], error=pb.TritonError(error.message, pb.code_of(error.status)))
