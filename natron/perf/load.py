"""The load generator: perf_analyzer's two load modes over one protocol client.

Concurrency mode keeps N requests in flight: N loops, each sending its next request as soon as
the last is answered. Request-rate mode sends on a schedule (constant gaps, or Poisson's
exponential ones) whatever the answers do, up to `max_in_flight` requests at once; a send that
leaves more than 1 ms after its time counts as delayed (perf_analyzer's "delayed" requests).

A measurement: the load runs `warmup_s`, the server's statistics are read, the window of
`window_s` opens, closes, the statistics are read again, and the load stops (the requests in
flight finish, within the timeout). A request counts in the window when its answer came while
the window was open, as perf_analyzer counts. With a stability rule, windows follow one another
under the same load, as perf_analyzer's trials do, until the last STABILITY_WINDOWS agree (each
one's throughput and latency within the given fraction of their mean) or `max_trials` windows
have run; the measurement is those last windows together. Every answer is checked: each output of the
model's config present, with the batch as its first dimension where the model batches, and,
given a `check`, the caller's own test of the answer; a wrong answer is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import ml_dtypes
import numpy as np

from natron.datatypes import BYTES, to_numpy_dtype
from natron.perf.protocols import (
    Array,
    Inputs,
    ModelInfo,
    ProtocolClient,
    RequestFailed,
    client_for,
)
from natron.perf.results import Measurement, PerfError, ServerGone, count_error, latency_summary
from natron.perf.target import Target

# A caller's test of an answer: (inputs, outputs) -> what is wrong with it, or None.
Check = Callable[[Mapping[str, Array], Mapping[str, Array]], str | None]

MODES: Final = ("concurrency", "request_rate")
DISTRIBUTIONS: Final = ("constant", "poisson")
# A send later than this after its scheduled time counts as delayed: the event loop's timers
# are good to about a millisecond, so anything finer would count the timer, not the load.
DELAYED_AFTER_S: Final = 0.001
# After a request that could not reach the server, its loop pauses this long: a dead server
# refuses at once, and without a pause the loops would spin the CPU for the whole window.
_GONE_PAUSE_S: Final = 0.05
# perf_analyzer's default length of a random BYTES element.
_STRING_LENGTH: Final = 128
# Requests in flight at most in request-rate mode; past it, sends wait (and count as delayed).
MAX_IN_FLIGHT: Final = 4096
# perf_analyzer's stability rule looks at this many windows in a row.
STABILITY_WINDOWS: Final = 3


def is_stable(windows: Sequence[Measurement], within: float, latency_key: str) -> bool:
    """perf_analyzer's rule: each window's throughput, and its `latency_key` latency, lies within
    `within` (a fraction) of the windows' mean. Windows that all measured nothing agree."""
    for values in (
        [m.throughput_per_s for m in windows],
        [m.latency_us.get(latency_key, 0.0) for m in windows],
    ):
        mean = sum(values) / len(values)
        if any(abs(v - mean) > within * mean for v in values):
            return False
    return True


def build_inputs(info: ModelInfo, target: Target, seed: int = 0) -> Inputs:
    """The request's tensors, built once: the batch dimension where the model batches, --shape
    for the variable dims, random or zero data."""
    if info.max_batch_size == 0 and target.batch_size > 1:
        raise PerfError(f"model '{info.name}' does not batch (max_batch_size 0): batch size must be 1")
    if target.batch_size > info.max_batch_size > 0:
        raise PerfError(
            f"batch size {target.batch_size} is over the max_batch_size {info.max_batch_size} "
            f"of model '{info.name}'"
        )
    names = {spec.name for spec in info.inputs}
    unknown = sorted(set(target.shapes) - names)
    if unknown:
        raise PerfError(f"--shape names no input of model '{info.name}': {', '.join(unknown)}")
    rng = np.random.default_rng(seed)
    inputs: Inputs = {}
    for spec in info.inputs:
        dims = spec.dims
        given = target.shapes.get(spec.name)
        if given is not None:
            if len(given) != len(dims) or any(d >= 0 and d != g for d, g in zip(dims, given, strict=True)):
                raise PerfError(f"--shape {spec.name}:{_dims(given)} does not fit its dims [{_dims(dims)}]")
            dims = given
        elif any(d < 0 for d in dims):
            raise PerfError(
                f"input '{spec.name}' has variable dims [{_dims(dims)}]: "
                f"give them with --shape {spec.name}:..."
            )
        shape = (target.batch_size, *dims) if info.max_batch_size > 0 else dims
        inputs[spec.name] = (spec.datatype, _data(spec.datatype, shape, target.input_data, rng))
    return inputs


