"""Where errors become HTTP, once: the error middleware and the JSON body helpers every handler
uses."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from natron.errors import InvalidArgument, NatronError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(message: str) -> bytes:
    """The JSON body of every error answer, as Triton writes it."""
    return orjson.dumps({"error": message})


def unexpected_error(exc: Exception) -> str:
    """The message of a 500 for an exception nobody expected."""
    return f"internal error: {type(exc).__name__}: {exc}"


def error_response(status: int, message: str) -> web.Response:
    return web.Response(body=error_body(message), status=status, content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become HTTP: NatronError by its status, aiohttp's own
    (404 route, 405 method, 413 body) as JSON, anything unexpected as a 500 naming it."""
    try:
        return await handler(request)
    except NatronError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return error_response(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.text or exc.reason)
    except Exception as exc:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, unexpected_error(exc))


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """A request body that must be a JSON object (empty: {}); a 400 naming `what` otherwise."""
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{what} body must be a JSON object")
    return parsed


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
