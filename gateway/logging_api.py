"""Triton's logging extension: `GET /v2/logging` answers the deployment's log settings,
`POST /v2/logging` changes some of them and answers them all (docs/extensions.md).

The settings are the deployment's, not this process's: a change is stored and broadcast through
the broker (broker/shared_settings.py) and every natron process that follows them applies it,
this gateway included. Until the first change, the answer is this gateway's own start-up
settings (its --log-level and --log-format).

The gRPC service answers `LogSettings` with `log_settings_rpc`, over the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web
from tritonclient.grpc import service_pb2 as pb

from broker import shared_settings
from gateway.keys import GATEWAY_TASKS, NATS, OPTIONS
from gateway.middleware import json_object, json_response
from natron import logsettings
from natron.errors import InternalError, InvalidArgument
from natron.logsettings import LogSettings

log = logging.getLogger(__name__)


async def _stored(app: web.Application) -> LogSettings | None:
    record = await shared_settings.read(app[NATS], app[OPTIONS].subjects, shared_settings.LOGGING)
    if record is None:
        return None
    try:
        return logsettings.decode(record.value)
    except InvalidArgument as exc:  # the broker's record, not the caller's request
        raise InternalError(f"the stored log settings are unreadable: {exc.message}") from None


async def get_log_settings(app: web.Application) -> dict[str, Any]:
    """The deployment's log settings, as `GET /v2/logging` answers them."""
    stored = await _stored(app)
    return (stored if stored is not None else logsettings.current()).as_dict()


async def update_log_settings(app: web.Application, changes: Mapping[str, object]) -> dict[str, Any]:
    """Change the settings `changes` names (a `POST /v2/logging` body) for the whole deployment
    and answer them all. InvalidArgument (400) naming the key for an unknown key, a wrong type
    or `log_file`; nothing changes then. Unavailable (503) when the broker cannot store them."""
    logsettings.parse_changes(changes)  # refuse a bad request before the broker is asked

    def change(stored: bytes | None) -> bytes:
        return logsettings.encode(_readable(stored).updated(changes))

    record = await shared_settings.update(app[NATS], app[OPTIONS].subjects, shared_settings.LOGGING, change)
    settings = logsettings.decode(record.value)
    # At once here, so the answer and this gateway agree; the broadcast reaches the others
    # (and this gateway again, which changes nothing).
    logsettings.apply(settings)
    log.info("log settings changed (revision %d): %s", record.revision, settings.describe())
    return settings.as_dict()


def _readable(stored: bytes | None) -> LogSettings:
    """The stored settings a change applies to: this gateway's own when there are none, or when
    the record is unreadable (the change then replaces it, rather than failing for ever)."""
    if stored is not None:
        try:
            return logsettings.decode(stored)
        except InvalidArgument as exc:
            log.warning("replacing unreadable stored log settings: %s", exc.message)
    return logsettings.current()


# -- gRPC ----------------------------------------------------------------------------------


async def log_settings_rpc(app: web.Application, request: Any) -> Any:
    """Triton's `LogSettings` RPC: a request with settings changes them, an empty one reads them;
    the answer holds them all (pb.LogSettingsResponse)."""
    changes = {key: _grpc_value(value) for key, value in request.settings.items()}
    settings = await update_log_settings(app, changes) if changes else await get_log_settings(app)
    response = pb.LogSettingsResponse()
    for key, value in settings.items():
        if isinstance(value, bool):
            response.settings[key].bool_param = value
        elif isinstance(value, int):
            response.settings[key].uint32_param = value
        else:
            response.settings[key].string_param = value
    return response


def _grpc_value(value: Any) -> object:
    # An unset oneof leaves the setting as it is, as `null` does over HTTP.
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


# -- HTTP ----------------------------------------------------------------------------------


async def get_logging(request: web.Request) -> web.Response:
    return json_response(await get_log_settings(request.app))


async def post_logging(request: web.Request) -> web.Response:
    changes = json_object(await request.read(), "log settings")
    return json_response(await update_log_settings(request.app, changes))


async def _follow_ctx(app: web.Application) -> AsyncIterator[None]:
    # An essential loop of the gateway: stopped with the others (GATEWAY_TASKS), before the
    # connection closes.
    follow = shared_settings.follow_log_settings(app[NATS], app[OPTIONS].subjects)
    app[GATEWAY_TASKS].spawn(follow, "gateway-log-settings")
    yield


def add_routes(app: web.Application) -> None:
    """The routes, and the gateway's own following of the settings (after the connection and
    the gateway's tasks are set up: call it after the app's cleanup contexts are in place)."""
    app.router.add_get("/v2/logging", get_logging)
    app.router.add_post("/v2/logging", post_logging)
    app.cleanup_ctx.append(_follow_ctx)
