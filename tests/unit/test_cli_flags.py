"""The command line of a Triton user: tritonserver's flags work where they mean something here,
in both of Triton's forms (`--flag=value`, `--flag value`), and the others are refused by name
with the reason and exit status 2. Every flag of every subcommand has a help line with its
default, and every subcommand answers --version."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from natron.cli import triton_flags
from natron.cli.main import build_parser, log_formatter, parse
from natron.cli.serve import endpoint_lines, plan_children
from natron.settings import (
    ROLES,
    GatewaySettings,
    OrchestratorSettings,
    RoleSettings,
    RouterSettings,
    ServeSettings,
    SettingsError,
    WorkerSettings,
    load,
)

pytestmark = pytest.mark.unit


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


def subparsers() -> dict[str, argparse.ArgumentParser]:
    """The services' parsers (the tools' entries only name them in `natron --help`)."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: parser for name, parser in commands.choices.items() if name in ROLES}


def args_for(command: str, repository: Path) -> list[str]:
    return [command, str(repository)] if command in ("serve", "router") else [command]


def both_forms(flag: str, value: str) -> list[list[str]]:
    """Triton's two spellings of a flag with its value."""
    return [[f"{flag}={value}"], [flag, value]]


def serve(*argv: str) -> ServeSettings:
    settings = parse(["serve", *argv])
    assert isinstance(settings, ServeSettings)
    return settings


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """parse(argv) exits with status 2; its message."""
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2, argv
    return capsys.readouterr().err


# -- tritonserver's flags, read as natron settings ---------------------------------------------


@pytest.mark.parametrize(
    ("command", "flag", "value", "field", "expected"),
    [
        (command, "--exit-timeout-secs", "5", "shutdown_timeout_s", 5.0)
        for command in ("serve", "gateway", "router", "worker", "ensemble")
    ]
    + [
        (command, flag, value, field, expected)
        for command in ("serve", "gateway")
        for flag, value, field, expected in [
            ("--http-port", "9000", "http_port", 9000),
            ("--http-address", "127.0.0.1", "http_address", "127.0.0.1"),
            ("--grpc-port", "9001", "grpc_port", 9001),
            ("--grpc-address", "127.0.0.1", "grpc_address", "127.0.0.1"),
            ("--metrics-port", "9002", "metrics_port", 9002),
            ("--allow-http", "false", "allow_http", False),
            ("--allow-grpc", "0", "allow_grpc", False),
            ("--allow-metrics", "FALSE", "allow_metrics", False),
            ("--allow-metrics", "1", "allow_metrics", True),
            ("--strict-readiness", "false", "strict_readiness", False),
            ("--http-thread-count", "4", "http_workers", 4),
            ("--metrics-config", "summary_latencies=true", "metrics_config", ("summary_latencies=true",)),
            ("--log-format", "ISO8601", "log_format", "ISO8601"),
        ]
    ]
    + [
        ("serve", "--model-control-mode", "explicit", "model_control_mode", "explicit"),
        ("serve", "--repository-poll-secs", "5", "repository_poll_secs", 5.0),
        ("serve", "--load-model", "tiny", "load_model", ("tiny",)),
        ("serve", "--model-load-thread-count", "2", "model_load_thread_count", 2),
        ("worker", "--model-load-thread-count", "2", "model_load_thread_count", 2),
        ("serve", "--backend-config", "onnxruntime,intra_op_thread_count=3", "cpu_threads", 3),
        ("worker", "--backend-config", "onnxruntime,intra_op_thread_count=3", "cpu_threads", 3),
        ("router", "--log-format", "iso8601", "log_format", "ISO8601"),
    ],
)
def test_a_tritonserver_flag_in_either_form_sets_its_natron_setting(
    repository: Path, command: str, flag: str, value: str, field: str, expected: object
) -> None:
    for form in both_forms(flag, value):
        settings = parse(args_for(command, repository) + form)
        assert getattr(settings, field) == expected, form


