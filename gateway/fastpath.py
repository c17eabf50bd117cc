"""The infer route's own HTTP/1.1 connection handler, in front of aiohttp.

aiohttp's machinery around a handler (its request and response objects, the router, the
middleware chain, header objects, the payload stream, the response writer) costs more per
request than natron's own infer work: measured on the 2-core development machine, a bare
aiohttp handler doing the JSON work of `tiny` took 182 µs of CPU per request, the same work
behind an asyncio protocol on httptools (the llhttp parser that uvicorn uses) 47 µs, and
Triton's whole server 157-180 µs. So every connection starts here, and only the plainest and
by far the commonest request is served here: `POST /v2/models/<m>[/versions/<v>]/infer`,
HTTP/1.1, keep-alive, with a Content-Length body and nothing that asks for more (no
Transfer-Encoding, Content-Encoding, Expect, Upgrade or query string). It is answered by the
same code as aiohttp's route (`gateway.infer.handle`).

Any other request hands the connection over to aiohttp for good: its bytes, from the first
byte of that request on, go to an aiohttp request handler that takes the transport's place, so
aiohttp parses, routes and answers it (health, metadata, statistics, streams, WebSockets, and
every malformed or unusual request, which aiohttp answers as before). For that the buffer always
starts at the first byte of the request being parsed: a request served here is cut from it by
its exact length, its header block up to the first empty line (llhttp refuses bare LF line ends,
so that is the end llhttp found too) plus its Content-Length.

Requests on one connection are answered in order (HTTP/1.1 pipelining); more than a few waiting
pause reading. A client that goes away cancels its request, as aiohttp's handler_cancellation
does, and the requester tells the worker. On shutdown the listener closes, requests in flight
get the drain budget, and idle connections close at once.

Idle and slow clients (gateway/connections.py): an idle connection closes after the keep-alive
timeout; a request whose head is not complete within the read timeout of its first byte, or
whose body stalls that long, closes its connection; past the connection cap, a new connection
is answered 503 and closed. With the inference group restricted (gateway/restricted.py), a
request without its header goes to aiohttp, which refuses it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import httptools
from aiohttp import web

from gateway import infer, kserve
from gateway.connections import ConnectionLimits, RefusedConnection, refusal
from gateway.keys import METRICS
from gateway.middleware import error_body, unexpected_error
from natron.errors import NatronError
from natron.restricted_api import Restriction

log = logging.getLogger(__name__)

_INFER_PATH = re.compile(rb"/v2/models/([A-Za-z0-9_-]{1,128})(?:/versions/([0-9]{1,19}))?/infer")
# A header block past this is not the plain request this path serves: aiohttp judges it.
_MAX_HEAD_BYTES = 16 * 1024
# Requests parsed and waiting for their turn on one connection before reading pauses.
_MAX_QUEUED = 8
# Linux's TCP_INFO, whose first byte is the connection's state; TCP_CLOSE once the peer reset it
# (include/net/tcp_states.h). Elsewhere there is no such look and every request is served.
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_TCP_CLOSE = b"\x07"
# An idle keep-alive connection is closed after this long, as aiohttp does (the default of
# ConnectionLimits; FastPath takes another).
KEEPALIVE_TIMEOUT_S = 75.0
# The headers the infer route reads, besides those that decide whether it is served here.
_KEPT = {b"content-length", b"inference-header-content-length", b"traceparent", b"tracestate"}
# Headers that ask aiohttp for more than a plain body: decoding, a 100-continue, a protocol.
_REFUSED = {b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"}


class _HandOver(Exception):
    """Raised from a parser callback: this request is aiohttp's."""


@dataclass(slots=True)
class _Request:
    model: str
    version: str
    headers: dict[str, str]
    body: bytes


