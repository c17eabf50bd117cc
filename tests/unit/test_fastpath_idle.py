"""The fast path's keep-alive timeout (gateway/fastpath.py): an idle connection is closed once
the timeout has passed since it went idle, a busy one is not, and one that keeps working keeps
its single timer moving instead of making one per request."""

from __future__ import annotations

import asyncio

import pytest

from gateway import fastpath


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # no socket: the fast path skips its look at the TCP state


def connection() -> tuple[fastpath.FastConnection, FakeTransport]:
    owner = fastpath.FastPath(None, lambda: asyncio.Protocol(), 1 << 20)  # type: ignore[arg-type]
    conn = owner()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_an_idle_connection_closes_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "KEEPALIVE_TIMEOUT_S", 0.05)

    async def run() -> bool:
        _, transport = connection()
        await asyncio.sleep(0.3)
        return transport.closed

    assert asyncio.run(run())


def test_a_busy_connection_stays_open_and_closes_once_idle_long_enough(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastpath, "KEEPALIVE_TIMEOUT_S", 0.2)

    async def run() -> tuple[bool, bool, bool]:
        conn, transport = connection()
        conn._disarm_idle()  # a request came: busy until answered
        await asyncio.sleep(0.5)
        busy_closed = transport.closed
        conn._arm_idle()  # answered: idle from now
        await asyncio.sleep(0.05)
        early_closed = transport.closed
        await asyncio.sleep(0.6)
        return busy_closed, early_closed, transport.closed

    assert asyncio.run(run()) == (False, False, True)


def test_activity_moves_the_one_timer_on_instead_of_making_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "KEEPALIVE_TIMEOUT_S", 0.2)

    async def run() -> bool:
        conn, transport = connection()
        for _ in range(5):
            timer = conn._idle
            conn._disarm_idle()
            conn._arm_idle()
            assert timer is not None and conn._idle is timer  # moved on when it fires, not here
            await asyncio.sleep(0.05)
        # 0.25 s have passed since the start, but only 0.05 s since the last request.
        return transport.closed

    assert not asyncio.run(run())
