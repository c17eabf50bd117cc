"""`natron perf`'s command line: perf_analyzer's spellings, ranges, and bad flags answered with
one line and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from natron.perf import cli
from natron.perf.cli import UsageError, options, parse_range, parse_shape

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "integer", "expected"),
    [
        ("4", True, [4]),
        ("1:4", True, [1, 2, 3, 4]),
        ("1:10:4", True, [1, 5, 9]),
        ("2:2:5", True, [2]),
        ("0.5:1.5:0.5", False, [0.5, 1.0, 1.5]),
        ("100:300:100", False, [100.0, 200.0, 300.0]),
        ("0.1:0.3:0.1", False, [0.1, 0.2, 0.3]),  # no float drift dropping the end
    ],
)
def test_ranges_are_start_end_step_with_perf_analyzers_defaults(
    text: str, integer: bool, expected: list[float]
) -> None:
    assert parse_range(text, "--r", integer=integer) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "must start above 0"),
        ("4:1", "ends below its start"),
        ("1:4:0", "positive step"),
        ("1:2:3:4", "start\\[:end\\[:step\\]\\]"),
        ("1::2", "start\\[:end\\[:step\\]\\]"),
        ("a:b", "whole numbers"),
        ("1.5:2", "whole numbers"),
        ("1:100000", "more than 10000 points"),
    ],
)
def test_bad_concurrency_ranges_are_refused(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_range(text, "--concurrency-range", integer=True)


def test_shapes_are_name_colon_dims() -> None:
    assert parse_shape("INPUT0:1,16") == ("INPUT0", (1, 16))
    assert parse_shape("a:b:3") == ("a:b", (3,))  # the name may hold a colon; dims follow the last
    for bad in ("INPUT0", ":3", "X:1,a", "X:-1"):
        with pytest.raises(UsageError):
            parse_shape(bad)


def test_perf_analyzers_options_make_the_target_and_the_points(tmp_path: Path) -> None:
    creds = tmp_path / "client.nk"
    creds.write_text("SU...")
    target, args, points = options(
        ["-m", "simple", "-x", "2", "-u", "nats://h:4222", "-i", "nats", "-b", "4", "--shape", "X:3",
         "--input-data", "zero", "--request-rate-range", "10:30:10", "--request-distribution", "poisson",
         "-p", "2500", "--percentile", "95", "--latency-threshold", "20", "-f", str(tmp_path / "o.csv"),
         "--nats-creds", str(creds), "--timeout", "7"]
    )  # fmt: skip
    assert (target.model, target.version, target.protocol, target.url) == (
        "simple",
        "2",
        "nats",
        "nats://h:4222",
    )
    assert (target.batch_size, dict(target.shapes), target.input_data) == (4, {"X": (3,)}, "zero")
    assert (target.nats_creds, target.timeout_s) == (creds, 7.0)
    assert points == [("request_rate", 10.0), ("request_rate", 20.0), ("request_rate", 30.0)]
    assert (args.interval_ms, args.percentile, args.latency_threshold) == (2500, 95, 20.0)
    assert args.request_distribution == "poisson"
    assert cli.latency_key(args.percentile) == "p95"


def test_the_defaults_are_perf_analyzers() -> None:
    target, args, points = options(["-m", "simple"])
    assert (target.url, target.protocol, target.binary, target.batch_size) == (
        "http://localhost:8000",
        "http",
        True,
        1,
    )
    assert points == [("concurrency", 1)]
    assert args.interval_ms == 5000
    assert (args.stability, args.max_trials) == (10.0, 10)
    assert cli.latency_key(args.percentile) == "avg"
    grpc, _, _ = options(["-m", "simple", "-i", "grpc"])
    assert grpc.url == "grpc://localhost:8001"
    json_target, _, _ = options(["-m", "simple", "--json", "-i", "ws"])
    assert not json_target.binary and json_target.url == "ws://localhost:8000"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: -m"),
        (["-m", "s", "-i", "smtp"], "invalid choice: 'smtp'"),
        (["-m", "s", "-b", "x"], "argument -b: invalid int value"),
        (["-m", "s", "-b", "0"], "batch size must be at least 1"),
        (["-m", "s", "--concurrency-range", "1:4", "--request-rate-range", "10"], "not both"),
        (["-m", "s", "--concurrency-range", "4:1"], "ends below its start"),
        (["-m", "s", "-p", "0"], "--measurement-interval must be positive"),
        (["-m", "s", "--percentile", "100"], "--percentile must be between 1 and 99"),
        (["-m", "s", "--latency-threshold", "-1"], "--latency-threshold must be positive"),
        (["-m", "s", "-i", "grpc", "--json"], "--json applies to http and ws"),
        (["-m", "s", "--nats-creds", "x"], "--nats-creds applies to -i nats"),
        (["-m", "s", "-i", "nats", "--nats-creds", "/no/such/file"], "no such file"),
        (["-m", "s", "-i", "grpc", "-u", "http://h:1"], "does not fit protocol grpc"),
        (["-m", "s", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["-m", "s", "--shape", "INPUT0"], "--shape must be NAME:D1,D2"),
        (["-m", "s", "--request-distribution", "gamma"], "invalid choice: 'gamma'"),
        (["-m", "s", "-s", "0"], "--stability-percentage must be positive"),
        (["-m", "s", "--streaming"], "streaming applies to gRPC only, not http"),
        (["-m", "s", "--max-trials", "0"], "--max-trials must be at least 1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("natron perf: error: ")
    assert message in err
    assert err.count("\n") == 1, err  # one line: no usage block, no traceback


def test_a_server_not_there_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on the loopback: refused at once, nothing to start.
    assert cli.main(["-m", "simple", "-u", "127.0.0.1:1", "--timeout", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("natron perf: error: cannot reach http://127.0.0.1:1")
    assert err.count("\n") == 1, err