def test_the_model_store_is_the_model_repository(repository: Path) -> None:
    for command in ("serve", "router"):
        for form in both_forms("--model-store", str(repository)):
            settings = parse([command, *form])
            assert isinstance(settings, ServeSettings | RouterSettings)
            assert settings.model_repository == (repository,)


def test_several_model_repositories_are_taken_by_serve_and_router_in_the_order_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for repo in (a, b, c):
        repo.mkdir()
    for command in ("serve", "router"):
        # Either spelling, in either of Triton's forms, repeated as tritonserver takes it.
        settings = parse(
            [command, "--model-repository", str(b), f"--model-store={a}", "--model-repository", str(c)]
        )
        assert isinstance(settings, ServeSettings | RouterSettings)
        assert settings.model_repository == (b, a, c)
        monkeypatch.setenv("NATRON_MODEL_REPOSITORY", f"{a}, {b}")
        settings = parse([command])
        assert isinstance(settings, ServeSettings | RouterSettings)
        assert settings.model_repository == (a, b)
        # A flag given wins over the variable, whole: the lists are not merged.
        settings = parse([command, "--model-repository", str(c)])
        assert isinstance(settings, ServeSettings | RouterSettings)
        assert settings.model_repository == (c,)
        monkeypatch.delenv("NATRON_MODEL_REPOSITORY")


