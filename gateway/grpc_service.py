"""Triton's gRPC protocol (`inference.GRPCInferenceService`) beside the HTTP gateway, in the
same process and on the same mesh: the same model view, requester and statistics, the service
definitions tritonclient ships (`service_pb2_grpc`), grpcio's asyncio server.

Restricted groups (gateway/restricted.py): with --grpc-restricted-protocol, an interceptor
refuses a call to a restricted group without the metadata `triton-grpc-protocol-<key>: <value>`
with Triton's message, and PERMISSION_DENIED where Triton answers UNAVAILABLE (a code that
clients and retry policies read as "try again", which a missing key never fixes). Idle and
half-open connections are bounded by grpc core's options (gateway/connections.py).

Errors map from natron's statuses to the gRPC codes Triton uses for the same cases. Requests
get the deadline the client set on the call when it names none in its `timeout` parameter, and
a call the client cancels cancels its request on the worker, as a closed HTTP connection does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from broker.view import ModelView
from gateway import admission, answers, grpc_codec, health, logging_api, stats, trace_api
from gateway.connections import ConnectionLimits, grpc_options
from gateway.infer import new_request_id, trace_headers
from gateway.keys import FLEET, METRICS, OPTIONS, REGISTRY, REQUESTER
from gateway.middleware import unexpected_error
from gateway.restricted import ACCESS, GRPC_GROUPS, AccessPolicy, check_upload
from gateway.sharedmemory import SHARED_MEMORY
from gateway.tracing import TRACER, RequestTraces
from natron.errors import NatronError, Unsupported
from natron.inference import InferRequest, InferResponse
from natron.restricted_api import Restriction, Restrictions, grpc_refusal
from natron.spec import ModelSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", pb.SystemSharedMemoryStatusResponse, pb.CudaSharedMemoryStatusResponse)

# natron's statuses (HTTP's) as the gRPC codes Triton answers the same cases with.
_CODES: Final[dict[int, grpc.StatusCode]] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    403: grpc.StatusCode.PERMISSION_DENIED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.UNAVAILABLE,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(status: int) -> grpc.StatusCode:
    return _CODES.get(status, grpc.StatusCode.INTERNAL)


def _unary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[T]]:
    """A unary call's errors as gRPC statuses: NatronError by its status, anything else INTERNAL
    (logged), never an exception escaping into grpcio."""

    @functools.wraps(method)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except NatronError as exc:
            await context.abort(status_code(exc.status), exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, unexpected_error(exc, f"gRPC {method.__name__}"))
        raise AssertionError("abort returns only by raising")

    return call


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, app: web.Application) -> None:
        self._app = app

    # -- health and metadata -------------------------------------------------------------

    @_unary
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_unary
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=health.not_ready_reason(self._app) is None)

    @_unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self._view(request.name).resolve(request.version)
        except NatronError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_unary
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(answers.server_metadata(), pb.ServerMetadataResponse())

    @_unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        doc = answers.model_metadata(self._view(request.name), request.version)
        return json_format.ParseDict(doc, pb.ModelMetadataResponse())

    @_unary
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        doc = answers.model_config(self._view(request.name), request.version)
        config = json_format.ParseDict(doc, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=config)

    @_unary
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        entries = await stats.model_stats_entries(self._app, request.name or None, request.version)
        return json_format.ParseDict(
            {"model_stats": entries}, pb.ModelStatisticsResponse(), ignore_unknown_fields=True
        )

    # -- repository --------------------------------------------------------------------------

    @_unary
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        index = answers.repository_index(self._app[REGISTRY], request.ready)
        return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

    @_unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        params: dict[str, Any] = {}
        for key, value in request.parameters.items():
            kind = value.WhichOneof("parameter_choice")
            if kind == "bytes_param":
                # HTTP carries a file's content in base64; the router reads that form.
                params[key] = base64.b64encode(value.bytes_param).decode("ascii")
            elif kind is not None:
                params[key] = getattr(value, kind)
        check_upload(self._app, "grpc", request.model_name, params)
        await answers.control(self._app, "load", request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        params = {key: grpc_codec.parameter_value(value) for key, value in request.parameters.items()}
        await answers.control(self._app, "unload", request.model_name, params)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -----------------------------------------------------------------------

    @_unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._counted(request, self._infer(request, context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently and answer in the order they finish, as in
        Triton; an error is an answer on the stream (`error_message`), never the stream's end."""
        answers_: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                await self._counted(request, self._stream_one(request, context, answers_.put_nowait))
            except NatronError as exc:
                answers_.put_nowait(_stream_error(request, exc.message))
            except Exception as exc:
                where = f"gRPC stream request {request.id}"
                answers_.put_nowait(_stream_error(request, unexpected_error(exc, where)))

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                answers_.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers_.get()) is not None:
                yield answer
            await reader  # its error, if reading the stream failed
        finally:
            # The client cancelled the call or the server stops: each request's cancellation
            # reaches its worker through the requester.
            for task in (reader, *running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *running, return_exceptions=True)

    async def _counted(self, request: pb.ModelInferRequest, call: Awaitable[T]) -> T:
        """The gateway's request counters and log line, as for HTTP."""
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        status = 500
        try:
            result = await call
            status = 200
            return result
        except NatronError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            duration_s = loop.time() - started_s
            self._app[METRICS].observe(request.model_name, request.model_version, status, duration_s)
            if status >= 500:
                log.warning(
                    "gRPC infer %s id=%s -> %d in %.2f ms",
                    request.model_name,
                    request.id or "-",
                    status,
                    duration_s * 1e3,
                )

    def _view(self, name: str) -> ModelView:
        return self._app[REGISTRY].get(name)

    async def _admit(
        self,
        request: pb.ModelInferRequest,
        infer: grpc_codec.GrpcInfer,
        spec: ModelSpec,
        target: str,
        queue: admission.Queueing,
        trace: dict[str, str] | None,
        received_ns: int,
        kind: str = "",
    ) -> tuple[int, RequestTraces | None]:
        """A checked request through the queue policy's admission, then sampled for a trace:
        its rows, and its trace when the settings sample it (whose context then goes on)."""
        rows = spec.validate(infer.parsed.request)
        waiting = self._app[admission.ADMISSION].admit(spec, target, queue, request.id)
        if waiting is not None:
            await waiting
        traced = self._app[TRACER].begin(
            spec.name,
            target,
            infer.parsed.request.id,
            (trace or {}).get,
            protocol="GRPC",
            received_ns=received_ns,
            read_ns=received_ns,  # grpcio read the message before the handler ran
            client_request_id=request.id,
            kind=kind,
        )
        return rows, traced

    async def _prepare(
        self, request: pb.ModelInferRequest, context: Any
    ) -> tuple[grpc_codec.GrpcInfer, ModelView, str, admission.Queueing, dict[str, str] | None]:
        """Parse and check a request; its model view, target version, queueing (priority level
        and deadline) and trace."""
        view = self._view(request.model_name)
        target = view.resolve(request.model_version)
        if view.spec is None:
            raise Unsupported(f"model '{view.record.name}' has no valid config")
        spec, limits = view.spec, self._app[OPTIONS].limits
        infer = await self._app[SHARED_MEMORY].parse(
            lambda window: grpc_codec.parse_request(
                request, window, limits=limits, max_inputs=len(spec.inputs), max_outputs=len(spec.outputs)
            )
        )
        parsed = infer.parsed
        if not parsed.request.id:
            parsed.request.id = new_request_id()
        # The call's own deadline, else the gateway's default; the `timeout` parameter's
        # meaning depends on the model's queue policy (gateway/admission.py).
        call_timeout_s = self._app[OPTIONS].default_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            call_timeout_s = max(remaining, 1e-3)
        queue = admission.queueing(view.spec.scheduling, parsed.request, parsed.timeout_us, call_timeout_s)
        metadata = {
            key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
        }
        return infer, view, target, queue, trace_headers(metadata.get) or None

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        # grpcio read the message before this handler ran: the trace's GRPC_WAITREAD_START
        # and _END are both now (read only while tracing is on).
        tracer = self._app[TRACER]
        received_ns = time.time_ns() if tracer.active else 0
        infer, view, target, queue, trace = await self._prepare(request, context)
        spec = view.spec
        assert spec is not None
        if spec.decoupled:
            raise Unsupported(
                f"model '{spec.name}' is decoupled: ModelInfer cannot carry its answers, use ModelStreamInfer"
            )
        rows, traced = await self._admit(request, infer, spec, target, queue, trace, received_ns)
        status = 500
        try:
            requester = self._app[REQUESTER]

            def send(request: InferRequest) -> Awaitable[InferResponse]:
                return requester.infer(
                    request,
                    target,
                    queue.timeout_s,
                    headers=trace if traced is None else traced.headers or None,
                    rows=rows,
                    max_rows=spec.max_rows,
                    level=queue.subject_level,
                    timestamps=None if traced is None else traced.timestamps,
                )

            # By reference when the model's workers share this host (gateway/sharedmemory.py).
            response = await self._app[SHARED_MEMORY].infer(
                infer.parsed.request,
                {name: out.window for name, out in infer.parsed.shm_outputs.items()},
                view.record,
                self._app[FLEET].workers,
                send,
            )
            status = 200
        except NatronError as exc:
            status = exc.status
            raise
        finally:
            if traced is not None and status != 200:
                traced.end(status)
        if traced is None:
            return grpc_codec.encode_response(response, infer.parsed, request.id, batched=spec.batching)
        # Traced: the answer is in, then encoded (the send), then handed to grpcio.
        traced.answered()
        try:
            return grpc_codec.encode_response(response, infer.parsed, request.id, batched=spec.batching)
        finally:
            traced.end(status)

    async def _stream_one(
        self,
        request: pb.ModelInferRequest,
        context: Any,
        send: Callable[[pb.ModelStreamInferResponse], None],
    ) -> None:
        # grpcio read the message before this ran: GRPC_WAITREAD_START and _END are both now.
        tracer = self._app[TRACER]
        received_ns = time.time_ns() if tracer.active else 0
        infer, view, target, queue, trace = await self._prepare(request, context)
        spec = view.spec
        assert spec is not None
        rows, traced = await self._admit(
            request, infer, spec, target, queue, trace, received_ns, kind="grpc_stream"
        )
        if traced is not None:
            trace = traced.headers or None
        requester = self._app[REQUESTER]

        def answer(response: InferResponse, final: bool) -> pb.ModelStreamInferResponse:
            encoded = grpc_codec.encode_response(response, infer.parsed, request.id, batched=spec.batching)
            encoded.parameters[grpc_codec.FINAL_PARAMETER].bool_param = final
            return pb.ModelStreamInferResponse(infer_response=encoded)

        status, error = 500, None  # how it ended, for its trace
        try:
            if not spec.decoupled:
                response = await requester.infer(
                    infer.parsed.request,
                    target,
                    queue.timeout_s,
                    headers=trace,
                    rows=rows,
                    max_rows=spec.max_rows,
                    level=queue.subject_level,
                    timestamps=None if traced is None else traced.timestamps,
                )
                if traced is not None:
                    traced.answered()
                send(answer(response, True))
                status = 200
                return
            infer.parsed.request.version = target
            # The worker's timestamps come with its final answer.
            async for response, final in requester.stream_marked(
                infer.parsed.request,
                target,
                queue.timeout_s,
                trace,
                queue.subject_level,
                timestamps=None if traced is None else traced.timestamps,
            ):
                if final and traced is not None:
                    traced.answered()
                if response.outputs:
                    send(answer(response, final))
                elif final and infer.empty_final_response:
                    empty = pb.ModelInferResponse(
                        model_name=response.model or spec.name, model_version=target
                    )
                    if request.id:
                        empty.id = request.id
                    empty.parameters[grpc_codec.FINAL_PARAMETER].bool_param = True
                    send(pb.ModelStreamInferResponse(infer_response=empty))
            status = 200
        except NatronError as exc:
            status, error = exc.status, exc.message
            raise
        except asyncio.CancelledError:
            status, error = 499, "cancelled"
            raise
        finally:
            if traced is not None:
                traced.end(status, error)

    # -- shared memory ---------------------------------------------------------------------

    @_unary
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        regions = await self._app[SHARED_MEMORY].system_status(request.name or None)
        return _regions(regions, pb.SystemSharedMemoryStatusResponse())

    @_unary
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await self._app[SHARED_MEMORY].register_system(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @_unary
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._app[SHARED_MEMORY].unregister_system(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_unary
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        regions = await self._app[SHARED_MEMORY].cuda_status(request.name or None)
        return _regions(regions, pb.CudaSharedMemoryStatusResponse())

    @_unary
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        await self._app[SHARED_MEMORY].register_cuda(
            request.name, request.raw_handle, request.device_id, request.byte_size
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @_unary
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await self._app[SHARED_MEMORY].unregister_cuda(request.name or None)
        return pb.CudaSharedMemoryUnregisterResponse()

    # -- extensions natron does not serve over gRPC yet ----------------------------------------

    @_unary
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        return await trace_api.trace_setting_rpc(self._app, request)

    @_unary
    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> pb.LogSettingsResponse:
        return await logging_api.log_settings_rpc(self._app, request)


def _regions(regions: list[dict[str, Any]], response: R) -> R:
    """A shared memory status answer: the regions by name, as Triton's JSON lists them."""
    return json_format.ParseDict(
        {"regions": {region["name"]: region for region in regions}}, response, ignore_unknown_fields=True
    )


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """An error on a stream, as Triton sends it: the message, and the request it answers."""
    answer = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version)
    if request.id:
        answer.id = request.id
    return pb.ModelStreamInferResponse(error_message=message, infer_response=answer)


class _Restricted(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call to a restricted group without its metadata, before the method runs."""

    def __init__(self, restrictions: Restrictions) -> None:
        self._restrictions = restrictions

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        group = GRPC_GROUPS.get(details.method.rpartition("/")[2])
        restriction = self._restrictions.get(group) if group is not None else None
        if restriction is None or handler is None:
            return handler
        for key, value in details.invocation_metadata or ():
            if key == restriction.header and value == restriction.value:
                return handler
        return _refusing(handler, restriction)


def _refusing(handler: grpc.RpcMethodHandler, restriction: Restriction) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers PERMISSION_DENIED with Triton's message."""
    message = grpc_refusal(restriction)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)


async def start_server(
    app: web.Application,
    address: str,
    port: int,
    *,
    shared_port: bool = False,
    limits: ConnectionLimits | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve gRPC for the gateway `app` (started: its requester and views are up); returns the
    server and the port it bound (port 0: any free one). `shared_port`: gateway processes
    share the port, as they share HTTP's; otherwise a port in use is an error, not a share.
    `limits`: how long a connection may stay idle or half-open, and how many are taken."""
    options = app[OPTIONS]
    access = app.get(ACCESS) or AccessPolicy()
    server = grpc.aio.server(
        interceptors=[_Restricted(access.grpc)] if access.grpc else None,
        options=[
            ("grpc.max_receive_message_length", options.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if shared_port else 0),
            *grpc_options(limits or ConnectionLimits()),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app), server)
    try:
        bound = server.add_insecure_port(f"{address}:{port}")
    except RuntimeError as exc:
        raise OSError(f"cannot serve gRPC on {address}:{port}: {exc}") from None
    if not bound:
        raise OSError(f"cannot serve gRPC on {address}:{port}")
    await server.start()
    return server, bound
