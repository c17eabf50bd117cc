"""Dynamic batching, the whole policy: when to take requests, which of them run together, and
how a batch's outputs go back to its requests.

It follows Triton's dynamic batcher, in the shape of Ray Serve's batch queue:

* Taking (`Batcher.next`): wait for a first request; take what already waits in the queue, up
  to `max_items`; then, with `max_queue_delay` configured and fewer than `enough` in hand
  (Triton's largest preferred batch size, else `max_batch_size`), linger for more until the
  oldest request in hand has waited `max_queue_delay` since it arrived. The timer starts at the
  first item, not at the end of the previous batch, so a request never waits longer than the
  delay for company. Unlike Triton, a linger that keeps gathering nobody is skipped: the delay
  is a bound, not a toll, and at low load (one client, one request at a time) waiting only adds
  it to every request's latency. After LINGERS_BEFORE_SKIPPING fruitless lingers in a row, the
  batcher lingers only every PROBE_EVERY-th round, to notice when company comes again; the
  first linger that gathers anything restores lingering every round.
* Grouping (`group`): requests whose non-batch shapes or datatypes differ never share an
  execution, and an execution holds at most `max_batch_size` rows; arrival order is kept.
  Requests whose callers went away (cancelled) or whose deadline passed are not here at all:
  admission answered or dropped them before batching.
* Joining and splitting (`join`, `split`): the inputs of a group are concatenated along the
  batch dimension, which is the one copy batching itself costs (a group of one is passed on
  as is), and each output is cut back into zero-copy views per request, after checking that
  its batch dimension holds exactly the rows that went in.

The transport underneath (pull requests, arrival times, acknowledgements) is broker/puller.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from nats.aio.msg import Msg

from broker.puller import Delivery, Puller
from natron.errors import InternalError
from natron.inference import InferRequest
from natron.spec import ModelSpec


@dataclass(slots=True, frozen=True)
class BatchPolicy:
    """How many requests to take at once, and how long to wait for them."""

    max_items: int  # requests taken in one round
    enough: int  # stop lingering once this many are in hand
    max_queue_delay_s: float  # linger budget, counted from the oldest request's arrival
    max_rows: int  # rows of one execution; 0: the model does not batch, one request each

    @staticmethod
    def for_model(spec: ModelSpec) -> BatchPolicy:
        if not spec.batching:
            return BatchPolicy(1, 1, spec.max_queue_delay_us / 1e6, 0)
        enough = max(spec.preferred_batch_sizes) if spec.preferred_batch_sizes else spec.max_batch_size
        return BatchPolicy(
            spec.max_batch_size,
            min(enough, spec.max_batch_size),
            spec.max_queue_delay_us / 1e6,
            spec.max_batch_size,
        )

    @staticmethod
    def one_at_a_time() -> BatchPolicy:
        """Requests taken singly and at once: for runners that run them concurrently."""
        return BatchPolicy(1, 1, 0.0, 0)


@dataclass(slots=True)
class Admitted:
    """A request that passed admission (decoded, in time, valid, still wanted)."""

    msg: Msg
    reply_to: str
    request: InferRequest
    batch_size: int  # rows; 1 for a model that does not batch
    deadline_ns: int = 0  # absolute, unix ns; 0: none given
    # Position in a coalesced message, by which its answer names it; -1: a message of its own.
    index: int = -1
    # It waited past its queue timeout and its policy DELAYs it: it runs after the others.
    delayed: bool = False
    # A request its gateway traces (the trace extension's triton mode): QUEUE_START, then the
    # runner's COMPUTE_* timestamps (wall clock ns), sent back with its answer. None: untraced.
    timestamps: list[int] | None = None


LINGERS_BEFORE_SKIPPING = 3
PROBE_EVERY = 8


class Batcher:
    """Gathers one instance's next requests from its puller, by the policy above."""

    def __init__(self, puller: Puller, policy: BatchPolicy) -> None:
        self._puller = puller
        self.policy = policy
        self._fruitless = 0  # lingers in a row that gathered no request
        self._skipped = 0  # lingers skipped since the last one made

    def _should_linger(self) -> bool:
        if self._fruitless < LINGERS_BEFORE_SKIPPING or self._skipped + 1 >= PROBE_EVERY:
            self._skipped = 0
            return True
        self._skipped += 1
        return False

    async def next(self) -> list[Delivery]:
        """The requests of the next round, oldest first; empty once the puller is closed."""
        puller = self._puller
        max_items = min(self.policy.max_items, puller.capacity)
        enough = min(self.policy.enough, max_items)
        if not await puller.wait_first():
            return []
        await puller.collect_waiting(max_items - puller.held)
        delay_s = self.policy.max_queue_delay_s
        if delay_s > 0 and not puller.closed and puller.held < enough and self._should_linger():
            before = puller.held
            until_s = puller.oldest_arrival_s + delay_s
            # Ask for no more than `enough`: a pull still outstanding when the round ends would
            # deliver to an instance busy executing, while another could take those requests.
            await puller.pull_until(enough - puller.held, until_s)
            loop = asyncio.get_running_loop()
            while puller.held < enough and loop.time() < until_s and not puller.closed:
                await puller.wait_delivery(until_s)
            self._fruitless = 0 if puller.held > before else self._fruitless + 1
        return puller.hand_over(max_items)


def _shape_key(item: Admitted) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in item.request.inputs))


def group(items: Sequence[Admitted], max_rows: int) -> list[list[Admitted]]:
    """Executions that may run together: same inputs with the same non-batch shapes and
    datatypes, at most `max_rows` rows each (0: every request alone). Arrival order within a
    group; the groups of one shape in turn, shapes in the order they first arrived."""
    if max_rows <= 0:
        return [[item] for item in items]
    groups: dict[tuple[Any, ...], list[list[Admitted]]] = {}
    for item in items:
        batches = groups.setdefault(_shape_key(item), [[]])
        current = batches[-1]
        if current and sum(i.batch_size for i in current) + item.batch_size > max_rows:
            current = []
            batches.append(current)
        current.append(item)
    return [batch for batches in groups.values() for batch in batches]


def join(batch: Sequence[Admitted]) -> dict[str, npt.NDArray[Any]]:
    """The batch's inputs, concatenated along the batch dimension (a batch of one: as is)."""
    first = batch[0].request
    if len(batch) == 1:
        return {t.name: t.data for t in first.inputs}
    by_name = [{t.name: t.data for t in item.request.inputs} for item in batch]
    return {t.name: np.concatenate([inputs[t.name] for inputs in by_name]) for t in first.inputs}


def split(array: npt.NDArray[Any], rows: Sequence[int], *, model: str, name: str) -> list[npt.NDArray[Any]]:
    """One output of a batch, cut into each request's rows (views, no copy). The batch
    dimension must hold exactly the rows that went in: anything else is a model bug, which
    every request of the batch hears about."""
    total = sum(rows)
    if array.ndim == 0 or array.shape[0] != total:
        raise InternalError(
            f"model '{model}' returned output '{name}' with shape {list(array.shape)}, "
            f"expected a batch dimension of {total}"
        )
    parts: list[npt.NDArray[Any]] = []
    offset = 0
    for count in rows:
        parts.append(array[offset : offset + count])
        offset += count
    return parts
