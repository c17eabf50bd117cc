"""Where errors become HTTP, once: the error middleware and the JSON body helpers every handler
uses."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from natron.errors import InvalidArgument, NatronError, PayloadTooLarge

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(message: str) -> bytes:
    """The JSON body of every error answer, as Triton writes it."""
    return orjson.dumps({"error": message})


def unexpected_error(exc: BaseException, where: str = "") -> str:
    """The message of a 500 for an exception nobody expected: an incident id, logged here with
    the traceback. The client learns nothing of the exception itself (its type, or a host
    path its text may carry); an operator finds it in the log by the id."""
    incident = secrets.token_hex(6)
    log.error("internal error %s%s", incident, f" on {where}" if where else "", exc_info=exc)
    return f"internal error (incident {incident}): the server's log has the details"


def payload_error(exc: Exception, max_body_bytes: int) -> NatronError:
    """What reading a request body raised, as the client's mistake it is: a body that does
    not decode (Content-Encoding) or breaks its framing is a 400, one over the limit a 413
    naming the flag that sets it."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            f"the request body is over the limit of {max_body_bytes} bytes (the gateway's --max-body-mb; "
            "natron serve's --max-payload-mb)"
        )
    cause = exc.__cause__ if isinstance(exc, RequestPayloadError) and exc.__cause__ else exc
    reason = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
    return InvalidArgument(f"the request body cannot be read: {' '.join(str(reason).split())}")


async def read_body(request: web.Request) -> bytes:
    """The whole body, decoded; NatronError (400, 413) for a body that cannot be read."""
    try:
        return await request.read()
    except (RequestPayloadError, HttpProcessingError, web.HTTPRequestEntityTooLarge) as exc:
        raise payload_error(exc, request.client_max_size) from None


def error_response(status: int, message: str) -> web.Response:
    return web.Response(body=error_body(message), status=status, content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become HTTP: NatronError by its status, aiohttp's own
    (404 route, 405 method, 413 body) as JSON, a body that cannot be read as a 400, anything
    unexpected as a 500 with an incident id (the log has the rest)."""
    try:
        return await handler(request)
    except NatronError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return error_response(exc.status, exc.message)
    except (RequestPayloadError, HttpProcessingError, web.HTTPRequestEntityTooLarge) as exc:
        error = payload_error(exc, request.client_max_size)
        return error_response(error.status, error.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.text or exc.reason)
    except Exception as exc:
        return error_response(500, unexpected_error(exc, f"{request.method} {request.path}"))


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
