"""`natron analyze MODEL (--url URL | --repository REPO) [--report DIR] [--max-configs N]`

Searches MODEL's configurations (instances, max_batch_size, dynamic batching, ONNX Runtime's
options) for throughput against latency and memory, on every device kind of the fleet, and
writes DIR/index.html (plots included), DIR/measurements.csv and DIR/config.pbtxt (the chosen
config). With --repository it starts a private `natron serve` in explicit control mode and
writes the chosen config next to the model as config.analyzed.pbtxt (`--apply` replaces the
model's config.pbtxt, keeping the old one as config.pbtxt.orig). With --url it analyzes a
running server in explicit control mode, and loads the model's own config again at the end.

Exit status: 0 a config meets the constraints; 1 none does (the closest is shown), or the run
failed or stopped early (what was measured is written); 2 bad flags; 130 Ctrl-C (report kept).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console

from natron.analyze import report as reports
from natron.analyze.run import DEFAULT_CONCURRENCY, Analysis, Options
from natron.analyze.search import LATENCY, THROUGHPUT, Constraints, closest
from natron.analyze.server import AnalyzeError
from natron.perf.api import PerfError

ANALYZED_NAME = "config.analyzed.pbtxt"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got '{text}'")
    return values


def _rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected rates > 0, got '{text}'")
    return values


def _delays(text: str) -> tuple[int | None, ...]:
    values: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        if item == "off":
            values.append(None)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'off' or microseconds, got '{item}'") from None
        if values[-1] < 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"a delay is >= 0 µs, got {item}")
    return tuple(values)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natron analyze",
        description=(__doc__ or "").split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("model", help="the model to analyze")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running natron gateway, e.g. http://127.0.0.1:8000 (explicit mode)")
    where.add_argument(
        "--repository", type=Path, help="a model repository: analyzed on a private natron serve"
    )
    parser.add_argument("--metrics-url", help="its Prometheus endpoint (default: the --url host, port 8002)")
    parser.add_argument("--report", type=Path, default=Path("analysis"), help="report directory (./analysis)")
    parser.add_argument("--max-configs", type=int, default=12, help="configs measured per device kind (12)")
    parser.add_argument("--search", choices=("auto", "brute", "quick"), default="auto")
    parser.add_argument("--latency-budget-ms", type=_positive, help="p99 latency a config must meet")
    parser.add_argument("--min-throughput", type=_positive, help="infer/s a config must reach")
    parser.add_argument("--max-memory-mb", type=_positive, help="memory per worker (GPU memory on a GPU)")
    parser.add_argument("--objective", choices=(THROUGHPUT, LATENCY), default=THROUGHPUT)
    parser.add_argument(
        "--concurrency",
        type=_ints,
        default=DEFAULT_CONCURRENCY,
        help="concurrency levels per config (1,2,4,8,16,32)",
    )
    parser.add_argument(
        "--request-rates",
        type=_rates,
        default=(),
        help="sweep these request rates (req/s) instead of concurrency levels",
    )
    parser.add_argument("--window-s", type=_positive, default=1.0, help="measurement window (1 s)")
    parser.add_argument(
        "--stability-percentage",
        type=_positive,
        default=10.0,
        help="a level is stable when 3 windows' throughput and mean latency lie within this %% of their mean "
        "(10)",
    )
    parser.add_argument(
        "--max-trials", type=int, default=4, help="windows per level at most; under 3: one, unchecked (4)"
    )
    parser.add_argument("--instance-counts", type=_ints, default=(1, 2, 4))
    parser.add_argument(
        "--max-batch-sizes", type=_ints, default=(), help="default: powers of 2 to the model's"
    )
    parser.add_argument(
        "--queue-delays-us", type=_delays, default=(None, 0, 100, 1000), help="off,0,100,1000"
    )
    parser.add_argument(
        "--device-kind", action="append", default=[], help="only this device kind (repeatable)"
    )
    parser.add_argument("--target-rate", type=_positive, help="infer/s to size the fleet for")
    parser.add_argument("-i", "--protocol", choices=("http", "grpc", "ws", "nats"), default="http")
    parser.add_argument("--grpc-url", default="", help="with --url and -i grpc: host:port")
    parser.add_argument("--nats-url", default="", help="with --url and -i nats")
    parser.add_argument("--nats-creds", type=Path, help="with --url and -i nats: the client's credentials")
    parser.add_argument("--workers", type=int, default=1, help="CPU workers of the private server (1)")
    parser.add_argument("-b", "--batch-size", type=int, default=1)
    parser.add_argument("--apply", action="store_true", help="with --repository: replace config.pbtxt")
    return parser


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    if args.max_configs < 1:
        parser.error("--max-configs must be >= 1")
    if args.max_trials < 1:
        parser.error("--max-trials must be >= 1")
    if args.workers < 1 or args.batch_size < 1:
        parser.error("--workers and --batch-size must be >= 1")
    if args.url and args.protocol in ("grpc", "nats") and not getattr(args, f"{args.protocol}_url"):
        parser.error(f"-i {args.protocol} with --url needs --{args.protocol}-url")
    if args.apply and args.repository is None:
        parser.error("--apply needs --repository")
    if args.repository is not None and not (args.repository / args.model).is_dir():
        parser.error(f"no model '{args.model}' in {args.repository}")
    metrics_url = args.metrics_url or ""
    if args.url and not metrics_url:
        parts = urlsplit(args.url)
        if not parts.hostname:
            parser.error(f"--url {args.url}: expected http://HOST:PORT")
        metrics_url = f"http://{parts.hostname}:8002/metrics"
    return Options(
        model=args.model,
        report_dir=args.report,
        url=args.url or "",
        repository=args.repository,
        metrics_url=metrics_url,
        protocol=args.protocol,
        constraints=Constraints(
            args.latency_budget_ms, args.min_throughput, args.max_memory_mb, args.objective
        ),
        max_configs=args.max_configs,
        strategy=args.search,
        concurrency=args.concurrency,
        request_rates=args.request_rates,
        window_s=args.window_s,
        stability_pct=args.stability_percentage,
        max_trials=args.max_trials,
        instance_counts=args.instance_counts,
        max_batch_sizes=args.max_batch_sizes,
        queue_delays_us=args.queue_delays_us,
        device_kinds=tuple(args.device_kind),
        target_rate=args.target_rate,
        workers=args.workers,
        batch_size=args.batch_size,
        grpc_url=args.grpc_url,
        nats_url=args.nats_url,
        nats_creds=args.nats_creds,
    )


async def _run(analysis: Analysis) -> reports.Report:
    """The analysis under a SIGINT handler: the first Ctrl-C cancels the search (the report is
    still written), a second one exits at once."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(analysis.run())
    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            os._exit(130)
        analysis.console.print("[yellow]Ctrl-C: stopping, writing what was measured (again to quit now)")
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def write_next_to_model(options: Options, text: str, apply: bool) -> Path:
    assert options.repository is not None
    folder = options.repository / options.model
    if not apply:
        target = folder / ANALYZED_NAME
        target.write_text(text)
        return target
    current = folder / "config.pbtxt"
    if current.exists():
        backup = folder / "config.pbtxt.orig"
        if not backup.exists():
            backup.write_text(current.read_text())
    current.write_text(text)
    return current


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = options_from(args, parser)
    console = Console(stderr=False)
    analysis = Analysis(options, console)
    try:
        report = asyncio.run(_run(analysis))
    except (AnalyzeError, PerfError) as exc:
        print(f"natron analyze: error: {exc}", file=sys.stderr)
        if any(c.points for r in analysis.report.results for c in r.candidates):
            written = reports.write(analysis.report, options.report_dir)
            print(f"natron analyze: what was measured: {written['html']}", file=sys.stderr)
        return 1
    written = reports.write(report, options.report_dir)
    reports.print_summary(report, console)
    console.print(f"report: {written['html']}  measurements: {written['csv']}")
    best = report.best
    if best is not None:
        console.print(f"chosen: {best.device} {best.name}; config: {written['config']}")
        if options.repository is not None:
            path = write_next_to_model(options, reports.config_text(best.config), args.apply)
            console.print(f"written next to the model: {path}")
    if report.interrupted:
        print(
            f"natron analyze: stopped early: {report.interrupted}; the report has what was measured",
            file=sys.stderr,
        )
        return 130 if report.interrupted.startswith("interrupted") else 1
    if best is None:
        candidates = [c for r in report.results for c in r.candidates]
        near = closest(candidates, options.constraints)
        if near is None:
            failures = sorted({c.failure for c in candidates if c.failure})
            why = f": {failures[0]}" if failures else ""
            print(f"natron analyze: error: no config could be measured{why}", file=sys.stderr)
            return 1
        shown = near.nearest_point(options.constraints)
        figures = f"{shown.throughput_per_s:.1f} infer/s at p99 {shown.p99_ms:.2f} ms" if shown else ""
        print(
            f"natron analyze: error: no config meets {options.constraints.describe()}; the closest is "
            f"{near.device} {near.name} ({figures}, {near.memory_mb:.0f} MB)",
            file=sys.stderr,
        )
        return 1
    return 0
