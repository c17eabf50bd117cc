"""A lean HTTP/1.1 client for the infer requests of `natron perf`: a pool of keep-alive
connections, each an asyncio protocol that writes a request built once and parses the answer
with httptools (llhttp, the parser the gateway's fast path uses).

Why not aiohttp's client, as for the other questions: a load generator's own CPU is taken from
the server it measures when both share a host, and aiohttp's client spends several times a bare
protocol's CPU per request (request building, header objects, the response's stream reader).
Here a request is one `transport.write` of bytes prepared before the run, and an answer is the
parser's callbacks filling a list. One connection carries one request at a time (no pipelining,
as perf_analyzer), so concurrency N settles on N connections.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

_HEADER_LENGTH = b"inference-header-content-length"


class ConnectionFailed(Exception):
    """The connection could not be opened, or broke before the whole answer came."""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    header_length: int | None  # the binary extension's JSON length, when the answer has one


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.chunks: list[bytes] = []
        self.header_length: int | None = None
        self.reusable = False
        self.answered = False  # any byte of an answer came on this connection since its last send

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionFailed(f"bad HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        reason = f"{type(exc).__name__}: {exc}" if exc else "closed by the server"
        self._fail(ConnectionFailed(f"connection lost ({reason})"))

    # -- httptools callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == _HEADER_LENGTH:
            try:
                self.header_length = int(value)
            except ValueError:
                self.header_length = None

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        self.reusable = self.parser.should_keep_alive()
        if waiter is not None and not waiter.done():
            body = b"".join(self.chunks)
            waiter.set_result(Response(self.parser.get_status_code(), body, self.header_length))

    # -- use -------------------------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def send(self, request: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.chunks = []
        self.header_length = None
        self.reusable = False
        self.answered = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class Http1Pool:
    """Keep-alive connections to one origin; `await pool.post(request_bytes)` sends a request
    built with `request()` and answers with the response."""

    def __init__(self, base: str, timeout_s: float) -> None:
        parts = urlsplit(base)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.host_header = parts.netloc
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    def request(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """A whole POST as bytes, built once and sent as many times as wanted."""
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port} ({reason})") from None
        self._all.add(connection)
        return connection

    async def post(self, request: bytes) -> Response:
        connection = None
        while self._idle and connection is None:
            connection = self._idle.pop()
            if connection.transport is None:  # closed by the server while idle (keep-alive timeout)
                self._all.discard(connection)
                connection = None
        if connection is None:
            return await self._exchange(await self._open(), request)
        try:
            return await self._exchange(connection, request)
        except ConnectionFailed:
            if connection.answered:
                raise
        # A kept-alive connection that the server closed as this request went out (its idle
        # timeout racing the send): no byte of an answer came, so the request goes again on a
        # new connection, once, as HTTP clients do. A fresh connection that fails so is an error.
        return await self._exchange(await self._open(), request)

    async def _exchange(self, connection: _Connection, request: bytes) -> Response:
        waiter = connection.send(request)
        # A timer on the future rather than wait_for: no task per request.
        timer = asyncio.get_running_loop().call_later(self.timeout_s, _expire, waiter, self.timeout_s)
        try:
            response = await waiter
        except BaseException:
            connection.close()
            self._all.discard(connection)
            raise
        finally:
            timer.cancel()
        if connection.reusable and connection.transport is not None:
            self._idle.append(connection)
        else:
            connection.close()
            self._all.discard(connection)
        return response

    def close(self) -> None:
        for connection in self._all:
            connection.close()
        self._all.clear()
        self._idle.clear()


def _expire(waiter: asyncio.Future[Response], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no answer within {timeout_s} s"))