class FastPath:
    """The listener's side: the protocol factory, and the connections to drain on stop."""

    def __init__(
        self,
        app: web.Application,
        aiohttp_server: Callable[[], asyncio.Protocol],
        max_body: int,
        limits: ConnectionLimits | None = None,
        restriction: Restriction | None = None,
        handed_over: Callable[[], int] = lambda: 0,
    ) -> None:
        """`limits`: timeouts and the connection cap; `restriction`: the inference group's
        header, if restricted; `handed_over`: how many connections aiohttp holds, which count
        towards the cap with this path's own."""
        self.app = app
        self.aiohttp_server = aiohttp_server
        self.max_body = max_body
        limits = limits or ConnectionLimits(keepalive_timeout_s=KEEPALIVE_TIMEOUT_S)
        self.keepalive_timeout_s = limits.keepalive_timeout_s
        self.read_timeout_s = limits.request_read_timeout_s
        self.max_connections = limits.max_connections
        self._refusal = refusal(limits.max_connections)
        self.handed_over = handed_over
        self.restriction = restriction
        # The headers a connection keeps: the infer route's, and the restriction's.
        self.kept = _KEPT | ({restriction.header.encode()} if restriction is not None else set())
        self.connections: set[FastConnection] = set()
        self.closing = False
        self._drained = asyncio.Event()

    def __call__(self) -> FastConnection:
        return FastConnection(self)

    def accept(self) -> asyncio.Protocol:
        """The listener's protocol factory: a connection over the cap is answered 503 and
        closed. aiohttp's share is counted only when this path's own leaves room."""
        if len(self.connections) >= self.max_connections or (
            len(self.connections) + self.handed_over() >= self.max_connections
        ):
            return RefusedConnection(self._refusal)
        return FastConnection(self)

    def forget(self, connection: FastConnection) -> None:
        self.connections.discard(connection)
        if self.closing and not self.connections:
            self._drained.set()

    async def shutdown(self, timeout_s: float) -> None:
        """Idle connections close now; those answering get `timeout_s`, then are aborted."""
        self.closing = True
        if not self.connections:
            return
        for connection in list(self.connections):
            connection.close_when_idle()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        for connection in list(self.connections):
            connection.abort()


