"""natron perf's HTTP/1.1 pool against a small asyncio server in this process: kept-alive
connections are reused; one the server closes as a request goes out (its idle timeout racing
the send) costs that request nothing, it goes again on a new connection; a connection that
fails without a kept-alive history is an error, not retried."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from natron.perf.http1 import ConnectionFailed, Http1Pool

pytestmark = pytest.mark.unit

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"


class _Server:
    """Answers requests; `closes(connection_number, request_number)` says which request's
    arrival closes its connection without an answer."""

    def __init__(self, closes: Callable[[int, int], bool]) -> None:
        self.closes = closes
        self.connections = 0
        self.requests = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, served = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                self.requests += 1
                served += 1
                if self.closes(number, served):
                    return
                writer.write(_ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def _serving(server: _Server) -> AsyncIterator[Http1Pool]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    pool = Http1Pool(f"http://127.0.0.1:{server.port}", timeout_s=5)
    try:
        yield pool
    finally:
        pool.close()
        listener.close()
        await listener.wait_closed()


async def test_a_kept_alive_connection_closed_as_a_request_goes_out_costs_nothing() -> None:
    # The first connection's second request meets a server that has just closed it.
    server = _Server(lambda connection, request: connection == 1 and request == 2)
    async with _serving(server) as pool:
        request = pool.request("/v2/models/m/infer", {}, b"{}")
        first = await pool.post(request)
        second = await pool.post(request)  # reuses connection 1, which the server closes
        third = await pool.post(request)
        assert [r.status for r in (first, second, third)] == [200, 200, 200]
        assert second.body == b"ok"
        # The second went twice: on the closed connection, and again on a new one, reused after.
        assert (server.connections, server.requests) == (2, 4)


async def test_a_fresh_connection_that_closes_without_an_answer_is_an_error() -> None:
    server = _Server(lambda connection, request: True)
    async with _serving(server) as pool:
        with pytest.raises(ConnectionFailed, match="connection lost"):
            await pool.post(pool.request("/v2/models/m/infer", {}, b"{}"))
        assert (server.connections, server.requests) == (1, 1)  # not sent again
