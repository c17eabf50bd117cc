"""broker.server.EmbeddedNatsServer as a supervisor uses it: a crash noticed, a restart on the
same port and JetStream store, a port someone else holds refused by name, and no nats-server
outliving its parent."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType

from broker.server import BrokerPortInUse, EmbeddedNatsServer, ServerOptions
from tests.harness import wait_until_async

pytestmark = pytest.mark.mesh

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def server() -> AsyncIterator[EmbeddedNatsServer]:
    async with EmbeddedNatsServer() as server:
        yield server


async def _connect(url: str) -> Client:
    return await nats.connect(url, connect_timeout=2, allow_reconnect=False)


async def test_wait_exit_returns_the_signal_when_nats_server_is_sigkilled(
    server: EmbeddedNatsServer,
) -> None:
    assert server.is_running and server.pid is not None
    waiting = asyncio.create_task(server.wait_exit())
    os.kill(server.pid, signal.SIGKILL)  # from outside, as the kernel's OOM killer would
    assert await asyncio.wait_for(waiting, 10) == -signal.SIGKILL
    assert not server.is_running and server.pid is None


async def test_a_restart_after_a_sigkill_keeps_a_file_streams_messages_on_the_same_port(
    server: EmbeddedNatsServer,
) -> None:
    url = server.url
    nc = await _connect(url)
    js = nc.jetstream()
    await js.add_stream(name="KEPT", subjects=["kept.>"], storage=StorageType.FILE)
    for i in range(50):
        await js.publish(f"kept.{i}", str(i).encode())
    await nc.close()

    assert await server.kill() == -signal.SIGKILL
    await server.restart()
    assert server.url == url and server.is_running

    nc = await _connect(url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info("KEPT")).state.messages == 50
        reader = await js.pull_subscribe("kept.>", stream="KEPT")
        messages = await reader.fetch(50, timeout=5)
        assert [int(message.data) for message in messages] == list(range(50))
    finally:
        await nc.close()


async def test_a_restart_of_a_running_server_stops_it_first(server: EmbeddedNatsServer) -> None:
    old_pid = server.pid
    await server.restart()
    assert server.is_running and server.pid != old_pid
    nc = await _connect(server.url)
    await nc.jetstream().account_info()
    await nc.close()


async def test_a_port_another_nats_server_answers_on_is_refused_naming_it(
    server: EmbeddedNatsServer,
) -> None:
    intruder = EmbeddedNatsServer(ServerOptions(port=server.port))
    with pytest.raises(BrokerPortInUse, match=rf"already answers on port {server.port}.*--nats-url"):
        await intruder.start()
    assert not intruder.is_running
    # The server that holds the port goes on serving.
    nc = await _connect(server.url)
    await nc.jetstream().account_info()
    await nc.close()


async def test_a_port_taken_while_the_server_was_down_is_refused_and_the_store_survives_it(
    server: EmbeddedNatsServer,
) -> None:
    nc = await _connect(server.url)
    js = nc.jetstream()
    await js.add_stream(name="WAIT", subjects=["wait"], storage=StorageType.FILE)
    await js.publish("wait", b"still here")
    await nc.close()
    await server.kill()

    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        with pytest.raises(BrokerPortInUse, match=str(server.port)):
            await server.restart()
        assert not server.is_running

    await server.restart()  # the port is free again, and the store was kept for this
    nc = await _connect(server.url)
    try:
        assert (await nc.jetstream().stream_info("WAIT")).state.messages == 1
    finally:
        await nc.close()


async def test_a_port_bound_by_a_socket_that_does_not_listen_is_refused_naming_it() -> None:
    # Nothing answers there, so only nats-server's own "address already in use" can tell: the
    # readiness check must take that exit for what it is, never a listener for ours.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        server = EmbeddedNatsServer(ServerOptions(port=port))
        with pytest.raises(BrokerPortInUse, match=str(port)):
            await server.start()
        assert not server.is_running


_PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from broker.server import EmbeddedNatsServer

    async def main() -> None:
        server = EmbeddedNatsServer()
        await server.start()
        print(server.pid, flush=True)
        await asyncio.Event().wait()

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    """
)


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie nobody reaped yet (its parent, PID 1 in a container,
    may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _config_dir(pid: int) -> Path:
    """The folder of nats-server `pid`'s config file (`-c <dir>/nats.conf`)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"-c") + 1].decode()).parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_nats_server_dies_with_a_parent_that_is_sigkilled(loop: str) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PARENT,
        loop,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), 30)  # type: ignore[union-attr]
        if not line:
            err = await parent.stderr.read()  # type: ignore[union-attr]
            pytest.fail(f"the parent exited before starting nats-server: {err.decode()[-2000:]}")
        nats_pid = int(line)
        assert not _gone(nats_pid)
        leftover = _config_dir(nats_pid)  # the parent dies without removing it: the test does
    finally:
        parent.kill()  # SIGKILL: no handler, no cleanup of its own
        await parent.wait()
    try:
        await wait_until_async(lambda: _gone(nats_pid), 10, f"nats-server {nats_pid} gone with its parent")
    finally:
        shutil.rmtree(leftover, ignore_errors=True)