def _dims(dims: Sequence[int]) -> str:
    return ",".join(str(d) for d in dims)


def _data(datatype: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> Array:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == BYTES:
        if kind == "zero":
            items = [b"0"] * count
        else:
            letters = rng.integers(ord("a"), ord("z") + 1, size=(count, _STRING_LENGTH), dtype=np.uint8)
            items = [row.tobytes() for row in letters]
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(shape)
    dtype = to_numpy_dtype(datatype)
    if kind == "zero":
        return np.zeros(shape, dtype=dtype)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind in "iu":
        # Small values: sums and products of them stay far from any integer type's limits.
        return rng.integers(0, 100, size=shape).astype(dtype)
    if dtype == ml_dtypes.bfloat16:
        return rng.random(size=shape, dtype=np.float32).astype(dtype)
    return rng.random(size=shape).astype(dtype)


def check_structure(info: ModelInfo, batch_size: int, outputs: Mapping[str, Array]) -> str | None:
    """What is wrong with an answer's shape of things, or None: every output of the config
    present, with the batch as its first dimension where the model batches."""
    for name, _datatype in info.outputs:
        array = outputs.get(name)
        if array is None:
            return f"output '{name}' missing from the answer"
        if info.max_batch_size > 0 and (array.ndim == 0 or array.shape[0] != batch_size):
            return f"output '{name}' has shape {list(array.shape)}, expected a batch of {batch_size} first"
    return None


class _Window:
    """What the requests that ended while the window was open did."""

    def __init__(self) -> None:
        self.open = False
        self.stopping = False
        self.latencies_us: list[float] = []
        self.send_ns = 0
        self.recv_ns = 0
        self.errors = 0
        self.gone = 0
        self.samples: dict[str, int] = {}
        self.sent = 0
        self.delayed = 0

    def ok(self, latency_ns: int, send_ns: int, recv_ns: int) -> None:
        if self.open:
            self.latencies_us.append(latency_ns / 1000)
            self.send_ns += send_ns
            self.recv_ns += recv_ns

    def error(self, message: str, gone: bool) -> None:
        if self.open:
            self.errors += 1
            self.gone += gone
            count_error(self.samples, message)

    def take(self) -> _Window:
        """What this window counted, handed over; it counts afresh from here (no await between:
        the next window loses no answer)."""
        taken = _Window()
        taken.absorb(self)
        self.latencies_us, self.samples = [], {}
        self.send_ns = self.recv_ns = self.errors = self.gone = self.sent = self.delayed = 0
        return taken

    def absorb(self, other: _Window) -> None:
        """Add what `other` counted to this window's counts."""
        self.latencies_us += other.latencies_us
        self.send_ns += other.send_ns
        self.recv_ns += other.recv_ns
        self.errors += other.errors
        self.gone += other.gone
        for text, count in other.samples.items():
            count_error(self.samples, text, count)
        self.sent += other.sent
        self.delayed += other.delayed


@dataclass(slots=True)
class _Trial:
    """One window of a measurement, with the server's statistics around it."""

    window: _Window
    duration_s: float
    before: dict[str, float] | None
    after: dict[str, float] | None


class LoadGenerator:
    """async with LoadGenerator(target) as gen: m = await gen.measure(concurrency=4, window_s=2.0)

    Connects and reads the model's config once on enter (inputs, datatypes, shapes,
    max_batch_size; the version to drive) and builds the request tensors once; connections
    persist across measure() calls. `check` tests each answer against the inputs (see
    `Check`); `percentiles` adds latency percentiles ("pN") to every measurement."""

    def __init__(
        self,
        target: Target,
        *,
        check: Check | None = None,
        percentiles: Sequence[int] = (),
        max_in_flight: int = MAX_IN_FLIGHT,
        seed: int = 0,
    ) -> None:
        for p in percentiles:
            if not 1 <= p <= 99:
                raise PerfError(f"percentile must be between 1 and 99, got {p}")
        self.target = target
        self.check = check
        self.percentiles = tuple(percentiles)
        self.max_in_flight = max_in_flight
        self.seed = seed
        self.client: ProtocolClient = client_for(target)
        self._info: ModelInfo | None = None
        self.inputs: Inputs = {}
        self._arrays: dict[str, Array] = {}

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("LoadGenerator used outside `async with`")
        return self._info

    async def __aenter__(self) -> LoadGenerator:
        try:
            await self.client.open()
            self._info = await self.client.describe()
            self.inputs = build_inputs(self._info, self.target, self.seed)
            self._arrays = {name: array for name, (_, array) in self.inputs.items()}
            self.client.prepare(self._info, self.inputs)
        except BaseException:
            await self.client.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def measure(
        self,
        *,
        concurrency: int | None = None,
        request_rate: float | None = None,
        window_s: float = 5.0,
        warmup_s: float = 0.5,
        distribution: str = "constant",
        stability: float | None = None,
        max_trials: int = 10,
        latency_key: str = "avg",
    ) -> Measurement:
        """One load point. Exactly one of `concurrency` and `request_rate`. With `stability` (a
        fraction) and `max_trials` of at least STABILITY_WINDOWS, windows run until the last
        ones are stable by `latency_key` (see the module docstring); otherwise one window.
        Raises ServerGone when no request of a window reached the server."""
        if (concurrency is None) == (request_rate is None):
            raise PerfError("give exactly one of concurrency and request_rate")
        if concurrency is not None and concurrency < 1:
            raise PerfError(f"concurrency must be at least 1, got {concurrency}")
        if request_rate is not None and not request_rate > 0:
            raise PerfError(f"request rate must be positive, got {request_rate}")
        if distribution not in DISTRIBUTIONS:
            raise PerfError(
                f"request distribution must be one of {', '.join(DISTRIBUTIONS)}, got '{distribution}'"
            )
        if not window_s > 0 or warmup_s < 0:
            raise PerfError(
                f"the window must be positive and the warm-up not negative ({window_s}, {warmup_s})"
            )
        if stability is not None and not stability > 0:
            raise PerfError(f"the stability fraction must be positive, got {stability}")
        if max_trials < 1:
            raise PerfError(f"max trials must be at least 1, got {max_trials}")
        checked = stability is not None and max_trials >= STABILITY_WINDOWS
        window = _Window()
        tasks: set[asyncio.Task[None]] = set()
        if concurrency is not None:
            mode, load = "concurrency", float(concurrency)
            for i in range(concurrency):
                tasks.add(asyncio.create_task(self._loop(window), name=f"natron-perf-slot-{i}"))
            scheduler = None
        else:
            assert request_rate is not None
            mode, load = "request_rate", float(request_rate)
            scheduler = asyncio.create_task(
                self._schedule(window, request_rate, distribution, tasks), name="natron-perf-schedule"
            )
        trials: list[_Trial] = []
        stable: bool | None = None
        try:
            await asyncio.sleep(warmup_s)
            while True:
                before = await self.client.statistics()
                window.open = True
                started = time.perf_counter()
                await asyncio.sleep(window_s)
                window.open = False
                duration_s = time.perf_counter() - started
                taken = window.take()
                trials.append(_Trial(taken, duration_s, before, await self.client.statistics()))
                if not taken.latencies_us and taken.errors and taken.gone == taken.errors:
                    common = max(taken.samples.items(), key=lambda item: item[1])[0]
                    raise ServerGone(f"the server stopped answering: {common}")
                if not checked:
                    break
                if len(trials) >= STABILITY_WINDOWS:
                    last = [self._measurement(mode, load, t, t) for t in trials[-STABILITY_WINDOWS:]]
                    assert stability is not None
                    if is_stable(last, stability, latency_key):
                        stable = True
                        break
                if len(trials) >= max_trials:
                    stable = False
                    break
        finally:
            window.open = False
            window.stopping = True
            await self._stop(scheduler, tasks)
        counted = trials[-STABILITY_WINDOWS:] if checked else trials[-1:]
        merged = _Window()
        for trial in counted:
            merged.absorb(trial.window)
        total = _Trial(merged, sum(t.duration_s for t in counted), counted[0].before, counted[-1].after)
        measurement = self._measurement(mode, load, total, total)
        measurement.stable, measurement.trials = stable, len(trials)
        return measurement

    async def _one(self, window: _Window) -> None:
        started = time.perf_counter_ns()
        try:
            answer = await self.client.infer()
        except RequestFailed as exc:
            window.error(str(exc), exc.gone)
            if exc.gone:
                await asyncio.sleep(_GONE_PAUSE_S)
            return
        except Exception as exc:  # a bug or an answer no decoder expected: this request's error
            window.error(f"{type(exc).__name__}: {exc}", False)
            return
        ended = time.perf_counter_ns()
        problem = check_structure(self.info, self.target.batch_size, answer.outputs)
        if problem is None and self.check is not None:
            try:
                problem = self.check(self._arrays, answer.outputs)
            except Exception as exc:  # a check that fails on a malformed answer: a wrong answer
                problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            window.error(f"wrong answer: {problem}", False)
        else:
            window.ok(ended - started, answer.send_ns, answer.recv_ns)

    async def _loop(self, window: _Window) -> None:
        while not window.stopping:
            if window.open:
                window.sent += 1
            await self._one(window)

    async def _schedule(
        self, window: _Window, rate: float, distribution: str, tasks: set[asyncio.Task[None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(self.seed)
        gaps: Callable[[], float] = (
            (lambda: rng.expovariate(rate)) if distribution == "poisson" else (lambda: 1 / rate)
        )
        slots = asyncio.Semaphore(self.max_in_flight)
        due = loop.time()
        while True:
            due += gaps()
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await slots.acquire()
            if window.open:
                window.sent += 1
                window.delayed += loop.time() - due > DELAYED_AFTER_S
            task = asyncio.create_task(self._one(window))
            tasks.add(task)

            def done(task: asyncio.Task[None]) -> None:
                tasks.discard(task)
                slots.release()

            task.add_done_callback(done)

    async def _stop(self, scheduler: asyncio.Task[None] | None, tasks: set[asyncio.Task[None]]) -> None:
        """Stop sending, let the requests in flight end within the timeout, cancel the rest."""
        if scheduler is not None:
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler
        # The concurrency loops end after the request each is in (`stopping`): their
        # connections stay open and usable for the next measurement.
        pending = set(tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.target.timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _measurement(self, mode: str, load: float, first: _Trial, last: _Trial) -> Measurement:
        """`last`'s window and duration; the server's statistics from before `first` to after `last`."""
        window, duration_s = last.window, last.duration_s
        before, after = first.before, last.after
        requests = len(window.latencies_us)
        batch = self.target.batch_size
        return Measurement(
            mode=mode,
            load=load,
            duration_s=duration_s,
            requests=requests,
            errors=window.errors,
            error_samples=dict(window.samples),
            throughput_per_s=requests * batch / duration_s,
            latency_us=latency_summary(window.latencies_us, self.percentiles),
            server=server_deltas(before, after),
            delayed=window.delayed,
            client_send_us=window.send_ns / requests / 1000 if requests else 0.0,
            client_recv_us=window.recv_ns / requests / 1000 if requests else 0.0,
            batch_size=batch,
            sent=window.sent,
            achieved_rate_per_s=window.sent / duration_s,
        )


def server_deltas(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> dict[str, float]:
    """Per-request averages (µs) of the statistics extension's counters between two readings,
    and "success", the requests the server finished between them; {} without both readings."""
    if before is None or after is None:
        return {}
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    result: dict[str, float] = {"success": delta.get("success_count", 0.0)}
    for kind in ("queue", "compute_input", "compute_infer", "compute_output"):
        count = delta.get(f"{kind}_count", 0.0)
        if count > 0:
            result[f"{kind}_us"] = delta.get(f"{kind}_ns", 0.0) / count / 1000
    return result


async def sweep(
    gen: LoadGenerator,
    points: Sequence[tuple[str, float]],
    *,
    window_s: float,
    latency_threshold_ms: float | None = None,
    on_point: Callable[[Measurement], None] | None = None,
    latency_key: str = "p99",
    warmup_s: float = 0.5,
    distribution: str = "constant",
    stability: float | None = None,
    max_trials: int = 10,
) -> list[Measurement]:
    """Measure each (mode, load) point in order; stop after the first whose `latency_key`
    latency passes `latency_threshold_ms` (perf_analyzer's --latency-threshold), and, as
    perf_analyzer does, after the first that did not become stable within `max_trials`
    windows. Raises ServerGone carrying the measurements taken before the server went."""
    measured: list[Measurement] = []
    for mode, load in points:
        if mode not in MODES:
            raise PerfError(f"unknown load mode '{mode}' (one of {', '.join(MODES)})")
        concurrency, rate = (int(load), None) if mode == "concurrency" else (None, load)
        try:
            m = await gen.measure(
                concurrency=concurrency,
                request_rate=rate,
                window_s=window_s,
                warmup_s=warmup_s,
                distribution=distribution,
                stability=stability,
                max_trials=max_trials,
                latency_key=latency_key,
            )
        except ServerGone as exc:
            raise ServerGone(str(exc), measured) from None
        measured.append(m)
        if on_point is not None:
            on_point(m)
        if m.stable is False:
            break
        if (
            latency_threshold_ms is not None
            and m.latency_us.get(latency_key, 0.0) > latency_threshold_ms * 1000
        ):
            break
    return measured
