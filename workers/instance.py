"""One model instance: pull a batch by capacity, check it, run it off the event loop, split
the outputs back to their requests, answer, then acknowledge.

Dynamic batching follows Triton: up to `max_batch_size` rows per execution, waiting at most
`max_queue_delay_microseconds` after the first request for more, stopping early at the largest
preferred batch size; requests whose non-batch shapes or datatypes differ never share a batch.
Each request is answered exactly once: with its outputs, or with an error that names the cause.
The broker message is acknowledged only after the answer is published, so a worker that dies
mid-batch leaves its messages to be delivered again to another instance.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import codec
from broker.puller import CapacityPuller, stored_ns
from broker.subjects import COUNT, DEADLINE_NS, FINAL, REPLY_TO, SEQUENCE, STATUS
from natron import datatypes
from natron.errors import DeadlineExceeded, InternalError, InvalidArgument, NatronError, PayloadTooLarge
from natron.inference import InferRequest, InferResponse, Tensor
from natron.spec import ModelSpec
from natron.stats import ModelStats, failure_reason
from workers.backends import AnyBackend

log = logging.getLogger(__name__)

# A batch predicted to run faster than this runs on the event loop (see _run_backend).
INLINE_BUDGET_S = 0.0003
MAX_ASYNC_IN_FLIGHT = 256
CANCEL_MEMORY_S = 120.0


@dataclass(slots=True)
class _Item:
    msg: Msg
    reply_to: str
    request: InferRequest
    batch_size: int
    deadline_ns: int = 0  # absolute, unix ns; 0: none given


class ModelInstance:
    def __init__(
        self,
        nc: Client,
        puller: CapacityPuller,
        spec: ModelSpec,
        version: str,
        backend: AnyBackend,
        name: str,
        *,
        throttle_s: float = 0.0,
        stats: ModelStats | None = None,
    ) -> None:
        self._nc = nc
        self._puller = puller
        self._spec = spec
        self._version = version
        self._backend = backend
        self._throttle_s = throttle_s
        # Messages taken and not yet acknowledged (by id: Msg is unhashable), with the loop
        # time they were taken.
        self._in_hand: dict[int, tuple[Msg, float]] = {}
        # An asynchronous backend (an ensemble) waits on the mesh, not on a device: its requests
        # run concurrently on the event loop, up to MAX_ASYNC_IN_FLIGHT at once.
        self._async = hasattr(backend, "execute_async")
        self._per_request = self._async or hasattr(backend, "execute_requests")
        self._in_flight = asyncio.Semaphore(MAX_ASYNC_IN_FLIGHT)
        self.name = name
        # One thread per instance: the backend runs one batch at a time, and the event loop
        # keeps serving NATS pings, heartbeats and other instances meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._stopping = False
        if spec.batching:
            target = max(spec.preferred_batch_sizes) if spec.preferred_batch_sizes else spec.max_batch_size
            self._max_items = spec.max_batch_size
            self._linger_target = target
        else:
            self._max_items = 1
            self._linger_target = 1
        self._linger_s = spec.max_queue_delay_us / 1e6
        # Shared by the instances of a version on this worker; reported with the heartbeat.
        self.stats = stats or ModelStats()
        self._answering: set[asyncio.Task[None]] = set()
        self._cancelled: dict[str, float] = {}
        # Measured execution seconds by batch size class; see _run_backend.
        self._cost_s: dict[int, float] = {}

    async def run(self) -> None:
        """Serve until `stop()`; a failing batch never ends the loop."""
        try:
            while not self._stopping:
                if self._async:
                    await self._take_async()
                    continue
                msgs = await self._puller.take(self._max_items, self._linger_s, self._linger_target)
                if not msgs:
                    continue
                try:
                    await self._process(msgs)
                except Exception:  # a bug here must not kill the instance
                    log.exception("instance %s failed processing a batch", self.name)
        finally:
            # Answers still being sent belong to batches that ran: let them finish.
            if self._answering:
                await asyncio.gather(*self._answering, return_exceptions=True)

    def cancel(self, request_id: str) -> None:
        """The client of `request_id` went away: drop it if queued, stop streaming it if running."""
        now_s = asyncio.get_running_loop().time()
        self._cancelled[request_id] = now_s
        # Remember a cancellation long enough for a request still in the queue to be dropped.
        for old in [rid for rid, at in self._cancelled.items() if now_s - at > CANCEL_MEMORY_S]:
            del self._cancelled[old]
        cancel = getattr(self._backend, "cancel", None)
        if cancel is not None:
            cancel(request_id)

    async def _take_async(self) -> None:
        """Take one request whenever a slot is free and process it as a task of its own."""
        await self._in_flight.acquire()
        msgs = await self._puller.take(1)
        if not msgs:
            self._in_flight.release()
            return

        async def process() -> None:
            try:
                await self._process(msgs)
            except Exception:  # a bug here must not kill the instance
                log.exception("instance %s failed processing a request", self.name)
            finally:
                self._in_flight.release()

        task = asyncio.create_task(process())
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    def stop(self) -> None:
        """Stop taking new work; the batch in hand completes."""
        self._stopping = True

    async def close_intake(self) -> None:
        """Stop pulling: undelivered credit lapses, prefetched messages go back (NAK)."""
        await self._puller.close()

    def release(self) -> None:
        """Free the model once no batch runs (blocking: call off the event loop)."""
        self._executor.shutdown(wait=True, cancel_futures=False)
        self._backend.close()

    # -- one round ---------------------------------------------------------------------------

    async def keep_alive(self, older_than_s: float) -> None:
        """+WPI for requests held longer than `older_than_s`: still working, do not redeliver."""
        now_s = asyncio.get_running_loop().time()
        for msg, taken_s in list(self._in_hand.values()):
            if now_s - taken_s >= older_than_s:
                await self._puller.in_progress(msg)

    async def _process(self, msgs: list[Msg]) -> None:
        items: list[_Item] = []
        now_ns = time.time_ns()
        now_s = asyncio.get_running_loop().time()
        for msg in msgs:
            self._in_hand[id(msg)] = (msg, now_s)
        for msg in msgs:
            item = await self._admit(msg, now_ns)
            if item is not None:
                items.append(item)
        for group in self._batches(items):
            await self._execute(group)

    async def _admit(self, msg: Msg, now_ns: int) -> _Item | None:
        headers = msg.headers or {}
        reply_to = headers.get(REPLY_TO)
        if not reply_to:
            log.warning("dropping a request without a %s header on %s", REPLY_TO, msg.subject)
            await self._ack(msg)
            return None
        request_id = ""
        try:
            request = codec.decode_request(msg.data)
            request_id = request.id
            deadline = headers.get(DEADLINE_NS)
            if deadline is not None and now_ns > int(deadline):
                raise DeadlineExceeded(
                    f"request to model '{self._spec.name}' expired in the queue before it ran"
                )
            if request.model != self._spec.name:
                raise InvalidArgument(
                    f"request for model '{request.model}' published to model '{self._spec.name}'"
                )
            batch_size = self._spec.validate(request)
            if request.id in self._cancelled:
                # Nobody waits for the answer any more: drop the request unrun.
                await self._ack(msg)
                self.stats.failed("CANCELED", 0)
                return None
        except NatronError as exc:
            await self._answer_error(msg, reply_to, request_id, exc)
            return None
        except ValueError as exc:  # a malformed deadline header
            await self._answer_error(msg, reply_to, request_id, InvalidArgument(str(exc)))
            return None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request id=%s model=%s traceparent=%s",
                request.id,
                request.model,
                headers.get("traceparent", "-"),
            )
        return _Item(msg, reply_to, request, batch_size, int(deadline) if deadline is not None else 0)

    def _batches(self, items: list[_Item]) -> list[list[_Item]]:
        """Groups that may run together: same non-batch shapes and datatypes, rows within
        max_batch_size. Order within a group is arrival order."""
        if not self._spec.batching:
            return [[item] for item in items]
        groups: dict[tuple[Any, ...], list[list[_Item]]] = {}
        for item in items:
            key = tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in item.request.inputs))
            batches = groups.setdefault(key, [[]])
            current = batches[-1]
            rows = sum(i.batch_size for i in current)
            if current and rows + item.batch_size > self._spec.max_batch_size:
                current = []
                batches.append(current)
            current.append(item)
        return [batch for batches in groups.values() for batch in batches]

    async def _execute(self, group: list[_Item]) -> None:
        if self._per_request:
            await self._execute_requests(group)
            return
        started_ns = time.perf_counter_ns()
        now_ns = time.time_ns()
        for item in group:
            stored = stored_ns(item.msg)
            if stored:
                self.stats.queue.add(now_ns - stored)
        first = group[0].request
        names = [t.name for t in first.inputs]
        if len(group) == 1:
            feeds = {t.name: t.data for t in first.inputs}
        else:
            by_name = [{t.name: t.data for t in item.request.inputs} for item in group]
            feeds = {n: np.concatenate([inputs[n] for inputs in by_name]) for n in names}
        wanted = self._wanted_outputs(group)
        rows = sum(item.batch_size for item in group)
        try:
            infer_ns = time.perf_counter_ns()
            results = await self._run_backend(feeds, wanted, rows)
            output_ns = time.perf_counter_ns()
            outputs = self._split(group, results)
            done_ns = time.perf_counter_ns()
        except NatronError as exc:
            for item in group:
                await self._answer_error(item.msg, item.reply_to, item.request.id, exc)
            return
        except Exception as exc:
            error = InternalError(f"model '{self._spec.name}' failed: {type(exc).__name__}: {exc}")
            log.warning("%s", error.message)
            for item in group:
                await self._answer_error(item.msg, item.reply_to, item.request.id, error)
            return
        self.stats.executed(rows, infer_ns - started_ns, output_ns - infer_ns, done_ns - output_ns)
        if self._throttle_s:
            await asyncio.sleep(self._throttle_s)
        # Encoding and publishing a large batch's answers takes milliseconds of loop time: do
        # it while the next batch executes, instead of leaving the device idle meanwhile.
        task = asyncio.create_task(self._answer_all(group, outputs))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _execute_requests(self, group: list[_Item]) -> None:
        """Run a RequestBackend: answers arrive through the sink, from the instance's thread
        (or any other), and are published in order by one pump task per call.

        An ordinary model's request is acknowledged with its answer. A decoupled model's is
        acknowledged when its execution starts: a stream under way cannot be replayed on another
        worker without sending the client what it already has a second time.
        """
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[tuple[int, list[Tensor] | NatronError | None, bool]] = asyncio.Queue()

        def sink(index: int, outputs: list[Tensor] | NatronError | None, final: bool) -> None:
            loop.call_soon_threadsafe(answers.put_nowait, (index, outputs, final))

        if self._spec.decoupled:
            for item in group:
                await self._ack(item.msg)
        pump = asyncio.create_task(self._pump(group, answers))
        self._answering.add(pump)
        pump.add_done_callback(self._answering.discard)
        requests = [item.request for item in group]
        started_ns = time.perf_counter_ns()
        try:
            if self._async:
                deadlines = [item.deadline_ns for item in group]
                await self._backend.execute_async(requests, sink, deadlines)  # type: ignore[union-attr]
            else:
                execute = self._backend.execute_requests  # type: ignore[union-attr]
                await loop.run_in_executor(self._executor, execute, requests, sink)
            failure: NatronError | None = None
        except NatronError as exc:
            failure = exc
        except Exception as exc:
            failure = InternalError(f"model '{self._spec.name}' failed: {type(exc).__name__}: {exc}")
            log.warning("%s", failure.message)
        self.stats.executed(sum(item.batch_size for item in group), 0, time.perf_counter_ns() - started_ns, 0)
        if failure is not None or not self._spec.decoupled:
            # Whatever the model left unanswered gets an answer now: the failure, or for an
            # ordinary model the fact that it returned no response.
            missing = failure or InternalError(
                f"model '{self._spec.name}' returned no response for the request"
            )
            for index in range(len(group)):
                sink(index, missing, True)

    async def _pump(
        self, group: list[_Item], answers: asyncio.Queue[tuple[int, list[Tensor] | NatronError | None, bool]]
    ) -> None:
        open_requests = set(range(len(group)))
        sequence = [0] * len(group)
        backlog: collections.deque[tuple[int, list[Tensor] | NatronError | None, bool]] = collections.deque()
        while open_requests:
            if not backlog:
                backlog.append(await answers.get())
            while not answers.empty():
                backlog.append(answers.get_nowait())
            index, outputs, final = backlog.popleft()
            if index not in open_requests or not 0 <= index < len(group):
                continue  # answered already: late or duplicate answers are dropped
            item = group[index]
            if item.request.id in self._cancelled:
                if final:
                    open_requests.discard(index)
                continue  # the client is gone: nothing more is sent
            if isinstance(outputs, NatronError):
                final = True
                await self._answer_error(
                    item.msg, item.reply_to, item.request.id, outputs, ack=not self._spec.decoupled
                )
            elif self._spec.decoupled:
                # Answers of this request that queued up meanwhile (the loop fell behind the
                # model) travel in one message: one NATS message per token only while the
                # reader keeps up.
                batch = [outputs or []]
                while (
                    not final
                    and backlog
                    and backlog[0][0] == index
                    and not isinstance(backlog[0][1], NatronError)
                ):
                    _, next_outputs, final = backlog.popleft()
                    assert not isinstance(next_outputs, NatronError)
                    batch.append(next_outputs or [])
                headers = {SEQUENCE: str(sequence[index])}
                if final:
                    headers[FINAL] = "1"
                sequence[index] += len(batch)
                responses = [InferResponse(item.request.id, self._spec.name, self._version, t) for t in batch]
                if len(responses) == 1:
                    payload = codec.encode_response(responses[0])
                else:
                    headers[COUNT] = str(len(responses))
                    payload = codec.encode_responses(responses)
                await self._nc.publish(item.reply_to, payload, headers=headers)
            else:
                final = True
                response = InferResponse(item.request.id, self._spec.name, self._version, outputs or [])
                await self._answer(item, response)
            if final:
                open_requests.discard(index)

    async def _answer_all(self, group: list[_Item], outputs: list[list[Tensor]]) -> None:
        for item, tensors in zip(group, outputs, strict=True):
            response = InferResponse(item.request.id, self._spec.name, self._version, tensors)
            try:
                await self._answer(item, response)
            except Exception as exc:  # e.g. an unencodable output: this request still gets an answer
                error = InternalError(f"cannot send the response: {type(exc).__name__}: {exc}")
                await self._answer_error(item.msg, item.reply_to, item.request.id, error)

    async def _run_backend(
        self, feeds: dict[str, npt.NDArray[Any]], wanted: list[str], rows: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Run off the event loop, except what is known to be quicker than the hand-off.

        Handing a batch to the thread and back costs about 0.3 ms of wake-ups on a loaded
        2-core box, several times what a tiny model computes. So a batch whose size class
        (rows rounded up to a power of two) last ran under INLINE_BUDGET_S runs on the loop;
        anything unmeasured or slower runs in the instance's thread, so NATS pings and
        heartbeats never wait longer than that budget.
        """
        size_class = 1 << (rows - 1).bit_length()
        estimate_s = self._cost_s.get(size_class)
        started_s = time.perf_counter()
        execute = self._backend.execute  # type: ignore[union-attr]
        if estimate_s is not None and estimate_s < INLINE_BUDGET_S:
            results = execute(feeds, wanted)
        else:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, execute, feeds, wanted)
        elapsed_s = time.perf_counter() - started_s
        # A moving average, so one slow outlier (a page fault, a GC pause) does not flip the
        # choice for good, while a model that really got slower moves off the loop quickly.
        previous = self._cost_s.get(size_class, elapsed_s)
        self._cost_s[size_class] = 0.7 * previous + 0.3 * elapsed_s if elapsed_s < previous else elapsed_s
        return results

    def _wanted_outputs(self, group: list[_Item]) -> list[str]:
        wanted: list[str] = []
        for item in group:
            if not item.request.outputs:
                return []  # someone wants all
            for name in item.request.outputs:
                if name not in wanted:
                    wanted.append(name)
        return wanted

    def _split(self, group: list[_Item], results: dict[str, npt.NDArray[Any]]) -> list[list[Tensor]]:
        per_request: list[list[Tensor]] = [[] for _ in group]
        total = sum(item.batch_size for item in group)
        for name, array in results.items():
            spec = self._spec.outputs.get(name)
            datatype = spec.datatype if spec else datatypes.from_numpy_dtype(array.dtype)
            if datatype != datatypes.BYTES:
                array = array.astype(datatypes.to_numpy_dtype(datatype), copy=False)
            if not self._spec.batching:
                per_request[0].append(Tensor(name, datatype, tuple(array.shape), array))
                continue
            if array.ndim == 0 or array.shape[0] != total:
                raise InternalError(
                    f"model '{self._spec.name}' returned output '{name}' with shape "
                    f"{list(array.shape)}, expected a batch dimension of {total}"
                )
            offset = 0
            for index, item in enumerate(group):
                part = array[offset : offset + item.batch_size]
                offset += item.batch_size
                if not item.request.outputs or name in item.request.outputs:
                    per_request[index].append(Tensor(name, datatype, tuple(part.shape), part))
        return per_request

    async def _answer(self, item: _Item, response: InferResponse) -> None:
        payload = codec.encode_response(response)
        if len(payload) > self._nc.max_payload:
            error = PayloadTooLarge(
                f"response of {len(payload)} bytes exceeds the broker's max_payload of "
                f"{self._nc.max_payload} bytes: ask for fewer outputs or a smaller batch"
            )
            await self._answer_error(item.msg, item.reply_to, item.request.id, error)
            return
        await self._nc.publish(item.reply_to, payload)
        await self._ack(item.msg)
        stored = stored_ns(item.msg)
        if stored:
            self.stats.success.add(time.time_ns() - stored)

    async def _ack(self, msg: Msg) -> None:
        self._in_hand.pop(id(msg), None)
        await self._puller.ack(msg)

    async def _answer_error(
        self, msg: Msg, reply_to: str, request_id: str, error: NatronError, *, ack: bool = True
    ) -> None:
        if error.status >= 500:
            log.warning(
                "request id=%s model=%s -> %d: %s", request_id, self._spec.name, error.status, error.message
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request id=%s model=%s -> %d: %s", request_id, self._spec.name, error.status, error.message
            )
        headers = {STATUS: str(error.status)}
        if self._spec.decoupled:
            headers[FINAL] = "1"
        await self._nc.publish(reply_to, codec.encode_error(request_id, error.message), headers=headers)
        stored = stored_ns(msg)
        self.stats.failed(failure_reason(error.status), time.time_ns() - stored if stored else 0)
        if ack:
            await self._ack(msg)
