"""Sub-millisecond timers for an event loop whose own timers count whole milliseconds.

libuv, under uvloop, keeps timers in milliseconds and rounds: a 0.5 ms `call_later` fires
either on the next turn of the loop (a caller that waits in a loop for the time to pass then
spins, burning the core it shares with everything else) or after 1 ms, while the standard
asyncio loop sleeps in epoll for at least a millisecond. A dynamic batcher's
`max_queue_delay_microseconds` is often 100-1000 µs, so it needs better: one daemon thread
sleeps on a condition variable (the kernel's high-resolution timers) until the earliest
deadline and hands each callback to its loop with `call_soon_threadsafe`. A cancelled timer
wakes nobody.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable

# Below this, a wait goes to the precise timers; above it, the loop's own are close enough.
LOOP_TIMER_RESOLUTION_S = 0.002


class TimerHandle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class PreciseTimers:
    """`call_later(delay_s, loop, callback)`: `callback()` runs on `loop` after `delay_s`,
    late by the thread's wake-up (tens of microseconds) rather than by a millisecond."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, asyncio.AbstractEventLoop, Callable[[], None], TimerHandle]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def call_later(
        self, delay_s: float, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
    ) -> TimerHandle:
        handle = TimerHandle()
        when_s = time.monotonic() + max(0.0, delay_s)
        with self._condition:
            heapq.heappush(self._heap, (when_s, next(self._order), loop, callback, handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="natron-precise-timers", daemon=True)
                self._thread.start()
            if self._heap[0][4] is handle:
                self._condition.notify()  # the earliest deadline changed
        return handle

    def _run(self) -> None:
        condition = self._condition
        while True:
            with condition:
                while True:
                    if not self._heap:
                        condition.wait()
                        continue
                    when_s, _, loop, callback, handle = self._heap[0]
                    if handle.cancelled:
                        heapq.heappop(self._heap)
                        continue
                    remaining_s = when_s - time.monotonic()
                    if remaining_s > 0:
                        condition.wait(remaining_s)
                        continue
                    heapq.heappop(self._heap)
                    break
            if not handle.cancelled and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(callback)
                except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                    pass


PRECISE = PreciseTimers()
