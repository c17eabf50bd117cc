"""Essential tasks (natron/tasks.py): a loop that dies is reported, stopping always ends."""

from __future__ import annotations

import asyncio

import pytest

from natron.tasks import EssentialTasks, ServiceFailed, Stopped, cancel_and_wait, until


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_loop_that_raises_resolves_the_failure_with_its_reason() -> None:
    tasks = EssentialTasks("worker w0")

    async def broken() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("KV put failed")

    tasks.spawn(forever(), "heartbeat")
    tasks.spawn(broken(), "follow-models")
    reason = await asyncio.wait_for(tasks.failure(), 5)
    assert reason == "worker w0: follow-models failed: RuntimeError: KV put failed"
    assert tasks.failed
    await tasks.stop()  # the loop's error is not raised again: the stop goes on to drain


async def test_a_loop_that_returns_is_a_failure_too() -> None:
    tasks = EssentialTasks("router")

    async def quits() -> None:
        await asyncio.sleep(0)

    tasks.spawn(quits(), "watch-workers")
    assert await asyncio.wait_for(tasks.failure(), 5) == "router: watch-workers ended"
    await tasks.stop()


async def test_loops_cancelled_by_stop_and_watched_tasks_unwatched_first_are_no_failure() -> None:
    tasks = EssentialTasks("worker w0")
    loop = tasks.spawn(forever(), "heartbeat")
    instance = asyncio.create_task(forever())
    tasks.watch(instance)
    tasks.unwatch([instance])
    instance.cancel()  # an unload stops it on purpose
    await asyncio.gather(instance, return_exceptions=True)
    await tasks.stop()
    assert loop.cancelled() and not tasks.failed


async def test_a_watched_task_that_ends_on_its_own_is_a_failure_and_stop_leaves_it_alone() -> None:
    tasks = EssentialTasks("worker w0")
    ended = asyncio.create_task(asyncio.sleep(0), name="tiny-v1-0")
    tasks.watch(ended)
    assert await asyncio.wait_for(tasks.failure(), 5) == "worker w0: tiny-v1-0 ended"
    running = asyncio.create_task(forever())
    tasks.watch(running)
    await tasks.stop()
    assert not running.done()  # its owner (an unload) stops it, not this one
    running.cancel()


async def test_cancelling_ends_a_task_that_swallowed_its_first_cancellation() -> None:
    """What Python 3.11's wait_for does when the answer it waits for arrives in the same loop
    turn as the cancellation: the cancellation is lost, and the loop goes on."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await forever()
        except asyncio.CancelledError:
            swallowed.set()
        await forever()

    task = asyncio.create_task(stubborn(), name="watch-workers")
    await asyncio.sleep(0)
    left = await asyncio.wait_for(cancel_and_wait([task], 5.0), 10)
    assert swallowed.is_set() and task.cancelled() and not left


async def test_until_returns_the_work_or_raises_stopped_or_service_failed() -> None:
    stop = asyncio.Event()
    assert await until(stop, asyncio.sleep(0, "started")) == "started"

    work = asyncio.ensure_future(forever())
    asyncio.get_running_loop().call_soon(stop.set)
    with pytest.raises(Stopped):
        await asyncio.wait_for(until(stop, work), 5)
    assert work.cancelled()  # a startup interrupted by SIGTERM does not go on

    tasks = EssentialTasks("gateway")

    async def broken() -> None:
        raise ConnectionError("gone")

    tasks.spawn(broken(), "follow-models")
    with pytest.raises(ServiceFailed, match="follow-models failed: ConnectionError: gone"):
        await asyncio.wait_for(until(asyncio.Event(), None, [tasks]), 5)
    await tasks.stop()
