"""How an instance runs its backend: one runner per execution model, chosen once when the
instance is built (`runner_for`).

* `BatchRunner` (a `Backend`: ONNX Runtime, PyTorch, TensorRT): whole batches. The instance's
  requests are grouped and joined by the batcher, executed in one call (on the event loop when
  known to be quicker than the thread hand-off, else in the instance's thread), split back,
  and answered while the next batch already executes.
* `RequestRunner` (a `RequestBackend`: Python models): the requests themselves, in the
  instance's thread; answers come through a sink, from any thread and possibly after the call
  returned, and one pump task per call publishes them in order. A decoupled model's requests
  are acknowledged when their execution starts, and its answers go out as stream frames.
* `AsyncRunner` (an `AsyncBackend`: ensembles): the same sink and pump, but each request is a
  task on the event loop, up to MAX_ASYNC_IN_FLIGHT at once, since it waits on the mesh rather
  than on a device.

The instance keeps admission, acknowledgements, keep-alive and statistics; `Answers` is how a
runner answers, counts and acknowledges through it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy.typing as npt
from nats.aio.msg import Msg

from broker.puller import stored_ns
from broker.reply import Indexed, Replier
from broker.subjects import TIMESTAMPS
from natron import datatypes
from natron.errors import InternalError, NatronError
from natron.inference import InferResponse, Tensor
from natron.spec import ModelSpec
from natron.stats import ModelStats, failure_reason
from workers.backends import AnyBackend, AsyncBackend, Backend, RequestBackend, ResponseSink
from workers.batcher import Admitted, BatchPolicy, group, join, split
from workers.sharedmemory import WorkerSharedMemory

log = logging.getLogger(__name__)

# A batch predicted to run faster than this runs on the event loop (see BatchRunner._run)...
INLINE_BUDGET_S = 0.0003
# ...and one faster than this when the instance has nothing else to do: nothing more delivered,
# no answers being sent. It bounds how long other models' work on this worker may wait.
IDLE_INLINE_BUDGET_S = 0.001
MAX_ASYNC_IN_FLIGHT = 256

# The next requests of an instance, admitted; empty when nothing came (the puller closed).
Intake = Callable[[], Awaitable[list[Admitted]]]
# One answer of a RequestBackend: request index, outputs / error / None (the final flag only).
_Answer = tuple[int, list[Tensor] | NatronError | None, bool]


class Answers:
    """A runner's way to answer: publish (broker/reply.py), count, then acknowledge."""

    def __init__(
        self,
        replier: Replier,
        spec: ModelSpec,
        version: str,
        stats: ModelStats,
        ack: Callable[[Msg], Awaitable[None]],
        *,
        shm: WorkerSharedMemory | None = None,
    ) -> None:
        self._replier = replier
        self._spec = spec
        self._version = version
        self._stats = stats
        self._ack = ack
        self._shm = shm

    def response(self, item: Admitted, outputs: list[Tensor]) -> InferResponse:
        return InferResponse(item.request.id, self._spec.name, self._version, outputs)

    async def result(self, item: Admitted, outputs: list[Tensor]) -> None:
        """An ordinary request's answer, then its acknowledgement."""
        await self.results([(item, outputs)])

    async def results(self, answered: list[tuple[Admitted, list[Tensor]]]) -> None:
        """Ordinary requests' answers, each acknowledged once sent: those of one coalesced
        message go out together in one answer message. Each is counted before it is sent."""
        coalesced: dict[int, list[tuple[Admitted, list[Tensor]]]] = {}
        for item, outputs in answered:
            if item.request.output_refs and self._shm is not None:
                # Outputs asked for in the client's shared memory go there; the answer carries
                # where, not the bytes. A window too small is this request's 400 alone.
                try:
                    outputs = self._shm.place_outputs(item.request, outputs)
                except NatronError as exc:
                    await self.fail(item, exc)
                    continue
            if item.index >= 0:
                coalesced.setdefault(id(item.msg), []).append((item, outputs))
                continue
            try:
                await self._replier.answer(
                    item.reply_to,
                    self.response(item, outputs),
                    functools.partial(self._count, item),
                    None if item.timestamps is None else _trace_headers(item),
                )
            except Exception as exc:  # e.g. an unencodable output: the request still gets an answer
                await self.fail(item, InternalError(f"cannot send the response: {type(exc).__name__}: {exc}"))
                continue
            await self._ack(item.msg)
        for together in coalesced.values():
            await self._coalesced_results(together)

    async def _coalesced_results(self, together: list[tuple[Admitted, list[Tensor]]]) -> None:
        first = together[0][0]
        answers: list[Indexed] = [
            (item.index, item.request.id, self.response(item, outputs)) for item, outputs in together
        ]

        def counted(replaced: list[Indexed]) -> None:
            errors = {index: error for index, _, error in replaced}
            for item, _ in together:
                failure = errors.get(item.index)
                self._count(item, failure if isinstance(failure, NatronError) else None)

        # The requests of one answer message ran in one execution: one set of timestamps
        # serves every traced one among them.
        traced: dict[str, str] | None = None
        for item, _ in together:
            if item.timestamps is not None and (traced := _trace_headers(item)):
                break
        try:
            await self._replier.batch(first.reply_to, answers, counted, traced)
        except Exception as exc:  # e.g. an unencodable output: every request still gets an answer
            error = InternalError(f"cannot send the response: {type(exc).__name__}: {exc}")
            await self._replier.batch(
                first.reply_to, [(item.index, item.request.id, error) for item, _ in together], counted
            )
        for item, _ in together:
            await self._ack(item.msg)

    def _count(self, item: Admitted, error: NatronError | None) -> None:
        stored = stored_ns(item.msg)
        if error is not None:
            self._count_failure(item.request.id, error, stored)
        elif stored:
            self._stats.success.add(time.time_ns() - stored)

    async def frames(self, item: Admitted, outputs: list[list[Tensor]], sequence: int, final: bool) -> bool:
        """Stream frames of a decoupled request (acknowledged already); False when they could
        not go out and an error answer ended the stream instead. Its first frame is its first
        response (Triton's first-response histogram), its last one its success. A traced
        request's timestamps go with its final frames: COMPUTE_OUTPUT_START is its first
        response, COMPUTE_END its last."""
        responses = [self.response(item, tensors) for tensors in outputs]
        stamps = item.timestamps
        if stamps is not None:
            now_ns = time.time_ns()
            if len(stamps) == 3:
                stamps.append(now_ns)
            if final and len(stamps) == 4:
                stamps.append(now_ns)
        stored = stored_ns(item.msg)

        def counted(error: NatronError | None) -> None:
            if error is not None:
                self._count_failure(item.request.id, error, stored)
                return
            if stored and sequence == 0:
                self._stats.first_response.add(time.time_ns() - stored)
            if final:
                self._count(item, None)

        headers = _trace_headers(item) if final and stamps is not None else None
        error = await self._replier.frames(item.reply_to, responses, sequence, final, counted, headers)
        return error is None

    async def ack(self, msg: Msg) -> None:
        await self._ack(msg)

    async def error(
        self,
        msg: Msg,
        reply_to: str,
        request_id: str,
        error: NatronError,
        *,
        index: int = -1,
        ack: bool = True,
    ) -> None:
        """An error answer (to the request at `index` of a coalesced message, or to the whole
        message), counted before it is sent; acknowledged unless the request was already (a
        decoupled one)."""
        stored = stored_ns(msg)

        def counted(_: object) -> None:
            self._count_failure(request_id, error, stored)

        if index >= 0:
            await self._replier.batch(reply_to, [(index, request_id, error)], counted)
        else:
            await self._replier.error(reply_to, request_id, error, counted)
        if ack:
            await self._ack(msg)

    async def fail(self, item: Admitted, error: NatronError, *, ack: bool = True) -> None:
        """An admitted request's error answer."""
        await self.error(item.msg, item.reply_to, item.request.id, error, index=item.index, ack=ack)

    def _count_failure(self, request_id: str, error: NatronError, stored: int) -> None:
        if error.status >= 500:
            log.warning(
                "request id=%s model=%s -> %d: %s", request_id, self._spec.name, error.status, error.message
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request id=%s model=%s -> %d: %s", request_id, self._spec.name, error.status, error.message
            )
        self._stats.failed(failure_reason(error.status), time.time_ns() - stored if stored else 0)


