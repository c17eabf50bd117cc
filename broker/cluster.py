"""A JetStream cluster of embedded nats-servers on one host, for `natron serve` and for tests of
broker restarts and node loss: `size` nats-server processes, each with its own client port,
cluster port and store, routed to all the others.

    async with EmbeddedNatsCluster(3) as cluster:
        nc = await nats.connect(cluster.urls)
        await cluster.kill(1)      # SIGKILL, as a crash would
        await cluster.restart(1)   # the same ports and store; it catches up from the others
        await cluster.wait_jetstream()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import StorageType

from broker.auth import ClientAuth
from broker.server import EmbeddedNatsServer, ServerOptions, free_ports

T = TypeVar("T")

# Created and deleted once at start: a replicated stream (R3 at most, JetStream's usual
# replication) can be created only once a meta leader is elected and knows enough peers.
_PROBE_STREAM = "natron_cluster_probe"
_PROBE_SUBJECT = "_natron.cluster.probe"
_MAX_PROBE_REPLICAS = 3
_RETRY_PAUSE_S = 0.2
_REQUEST_TIMEOUT_S = 2.0
# A node not ready yet answers JetStream requests with these, or with silence.
_NOT_YET = (nats.errors.Error, TimeoutError, OSError)


class EmbeddedNatsCluster:
    """`size` EmbeddedNatsServers forming one JetStream cluster.

    `options` applies to every node; a non-zero `port` (and `cluster_port`, `monitor_port`)
    gives node i that port plus i, zero picks free ports. `store_dir`, when named, holds one
    folder per node. Node i's server_name is `<server_name or cluster_name>-<i>`."""

    def __init__(
        self, size: int = 3, options: ServerOptions | None = None, probe_auth: ClientAuth | None = None
    ) -> None:
        """`probe_auth`: the identity the readiness probes connect with where `options` has an
        authorization (one that may create and delete a stream: admin)."""
        if size < 1:
            raise ValueError(f"size={size}: a cluster needs at least one node")
        self._size = size
        self._options = options or ServerOptions()
        self._probe_auth = probe_auth
        self._nodes: list[EmbeddedNatsServer] = []

    @property
    def nodes(self) -> Sequence[EmbeddedNatsServer]:
        return tuple(self._nodes)

    @property
    def urls(self) -> list[str]:
        """Every node's client URL: a server list for nats-py's connect()."""
        return [node.url for node in self._nodes]

    @property
    def url(self) -> str:
        """The client URLs joined by commas, as a single URL setting spells a server list."""
        return ",".join(self.urls)

    @property
    def server_names(self) -> list[str]:
        """Node i's JetStream name, as stream info names leaders and replicas."""
        prefix = self._options.server_name or self._options.cluster_name
        return [f"{prefix}-{index}" for index in range(self._size)]

    def _node_options(self) -> list[ServerOptions]:
        opts, size = self._options, self._size
        # Free ports for what is not given, none of them a given one: a route listener on
        # port+1 would make node 1's client port look taken.
        given = {opts.port + i for i in range(size)} if opts.port else set()
        given |= {opts.cluster_port + i for i in range(size)} if opts.cluster_port else set()
        spare = iter([port for port in free_ports(2 * size + len(given)) if port not in given])
        client_ports = [opts.port + i if opts.port else next(spare) for i in range(size)]
        cluster_ports = [opts.cluster_port + i if opts.cluster_port else next(spare) for i in range(size)]
        # The nodes share one host, so the routes between them stay on loopback whatever
        # interface the clients reach: no one else can join the cluster or read its traffic.
        routes = [f"nats-route://127.0.0.1:{port}" for port in cluster_ports]
        return [
            replace(
                opts,
                port=client_ports[i],
                server_name=name,
                cluster_port=cluster_ports[i],
                cluster_host="127.0.0.1",
                routes=tuple(route for j, route in enumerate(routes) if j != i),
                monitor_port=None if opts.monitor_port is None else opts.monitor_port + i,
                store_dir=None if opts.store_dir is None else opts.store_dir / name,
            )
            for i, name in enumerate(self.server_names)
        ]

    async def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start every node and return once JetStream works cluster-wide: a meta leader is
        elected, every node reaches it, and a replicated stream can be created."""
        if self._nodes:
            raise RuntimeError("the cluster is already started")
        self._nodes = [EmbeddedNatsServer(options) for options in self._node_options()]
        try:
            # One node failing cancels the others' starts (each cleans up after itself), and
            # its own error, not a group of them, tells why.
            starts = [asyncio.create_task(node.start()) for node in self._nodes]
            try:
                await asyncio.gather(*starts)
            finally:
                for start in starts:
                    start.cancel()
                await asyncio.gather(*starts, return_exceptions=True)
            loop = asyncio.get_running_loop()
            await self._wait_usable(loop.time() + ready_timeout_s)
        except BaseException:
            await self.stop()
            raise

    async def kill(self, index: int) -> int | None:
        """SIGKILL node `index`, as a crash would, and return its exit code once it is gone."""
        return await self._nodes[index].kill()

    async def restart(self, index: int, ready_timeout_s: float = 15.0) -> None:
        """Start node `index` again on its ports and store (stopping it first if it runs).
        It rejoins and catches up on streams from the other nodes in the background;
        `wait_jetstream()` waits until JetStream answers through it. (Not waited for here: with
        a majority of nodes down there is no meta leader until the next node is back too.)"""
        await self._nodes[index].restart(ready_timeout_s)

    async def wait_jetstream(self, timeout_s: float = 30.0) -> None:
        """Return once JetStream answers through every running node: each reaches an
        elected meta leader."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for node in self._nodes:
            if node.is_running:
                probe = functools.partial(_account_info, node.url, self._probe_auth)
                await _retry(probe, deadline, f"JetStream through {node.url}")

    async def wait_exit(self, index: int) -> int | None:
        """Return when node `index` exits, with its return code."""
        return await self._nodes[index].wait_exit()

    async def wait_any_exit(self) -> tuple[int, int | None]:
        """Return when any node exits: its index and return code."""
        waits = [asyncio.create_task(node.wait_exit()) for node in self._nodes]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            index = next(i for i, wait in enumerate(waits) if wait in done)
            return index, waits[index].result()
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every node (their stores removed unless options named one); safe to call
        twice and after a failed start."""
        nodes, self._nodes = self._nodes, []
        results = await asyncio.gather(*(node.stop(timeout_s) for node in nodes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def __aenter__(self) -> EmbeddedNatsCluster:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _wait_usable(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        await self.wait_jetstream(deadline - loop.time())
        replicas = min(self._size, _MAX_PROBE_REPLICAS)
        await _retry(
            functools.partial(_probe_stream, self.urls, replicas, self._probe_auth),
            deadline,
            f"an R{replicas} stream",
        )


async def _connect(servers: str | list[str], auth: ClientAuth | None) -> Client:
    async def quiet(*_: object) -> None:
        """The probes' connection problems are what they wait out, not news to log."""

    return await nats.connect(
        servers,
        name="natron-cluster-probe",
        connect_timeout=_REQUEST_TIMEOUT_S,
        allow_reconnect=False,
        error_cb=quiet,
        disconnected_cb=quiet,
        closed_cb=quiet,
        **(auth.connect_options() if auth is not None else {}),
    )