def test_serve_hands_the_router_every_repository(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    router = children(parse(["serve", "--model-repository", str(a), "--model-repository", str(b)]))["router"]
    assert isinstance(router, RouterSettings) and router.model_repository == (a, b)


@pytest.mark.parametrize("command", ["serve", "router"])
def test_a_bad_list_of_model_repositories_is_refused_naming_the_one_at_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    a, missing = tmp_path / "a", tmp_path / "missing"
    a.mkdir()
    (tmp_path / "file").write_text("not a folder")
    model = ServeSettings if command == "serve" else RouterSettings
    with pytest.raises(SettingsError, match="a repository is named twice"):
        load(model, {"model_repository": (a, tmp_path / "." / "a")})
    with pytest.raises(SettingsError, match=f"'{missing}' is not a directory"):
        load(model, {"model_repository": (a, missing)})
    message = refused(
        capsys, [command, "--model-repository", str(a), "--model-repository", str(tmp_path / "file")]
    )
    assert f"'{tmp_path / 'file'}' is not a directory" in message
    assert "--model-repository or NATRON_MODEL_REPOSITORY; tritonserver's --model-store" in message
    assert "model_repository is required" in refused(capsys, [command])


@pytest.mark.parametrize(
    ("flags", "level"),
    [
        (["--log-verbose=1"], "debug"),
        (["--log-verbose", "2"], "debug"),
        (["--log-verbose=0"], "info"),
        (["--log-info=true"], "info"),
        (["--log-info=false"], "warning"),
        (["--log-info", "0", "--log-warning", "off"], "error"),
        (["--log-verbose=1", "--log-info=true", "--log-warning=1", "--log-error=true"], "debug"),
    ],
)
def test_tritons_log_switches_become_one_log_level(repository: Path, flags: list[str], level: str) -> None:
    for command in ("serve", "worker"):
        assert parse(args_for(command, repository) + flags).log_level == level


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--log-error=false"], "--log-error=false: natron always logs errors"),
        (["--log-verbose=1", "--log-info=false"], "--log-info=false with --log-verbose on"),
        (["--log-warning=false"], "--log-warning=false with --log-info on"),
        (["--log-level", "debug", "--log-verbose=1"], "--log-level and tritonserver's"),
        (["--log-verbose=-1"], "argument --log-verbose: expected 0 or more, not '-1'"),
        (["--log-info=maybe"], "argument --log-info: expected true or false, not 'maybe'"),
        (["--log-format=json"], "log_format='json'"),
    ],
)
def test_log_switches_natron_cannot_honour_are_refused_with_why(
    repository: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert message in refused(capsys, ["serve", str(repository), *flags])


def test_the_metrics_config_keeps_each_setting_and_refuses_a_malformed_one(
    repository: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = parse(
        [
            "gateway",
            "--metrics-config",
            "summary_latencies=true",
            "--metrics-config=summary_quantiles=0.5:0.05,0.9:0.01",
        ]
    )
    assert isinstance(settings, GatewaySettings)
    assert settings.metrics_config == ("summary_latencies=true", "summary_quantiles=0.5:0.05,0.9:0.01")
    # From the environment, separated by whitespace: a value may hold commas.
    monkeypatch.setenv("NATRON_METRICS_CONFIG", "summary_latencies=true summary_quantiles=0.5:0.05,0.9:0.01")
    assert parse(["gateway"]).model_dump()["metrics_config"] == settings.metrics_config
    monkeypatch.delenv("NATRON_METRICS_CONFIG")
    for bad in ("summary_latencies", "=true", "summary_latencies="):
        message = refused(capsys, ["serve", str(repository), f"--metrics-config={bad}"])
        assert f"'{bad}': expected <setting>=<value>" in message and "--metrics-config" in message
    # Read as the metrics read them: a setting they do not know, or a bad value, is refused.
    message = refused(capsys, ["gateway", "--metrics-config=summary_latency=true"])
    assert "unknown setting 'summary_latency'" in message and "--metrics-config" in message
    assert "'maybe'" in refused(
        capsys, ["serve", str(repository), "--metrics-config", "counter_latencies=maybe"]
    )


def test_a_setting_given_under_both_names_is_the_last_one(repository: Path) -> None:
    settings = parse(["serve", str(repository), "--shutdown-timeout-s", "3", "--exit-timeout-secs=7"])
    assert settings.shutdown_timeout_s == 7.0


def test_an_invalid_value_under_tritons_name_names_both_spellings(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = refused(capsys, ["serve", str(repository), "--exit-timeout-secs=0"])
    assert "shutdown_timeout_s='0'" in message and "--exit-timeout-secs" in message
    message = refused(capsys, ["gateway", "--http-thread-count", "0"])
    assert "http_workers='0'" in message and "--http-thread-count" in message


# -- --backend-config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [
        "onnxruntime,enable-global-threadpool=0",
        "default-max-batch-size=4",
        "onnxruntime,default-max-batch-size=4",
    ],
)
def test_a_backend_setting_natron_already_behaves_as_is_accepted(repository: Path, item: str) -> None:
    for form in both_forms("--backend-config", item):
        assert serve(str(repository), *form).cpu_threads == 0


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("onnxruntime,enable-global-threadpool=1", "natron has no global thread pool"),
        ("onnxruntime,inter_op_thread_count=2", "natron's ONNX Runtime backend has no such setting"),
        ("onnxruntime,intra_op_thread_count=many", "expected a whole number, not 'many'"),
        ("default-max-batch-size=8", "max_batch_size 4"),
        ("pytorch,INTRA_OP_THREAD_COUNT=2", "config.pbtxt parameters (INTRA_OP_THREAD_COUNT"),
        ("python,shm-default-byte-size=1048576", "natron's Python models talk to their worker over a socket"),
        ("tensorrt,plugins=/x.so", "natron's TensorRT backend has no server-wide settings"),
        ("tensorflow,version=2", "natron has no 'tensorflow' backend"),
        ("backend-directory=/opt", "natron has no such global setting"),
        ("onnxruntime", "expected <backend>,<setting>=<value>"),
        (",x=1", "expected <backend>,<setting>=<value>"),
    ],
)
def test_a_backend_setting_natron_does_not_apply_is_refused_by_backend_and_name(
    repository: Path, capsys: pytest.CaptureFixture[str], item: str, why: str
) -> None:
    message = refused(capsys, ["serve", str(repository), f"--backend-config={item}"])
    assert message.startswith("natron serve: error: --backend-config ") and why in message
    assert item in message