class _Runner:
    """What every runner shares: the serving loop's shape, answer tasks it owns, shutdown."""

    def __init__(self, spec: ModelSpec, answers: Answers, stats: ModelStats, name: str) -> None:
        self._spec = spec
        self._answers = answers
        self._stats = stats
        self.name = name
        self._policy = self.policy()
        # Tasks that publish answers (they outlive the round that started them): kept, and
        # awaited before `serve` returns.
        self._tasks: set[asyncio.Task[None]] = set()

    def policy(self) -> BatchPolicy:
        return BatchPolicy.for_model(self._spec)

    async def serve(self, intake: Intake, running: Callable[[], bool]) -> None:
        """Serve rounds while `running()`; a failing round never ends the loop."""
        try:
            while running():
                await self._round(intake)
        finally:
            # Answers still being sent belong to work that ran: let them finish.
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _round(self, intake: Intake) -> None:
        try:
            items = await intake()
            for batch in group(items, self._policy.max_rows):
                await self._execute(batch)
        except Exception:  # a bug here must not kill the instance
            log.exception("instance %s failed processing a batch", self.name)

    async def _execute(self, batch: list[Admitted]) -> None:
        raise NotImplementedError

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self, request_id: str) -> None:
        """Tell the backend, if it listens, that a request's client went away."""

    def close(self) -> None:
        """Free the model once nothing runs (blocking: call off the event loop)."""