async def _account_info(url: str, auth: ClientAuth | None) -> None:
    nc = await _connect(url, auth)
    try:
        await nc.jetstream(timeout=_REQUEST_TIMEOUT_S).account_info()
    finally:
        await nc.close()


async def _probe_stream(urls: list[str], replicas: int, auth: ClientAuth | None) -> None:
    nc = await _connect(urls, auth)
    try:
        jsm = nc.jetstream(timeout=_REQUEST_TIMEOUT_S)
        # Idempotent: a probe whose answer was lost, or one a store kept from an earlier run,
        # is created again without complaint.
        await jsm.add_stream(
            name=_PROBE_STREAM, subjects=[_PROBE_SUBJECT], storage=StorageType.MEMORY, num_replicas=replicas
        )
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await jsm.delete_stream(_PROBE_STREAM)
    finally:
        await nc.close()


async def _retry(attempt: Callable[[], Awaitable[T]], deadline: float, what: str) -> T:
    """`attempt()` until it succeeds; past `deadline`, a RuntimeError naming `what` and the last
    answer."""
    loop = asyncio.get_running_loop()
    while True:
        remaining_s = deadline - loop.time()
        try:
            return await asyncio.wait_for(attempt(), max(remaining_s, 0.001))
        except _NOT_YET as exc:
            if loop.time() + _RETRY_PAUSE_S >= deadline:
                raise RuntimeError(f"nats cluster: {what} did not come up in time (last: {exc!r})") from exc
        await asyncio.sleep(_RETRY_PAUSE_S)
