"""Settings: parsed once, from flags over NATRON_* variables over defaults; handed by `natron
serve` to each child whole, as the settings of the child's own role."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from natron.cli.main import build_parser, parse
from natron.cli.serve import plan_children
from natron.settings import (
    SETTINGS_ENV,
    GatewaySettings,
    OrchestratorSettings,
    RouterSettings,
    ServeSettings,
    SettingsError,
    WorkerSettings,
    load,
)
from workers.devices import Device


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NATRON_* variable of the machine running the tests reaches them."""
    for name in list(os.environ):
        if name.startswith("NATRON_"):
            monkeypatch.delenv(name)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def test_a_flag_wins_over_its_natron_variable_which_wins_over_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(worker := parse(["worker"]), WorkerSettings)
    assert worker.drain_timeout_s == 20.0 and worker.nats_url == "nats://127.0.0.1:4222"
    monkeypatch.setenv("NATRON_DRAIN_TIMEOUT_S", "3")
    monkeypatch.setenv("NATRON_NATS_URL", "nats://nats:4222")
    assert isinstance(worker := parse(["worker"]), WorkerSettings)
    assert worker.drain_timeout_s == 3.0 and worker.nats_url == "nats://nats:4222"
    assert isinstance(worker := parse(["worker", "--drain-timeout-s", "5"]), WorkerSettings)
    assert worker.drain_timeout_s == 5.0 and worker.nats_url == "nats://nats:4222"


def test_a_list_reads_comma_separated_from_its_variable_and_repeated_from_its_flag(
    monkeypatch: pytest.MonkeyPatch, repository: Path
) -> None:
    monkeypatch.setenv("NATRON_LOAD_MODEL", "a, b")
    monkeypatch.setenv("NATRON_MODEL_REPOSITORY", str(repository))
    assert isinstance(router := parse(["router"]), RouterSettings)
    assert router.load_model == ("a", "b") and router.model_repository == (repository.resolve(),)
    assert isinstance(router := parse(["router", "--load-model", "x", "--load-model", "y"]), RouterSettings)
    assert router.load_model == ("x", "y")


@pytest.mark.parametrize("model", [ServeSettings, RouterSettings])
def test_several_model_repositories_read_from_the_variable_and_travel_to_a_child_whole(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: type[ServeSettings] | type[RouterSettings]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("NATRON_MODEL_REPOSITORY", f"{b},{a},")
    settings = load(model, {})
    assert settings.model_repository == (b.resolve(), a.resolve())
    # As `natron serve` hands a router its settings: the tuple, in its order, read back as is.
    monkeypatch.delenv("NATRON_MODEL_REPOSITORY")
    assert load(model, {}, settings.model_dump_json()).model_repository == (b.resolve(), a.resolve())
    monkeypatch.setenv("NATRON_MODEL_REPOSITORY", " , ")
    with pytest.raises(SettingsError, match=r"model_repository=\(\): Tuple should have at least 1 item"):
        load(model, {})


def test_the_model_repository_flag_wins_over_the_positional_one(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = parse(["serve", str(tmp_path / "a"), "--model-repository", str(tmp_path / "b")])
    assert isinstance(settings, ServeSettings) and settings.model_repository == (tmp_path / "b",)


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (ServeSettings, "max_payload_mb", "65"),
        (ServeSettings, "http_port", "70000"),
        (ServeSettings, "model_control_mode", "sometimes"),
        (ServeSettings, "repository_poll_secs", "0"),
        (RouterSettings, "ack_wait_s", "-1"),
        (WorkerSettings, "drain_timeout_s", "0"),
        (WorkerSettings, "device", "tpu:0"),
        (WorkerSettings, "prefix", "a.b"),
        (WorkerSettings, "log_level", "loud"),
    ],
)
def test_a_bad_value_from_a_flag_or_a_variable_names_the_field_and_the_value(
    monkeypatch: pytest.MonkeyPatch, repository: Path, model: type[ServeSettings], field: str, value: str
) -> None:
    flags: dict[str, object] = (
        {"model_repository": repository} if model in (ServeSettings, RouterSettings) else {}
    )
    with pytest.raises(SettingsError) as from_flag:
        load(model, {**flags, field: value})
    monkeypatch.setenv(f"NATRON_{field.upper()}", value)
    with pytest.raises(SettingsError) as from_variable:
        load(model, flags)
    for error in (from_flag, from_variable):
        assert f"{field}='{value}'" in str(error.value)
        assert f"NATRON_{field.upper()}" in str(error.value)


def test_the_command_line_refuses_a_bad_value_with_its_name_and_exit_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["gateway", "--http-port", "70000"])
    assert exit_.value.code == 2
    assert "http_port='70000'" in capsys.readouterr().err


