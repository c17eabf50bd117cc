"""`natron serve`'s process supervisor: each service is its own OS process, whose command line
names it (`natron worker ...`), restarted with backoff when it dies, and stopped in order.

Children run in their own process groups, so a Ctrl-C at the terminal reaches only the
supervisor, which then stops them in the order that loses nothing: gateway first (no new
requests), then workers (drain what they hold), then the router, and NATS last.

Each child exits within its shutdown budget; the supervisor waits SUPERVISOR_GRACE_S longer
(one deadline for the whole ordered stop), then kills what is left, so `natron serve` itself
ends within `stop_bound_s(budget)`. A child that exits non-zero (an essential task died) is
restarted like one that crashed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from natron.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# The supervisor waits this much longer than a child's budget before it kills the child.
SUPERVISOR_GRACE_S = 5.0


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

    async def stop(self, order: list[str], timeout_s: float) -> None:
        """SIGTERM each named group in turn and wait for it, all within `timeout_s` (a child's
        budget and SUPERVISOR_GRACE_S); SIGKILL what is still running then. Children not named
        in `order` are stopped last."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await cancel_and_wait([c.task for c in self._children if c.task is not None], 2.0)
        named = [[c for c in self._children if c.name.startswith(prefix)] for prefix in order]
        rest = [c for c in self._children if not any(c in group for group in named)]
        for group in [*named, rest]:
            for child in group:
                if child.process is not None and child.process.returncode is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                if child.process is None:
                    continue
                try:
                    await asyncio.wait_for(child.process.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    log.warning("%s did not stop within %.0f s; killing it", child.name, timeout_s)
                    child.process.kill()
                    await child.process.wait()
