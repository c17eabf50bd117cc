"""Sub-millisecond timers (natron/timers.py): callbacks run on their loop, in deadline order,
and a cancelled one never runs."""

from __future__ import annotations

import asyncio

from natron.timers import PreciseTimers


def test_callbacks_run_on_the_loop_in_deadline_order_and_cancelled_ones_never() -> None:
    timers = PreciseTimers()

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        done = asyncio.Event()

        def record(name: str) -> None:
            assert asyncio.get_running_loop() is loop  # called on the loop's own thread
            fired.append(name)
            if name == "last":
                done.set()

        # Deadlines far apart compared with how long scheduling takes (the first call starts the
        # thread), so their order is the order of the delays.
        timers.call_later(0.06, loop, lambda: record("third"))
        timers.call_later(0.02, loop, lambda: record("first"))
        timers.call_later(0.04, loop, lambda: record("second"))
        timers.call_later(0.03, loop, lambda: record("cancelled")).cancel()
        timers.call_later(0.08, loop, lambda: record("last"))
        await asyncio.wait_for(done.wait(), 10)
        return fired

    assert asyncio.run(run()) == ["first", "second", "third", "last"]


def test_a_timer_whose_loop_has_closed_is_dropped_and_the_next_still_fires() -> None:
    timers = PreciseTimers()
    closed = asyncio.new_event_loop()
    timers.call_later(0.0002, closed, lambda: None)
    closed.close()

    async def run() -> bool:
        fired = asyncio.Event()
        timers.call_later(0.001, asyncio.get_running_loop(), fired.set)
        await asyncio.wait_for(fired.wait(), 10)
        return fired.is_set()

    assert asyncio.run(run())
