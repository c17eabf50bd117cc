"""Where a batch runs (workers/runners.py, BatchRunner._run): on the event loop when it is
known to be quick, or when the instance has nothing else to do and it is not slow; otherwise
in the instance's thread. Which thread ran it is what the backend sees."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from natron.spec import ModelSpec
from natron.stats import ModelStats
from workers.runners import IDLE_INLINE_BUDGET_S, INLINE_BUDGET_S, BatchRunner

SPEC = ModelSpec("m", 8, {}, {}, True, (), 0, False)


class ThreadRecorder:
    """A backend that notes which thread ran each batch."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def execute(self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]) -> dict[str, npt.NDArray[Any]]:
        self.threads.append(threading.current_thread())
        return {"OUT": inputs["IN"]}

    def close(self) -> None:
        pass


def ran_on_loop(estimate_s: float | None, waiting: int) -> bool:
    """Run one batch of one row with the instance's estimate for that size set to
    `estimate_s` (None: never measured) and `waiting` requests delivered meanwhile."""
    backend = ThreadRecorder()
    runner = BatchRunner(backend, SPEC, "1", None, ModelStats(), "m-test", waiting=lambda: waiting)  # type: ignore[arg-type]

    async def run() -> threading.Thread:
        if estimate_s is not None:
            runner._cost_s[1] = estimate_s
        await runner._run({"IN": np.zeros((1, 2), np.float32)}, [], 1)
        return threading.current_thread()

    try:
        loop_thread = asyncio.run(run())
    finally:
        runner.close()
    return backend.threads == [loop_thread]


def test_an_unmeasured_batch_runs_in_the_thread() -> None:
    assert not ran_on_loop(None, waiting=0)


def test_a_quick_batch_runs_on_the_loop_even_with_work_waiting() -> None:
    assert ran_on_loop(INLINE_BUDGET_S / 2, waiting=5)


def test_a_batch_under_the_idle_budget_runs_on_the_loop_only_when_nothing_else_waits() -> None:
    between = (INLINE_BUDGET_S + IDLE_INLINE_BUDGET_S) / 2
    assert ran_on_loop(between, waiting=0)
    assert not ran_on_loop(between, waiting=1)


def test_a_slow_batch_runs_in_the_thread_even_when_idle() -> None:
    assert not ran_on_loop(IDLE_INLINE_BUDGET_S * 2, waiting=0)