class FastConnection(asyncio.Protocol):
    def __init__(self, owner: FastPath) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._buffer = bytearray()  # from the first byte of the request being parsed
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._content_length = 0
        self._match: re.Match[bytes] | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._hand_over = False  # once the requests queued before it are answered
        self._closing = False
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._kept = owner.kept
        self._idle: asyncio.TimerHandle | None = None
        # When the connection closes unless a request comes (idle) or this one is complete
        # (read); None while a request is being answered.
        self._deadline_s: float | None = None
        self._socket: socket.socket | None = None

    # -- the transport's callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods without being its subclass.
        self._transport = cast(asyncio.Transport, transport)
        self._socket = transport.get_extra_info("socket")
        self._owner.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.forget(self)
        self._cancel_idle()
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()  # the client went away: its request is dropped (499)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._hand_over:
            self._buffer += data  # after the request aiohttp takes over: kept for it
            return
        starts = not self._buffer  # the first bytes of a request
        self._buffer += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _HandOver):
                raise
            self._begin_hand_over()
        except httptools.HttpParserError:
            # Malformed, or something this path does not read: aiohttp answers it as before.
            self._begin_hand_over()
        else:
            if not self._head_bytes and len(self._buffer) > _MAX_HEAD_BYTES:
                # A header block without end in sight: aiohttp's limits answer it.
                self._begin_hand_over()
            elif self._task is not None:
                self._disarm_idle()  # answering: the timeouts count again once it is done
            elif starts or self._head_bytes:
                # A request's first bytes, or its body coming: the read timeout from now. More of
                # a head that began earlier moves nothing, so a head sent a byte at a time ends.
                self._arm_idle()

    # -- the parser's callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._match = None
        self._head_bytes = 0  # until the header block is complete

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > _MAX_HEAD_BYTES:
            raise _HandOver

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _REFUSED:
            raise _HandOver
        if name in self._kept:
            key = name.decode()
            if key in self._headers:
                raise _HandOver  # a repeated header: aiohttp's rules apply
            # As aiohttp decodes them: bytes that are not UTF-8 become lone surrogates, which
            # the infer handler refuses with a 400 naming the header.
            self._headers[key] = value.decode("utf-8", "surrogateescape")

    def on_headers_complete(self) -> None:
        parser = self._parser
        if (
            self._owner.closing
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or not self._buffer.startswith(b"POST ")
        ):
            raise _HandOver
        self._match = _INFER_PATH.fullmatch(self._url)
        length = self._headers.get("content-length")
        if self._match is None or length is None or not length.isdigit():
            raise _HandOver
        self._content_length = int(length)
        head_end = self._buffer.find(b"\r\n\r\n", 0, _MAX_HEAD_BYTES)
        if head_end < 0 or self._content_length > self._owner.max_body:
            raise _HandOver  # aiohttp answers 413 for a body over the limit
        restriction = self._owner.restriction
        if restriction is not None and self._headers.get(restriction.header) != restriction.value:
            raise _HandOver  # aiohttp's middleware refuses it (gateway/restricted.py)
        self._head_bytes = head_end + 4

    def on_message_complete(self) -> None:
        total = self._head_bytes + self._content_length
        if self._match is None or len(self._buffer) < total:
            raise _HandOver  # cannot happen with llhttp's framing; aiohttp would judge it
        body = bytes(self._buffer[self._head_bytes : total])
        del self._buffer[:total]
        self._head_bytes = 0
        model, version = self._match.group(1), self._match.group(2)
        self._queue.append(_Request(model.decode(), version.decode() if version else "", self._headers, body))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())
        if len(self._queue) >= _MAX_QUEUED and self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    # -- answering ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self._queue:
                request = self._queue.popleft()
                await self._answer(request)
                await self._writable.wait()
                if self._reading_paused and len(self._queue) < _MAX_QUEUED and not self._hand_over:
                    self._reading_paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
        finally:
            self._task = None
        if self._hand_over:
            self._complete_hand_over()
        elif self._closing:
            self.abort_if_open()
        else:
            self._arm_idle()

    def _peer_reset(self) -> bool:
        """Whether the client reset the connection, though the transport has not read that yet.

        A client that gives up sends its reset right behind its request: the transport hands
        the request over first and reads the reset a loop turn later, by when the request would
        be published and a worker would run it for nobody. The kernel knows already: a reset
        connection is in TCP_CLOSE. One getsockopt (about a microsecond) per request; a peer
        that only half-closed (FIN, CLOSE_WAIT) may still read its answer, so it is served."""
        if self._socket is None or _TCP_INFO is None:
            return False
        try:
            return self._socket.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[:1] == _TCP_CLOSE
        except OSError:
            return False

    async def _answer(self, request: _Request) -> None:
        headers = request.headers
        if self._peer_reset():
            # Counted as a client that went away (499), as aiohttp's route counts one.
            self._owner.app[METRICS].observe(request.model, request.version or "", 499, 0.0)
            self.abort()
            return
        try:
            answer = await infer.handle(
                self._owner.app,
                request.model,
                request.version,
                lambda name: headers.get(name.lower()),  # kept lower-cased: names are case-blind
                _reader(request.body),
            )
        # The errors as gateway/middleware.py turns them into HTTP for aiohttp's routes.
        except NatronError as exc:
            self._write(exc.status, error_body(exc.message), b"application/json")
            return
        except web.HTTPException as exc:
            self._write(exc.status, error_body(exc.text or exc.reason), b"application/json")
            return
        except Exception as exc:
            where = f"POST /v2/models/{request.model}/infer"
            self._write(500, error_body(unexpected_error(exc, where)), b"application/json")
            return
        if answer.json_length is None:
            self._write(200, answer.body, b"application/json")
        else:
            extra = b"%s: %d\r\n" % (kserve.HEADER_LENGTH_HEADER.encode(), answer.json_length)
            self._write(200, answer.body, b"application/octet-stream", extra)

    def _write(self, status: int, body: bytes, content_type: bytes, extra: bytes = b"") -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            _status_line(status),
            content_type,
            len(body),
            extra,
        )
        transport.writelines((head, body))

    # -- handing over, closing ---------------------------------------------------------------

    def _begin_hand_over(self) -> None:
        self._hand_over = True
        self._cancel_idle()
        if self._task is None:
            self._complete_hand_over()
        elif self._transport is not None and not self._reading_paused:
            # Bytes that come meanwhile are kept, but wait for the answers ahead of them.
            self._reading_paused = True
            self._transport.pause_reading()

    def _complete_hand_over(self) -> None:
        transport = self._transport
        self._owner.forget(self)
        if transport is None or transport.is_closing():
            return
        handler = self._owner.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        self._transport = None
        if data:
            handler.data_received(data)

    def close_when_idle(self) -> None:
        """On shutdown: close now if nothing is being answered, else after the answers."""
        self._closing = True
        if self._task is None:
            self.abort_if_open()

    def abort_if_open(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm_idle(self) -> None:
        """Count from now the keep-alive timeout, or, with part of a request in, the read
        timeout. One timer per connection, moved on only when it fires (or when the deadline
        comes before it): a timer made and cancelled per request would cost more than its check."""
        loop = asyncio.get_running_loop()
        owner = self._owner
        timeout_s = owner.read_timeout_s if self._buffer else owner.keepalive_timeout_s
        self._deadline_s = deadline_s = loop.time() + timeout_s
        if self._idle is not None and self._idle.when() > deadline_s:
            self._idle.cancel()
            self._idle = None
        if self._idle is None:
            self._idle = loop.call_at(deadline_s, self._check_idle)

    def _disarm_idle(self) -> None:
        self._deadline_s = None

    def _check_idle(self) -> None:
        self._idle = None
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        if self._deadline_s is None:
            # Busy: look again a timeout later.
            delay_s = min(self._owner.keepalive_timeout_s, self._owner.read_timeout_s)
        else:
            delay_s = self._deadline_s - loop.time()
            if delay_s <= 0:
                self.abort_if_open()
                return
        self._idle = loop.call_later(delay_s, self._check_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:  # not a status HTTP names
        reason = b"Error"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def _reader(body: bytes) -> infer.BodyReader:
    async def read() -> bytes:
        return body

    return read