class BatchRunner(_Runner):
    def __init__(
        self,
        backend: Backend,
        spec: ModelSpec,
        version: str,
        answers: Answers,
        stats: ModelStats,
        name: str,
        *,
        throttle_s: float = 0.0,
        waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__(spec, answers, stats, name)
        self._backend = backend
        self._throttle_s = throttle_s
        self._waiting = waiting  # requests delivered to the instance, not yet taken
        # One thread per instance: the backend runs one batch at a time, and the event loop
        # keeps serving NATS pings, heartbeats and other instances meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        # Measured execution seconds by batch size class; see _run.
        self._cost_s: dict[int, float] = {}

    async def _execute(self, batch: list[Admitted]) -> None:
        started_ns = time.perf_counter_ns()
        now_ns = time.time_ns()
        for item in batch:
            stored = stored_ns(item.msg)
            if stored:
                self._stats.queue.add(now_ns - stored)
        feeds = join(batch)
        wanted = _wanted_outputs(batch)
        rows = sum(item.batch_size for item in batch)
        try:
            infer_ns = time.perf_counter_ns()
            results = await self._run(feeds, wanted, rows)
            output_ns = time.perf_counter_ns()
            outputs = self._split(batch, results)
            done_ns = time.perf_counter_ns()
        except NatronError as exc:
            for item in batch:
                await self._answers.fail(item, exc)
            return
        except Exception as exc:
            error = InternalError(f"model '{self._spec.name}' failed: {type(exc).__name__}: {exc}")
            log.warning("%s", error.message)
            for item in batch:
                await self._answers.fail(item, error)
            return
        self._stats.executed(
            rows, infer_ns - started_ns, output_ns - infer_ns, done_ns - output_ns, requests=len(batch)
        )
        for item in batch:
            if item.timestamps is not None:
                # Wall clock from the monotonic readings above: traced requests pay for no
                # clock reading of their own.
                item.timestamps += [
                    now_ns,
                    now_ns + infer_ns - started_ns,
                    now_ns + output_ns - started_ns,
                    now_ns + done_ns - started_ns,
                ]
        if self._throttle_s:
            await asyncio.sleep(self._throttle_s)
        # Encoding and publishing a large batch's answers takes milliseconds of loop time: do
        # it while the next batch executes, instead of leaving the device idle meanwhile.
        self._keep(asyncio.create_task(self._answer_all(batch, outputs)))

    async def _run(
        self, feeds: dict[str, npt.NDArray[Any]], wanted: list[str], rows: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Run off the event loop, except what is known to be quicker than the hand-off.

        Handing a batch to the thread and back costs about 0.3 ms of wake-ups on a loaded
        2-core box, several times what a tiny model computes. So a batch whose size class
        (rows rounded up to a power of two) last computed in under INLINE_BUDGET_S (measured
        without the hand-off) runs on the loop;
        anything unmeasured or slower runs in the instance's thread, so NATS pings and
        heartbeats never wait longer than that budget. When the instance is idle otherwise
        (nothing more delivered, no answers being sent), the thread would only add its
        wake-ups to the request's latency, so up to IDLE_INLINE_BUDGET_S runs on the loop too.
        """
        size_class = 1 << (rows - 1).bit_length()
        estimate_s = self._cost_s.get(size_class)
        execute = self._backend.execute
        if estimate_s is not None and (
            estimate_s < INLINE_BUDGET_S
            or (estimate_s < IDLE_INLINE_BUDGET_S and not self._tasks and not self._waiting())
        ):
            started_s = time.perf_counter()
            results = execute(feeds, wanted)
            elapsed_s = time.perf_counter() - started_s
        else:
            loop = asyncio.get_running_loop()
            results, elapsed_s = await loop.run_in_executor(self._executor, _timed, execute, feeds, wanted)
        # A moving average, so one slow outlier (a page fault, a GC pause) does not flip the
        # choice for good, while a model that really got slower moves off the loop quickly.
        previous = self._cost_s.get(size_class, elapsed_s)
        self._cost_s[size_class] = 0.7 * previous + 0.3 * elapsed_s if elapsed_s < previous else elapsed_s
        return results

    def _split(self, batch: list[Admitted], results: dict[str, npt.NDArray[Any]]) -> list[list[Tensor]]:
        per_request: list[list[Tensor]] = [[] for _ in batch]
        rows = [item.batch_size for item in batch]
        for name, array in results.items():
            spec = self._spec.outputs.get(name)
            datatype = spec.datatype if spec else datatypes.from_numpy_dtype(array.dtype)
            if datatype != datatypes.BYTES:
                array = array.astype(datatypes.to_numpy_dtype(datatype), copy=False)
            if not self._spec.batching:
                per_request[0].append(Tensor(name, datatype, tuple(array.shape), array))
                continue
            parts = split(array, rows, model=self._spec.name, name=name)
            for index, (item, part) in enumerate(zip(batch, parts, strict=True)):
                if not item.request.outputs or name in item.request.outputs:
                    per_request[index].append(Tensor(name, datatype, tuple(part.shape), part))
        return per_request

    async def _answer_all(self, batch: list[Admitted], outputs: list[list[Tensor]]) -> None:
        await self._answers.results(list(zip(batch, outputs, strict=True)))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
        self._backend.close()


class _SinkRunner(_Runner):
    """Requests handed to the model as they are; answers through a sink, published in order by
    one pump task per call.

    An ordinary model's request is acknowledged with its answer. A decoupled model's is
    acknowledged when its execution starts: a stream under way cannot be replayed on another
    worker without sending the client what it already has a second time.
    """

    def __init__(
        self,
        backend: RequestBackend | AsyncBackend,
        spec: ModelSpec,
        answers: Answers,
        stats: ModelStats,
        name: str,
        *,
        cancelled: Callable[[str, str], bool],
    ) -> None:
        super().__init__(spec, answers, stats, name)
        self._any_backend = backend
        self._cancelled = cancelled

    async def _call(self, batch: list[Admitted], sink: ResponseSink) -> None:
        raise NotImplementedError

    async def _execute(self, batch: list[Admitted]) -> None:
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[_Answer] = asyncio.Queue()

        def sink(index: int, outputs: list[Tensor] | NatronError | None, final: bool) -> None:
            loop.call_soon_threadsafe(answers.put_nowait, (index, outputs, final))

        decoupled = self._spec.decoupled
        if decoupled:
            for item in batch:
                await self._answers.ack(item.msg)
        self._keep(asyncio.create_task(self._pump(batch, answers)))
        started_ns = time.perf_counter_ns()
        for item in batch:
            if item.timestamps is not None:
                # The model takes its inputs as they are: COMPUTE_INPUT_END is COMPUTE_START.
                now_ns = time.time_ns()
                item.timestamps += [now_ns, now_ns]
        failure: NatronError | None = None
        try:
            await self._call(batch, sink)
        except NatronError as exc:
            failure = exc
        except Exception as exc:
            failure = InternalError(f"model '{self._spec.name}' failed: {type(exc).__name__}: {exc}")
            log.warning("%s", failure.message)
        rows = sum(item.batch_size for item in batch)
        self._stats.executed(rows, 0, time.perf_counter_ns() - started_ns, 0, requests=len(batch))
        if failure is not None or not decoupled:
            # Whatever the model left unanswered gets an answer now: the failure, or for an
            # ordinary model the fact that it returned no response. The pump drops it for a
            # request answered already, so each request gets exactly one final answer.
            missing = failure or InternalError(
                f"model '{self._spec.name}' returned no response for the request"
            )
            for index in range(len(batch)):
                sink(index, missing, True)

    async def _pump(self, batch: list[Admitted], answers: asyncio.Queue[_Answer]) -> None:
        open_requests = set(range(len(batch)))
        sequence = [0] * len(batch)
        backlog: collections.deque[_Answer] = collections.deque()
        decoupled = self._spec.decoupled
        while open_requests:
            if not backlog:
                backlog.append(await answers.get())
            while not answers.empty():
                backlog.append(answers.get_nowait())
            index, outputs, final = backlog.popleft()
            if index not in open_requests:
                continue  # answered already, or no such request: late or stray answers are dropped
            item = batch[index]
            if self._cancelled(item.request.id, item.reply_to):
                if final:
                    open_requests.discard(index)
                continue  # the client is gone: nothing more is sent
            if isinstance(outputs, NatronError):
                final = True
                await self._answers.fail(item, outputs, ack=not decoupled)
            elif decoupled:
                # Answers of this request that queued up meanwhile (the loop fell behind the
                # model) travel in one message: one NATS message per token only while the
                # reader keeps up.
                frames = [outputs or []]
                while (
                    not final
                    and backlog
                    and backlog[0][0] == index
                    and not isinstance(backlog[0][1], NatronError)
                ):
                    _, next_outputs, final = backlog.popleft()
                    assert not isinstance(next_outputs, NatronError)
                    frames.append(next_outputs or [])
                if not await self._answers.frames(item, frames, sequence[index], final):
                    final = True  # the frames did not fit: an error answer ended the stream
                sequence[index] += len(frames)
            else:
                final = True
                if item.timestamps is not None and len(item.timestamps) == 3:
                    # Its answer is in: COMPUTE_OUTPUT_START and COMPUTE_END.
                    now_ns = time.time_ns()
                    item.timestamps += [now_ns, now_ns]
                await self._answers.result(item, outputs or [])
            if final:
                open_requests.discard(index)

    def cancel(self, request_id: str) -> None:
        cancel = getattr(self._any_backend, "cancel", None)
        if cancel is not None:
            cancel(request_id)

    def close(self) -> None:
        self._any_backend.close()


class RequestRunner(_SinkRunner):
    """A RequestBackend's calls run in the instance's thread, one at a time."""

    def __init__(
        self,
        backend: RequestBackend,
        spec: ModelSpec,
        answers: Answers,
        stats: ModelStats,
        name: str,
        *,
        cancelled: Callable[[str, str], bool],
    ) -> None:
        super().__init__(backend, spec, answers, stats, name, cancelled=cancelled)
        self._backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def _call(self, batch: list[Admitted], sink: ResponseSink) -> None:
        requests = [item.request for item in batch]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._backend.execute_requests, requests, sink)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
        super().close()


class AsyncRunner(_SinkRunner):
    """Each request a task of its own on the event loop, taken whenever one of
    MAX_ASYNC_IN_FLIGHT slots is free: an ensemble step waits on other models, not on a device,
    so its instance would otherwise idle while its steps run elsewhere."""

    def __init__(
        self,
        backend: AsyncBackend,
        spec: ModelSpec,
        answers: Answers,
        stats: ModelStats,
        name: str,
        *,
        cancelled: Callable[[str, str], bool],
    ) -> None:
        super().__init__(backend, spec, answers, stats, name, cancelled=cancelled)
        self._backend = backend
        self._slots = asyncio.Semaphore(MAX_ASYNC_IN_FLIGHT)

    def policy(self) -> BatchPolicy:
        return BatchPolicy.one_at_a_time()

    async def _round(self, intake: Intake) -> None:
        # The slot is taken before pulling: with every slot busy the instance asks for nothing.
        await self._slots.acquire()
        try:
            items = await intake()
        except BaseException:
            self._slots.release()
            raise
        if not items:
            self._slots.release()
            return
        self._keep(asyncio.create_task(self._process(items)))

    async def _process(self, items: list[Admitted]) -> None:
        try:
            await self._execute(items)
        except Exception:  # a bug here must not kill the instance
            log.exception("instance %s failed processing a request", self.name)
        finally:
            self._slots.release()

    async def _call(self, batch: list[Admitted], sink: ResponseSink) -> None:
        requests = [item.request for item in batch]
        deadlines = [item.deadline_ns for item in batch]
        await self._backend.execute_async(requests, sink, deadlines)


Runner = BatchRunner | RequestRunner | AsyncRunner


def runner_for(
    backend: AnyBackend,
    spec: ModelSpec,
    version: str,
    answers: Answers,
    stats: ModelStats,
    name: str,
    *,
    cancelled: Callable[[str, str], bool],
    throttle_s: float = 0.0,
    waiting: Callable[[], int] = lambda: 0,
) -> Runner:
    """The runner for the backend's shape; decided once, when the instance is built."""
    if hasattr(backend, "execute_async"):
        return AsyncRunner(backend, spec, answers, stats, name, cancelled=cancelled)  # type: ignore[arg-type]
    if hasattr(backend, "execute_requests"):
        return RequestRunner(backend, spec, answers, stats, name, cancelled=cancelled)  # type: ignore[arg-type]
    return BatchRunner(backend, spec, version, answers, stats, name, throttle_s=throttle_s, waiting=waiting)


def _timed(
    execute: Callable[[dict[str, npt.NDArray[Any]], list[str]], dict[str, npt.NDArray[Any]]],
    feeds: dict[str, npt.NDArray[Any]],
    wanted: list[str],
) -> tuple[dict[str, npt.NDArray[Any]], float]:
    """The execution and its own duration, measured where it runs: timing the hand-off too
    would keep a quick model in the thread for good, since its estimate would never drop."""
    started_s = time.perf_counter()
    results = execute(feeds, wanted)
    return results, time.perf_counter() - started_s


def _trace_headers(item: Admitted) -> dict[str, str] | None:
    """A traced request's timestamps as its answer carries them, once all five are in."""
    stamps = item.timestamps
    if stamps is None or len(stamps) != 5:
        return None
    return {TIMESTAMPS: ",".join(map(str, stamps))}


def _wanted_outputs(batch: list[Admitted]) -> list[str]:
    wanted: list[str] = []
    seen: set[str] = set()
    for item in batch:
        if not item.request.outputs:
            return []  # someone wants all
        for name in item.request.outputs:
            if name not in seen:
                seen.add(name)
                wanted.append(name)
    return wanted
