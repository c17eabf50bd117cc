"""`natron perf`: perf_analyzer's core options, spelled as perf_analyzer spells them.

    natron perf -m simple -u localhost:8000 --concurrency-range 1:16:2 -f perf.csv
    natron perf -m simple -i grpc -u localhost:8001 --request-rate-range 100:500:100
    natron perf -m simple -i nats -u nats://localhost:4222 --nats-creds client.nk

Exit status: 0 measured, 1 the server or the model failed (unreachable, unknown model, not
ready, the server gone mid-run, or errors in the last window), 2 bad flags. Every failure is one
line `natron perf: error: ...`, never a traceback.

The CSV (`-f`) has perf_analyzer's columns, in µs, one row per load point in the order measured
(perf_analyzer sorts by throughput instead). Measured: Inferences/Second, the latencies (the
client's time from sending a request to its decoded answer) and Client Send / Client Recv
(natron perf's own per-request framing and decoding; the tensors are built once, so Client Send
is close to 0). The Server columns are the statistics extension's per-request averages over the
window, as perf_analyzer computes them; they stay empty when the server gives no statistics (a
NATS target without --stats-url). Estimated: Network+Server Send/Recv, which is the average
latency less the client's and the server's measured parts, as perf_analyzer derives it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.live import Live
from rich.table import Table

from natron.perf.load import DISTRIBUTIONS, LoadGenerator, sweep
from natron.perf.results import Measurement, PerfError, ServerGone, csv_header, first_column
from natron.perf.target import INPUT_DATA, PROTOCOLS, Target

PROG = "natron perf"
_DEFAULT_URLS = {
    "http": "localhost:8000",
    "ws": "localhost:8000",
    "grpc": "localhost:8001",
    "nats": "nats://localhost:4222",
}


class UsageError(Exception):
    """A bad flag or value: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, description="Measure a model's throughput and latency under load, as perf_analyzer does."
    )
    p.add_argument("-m", dest="model", required=True, metavar="MODEL", help="the model to drive")
    p.add_argument(
        "-x", dest="version", default="", metavar="VERSION", help="its version (default: the highest ready)"
    )
    p.add_argument(
        "-u",
        dest="url",
        default=None,
        metavar="URL",
        help="the server (default by protocol: localhost:8000, :8001, nats://localhost:4222)",
    )
    p.add_argument("-i", dest="protocol", default="http", choices=PROTOCOLS, help="protocol (default http)")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="gRPC: every request on one ModelStreamInfer stream (what a decoupled model needs)",
    )
    p.add_argument(
        "--json", action="store_true", help="JSON tensors instead of binary tensor data (http, ws)"
    )
    p.add_argument(
        "-b", dest="batch_size", type=int, default=1, metavar="BATCH", help="batch size (default 1)"
    )
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2",
        help="dims of an input with variable dims (repeatable)",
    )
    p.add_argument(
        "--input-data", default="random", choices=INPUT_DATA, help="tensor contents (default random)"
    )
    p.add_argument(
        "--concurrency-range", default=None, metavar="START:END:STEP", help="requests in flight (default 1)"
    )
    p.add_argument(
        "--request-rate-range",
        default=None,
        metavar="START:END:STEP",
        help="requests per second, sent on a schedule",
    )
    p.add_argument(
        "--request-distribution",
        default="constant",
        choices=DISTRIBUTIONS,
        help="gaps between scheduled sends",
    )
    p.add_argument(
        "-p",
        "--measurement-interval",
        dest="interval_ms",
        type=int,
        default=5000,
        metavar="MS",
        help="window per load point (default 5000)",
    )
    p.add_argument(
        "-s",
        "--stability-percentage",
        dest="stability",
        type=float,
        default=10.0,
        metavar="PCT",
        help="windows agree when each one's throughput and latency lie within PCT%% of their mean "
        "(default 10)",
    )
    p.add_argument(
        "-r",
        "--max-trials",
        type=int,
        default=10,
        metavar="N",
        help="windows per load point at most while seeking 3 that agree; under 3: one window, unchecked "
        "(default 10)",
    )
    p.add_argument(
        "--percentile",
        type=int,
        default=None,
        metavar="N",
        help="the latency percentile that the stability rule, the threshold and the summary use "
        "(default: the average)",
    )
    p.add_argument(
        "--latency-threshold",
        type=float,
        default=None,
        metavar="MS",
        help="stop the sweep after a point whose latency passes this",
    )
    p.add_argument(
        "-f", dest="csv", type=Path, default=None, metavar="CSV", help="write perf_analyzer's CSV report here"
    )
    p.add_argument(
        "--nats-creds",
        type=Path,
        default=None,
        metavar="FILE",
        help="the NATS client's credentials (nkey seed or .creds)",
    )
    p.add_argument(
        "--nats-prefix",
        default="natron",
        metavar="PREFIX",
        help="subject prefix of the deployment (default natron)",
    )
    p.add_argument(
        "--stats-url",
        default="",
        metavar="URL",
        help="HTTP base of the statistics extension (default: -u for http and ws)",
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="per-request timeout in seconds (default 30)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        metavar="S",
        help="load before each window, in seconds (default 0.5)",
    )
    return p


