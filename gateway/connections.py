"""Idle and slow clients: how long a connection may sit idle or half-sent, and how many one
gateway process keeps open. Each open connection costs a file descriptor and some memory; a
client that opens many and sends nothing, or sends a request a byte at a time, must not be able
to hold them for ever.

- Keep-alive timeout: a connection with no request in progress (a fresh one, or one between
  requests) is closed after `keepalive_timeout_s` (aiohttp's and nginx's default, 75 s: longer
  than the 60 s idle timeout of the usual load balancers, so the balancer, not the gateway,
  closes a pooled connection first and never sends a request into a closing one).
- Request read timeout: once a request's first byte is in, its head (request line and headers)
  must be complete within `request_read_timeout_s`, however slowly it trickles; its body may
  take as long as it needs but may not stall for that long (a 64 MiB body over a slow link is
  fine, a body that stops is not). The fast path (gateway/fastpath.py) applies both. A
  connection it handed to aiohttp has aiohttp's keep-alive timer for a half-sent head (aiohttp
  has no separate head timeout) and `body_deadline_middleware` for a stalled body.
- Connection cap: past `max_connections` open connections, a new one is answered at once with
  503, a JSON error and `Connection: close`, then closed. Answering rather than closing at
  accept tells the client why (a bare close reads as a network fault and is retried at once).
- gRPC: the same bounds as grpc core options (`grpc_options`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.middleware import Handler, error_body

# How long a refused connection stays open for its answer to be read before it is closed.
REFUSAL_LINGER_S = 1.0


@dataclass(slots=True, frozen=True)
class ConnectionLimits:
    keepalive_timeout_s: float = 75.0
    request_read_timeout_s: float = 30.0
    max_connections: int = 10_000


def refusal(max_connections: int) -> bytes:
    """The whole answer to a connection over the cap."""
    body = error_body(
        f"the gateway has {max_connections} connections open, its limit (--http-max-connections): "
        "retry later, or reuse a connection"
    )
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s" % (len(body), body)
    )


class RefusedConnection(asyncio.Protocol):
    """A connection over the cap: answered 503 as soon as it opens, then closed. What the
    client sends meanwhile is read and dropped: closing with unread bytes would make the kernel
    reset the connection, and the client could lose the answer."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._transport.write(self._answer)  # type: ignore[union-attr]
        if self._transport.can_write_eof():  # type: ignore[union-attr]
            self._transport.write_eof()  # type: ignore[union-attr]
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, self._close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def body_deadline_middleware(timeout_s: float) -> Any:
    """aiohttp's routes: a request whose body stops arriving for `timeout_s` closes its
    connection (the handler waiting for the body is then cancelled). One timer per request
    with a body still coming, moved on while bytes arrive; none for the others."""

    @web.middleware
    async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
        content = request.content
        if not request.body_exists or content.is_eof():
            return await handler(request)
        loop = asyncio.get_running_loop()
        seen = content.total_bytes
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal seen, timer
            timer = None
            if content.is_eof():
                return
            if content.total_bytes == seen:
                transport = request.transport
                if transport is not None:
                    transport.close()
                return
            seen = content.total_bytes
            timer = loop.call_later(timeout_s, check)

        timer = loop.call_later(timeout_s, check)
        try:
            return await handler(request)
        finally:
            if timer is not None:
                timer.cancel()

    return watch


def grpc_options(limits: ConnectionLimits) -> list[tuple[str, Any]]:
    """grpc core's bounds for the same three things: a connection with no call open is closed
    (with GOAWAY, which a client's channel takes in its stride) after the keep-alive timeout;
    one that has not finished its HTTP/2 handshake within the read timeout is dropped; and past
    the cap, new connections are not taken."""
    return [
        ("grpc.max_connection_idle_ms", int(limits.keepalive_timeout_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(limits.request_read_timeout_s * 1000)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
    ]
