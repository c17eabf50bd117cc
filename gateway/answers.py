"""What the metadata, config, repository and control calls answer, as plain values: the HTTP
routes (gateway/app.py) write them as JSON, the gRPC service (gateway/grpc_service.py) as
protobuf. One place decides what a call means, so the two protocols cannot drift apart."""

from __future__ import annotations

from typing import Any

import nats.errors
import orjson
from aiohttp import web

from broker.subjects import check_name
from broker.view import ModelRegistry, ModelView
from gateway.keys import NATS, OPTIONS
from natron import __version__
from natron.errors import DeadlineExceeded, InvalidArgument, NatronError, Unavailable, Unsupported

# What `/v2` and gRPC ServerMetadata list; an extension is named here once it works over both.
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "logging",
    "model_repository",
    "statistics",
    "system_shared_memory",
    "trace",
]


def server_metadata() -> dict[str, Any]:
    return {"name": "natron", "version": __version__, "extensions": EXTENSIONS}


def _check_version(view: ModelView, version: str) -> None:
    if version and version not in view.record.versions:
        raise InvalidArgument(f"model '{view.record.name}' has no version {version}")


def _tensor_metadata(view: ModelView, outputs: bool) -> list[dict[str, Any]]:
    spec = view.spec
    if spec is None:
        return []
    batch = [-1] if spec.batching else []
    tensors = spec.outputs if outputs else spec.inputs
    return [{"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in tensors.values()]


def model_metadata(view: ModelView, version: str) -> dict[str, Any]:
    _check_version(view, version)
    config = view.record.config or {}
    return {
        "name": view.record.name,
        "versions": [version] if version else sorted(view.record.versions, key=int),
        "platform": config.get("platform") or config.get("backend", ""),
        "inputs": _tensor_metadata(view, outputs=False),
        "outputs": _tensor_metadata(view, outputs=True),
    }


def model_config(view: ModelView, version: str) -> dict[str, Any]:
    """The model's config as Triton's JSON form of ModelConfig."""
    _check_version(view, version)
    if view.record.config is None:
        raise Unsupported(f"model '{view.record.name}' has no valid config: {view.record.reason}")
    return view.record.config


def repository_index(registry: ModelRegistry, ready_only: bool) -> list[dict[str, str]]:
    index: list[dict[str, str]] = []
    for view in registry.all():
        for version in sorted(view.record.versions, key=int):
            state = view.record.versions[version]
            if ready_only and state.state != "READY":
                continue
            entry = {"name": view.record.name, "version": version, "state": state.state}
            if state.reason:
                entry["reason"] = state.reason
            index.append(entry)
        if not view.record.versions and not ready_only:
            index.append({"name": view.record.name, "state": "UNAVAILABLE", "reason": view.record.reason})
    return index


async def control(app: web.Application, verb: str, model: str, params: dict[str, Any]) -> None:
    """Forward a load/unload to the router and return once it has taken effect fleet-wide.
    `params` are the repository extension's, as HTTP has them: `config` a JSON string, each
    `file:<path>` its content in base64."""
    name = check_name("model", model)
    options = app[OPTIONS]
    message: dict[str, Any] = {"name": name, "parameters": params}
    if verb == "unload":
        message["unload_dependents"] = bool(params.get("unload_dependents", False))
    try:
        reply = await app[NATS].request(
            options.subjects.ctl(verb), orjson.dumps(message), timeout=options.control_timeout_s
        )
    except nats.errors.NoRespondersError:
        raise Unavailable("no router is running to load or unload models") from None
    except nats.errors.TimeoutError:
        raise DeadlineExceeded(
            f"{verb} of '{name}' did not finish within {options.control_timeout_s:.0f} s"
        ) from None
    answer = orjson.loads(reply.data)
    status = int(answer.get("status", 500))
    if status != 200:
        raise NatronError.from_status(status, str(answer.get("error", f"{verb} failed")))
