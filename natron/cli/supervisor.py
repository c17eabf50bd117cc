"""`natron serve`'s process supervisor: each service is its own OS process, whose command line
names it (`natron worker ...`), restarted with backoff when it dies, and stopped in order.

Children run in their own process groups, so a Ctrl-C at the terminal reaches only the
supervisor, which then stops them in the order that loses nothing: gateway first (no new
requests), then workers (drain what they hold), then the router, and NATS last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Child:
    name: str
    args: list[str]
    env: dict[str, str] | None = None
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, max_backoff_s: float = 10.0) -> None:
        self._children: list[Child] = []
        self._stopping = False
        self._max_backoff_s = max_backoff_s

    def add(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        """A child running `natron <args>`; `env` adds to this process's environment."""
        child = Child(name, [sys.executable, "-m", "natron", *args], env)
        self._children.append(child)
        return child

    async def start(self) -> None:
        for child in self._children:
            await self._spawn(child)
            child.task = asyncio.create_task(self._watch(child), name=f"supervise-{child.name}")

    async def _spawn(self, child: Child) -> None:
        env = {**os.environ, **child.env} if child.env else None
        child.process = await asyncio.create_subprocess_exec(*child.args, start_new_session=True, env=env)
        log.debug("started %s (pid %d)", child.name, child.process.pid)

    async def _watch(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        while True:
            assert child.process is not None
            started_s = loop.time()
            code = await child.process.wait()
            if self._stopping:
                return
            # A child that ran a while before dying starts again at once; one that keeps dying
            # backs off exponentially, up to max_backoff_s.
            if loop.time() - started_s > 30:
                child.restarts = 0
            backoff_s = min(self._max_backoff_s, 0.5 * 2**child.restarts)
            child.restarts += 1
            log.warning("%s exited with code %s; restarting in %.1f s", child.name, code, backoff_s)
            await asyncio.sleep(backoff_s)
            if self._stopping:
                return
            await self._spawn(child)

    async def stop(self, order: list[str], timeout_s: float = 30.0) -> None:
        """SIGTERM each named group in turn and wait for it; SIGKILL after `timeout_s`."""
        self._stopping = True
        for child in self._children:
            if child.task is not None:
                child.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.task
        for prefix in order:
            group = [c for c in self._children if c.name.startswith(prefix)]
            for child in group:
                if child.process is not None and child.process.returncode is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                if child.process is None:
                    continue
                try:
                    await asyncio.wait_for(child.process.wait(), timeout_s)
                except TimeoutError:
                    log.warning("%s did not stop within %.0f s; killing it", child.name, timeout_s)
                    child.process.kill()
                    await child.process.wait()
