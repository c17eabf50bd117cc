"""The trace extension's triton mode without a process: Triton's `--trace-config` entries and
deprecated trace flags read as natron's settings, and the trace file's writer (valid JSON while
it runs, rotation by log_frequency, drops when it falls behind, flushed at close)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.tracefile import TraceFile
from natron.cli import triton_flags
from natron.cli.main import parse
from natron.settings import GatewaySettings, ServeSettings
from natron.tracesettings import startup

pytestmark = pytest.mark.unit


# -- the command line ----------------------------------------------------------------------


def test_trace_config_entries_read_as_triton_reads_them() -> None:
    settings = startup(
        [
            "triton,file=/tmp/trace.json",
            "triton,log-frequency=50",
            "rate=100",
            "level=TIMESTAMPS",
            "level=TENSORS",
            "count=7",
        ]
    )
    assert settings.trace_file == "/tmp/trace.json"
    assert settings.log_frequency == 50
    assert settings.trace_rate == 100
    assert settings.trace_level == ("TIMESTAMPS", "TENSORS")
    assert settings.trace_count == 7
    assert settings.trace_mode == "triton"
    # A later entry wins; level=OFF clears the levels given before it.
    again = startup(["rate=5", "rate=6", "level=TIMESTAMPS", "level=OFF", "log_frequency=2"])
    assert (again.trace_rate, again.trace_level, again.log_frequency) == (6, (), 2)
    assert startup([]) == startup(())


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("rate=often", "Unable to parse 'trace_rate'"),
        ("level=LOUD", "unknown level"),
        ("count=-5", "out of range"),
        ("triton,file=", "needs a path"),
        ("colour=blue", "unknown setting"),
        ("zipkin,file=/tmp/x", "unknown setting"),
        ("mode=zipkin", "trace_mode"),
        ("justaword", "expected [<mode>,]<setting>=<value>"),
        ("opentelemetry,bsp_max_queue_size=0", "must be positive"),
    ],
)
def test_a_bad_trace_config_entry_is_refused_naming_it(entry: str, says: str) -> None:
    with pytest.raises(ValueError, match="--trace-config") as caught:
        startup([entry])
    assert says in str(caught.value)
    if "bsp" not in entry:
        assert repr(entry) in str(caught.value)


def test_the_deprecated_flags_are_trace_config_entries_that_trace_config_overrides(tmp_path: Path) -> None:
    settings = parse(
        [
            "gateway",
            "--trace-file", str(tmp_path / "t.json"),
            "--trace-level", "TIMESTAMPS",
            "--trace-rate", "3",
            "--trace-count", "9",
            "--trace-log-frequency", "4",
            "--trace-config", "rate=2",
        ]
    )  # fmt: skip
    assert isinstance(settings, GatewaySettings)
    assert settings.trace_config == (
        f"triton,file={tmp_path / 't.json'}",
        "level=TIMESTAMPS",
        "rate=3",
        "count=9",
        "triton,log-frequency=4",
        "rate=2",
    )
    read = startup(settings.trace_config)
    assert (read.trace_rate, read.trace_count, read.log_frequency) == (2, 9, 4)
    assert read.trace_file == str(tmp_path / "t.json")


def test_serve_takes_the_flags_and_passes_them_to_its_gateway(tmp_path: Path) -> None:
    from natron.cli.serve import plan_children

    repository = tmp_path / "models"
    repository.mkdir()
    trace = str(tmp_path / "t.json")
    settings = parse(
        ["serve", str(repository), "--trace-config", f"triton,file={trace}", "--trace-level=TIMESTAMPS"]
    )
    assert isinstance(settings, ServeSettings)
    assert settings.trace_config == ("level=TIMESTAMPS", f"triton,file={trace}")
    children = plan_children(settings, "nats://n:4222", [], "box", parent_pid=1)
    gateways = [child.settings for child in children if child.name.startswith("gateway")]
    assert gateways
    for gateway in gateways:
        assert isinstance(gateway, GatewaySettings)
        assert gateway.trace_config == settings.trace_config


@pytest.mark.parametrize(
    "argv",
    [
        ["gateway", "--trace-config", "rate=x"],
        ["gateway", "--trace-rate", "-3"],
        ["gateway", "--trace-level", "NOISY"],
        ["serve", "REPOSITORY", "--trace-config", "bogus=1"],
    ],
)
def test_a_bad_trace_flag_exits_2_naming_the_value(
    argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse([str(tmp_path) if arg == "REPOSITORY" else arg for arg in argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--trace-config" in err
    assert argv[-1].split("=")[-1] in err


def test_a_trace_file_in_a_directory_that_is_not_there_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(["gateway", "--trace-config", f"triton,file={tmp_path}/missing/t.json"])
    assert exited.value.code == 2
    assert "not a writable directory" in capsys.readouterr().err


def test_gateway_processes_sharing_a_port_write_files_of_their_own(tmp_path: Path) -> None:
    from natron.cli.services import trace_defaults
    from natron.settings import exactly

    settings = parse(["gateway", "--trace-file", str(tmp_path / "t.json"), "--trace-level", "TIMESTAMPS"])
    assert isinstance(settings, GatewaySettings)
    assert trace_defaults(settings).trace_file == str(tmp_path / "t.json")
    files = {
        trace_defaults(
            exactly(GatewaySettings, {**settings.model_dump(), "http_workers": 3, "http_worker_index": index})
        ).trace_file
        for index in range(3)
    }
    assert files == {f"{tmp_path / 't.json'}.gateway-{index}" for index in range(3)}


def test_the_trace_flags_are_no_longer_refused() -> None:
    for flag in ("--trace-config", "--trace-file", "--trace-level", "--trace-rate", "--trace-count"):
        assert flag not in triton_flags.REFUSED
    assert "--trace-log-frequency" not in triton_flags.REFUSED


# -- the writer ----------------------------------------------------------------------------


def _trace(number: int) -> dict[str, object]:
    return {"id": number, "model_name": "m", "model_version": 1, "timestamps": [{"name": "X", "ns": number}]}


async def test_the_file_is_a_json_array_of_the_traces_valid_after_each_batch(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    file = TraceFile(str(path))
    file.submit(_trace(1))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if file.written == 1:
            break
    # Readable while the gateway runs, before any close.
    assert json.loads(path.read_text()) == [_trace(1)]
    for number in range(2, 6):
        file.submit(_trace(number))
    await file.close()
    assert json.loads(path.read_text()) == [_trace(n) for n in range(1, 6)]
    assert (file.written, file.dropped) == (5, 0)
    file.submit(_trace(6))  # after close: dropped, the file stays whole
    assert file.dropped == 1
    assert len(json.loads(path.read_text())) == 5


async def test_log_frequency_rotates_into_indexed_files(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    file = TraceFile(str(path), log_frequency=2)
    for number in range(1, 6):
        file.submit(_trace(number))
    await file.close()
    assert not path.exists()
    assert json.loads((tmp_path / "trace.json.0").read_text()) == [_trace(1), _trace(2)]
    assert json.loads((tmp_path / "trace.json.1").read_text()) == [_trace(3), _trace(4)]
    assert json.loads((tmp_path / "trace.json.2").read_text()) == [_trace(5)]
    assert not (tmp_path / "trace.json.3").exists()


async def test_a_full_queue_drops_and_counts_rather_than_waiting(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    file = TraceFile(str(path), queue_size=3)
    for number in range(1, 11):
        file.submit(_trace(number))  # no await between: the writer cannot take any yet
    assert file.dropped == 7
    await file.close()
    assert [trace["id"] for trace in json.loads(path.read_text())] == [1, 2, 3]


async def test_a_file_that_cannot_be_written_drops_its_traces_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone" / "trace.json"
    file = TraceFile(str(path))
    file.submit(_trace(1))
    file.submit(_trace(2))
    await file.close()
    assert file.dropped == 2 and file.written == 0
    assert "cannot be written" in caplog.text
