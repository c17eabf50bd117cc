"""One analysis: for each device class of the fleet, search the model's config space, measuring
each candidate with natron.perf at rising concurrency, and keep what was measured whatever ends
the run (done, Ctrl-C, the server going away).

Each candidate's concurrency sweep stops early once p99 passes the latency budget (higher
concurrency only queues more) or once throughput has stopped growing (two levels in a row under
5% better than the best so far): the saturation point is what sizing needs, and levels past it
only cost time.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from natron.analyze import fleet, search
from natron.analyze.report import DeviceResult, Report
from natron.analyze.search import Candidate, Constraints, LoadPoint
from natron.analyze.server import AnalyzeError, Endpoints, PrivateServer, Repository
from natron.analyze.space import DeviceClass, Point, Space, build_space
from natron.perf.api import LoadGenerator, Measurement, PerfError, ServerGone, Target

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
SATURATION_GAIN = 1.05
SATURATED_AFTER = 2


@dataclass(slots=True)
class Options:
    model: str
    report_dir: Path
    url: str = ""
    repository: Path | None = None
    metrics_url: str = ""
    protocol: str = "http"
    constraints: Constraints = field(default_factory=Constraints)
    max_configs: int = 12
    strategy: str = "auto"
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    # Request rates (infer requests/s) to sweep instead of concurrency levels, when given.
    request_rates: tuple[float, ...] = ()
    window_s: float = 1.0
    warmup_s: float = 0.5
    # natron perf's (and perf_analyzer's) stability rule per level, on throughput and average
    # latency as perf_analyzer's default: up to `max_trials` windows until 3 agree within
    # `stability_pct`; under 3, one window. p99 is then read over the three windows' requests:
    # a p99 of one short window is itself too noisy to agree within 10%.
    stability_pct: float = 10.0
    max_trials: int = 4
    instance_counts: tuple[int, ...] = (1, 2, 4)
    max_batch_sizes: tuple[int, ...] = ()
    queue_delays_us: tuple[int | None, ...] = (None, 0, 100, 1000)
    device_kinds: tuple[str, ...] = ()  # labels to analyze; empty: every class of the fleet
    target_rate: float | None = None
    workers: int = 1  # a private server's CPU workers
    batch_size: int = 1
    grpc_url: str = ""
    nats_url: str = ""
    nats_creds: Path | None = None


def point_of(measurement: Measurement) -> LoadPoint:
    latency = measurement.latency_us
    server = measurement.server
    compute = sum(server.get(k, 0.0) for k in ("compute_input_us", "compute_infer_us", "compute_output_us"))
    return LoadPoint(
        concurrency=round(measurement.load) if measurement.mode == "concurrency" else 0,
        request_rate=measurement.load if measurement.mode != "concurrency" else 0.0,
        throughput_per_s=measurement.throughput_per_s,
        p50_ms=latency.get("p50", 0.0) / 1000,
        p95_ms=latency.get("p95", 0.0) / 1000,
        p99_ms=latency.get("p99", 0.0) / 1000,
        avg_ms=latency.get("avg", 0.0) / 1000,
        errors=measurement.errors,
        server_queue_us=server.get("queue_us", 0.0),
        server_compute_us=compute,
        stable=measurement.stable,
        windows=measurement.trials,
    )


class Analysis:
    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self.report = Report(
            model=options.model, constraints=options.constraints, target_rate=options.target_rate
        )
        self._progress: Progress | None = None

    async def run(self) -> Report:
        """The report, complete or as far as the run got: this never loses what was measured."""
        options = self.options
        server = PrivateServer(options.repository, options.workers) if options.repository else None
        try:
            if server is not None:
                self.console.print(f"starting natron serve on {options.repository} (explicit control mode)")
                endpoints = await server.start()
            else:
                endpoints = Endpoints(
                    http_url=options.url.rstrip("/"),
                    metrics_url=options.metrics_url,
                    grpc_url=options.grpc_url,
                    nats_url=options.nats_url,
                    nats_creds=options.nats_creds,
                )
            async with aiohttp.ClientSession() as session:
                await self._analyze(session, endpoints, restore=server is None)
        except asyncio.CancelledError:
            self.report.interrupted = "interrupted"
        finally:
            if server is not None:
                await server.stop()
        return self.report

    async def _analyze(self, session: aiohttp.ClientSession, endpoints: Endpoints, restore: bool) -> None:
        options = self.options
        repository = Repository(session, endpoints.http_url)
        was_loaded = await repository.loaded(options.model)
        if not was_loaded:
            await repository.load(options.model)
        try:
            base = await repository.config(options.model)
            if base.get("platform") == "ensemble":
                raise AnalyzeError(
                    f"'{options.model}' is an ensemble: analyze its steps, each has a config of its own"
                )
            reading = await fleet.read(session, endpoints.metrics_url)
            classes = self._classes(reading)
            self.report.notes += fleet.overlapping(classes)
            try:
                with Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                ) as progress:
                    self._progress = progress
                    for device in classes:
                        await self._search(session, endpoints, base, device)
            except ServerGone as exc:
                self.report.interrupted = f"the server went away: {exc}"
            except asyncio.CancelledError:
                self.report.interrupted = "interrupted (Ctrl-C)"
                # The cancellation was for the search: the clean-up below still talks to the server.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            finally:
                self._progress = None
                for result in self.report.results:
                    result.best = search.winner(result.candidates, options.constraints)
                    result.closest = search.closest(result.candidates, options.constraints)
        finally:
            if restore:
                # The user's server goes back to the model's own config.pbtxt, as it was.
                with contextlib.suppress(PerfError, asyncio.TimeoutError):
                    if was_loaded:
                        await asyncio.wait_for(repository.load(options.model), 120)
                    else:
                        await asyncio.wait_for(repository.unload(options.model), 60)

    def _classes(self, reading: fleet.FleetReading) -> list[DeviceClass]:
        classes = reading.classes
        if not classes:
            raise AnalyzeError(
                f"no workers in {self.options.metrics_url or 'the metrics'}: "
                "is it natron's metrics endpoint, and is a worker running?"
            )
        wanted = self.options.device_kinds
        if wanted:
            chosen = [c for c in classes if c.label in wanted or c.kind in wanted]
            if not chosen:
                have = ", ".join(c.label for c in classes)
                raise AnalyzeError(f"no device kind {', '.join(wanted)} in the fleet; it has: {have}")
            return chosen
        return classes

    async def _search(
        self,
        session: aiohttp.ClientSession,
        endpoints: Endpoints,
        base: dict[str, object],
        device: DeviceClass,
    ) -> None:
        options = self.options
        space = build_space(
            base,
            device,
            instance_counts=options.instance_counts,
            max_batch_sizes=options.max_batch_sizes or None,
            queue_delays_us=options.queue_delays_us,
        )
        result = DeviceResult(device=device.label, workers=len(device.workers))
        self.report.results.append(result)
        strategy = search.choose_strategy(space, options.max_configs, options.strategy)
        budget = min(options.max_configs, space.size)
        assert self._progress is not None
        overall = self._progress.add_task(f"{device.label}: {strategy} search", total=budget)
        self.console.print(
            f"{device.label} ({len(device.workers)} worker(s)): {space.size} configs in the space, "
            f"{strategy} search over at most {budget}"
        )

        async def evaluate(point: Point) -> Candidate:
            candidate = await self._measure(session, endpoints, space, device, point, result)
            self.console.print(self._line(candidate), highlight=False)
            assert self._progress is not None
            self._progress.advance(overall)
            return candidate

        if strategy == "brute":
            await search.brute(space, evaluate, options.max_configs)
        else:
            await search.quick(space, evaluate, options.max_configs, options.constraints)
        self._progress.remove_task(overall)

    async def _measure(
        self,
        session: aiohttp.ClientSession,
        endpoints: Endpoints,
        space: Space,
        device: DeviceClass,
        point: Point,
        result: DeviceResult,
    ) -> Candidate:
        options = self.options
        candidate = Candidate(
            name=space.name(point),
            device=device.label,
            settings=space.describe(point),
            config=space.config(point),
            workers=max(1, len(device.workers)),
        )
        # In the report from the start: an interruption keeps the levels measured so far.
        result.candidates.append(candidate)
        assert self._progress is not None
        levels: list[tuple[str, float]] = (
            [("request_rate", rate) for rate in options.request_rates]
            if options.request_rates
            else [("concurrency", float(c)) for c in options.concurrency]
        )
        step = self._progress.add_task(f"  {candidate.name}: loading", total=len(levels))
        try:
            try:
                await Repository(session, endpoints.http_url).load(options.model, candidate.config)
            except ServerGone:
                raise
            except PerfError as exc:
                if not any(c.points for r in self.report.results for c in r.candidates):
                    # Not even the config nearest the model's own loads: a server in another
                    # control mode, or a model that does not load at all. The rest would fail alike.
                    raise AnalyzeError(
                        f"'{options.model}' does not load with a config override: {exc}"
                    ) from exc
                candidate.failure = f"not loaded: {exc}"
                return candidate
            target = Target(
                url=endpoints.http_url if options.protocol in ("http", "ws") else self._url_for(endpoints),
                protocol=options.protocol,
                model=options.model,
                batch_size=options.batch_size,
                stats_url=endpoints.http_url,
                nats_creds=endpoints.nats_creds if options.protocol == "nats" else None,
            )
            async with LoadGenerator(target) as generator:
                best, stale = 0.0, 0
                # Appended as measured: an interruption keeps the levels done so far.
                for mode, level in levels:
                    self._progress.update(step, description=f"  {candidate.name}: {mode} {level:g}")
                    concurrency, rate = (int(level), None) if mode == "concurrency" else (None, level)
                    measurement = await generator.measure(
                        concurrency=concurrency,
                        request_rate=rate,
                        window_s=options.window_s,
                        warmup_s=options.warmup_s,
                        stability=options.stability_pct / 100,
                        max_trials=options.max_trials,
                        latency_key="avg",
                    )
                    load_point = point_of(measurement)
                    candidate.points.append(load_point)
                    await self._sample_memory(session, endpoints, device, candidate)
                    self._progress.advance(step)
                    if measurement.requests == 0:
                        break
                    budget = options.constraints.latency_budget_ms
                    if budget is not None and load_point.p99_ms > budget:
                        break
                    if load_point.throughput_per_s < best * SATURATION_GAIN:
                        stale += 1
                        if stale >= SATURATED_AFTER:
                            break
                    else:
                        stale = 0
                    best = max(best, load_point.throughput_per_s)
        except ServerGone:
            raise
        except PerfError as exc:
            candidate.failure = f"not measured: {exc}"
        finally:
            self._progress.remove_task(step)
        return candidate

    def _line(self, candidate: Candidate) -> str:
        if candidate.failure:
            return f"measured {candidate.device} {candidate.name}: {candidate.failure}"
        if not candidate.points:
            return f"measured {candidate.device} {candidate.name}: nothing"
        top = max(candidate.points, key=lambda p: p.throughput_per_s)
        unstable = sum(p.stable is False for p in candidate.points)
        return (
            f"measured {candidate.device} {candidate.name}: {top.throughput_per_s:.1f} infer/s at "
            f"load {top.load}, p99 {top.p99_ms:.2f} ms, RSS {candidate.rss_mb:.0f} MB"
            + (f" ({unstable} of {len(candidate.points)} levels unstable)" if unstable else "")
        )

    def _url_for(self, endpoints: Endpoints) -> str:
        url = endpoints.grpc_url if self.options.protocol == "grpc" else endpoints.nats_url
        if not url:
            raise AnalyzeError(f"--protocol {self.options.protocol} needs --{self.options.protocol}-url")
        return url

    async def _sample_memory(
        self, session: aiohttp.ClientSession, endpoints: Endpoints, device: DeviceClass, candidate: Candidate
    ) -> None:
        try:
            reading = await fleet.read(session, endpoints.metrics_url)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return  # the next level's sample will do; a missing one does not void the figures
        rss, gpu = reading.memory_mb(device)
        candidate.rss_mb = max(candidate.rss_mb, rss)
        candidate.gpu_mb = max(candidate.gpu_mb, gpu)
