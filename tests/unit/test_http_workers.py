"""`--http-workers`: its validation, the gateway processes `natron serve` plans for it, and the
budgets of a standalone gateway group. (The processes themselves: tests/mesh/test_http_workers.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.metrics import GatewayMetrics
from natron.cli.main import parse
from natron.cli.serve import PROMETHEUS_MULTIPROC_ENV, gateway_children, plan_children
from natron.cli.services import group_budgets_s
from natron.cli.supervisor import SUPERVISOR_GRACE_S
from natron.settings import SETTINGS_ENV, GatewaySettings, ServeSettings, SettingsError, exactly, load


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NATRON_* variable of the machine running the tests reaches them."""
    for name in list(os.environ):
        if name.startswith("NATRON_") or name == PROMETHEUS_MULTIPROC_ENV:
            monkeypatch.delenv(name)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def serve_settings(repository: Path, *flags: str) -> ServeSettings:
    settings = parse(["serve", str(repository), *flags])
    assert isinstance(settings, ServeSettings)
    return settings


def test_one_http_worker_is_the_default_for_serve_and_the_gateway(repository: Path) -> None:
    assert serve_settings(repository).http_workers == 1
    gateway = parse(["gateway"])
    assert isinstance(gateway, GatewaySettings)
    assert gateway.http_workers == 1 and gateway.http_worker_index is None


@pytest.mark.parametrize("command", ["serve", "gateway"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--http-workers", "0"], "http_workers='0': Input should be greater than or equal to 1"),
        (["--http-workers", "65"], "http_workers='65': Input should be less than or equal to 64"),
        (["--http-workers", "two"], "http_workers='two'"),
        (
            ["--http-workers", "2", "--http-port", "0"],
            "http_workers='2': several processes share one HTTP port",
        ),
    ],
)
def test_a_bad_http_workers_value_is_refused_with_its_name_and_flag(
    repository: Path, capsys: pytest.CaptureFixture[str], command: str, flags: list[str], message: str
) -> None:
    positional = [str(repository)] if command == "serve" else []
    with pytest.raises(SystemExit) as exit_:
        parse([command, *positional, *flags])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "--http-workers or NATRON_HTTP_WORKERS" in error


def test_http_workers_reads_from_its_variable(monkeypatch: pytest.MonkeyPatch, repository: Path) -> None:
    monkeypatch.setenv("NATRON_HTTP_WORKERS", "4")
    assert serve_settings(repository).http_workers == 4
    monkeypatch.setenv("NATRON_HTTP_WORKERS", "99")
    with pytest.raises(SettingsError, match="http_workers='99'"):
        load(ServeSettings, {"model_repository": repository})


def test_a_gateway_place_must_lie_within_its_group() -> None:
    assert load(GatewaySettings, {"http_workers": 2, "http_worker_index": 1}).http_worker_index == 1
    with pytest.raises(SettingsError, match=r"http_worker_index=2: must be below http_workers \(2\)"):
        load(GatewaySettings, {"http_workers": 2, "http_worker_index": 2})
    with pytest.raises(SettingsError, match="http_worker_index=-1"):
        load(GatewaySettings, {"http_workers": 2, "http_worker_index": -1})


def test_serve_plans_one_gateway_child_as_before_by_default(repository: Path) -> None:
    children = plan_children(serve_settings(repository), "nats://n:4222", [], "box", parent_pid=7)
    (gateway,) = [c for c in children if c.name.startswith("gateway")]
    assert gateway.name == "gateway" and gateway.env == {}
    assert isinstance(gateway.settings, GatewaySettings)
    assert gateway.settings.http_workers == 1 and gateway.settings.http_worker_index is None
    assert PROMETHEUS_MULTIPROC_ENV not in gateway.command()[1]


def test_serve_plans_n_gateway_processes_sharing_the_port_and_one_metrics_directory(
    repository: Path, tmp_path: Path
) -> None:
    settings = serve_settings(
        repository, "--http-workers", "3", "--http-port", "9000", "--metrics-port", "9002", "--prefix", "edge"
    )
    children = plan_children(settings, "nats://n:4222", [], "box", parent_pid=7, gateway_metrics_dir=tmp_path)
    assert [c.name for c in children] == [
        "router",
        "worker-0",
        "ensemble",
        "gateway-0",
        "gateway-1",
        "gateway-2",
    ]
    gateways = children[3:]
    for index, child in enumerate(gateways):
        gateway = child.settings
        assert isinstance(gateway, GatewaySettings)
        # http_workers above 1 is what makes the process bind with SO_REUSEPORT.
        assert gateway.http_workers == 3 and gateway.http_worker_index == index
        assert gateway.http_port == 9000 and gateway.prefix == "edge" and gateway.parent_pid == 7
        # The first alone serves the metrics port; every one counts into the same directory.
        assert gateway.metrics_port == (9002 if index == 0 else 0)
        args, env = child.command()
        assert args == ["gateway", "--parent-pid", "7"]
        assert env[PROMETHEUS_MULTIPROC_ENV] == str(tmp_path)
        assert parse(args, env[SETTINGS_ENV]) == gateway
    for child in children[:3]:
        assert PROMETHEUS_MULTIPROC_ENV not in child.command()[1]


def test_gateway_processes_sharing_a_port_need_a_metrics_directory(repository: Path) -> None:
    settings = serve_settings(repository, "--http-workers", "2")
    with pytest.raises(ValueError, match="directory"):
        plan_children(settings, "nats://n:4222", [], "box", parent_pid=7)


def test_a_standalone_gateway_group_plans_the_same_children(tmp_path: Path) -> None:
    template = exactly(GatewaySettings, {"http_workers": 2, "parent_pid": 11, "metrics_port": 8002})
    children = gateway_children(template, tmp_path)
    assert [c.name for c in children] == ["gateway-0", "gateway-1"]
    assert [c.settings.metrics_port for c in children] == [8002, 0]


@pytest.mark.parametrize("budget_s", [25.0, 10.0, 4.0, 0.5])
def test_a_gateway_group_stops_its_processes_within_its_own_budget(budget_s: float) -> None:
    wait_s, gateway_budget_s = group_budgets_s(budget_s)
    assert 0 < gateway_budget_s < wait_s < budget_s


def test_with_the_default_budget_each_gateway_of_a_group_keeps_the_supervisors_grace() -> None:
    wait_s, gateway_budget_s = group_budgets_s(25.0)
    assert (wait_s, gateway_budget_s) == (24.0, 24.0 - SUPERVISOR_GRACE_S)


def test_shared_gateway_metrics_without_their_directory_fail_at_start_with_a_reason() -> None:
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        GatewayMetrics(shared=True)