def test_the_backend_config_and_cpu_threads_must_agree(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [str(repository), "--backend-config", "onnxruntime,intra_op_thread_count=2"]
    assert serve(*base, "--cpu-threads", "2").cpu_threads == 2
    assert "give one" in refused(capsys, ["serve", *base, "--cpu-threads", "3"])
    # Repeated, the last wins, as in Triton.
    assert serve(*base, "--backend-config=onnxruntime,intra_op_thread_count=5").cpu_threads == 5


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", sorted(triton_flags.REFUSED))
def test_a_tritonserver_flag_natron_does_not_support_is_refused_by_name_with_why(
    repository: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    expected = (
        f"natron serve: {flag} is a tritonserver flag natron does not support: {triton_flags.REFUSED[flag]}\n"
    )
    for form in ([f"{flag}=1"], [flag, "1"], [flag]):
        assert refused(capsys, ["serve", str(repository), *form]) == expected
    # Every subcommand refuses it the same way.
    assert refused(capsys, ["worker", flag, "1"]) == expected.replace("natron serve", "natron worker")


def test_the_refusal_reads_as_documented(repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = refused(capsys, ["serve", str(repository), "--sagemaker-port=8080"])
    assert message == (
        "natron serve: --sagemaker-port is a tritonserver flag natron does not support: "
        "natron has no SageMaker endpoint\n"
    )


@pytest.mark.parametrize("flag", sorted(triton_flags.NATRON_BEHAVIOUR))
def test_a_tritonserver_flag_is_accepted_with_natrons_value_only(
    repository: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    behaviour = triton_flags.NATRON_BEHAVIOUR[flag]
    for form in both_forms(flag, behaviour.value):
        assert isinstance(parse(["serve", str(repository), *form]), ServeSettings)
        assert isinstance(parse(["ensemble", *form]), OrchestratorSettings)
    other = {"bool": "false" if behaviour.value == "true" else "true", "number": "100", "word": "other"}
    for form in both_forms(flag, other[behaviour.kind]):
        message = refused(capsys, ["serve", str(repository), *form])
        assert message.startswith(
            f"natron serve: {flag}={other[behaviour.kind]} is a tritonserver setting natron"
        )
        assert behaviour.why_not_otherwise in message and f"{flag}={behaviour.value} only" in message
    assert f"natron serve: {flag} is a tritonserver setting" in refused(
        capsys, ["serve", str(repository), flag]
    )


def test_a_boolean_in_none_of_the_accepted_spellings_is_refused(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--exit-on-error='maybe': expected true or false" in refused(
        capsys, ["serve", str(repository), "--exit-on-error=maybe"]
    )
    assert "allow_http='maybe'" in refused(capsys, ["serve", str(repository), "--allow-http=maybe"])


@pytest.mark.parametrize(
    ("command", "flag", "takers"),
    [
        ("worker", "--http-port", "natron serve and natron gateway"),
        ("gateway", "--backend-config", "natron serve and natron worker"),
        ("gateway", "--model-repository", "natron serve, natron router and natron push"),
        ("router", "--allow-metrics", "natron serve and natron gateway"),
        ("ensemble", "--model-load-thread-count", "natron serve and natron worker"),
        ("worker", "--strict-readiness", "natron serve and natron gateway"),
    ],
)
def test_a_tritonserver_flag_of_another_subcommand_names_those_that_take_it(
    repository: Path, capsys: pytest.CaptureFixture[str], command: str, flag: str, takers: str
) -> None:
    message = refused(capsys, [*args_for(command, repository), f"{flag}=1"])
    assert (
        message
        == f"natron {command}: {flag} is a tritonserver flag natron {command} does not take ({takers} do)\n"
    )


def test_no_prefix_passes_for_a_flag(repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "unrecognized arguments: --log-verb" in refused(capsys, ["serve", str(repository), "--log-verb=1"])
    assert "unrecognized arguments: --allow-sage" in refused(
        capsys, ["serve", str(repository), "--allow-sage=1"]
    )


# -- which subcommand takes which --------------------------------------------------------------


def taken(parser: argparse.ArgumentParser) -> set[str]:
    """The tritonserver flags a parser takes (as a setting, translated, or with natron's value)."""
    return {
        flag
        for flag in triton_flags.TRITONSERVER_FLAGS
        if flag in parser._option_string_actions
        and not isinstance(parser._option_string_actions[flag], triton_flags.RefusedFlag)
    }


def test_every_tritonserver_flag_is_taken_or_refused_by_every_subcommand() -> None:
    for command, parser in subparsers().items():
        for flag in triton_flags.TRITONSERVER_FLAGS:
            assert flag in parser._option_string_actions, (command, flag)


def test_serve_takes_every_tritonserver_flag_that_means_something_here() -> None:
    parsers = subparsers()
    assert taken(parsers["serve"]) == set(triton_flags.TRITONSERVER_FLAGS) - set(triton_flags.REFUSED)
    gateway = {
        "--http-port", "--http-address", "--allow-http", "--http-thread-count", "--grpc-port",
        "--grpc-address", "--allow-grpc", "--allow-metrics", "--metrics-port", "--metrics-config",
        "--strict-readiness", "--exit-timeout-secs", "--log-verbose", "--log-info", "--log-warning",
        "--log-error", "--log-format", "--http-restricted-api", "--grpc-restricted-protocol",
        "--trace-config", "--trace-file", "--trace-level", "--trace-rate", "--trace-count",
        "--trace-log-frequency",
    }  # fmt: skip
    assert gateway <= taken(parsers["gateway"])
    assert taken(parsers["gateway"]) - gateway == set(triton_flags.NATRON_BEHAVIOUR)
    assert {"--backend-config", "--model-load-thread-count"} <= taken(parsers["worker"])
    assert {"--model-repository", "--model-store", "--model-control-mode", "--load-model"} <= taken(
        parsers["router"]
    )


def test_the_flag_table_has_no_flag_twice() -> None:
    assert len(set(triton_flags.TRITONSERVER_FLAGS)) == len(triton_flags.TRITONSERVER_FLAGS)
    assert set(triton_flags.REFUSED) <= set(triton_flags.TRITONSERVER_FLAGS)
    assert set(triton_flags.NATRON_BEHAVIOUR) <= set(triton_flags.TRITONSERVER_FLAGS)
    assert not set(triton_flags.REFUSED) & set(triton_flags.NATRON_BEHAVIOUR)


# -- help and --version ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *ROLES])
def test_every_subcommand_answers_version(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse([command, "--version"] if command else ["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"natron \d+\.\d+\S*\n", capsys.readouterr().out)


@pytest.mark.parametrize("command", list(ROLES))
def test_every_flag_of_every_subcommand_has_a_help_line_with_its_default(command: str) -> None:
    parser = subparsers()[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, triton_flags.RefusedFlag):
            assert action.option_strings[0] not in text  # not one of its flags
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction) or not action.option_strings:
            continue
        assert action.help, (command, action.option_strings)
        assert "default" in action.help or "required" in action.help, (command, action.option_strings)
        for flag in action.option_strings:
            assert flag in text, (command, flag)


def test_a_help_line_shows_the_default_as_it_is_typed() -> None:
    help_ = {a.option_strings[0]: a.help for a in subparsers()["serve"]._actions if a.option_strings}
    assert "default true" in str(help_["--allow-http"])
    assert "default 8001" in str(help_["--grpc-port"])
    assert "default none" in str(help_["--metrics-config"])
    assert "default default" in str(help_["--log-format"])
    assert "(default: an embedded one)" in str(help_["--nats-url"])
    assert "required" in str(help_["--model-repository"])


# -- what reaches the children of natron serve --------------------------------------------------


def children(settings: RoleSettings) -> dict[str, RoleSettings]:
    assert isinstance(settings, ServeSettings)
    return {c.name: c.settings for c in plan_children(settings, "nats://n:4222", [], "box", parent_pid=1)}


def test_serve_hands_the_new_settings_to_the_children_that_use_them(repository: Path) -> None:
    settings = parse(
        ["serve", str(repository), "--log-format=ISO8601", "--allow-http=false", "--allow-grpc=false",
         "--metrics-config=summary_latencies=true", "--model-load-thread-count=2", "--strict-readiness=false"]
    )  # fmt: skip
    planned = children(settings)
    assert {s.log_format for s in planned.values()} == {"ISO8601"}
    gateway, worker = planned["gateway"], planned["worker-0"]
    assert isinstance(gateway, GatewaySettings) and isinstance(worker, WorkerSettings)
    assert not gateway.allow_http and not gateway.allow_grpc and gateway.allow_metrics
    assert gateway.metrics_config == ("summary_latencies=true",) and not gateway.strict_readiness
    assert worker.model_load_thread_count == 2
    router = planned["router"]
    assert isinstance(router, RouterSettings) and router.model_repository == (repository.resolve(),)


def test_serve_without_metrics_gives_the_gateway_no_metrics_port_and_prints_no_endpoint(
    repository: Path,
) -> None:
    settings = parse(
        ["serve", str(repository), "--allow-metrics=false", "--allow-http=false", "--allow-grpc=0"]
    )
    assert isinstance(settings, ServeSettings)
    gateway = children(settings)["gateway"]
    assert isinstance(gateway, GatewaySettings) and gateway.metrics_port == 0 and not gateway.allow_metrics
    assert endpoint_lines(settings, "nats://n:4222") == ["NATS:             nats://n:4222"]
    served = parse(["serve", str(repository)])
    assert isinstance(served, ServeSettings)
    assert [line.split(":")[0] for line in endpoint_lines(served, "nats://n:4222")] == [
        "HTTP endpoint",
        "gRPC endpoint",
        "Metrics endpoint",
        "NATS",
    ]


def test_the_iso8601_log_format_stamps_lines_in_utc_as_triton(repository: Path) -> None:
    record = logging.LogRecord("natron.x", logging.INFO, __file__, 1, "hello", None, None)
    record.created = 0.0  # 1970-01-01T00:00:00Z
    iso = log_formatter(parse(["serve", str(repository), "--log-format=ISO8601"])).format(record)
    assert iso.startswith("1970-01-01T00:00:00Z INFO serve[") and iso.endswith("] natron.x: hello")
    default = log_formatter(parse(["worker"])).format(record)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO worker\[", default)


def test_a_child_reads_the_new_settings_back_from_its_parent(repository: Path) -> None:
    settings = parse(
        ["serve", str(repository), "--log-format=ISO8601", "--metrics-config=summary_latencies=true"]
    )
    assert isinstance(settings, ServeSettings)
    for child in plan_children(settings, "nats://n:4222", [], "box", parent_pid=1):
        args, env = child.command()
        back: Any = parse(args, env["NATRON_SETTINGS_JSON"])
        assert back == child.settings


def test_the_deployment_guide_names_every_tritonserver_flag_and_each_refusal() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    section = guide[guide.index("## Coming from Triton") :]
    for flag in triton_flags.TRITONSERVER_FLAGS:
        assert f"`{flag}`" in section, flag
    for flag, behaviour in triton_flags.NATRON_BEHAVIOUR.items():
        assert f"`{behaviour.value}`" in section.split(f"`{flag}`", 1)[1].split("\n", 1)[0], flag
