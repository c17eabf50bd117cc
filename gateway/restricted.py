"""Who may call what: Triton's restricted API groups over HTTP, and the refusal of uploaded code.

Restricted groups (natron/restricted_api.py reads the flags). Every HTTP route and every gRPC
method belongs to one of Triton's groups (`http_group`, `GRPC_GROUPS`); a request to a
restricted group without its header is answered 403 (HTTP) or PERMISSION_DENIED (gRPC) with
Triton's message, before anything else is read or done. natron's own routes join the group of
what they do: the WebSocket (`/v2/ws`) and the SSE streams (`generate`, `generate_stream`) are
inference. The infer fast path (gateway/fastpath.py) checks the inference group's header
itself and hands a request without it to aiohttp, where the middleware here refuses it.

Uploaded code. A repository `load` may carry the model's files (`file:<version>/<name>`). A
file that is code (Python source or bytecode, a shared library) or a Python-backend model runs
in a worker with the worker's rights, so it is refused with 403 unless the protocol it came on
restricts model-repository (so only holders of that key can load models) or the gateway runs
with --allow-code-upload. Checked where the request arrives, for HTTP and gRPC alike.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.middleware import Handler, error_response
from natron import restricted_api
from natron.errors import NatronError
from natron.restricted_api import Restrictions

FILE_PREFIX = "file:"  # router/uploads.py's, the repository extension's


class Forbidden(NatronError):
    status = 403


@dataclass(slots=True, frozen=True)
class AccessPolicy:
    """The gateway's access settings, per protocol."""

    http: Restrictions = field(default_factory=Restrictions)
    grpc: Restrictions = field(default_factory=Restrictions)
    allow_code_upload: bool = False


ACCESS: web.AppKey[AccessPolicy] = web.AppKey("access", AccessPolicy)

# The HTTP routes' groups, by the route's pattern (aiohttp's canonical form), first match wins.
_HTTP_GROUPS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), group)
    for pattern, group in (
        (r"^/v2/health/(live|ready)$", "health"),
        (r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$", "health"),
        # Before metadata's pattern, which `/v2/models/stats` would match too.
        (r"^/v2/models(/[^/]+(/versions/[^/]+)?)?/stats$", "statistics"),
        (r"^/v2$", "metadata"),
        (r"^/v2/models/[^/]+(/versions/[^/]+)?$", "metadata"),
        (r"^/v2/models/[^/]+(/versions/[^/]+)?/config$", "model-config"),
        (r"^/v2/models/[^/]+(/versions/[^/]+)?/(infer|generate|generate_stream)$", "inference"),
        (r"^/v2/ws$", "inference"),
        (r"^/v2/repository/", "model-repository"),
        (r"^/v2/(systemsharedmemory|cudasharedmemory)/", "shared-memory"),
        (r"^/v2(/models/[^/]+)?/trace/setting$", "trace"),
        (r"^/v2/logging$", "logging"),
    )
)

# Every method of inference.GRPCInferenceService, by its name.
GRPC_GROUPS: Mapping[str, str] = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}


@functools.cache
def http_group(canonical: str) -> str | None:
    """The group of the route with pattern `canonical` (`/v2/models/{model}/infer`); None for a
    path no route serves (404 whatever the headers)."""
    for pattern, group in _HTTP_GROUPS:
        if pattern.match(canonical):
            return group
    return None


def restricted_middleware(restrictions: Restrictions) -> Any:
    """The middleware that refuses requests to `restrictions`' groups without their header.
    Only added when some group is restricted: an open gateway pays nothing for it."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None:
            group = http_group(resource.canonical)
            restriction = restrictions.get(group) if group is not None else None
            if restriction is not None and request.headers.get(restriction.header) != restriction.value:
                return error_response(403, restricted_api.refusal(restriction))
        return await handler(request)

    return check


# What runs when a worker loads it: Python (source, bytecode) and native shared libraries.
_CODE_FILE = re.compile(r"\.(py|pyc|pyo|pyd|so)(\.[0-9][0-9.]*)?$", re.IGNORECASE)


def uploaded_code(params: Mapping[str, Any]) -> str | None:
    """What in a load's parameters is code, in words; None when nothing is."""
    files = [key[len(FILE_PREFIX) :] for key in params if key.startswith(FILE_PREFIX)]
    code = [path for path in files if _CODE_FILE.search(path.rsplit("/", 1)[-1])]
    if code:
        shown = ", ".join(f"'{path}'" for path in sorted(code)[:3])
        return f"uploaded file(s) {shown}{' and more' if len(code) > 3 else ''} hold code"
    if files and _names_python_backend(params.get("config")):
        return "its config names the python backend, which runs the uploaded files as code"
    return None


def _names_python_backend(config: Any) -> bool:
    if not isinstance(config, str):
        return False
    try:
        parsed = orjson.loads(config)
    except orjson.JSONDecodeError:
        return False  # the router answers a broken config with its own 400
    if not isinstance(parsed, dict):
        return False
    return any(str(parsed.get(key, "")).lower() == "python" for key in ("backend", "platform"))


def check_upload(app: web.Application, protocol: str, model: str, params: Mapping[str, Any]) -> None:
    """Refuse (403) a load of `model` over `protocol` ("http" or "grpc") whose uploaded files
    are code, unless that protocol restricts model-repository or code uploads are allowed."""
    policy = app.get(ACCESS) or AccessPolicy()
    if policy.allow_code_upload:
        return
    restrictions = policy.http if protocol == "http" else policy.grpc
    if restrictions.get("model-repository") is not None:
        return  # the caller holds the model-repository key: it may load what it likes
    why = uploaded_code(params)
    if why is None:
        return
    flag = "--http-restricted-api" if protocol == "http" else "--grpc-restricted-protocol"
    raise Forbidden(
        f"load of '{model}' refused: {why}, which would run on the workers; restrict the "
        f"model-repository API ({flag}=model-repository:<key>=<value>) so that only holders of "
        f"the key can load models, or start the gateway with --allow-code-upload"
    )