def test_every_flag_of_every_command_has_a_help_line() -> None:
    """Those a command takes: the tritonserver flags it refuses are no flags of its own
    (tests/unit/test_cli_flags.py)."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.dest != argparse.SUPPRESS:
                assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_the_flags_triton_has_keep_tritons_names() -> None:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    serve = {flag for action in commands.choices["serve"]._actions for flag in action.option_strings}
    assert {
        "--model-repository",
        "--model-control-mode",
        "--repository-poll-secs",
        "--load-model",
        "--http-port",
        "--http-address",
        "--metrics-port",
    } <= serve


def test_the_version_flag_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("natron 0.")


def serve_settings(repository: Path, *flags: str) -> ServeSettings:
    settings = parse(["serve", str(repository), *flags])
    assert isinstance(settings, ServeSettings)
    return settings


def test_serve_hands_each_child_its_settings_whole_and_the_child_reads_them_back(
    monkeypatch: pytest.MonkeyPatch, repository: Path
) -> None:
    settings = serve_settings(
        repository, "--prefix", "edge", "--log-level", "debug", "--ack-wait-s", "2", "--workers", "2",
        "--throttle-ms", "5", "--load-model", "tiny", "--http-port", "9000", "--metrics-port", "9002",
    )  # fmt: skip
    children = plan_children(settings, "nats://127.0.0.1:4333", [], "box", parent_pid=4242)
    assert [c.name for c in children] == ["router", "worker-0", "worker-1", "ensemble", "gateway"]
    # Variables a child inherits play no part: its parent already read them, once.
    monkeypatch.setenv("NATRON_METRICS_PORT", "1234")
    monkeypatch.setenv("NATRON_ACK_WAIT_S", "99")
    monkeypatch.setenv("NATRON_DRAIN_TIMEOUT_S", "1")
    for child in children:
        args, env = child.command()
        assert args == [child.settings.command, "--parent-pid", "4242"]
        assert parse(args, env[SETTINGS_ENV]) == child.settings
        assert child.settings.prefix == "edge" and child.settings.log_level == "debug"
        assert child.settings.nats_url == "nats://127.0.0.1:4333"
    router, worker, _, ensemble, gateway = (c.settings for c in children)
    assert isinstance(router, RouterSettings) and router.load_model == ("tiny",)
    # The router configures the queues: the ack wait is its setting alone.
    assert router.ack_wait_s == 2.0
    assert isinstance(worker, WorkerSettings) and worker.worker_id == "box-cpu-0" and worker.metrics_port == 0
    assert worker.drain_timeout_s == settings.drain_timeout_s and worker.throttle_ms == 5.0
    assert not hasattr(worker, "ack_wait_s")
    assert isinstance(ensemble, OrchestratorSettings) and not hasattr(ensemble, "ack_wait_s")
    assert isinstance(gateway, GatewaySettings) and gateway.max_body_mb == settings.max_payload_mb
    assert gateway.http_port == 9000 and gateway.metrics_port == 9002


def test_serve_pins_one_worker_to_each_gpu_by_uuid(repository: Path) -> None:
    gpu = Device("GPU", index=0, uuid="GPU-0123456789abcdef", name="H200")
    children = plan_children(serve_settings(repository), "nats://n:4222", [gpu], "box", parent_pid=1)
    (worker,) = [c for c in children if c.name.startswith("worker")]
    assert isinstance(worker.settings, WorkerSettings)
    assert worker.settings.device == "gpu:GPU-0123456789abcdef"
    assert worker.env == {"CUDA_VISIBLE_DEVICES": "GPU-0123456789abcdef"}
    assert worker.command()[1]["CUDA_VISIBLE_DEVICES"] == "GPU-0123456789abcdef"


def test_the_orchestrator_gets_no_cpu_threads_and_workers_split_the_cores(repository: Path) -> None:
    settings = serve_settings(repository, "--workers", "2", "--throttle-ms", "5")
    children = {c.name: c for c in plan_children(settings, "nats://n:4222", [], "box", parent_pid=1)}
    sent = json.loads(children["ensemble"].command()[1][SETTINGS_ENV])
    assert "cpu_threads" not in sent and "throttle_ms" not in sent and "device" not in sent
    assert "--cpu-threads" not in children["ensemble"].command()[0]
    worker = children["worker-0"].settings
    assert isinstance(worker, WorkerSettings)
    assert worker.cpu_threads == max(1, (os.cpu_count() or 1) // 2)
    explicit = serve_settings(repository, "--workers", "2", "--cpu-threads", "3")
    for child in plan_children(explicit, "nats://n:4222", [], "box", parent_pid=1):
        assert child.settings.model_dump().get("cpu_threads") == (
            3 if child.name.startswith("worker") else None
        )


def test_an_orchestrator_refuses_cpu_threads_from_the_command_line_or_its_parent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse(["ensemble", "--cpu-threads", "2"])
    assert "--cpu-threads" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="cpu_threads=2: no such setting"):
        load(OrchestratorSettings, {}, json.dumps({"cpu_threads": 2}))