def parse_range(text: str, what: str, *, integer: bool) -> list[float]:
    """perf_analyzer's start[:end[:step]] (end defaults to start, step to 1) as the loads."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise UsageError(f"{what} must be start[:end[:step]], got '{text}'")
    try:
        values = [int(p) if integer else float(p) for p in parts]
    except ValueError:
        kind = "whole numbers" if integer else "numbers"
        raise UsageError(f"{what} must be {kind}, got '{text}'") from None
    start = values[0]
    end = values[1] if len(values) > 1 else start
    step = values[2] if len(values) > 2 else 1
    if not start > 0:
        raise UsageError(f"{what} must start above 0, got '{text}'")
    if end < start:
        raise UsageError(f"{what} ends below its start: '{text}'")
    if not step > 0:
        raise UsageError(f"{what} needs a positive step, got '{text}'")
    loads: list[float] = []
    value = start
    while value <= end + 1e-9 * end:
        loads.append(value)
        value = start + len(loads) * step  # no float drift: each from the start
        if len(loads) > 10_000:
            raise UsageError(f"{what} has more than 10000 points: '{text}'")
    return loads


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise UsageError(f"--shape must be NAME:D1,D2,..., got '{text}'")
    try:
        values = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise UsageError(f"--shape dims must be whole numbers, got '{text}'") from None
    if any(d < 0 for d in values):
        raise UsageError(f"--shape dims must not be negative, got '{text}'")
    return name, values


def options(argv: Sequence[str]) -> tuple[Target, argparse.Namespace, list[tuple[str, float]]]:
    args = parser().parse_args(list(argv))
    if args.concurrency_range and args.request_rate_range:
        raise UsageError("give --concurrency-range or --request-rate-range, not both")
    if args.request_rate_range:
        points = [
            ("request_rate", r)
            for r in parse_range(args.request_rate_range, "--request-rate-range", integer=False)
        ]
    else:
        loads = parse_range(args.concurrency_range or "1", "--concurrency-range", integer=True)
        points = [("concurrency", c) for c in loads]
    if args.interval_ms <= 0:
        raise UsageError(f"--measurement-interval must be positive, got {args.interval_ms}")
    if args.percentile is not None and not 1 <= args.percentile <= 99:
        raise UsageError(f"--percentile must be between 1 and 99, got {args.percentile}")
    if args.latency_threshold is not None and not args.latency_threshold > 0:
        raise UsageError(f"--latency-threshold must be positive, got {args.latency_threshold}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must not be negative, got {args.warmup}")
    if not args.stability > 0:
        raise UsageError(f"--stability-percentage must be positive, got {args.stability:g}")
    if args.max_trials < 1:
        raise UsageError(f"--max-trials must be at least 1, got {args.max_trials}")
    if args.json and args.protocol not in ("http", "ws"):
        raise UsageError(f"--json applies to http and ws, not {args.protocol}")
    if args.nats_creds is not None and args.protocol != "nats":
        raise UsageError("--nats-creds applies to -i nats only")
    shapes = dict(parse_shape(s) for s in args.shape)
    try:
        target = Target(
            url=args.url or _DEFAULT_URLS[args.protocol],
            protocol=args.protocol,
            model=args.model,
            version=args.version,
            binary=not args.json,
            batch_size=args.batch_size,
            shapes=shapes,
            input_data=args.input_data,
            stats_url=args.stats_url,
            timeout_s=args.timeout,
            nats_creds=args.nats_creds,
            prefix=args.nats_prefix,
            streaming=args.streaming,
        )
    except PerfError as exc:
        raise UsageError(str(exc)) from None
    if target.nats_creds is not None and not target.nats_creds.is_file():
        raise UsageError(f"--nats-creds {target.nats_creds}: no such file")
    return target, args, points


# -- the report -------------------------------------------------------------------------------


def latency_key(percentile: int | None) -> str:
    return f"p{percentile}" if percentile is not None else "avg"


def table(measured: Sequence[Measurement], mode: str, key: str, title: str) -> Table:
    """The points so far; latencies and server times in ms (the CSV keeps perf_analyzer's µs)."""
    t = Table(title=title, title_justify="left")
    columns = ["Conc." if mode == "concurrency" else "Rate/s", "Infer/s", "OK", "Errors"]
    columns += [f"{key} ms", "p50", "p90", "p99", "Queue", "Compute", "Windows"]
    if mode == "request_rate":
        columns.append("Delayed")
    for column in columns:
        t.add_column(column, justify="right")
    for m in measured:
        compute = ("compute_input_us", "compute_infer_us", "compute_output_us")
        row = [
            f"{m.load:g}",
            f"{m.throughput_per_s:.1f}",
            str(m.requests),
            str(m.errors) if not m.errors else f"[red]{m.errors}[/red]",
            _ms(m.latency_us.get(key)),
            _ms(m.latency_us.get("p50")),
            _ms(m.latency_us.get("p90")),
            _ms(m.latency_us.get("p99")),
            _ms(m.server.get("queue_us")),
            _ms(sum(m.server.get(k, 0.0) for k in compute) if "compute_infer_us" in m.server else None),
            str(m.trials) if m.stable is not False else f"[yellow]{m.trials}, unstable[/yellow]",
        ]
        if mode == "request_rate":
            row.append(str(m.delayed))
        t.add_row(*row)
    return t


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def write_csv(path: Path, mode: str, measured: Sequence[Measurement]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=csv_header(mode))
        writer.writeheader()
        for m in measured:
            writer.writerow(m.csv_row())


def _errors_line(m: Measurement) -> str:
    worst = sorted(m.error_samples.items(), key=lambda item: -item[1])[:3]
    return "; ".join(f"{count}x {text}" for text, count in worst)


async def run(
    target: Target, args: argparse.Namespace, points: list[tuple[str, float]], console: Console
) -> int:
    mode = points[0][0]
    key = latency_key(args.percentile)
    percentiles = [args.percentile] if args.percentile is not None else []
    title = f"natron perf: {target.model} over {target.protocol}" + (" (JSON)" if not target.binary else "")
    title += " (streaming)" if target.streaming else ""
    measured: list[Measurement] = []
    exit_code = 0
    async with LoadGenerator(target, percentiles=percentiles) as gen:
        console.print(
            f"{title}: version {gen.info.version}, batch {target.batch_size}, "
            f"window {args.interval_ms} ms, {target.url}",
            highlight=False,
        )
        with Live(table(measured, mode, key, title), console=console, auto_refresh=False) as live:

            def on_point(m: Measurement) -> None:
                measured.append(m)
                live.update(table(measured, mode, key, title), refresh=True)

            try:
                await sweep(
                    gen,
                    points,
                    window_s=args.interval_ms / 1000,
                    latency_threshold_ms=args.latency_threshold,
                    on_point=on_point,
                    latency_key=key,
                    warmup_s=args.warmup,
                    distribution=args.request_distribution,
                    stability=args.stability / 100,
                    max_trials=args.max_trials,
                )
            except ServerGone as exc:
                if args.csv is not None and measured:
                    write_csv(args.csv, mode, measured)
                raise PerfError(f"{exc} (after {len(measured)} load points)") from None
        console.line()  # Live leaves its last frame without a newline when not on a terminal
    if args.csv is not None:
        write_csv(args.csv, mode, measured)
    for m in measured:
        if m.errors:
            console.print(
                f"[yellow]{m.load:g}: {m.errors} errors: {_errors_line(m)}[/yellow]", highlight=False
            )
    if measured and measured[-1].errors and not measured[-1].requests:
        console.print(f"{PROG}: error: no request succeeded at load {measured[-1].load:g}", highlight=False)
        exit_code = 1
    elif measured and measured[-1].stable is False:
        # perf_analyzer's words, and its choice: the sweep ends there, and that is a failure.
        last = measured[-1]
        console.print(
            f"{PROG}: error: failed to obtain stable measurement within {last.trials} measurement "
            f"windows for {first_column(mode).lower()} {last.load:g}; increase the "
            "--measurement-interval or the --stability-percentage",
            highlight=False,
        )
        exit_code = 1
    return exit_code


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # uvloop is optional: the standard loop measures the same, a bit slower
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: list[str]) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        target, args, points = options(argv)
    except UsageError as exc:
        err.print(f"{PROG}: error: {exc}", markup=False)
        return 2
    # The broker's reconnect warnings would interleave with the table; failures reach the user
    # as request errors instead.
    logging.getLogger("broker").setLevel(logging.ERROR)
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 132  # a log or a pipe: room for every column instead of rich's 80
    try:
        with _event_loop_runner() as runner:
            return runner.run(run(target, args, points, console))
    except PerfError as exc:
        err.print(f"{PROG}: error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        err.print(f"{PROG}: interrupted", markup=False)
        return 130
    except OSError as exc:  # the CSV file could not be written
        err.print(f"{PROG}: error: {exc}", markup=False)
        return 1
