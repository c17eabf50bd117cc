"""The background loops a component cannot work without, owned and watched.

A loop that dies quietly is the worst failure a service can have: its heartbeat goes on, so it
looks healthy, while its real work (following the models, placing them, serving a version) has
stopped. So every essential loop runs under an `EssentialTasks`: the first one that ends or
raises before `stop()` is logged with the reason and resolves `failure()`, which the process's
runner awaits next to its stop signal; it then shuts the service down in the usual order and
exits non-zero, so that its supervisor (`natron serve`, compose, Kubernetes) restarts it.
A failure that is expected and passes (a KV put while NATS reconnects) is retried inside the
loop; it never reaches this owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar, overload

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long stopping a component's loops may take; they only need to be cancelled.
STOP_TIMEOUT_S = 5.0
# A cancellation swallowed by a race (see cancel_and_wait) is repeated after this, then
# after twice as long, and so on.
_RECANCEL_S = 0.1


class EssentialTasks:
    """`tasks.spawn(loop(), "name")` ... `reason = await tasks.failure()` ... `await tasks.stop()`"""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._spawned: set[asyncio.Task[Any]] = set()
        self._watched: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._failure: asyncio.Future[str] | None = None

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coroutine` as a loop of this owner: it must run until `stop()`, which cancels it."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._on_done)
        return task

    def watch(self, task: asyncio.Task[Any]) -> None:
        """Watch a task someone else runs and stops (a model instance, drained on unload): its
        ending counts as a failure until `unwatch`. `stop()` does not cancel it."""
        self._watched.add(task)
        task.add_done_callback(self._on_done)

    def unwatch(self, tasks: Iterable[asyncio.Task[Any]]) -> None:
        """These tasks are about to be stopped on purpose: their ending is no failure."""
        for task in tasks:
            self._watched.discard(task)
            task.remove_done_callback(self._on_done)

    @property
    def failed(self) -> bool:
        return self._failure is not None and self._failure.done()

    async def failure(self) -> str:
        """Wait until an essential task ends or raises; the reason, for the log and the exit."""
        return await asyncio.shield(self._future())

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Cancel the loops and wait for them; watched tasks are left to their owner. An error a
        loop died with was logged when it died and is not raised again here, so a service
        whose loop died still unloads and drains. Safe to call twice."""
        self._stopping = True
        self.unwatch(list(self._watched))
        tasks, self._spawned = self._spawned, set()
        await cancel_and_wait(tasks, timeout_s)

    def _future(self) -> asyncio.Future[str]:
        if self._failure is None:
            self._failure = asyncio.get_running_loop().create_future()
        return self._failure

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if self._stopping or (task not in self._spawned and task not in self._watched):
            return
        exc = None if task.cancelled() else task.exception()
        if task.cancelled():
            reason = f"{task.get_name()} was cancelled"
        elif exc is not None:
            reason = f"{task.get_name()} failed: {type(exc).__name__}: {exc}"
        else:
            reason = f"{task.get_name()} ended"
        log.error("%s: essential task %s", self._owner, reason, exc_info=exc)
        failure = self._future()
        if not failure.done():
            failure.set_result(f"{self._owner}: {reason}")


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], timeout_s: float, reason: str | None = None
) -> set[asyncio.Task[Any]]:
    """Cancel `tasks` and wait until they end, within `timeout_s`; those still running then are
    logged and returned (never raised: this is a stop path).

    One `cancel()` is not enough on Python 3.11: `asyncio.wait_for` returns the result instead
    of raising when its inner future completes in the same loop turn as the cancellation, and
    nats-py waits for every request's answer with it. A loop cancelled just as a KV put was
    acknowledged went on waiting for its next update, and its process ignored SIGTERM. So the
    cancellation is repeated until the task really ends."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # Growing intervals: a task cleaning up after its cancellation (unsubscribing, say) is
    # interrupted again only if it takes longer and longer.
    interval_s = _RECANCEL_S
    while pending:
        for task in pending:
            task.cancel(reason)
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(interval_s, remaining))
        for task in pending:
            log.debug("task %s still running %.1f s after its cancellation", task.get_name(), interval_s)
        interval_s *= 2
    for task in pending:
        log.error("task %s did not end within %.1f s of being cancelled", task.get_name(), timeout_s)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: its error was logged where it mattered
    return pending


async def first_failure(*owners: EssentialTasks) -> str:
    """The reason of the first failure among `owners`."""
    waits = [asyncio.ensure_future(owner.failure()) for owner in owners]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for wait in waits:
            wait.cancel()


class Stopped(Exception):
    """A stop was asked before what the process was waiting for finished."""


class ServiceFailed(Exception):
    """An essential task of the service died: the process must exit non-zero."""


@overload
async def until(stop: asyncio.Event, work: Awaitable[T], essential: Sequence[EssentialTasks] = ()) -> T: ...


@overload
async def until(stop: asyncio.Event, work: None = None, essential: Sequence[EssentialTasks] = ()) -> None: ...


async def until(
    stop: asyncio.Event, work: Awaitable[T] | None = None, essential: Sequence[EssentialTasks] = ()
) -> T | None:
    """`work`'s result, unless `stop` is set (raises Stopped) or an essential task fails
    (raises ServiceFailed) first; `work` is then cancelled. Without `work`: wait for either.

    A process starting up (connecting to a NATS that is not there yet, loading models) must
    still end promptly on SIGTERM, and one whose loop died must not wait for a stop that never
    comes."""
    pending = asyncio.ensure_future(work) if work is not None else None
    stopping = asyncio.ensure_future(stop.wait())
    failing = asyncio.ensure_future(first_failure(*essential)) if essential else None
    waits = {w for w in (pending, stopping, failing) if w is not None}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if failing is not None:
            failing.cancel()
        if pending is not None and not pending.done():
            await cancel_and_wait([pending], STOP_TIMEOUT_S)
    if pending is not None and pending in done:
        return pending.result()
    if failing is not None and failing in done:
        raise ServiceFailed(failing.result())
    raise Stopped
