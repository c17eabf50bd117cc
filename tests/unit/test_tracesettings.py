"""natron/tracesettings.py: the trace extension's settings, checked as Triton checks them, a
model's over the global ones, the answer in Triton's shape, and the record on the wire."""

from __future__ import annotations

import pytest

from natron import tracesettings
from natron.errors import InvalidArgument
from natron.tracesettings import CLEAR, OTEL_DEFAULTS, TraceSettings

pytestmark = pytest.mark.unit

TRITON_DEFAULTS = {
    "trace_level": ["OFF"],
    "trace_rate": "1000",
    "trace_count": "-1",
    "log_frequency": "0",
    "trace_file": "",
    "trace_mode": "triton",
}


def _set(settings: TraceSettings, body: dict[str, object], model: str | None = None) -> TraceSettings:
    return settings.updated(tracesettings.parse_changes(body, model), model)


def test_the_defaults_answer_as_tritons() -> None:
    assert TraceSettings().answer(None) == TRITON_DEFAULTS


def test_levels_are_kept_in_tritons_order_and_off_alone() -> None:
    settings = _set(TraceSettings(), {"trace_level": ["TENSORS", "TIMESTAMPS", "TENSORS"]})
    assert settings.answer(None)["trace_level"] == ["TIMESTAMPS", "TENSORS"]
    assert _set(settings, {"trace_level": ["OFF"]}).answer(None)["trace_level"] == ["OFF"]


def test_a_model_names_what_differs_and_falls_back_to_the_global_settings() -> None:
    settings = _set(TraceSettings(), {"trace_level": ["TIMESTAMPS"], "trace_rate": "10"})
    settings = _set(settings, {"trace_rate": "2"}, "tiny")
    assert settings.answer("tiny") == {**TRITON_DEFAULTS, "trace_level": ["TIMESTAMPS"], "trace_rate": "2"}
    # A global change reaches the model's settings it does not name.
    settings = _set(settings, {"trace_level": ["TENSORS"]})
    assert settings.answer("tiny")["trace_level"] == ["TENSORS"]
    assert settings.answer("other")["trace_rate"] == "10"
    # null clears the model's own value; with nothing of its own left it follows the globals.
    settings = _set(settings, {"trace_rate": None}, "tiny")
    assert settings.answer("tiny")["trace_rate"] == "10"
    assert "tiny" not in settings.models


def test_null_puts_a_global_setting_back_to_its_default() -> None:
    settings = _set(TraceSettings(), {"trace_rate": "5", "trace_count": "3"})
    assert _set(settings, {"trace_rate": None, "trace_count": None}).answer(None) == TRITON_DEFAULTS


def test_setting_a_count_again_starts_a_new_epoch_for_its_scope_only() -> None:
    settings = _set(TraceSettings(), {"trace_count": "5"})
    first = settings.effective(None).count_epoch
    again = _set(settings, {"trace_count": "5"})
    assert again.effective(None).count_epoch != first
    model = _set(again, {"trace_count": "1"}, "tiny")
    assert model.effective(None).count_epoch == again.effective(None).count_epoch
    assert model.effective("tiny").count_epoch not in (first, again.effective(None).count_epoch)
    assert model.effective("tiny").scope == "tiny" and model.effective("other").scope == ""


def test_the_opentelemetry_mode_answers_its_options_and_not_the_file() -> None:
    settings = _set(
        TraceSettings(),
        {"trace_mode": "opentelemetry", "trace_config": ["url=http://collector:4318/v1/traces"]},
    )
    answer = settings.answer(None)
    assert "trace_file" not in answer and "log_frequency" not in answer
    assert answer["trace_mode"] == "opentelemetry"
    assert answer["url"] == "http://collector:4318/v1/traces"
    assert answer["bsp_schedule_delay"] == OTEL_DEFAULTS["bsp_schedule_delay"]
    # The answer posted back changes nothing.
    body = {k: v for k, v in answer.items() if k != "trace_count"}
    assert _set(settings, body).answer(None) == answer


def test_trace_config_takes_tritons_mode_prefix_and_resource_pairs() -> None:
    settings = _set(
        TraceSettings(),
        {
            "trace_config": [
                "opentelemetry,resource=service.name=edge,deployment=a",
                "bsp_max_queue_size=4096",
            ]
        },
    )
    assert settings.trace_config["resource"] == "service.name=edge,deployment=a"
    assert settings.trace_config["bsp_max_queue_size"] == "4096"
    assert _set(settings, {"trace_config": None}).trace_config == OTEL_DEFAULTS


@pytest.mark.parametrize(
    ("body", "model", "needle"),
    [
        ({"trace_levels": ["OFF"]}, None, "unknown trace setting 'trace_levels'"),
        ({"trace_level": "TIMESTAMPS"}, None, "'trace_level' must be a list of strings"),
        ({"trace_level": []}, None, "'trace_level' needs a level"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, None, "Expect only one trace level 'OFF' is specified"),
        ({"trace_level": ["VERBOSE"]}, None, "unknown level \"VERBOSE\""),
        ({"trace_rate": 10}, None, "'trace_rate' must be a string, as Triton's JSON has it"),
        ({"trace_rate": "ten"}, None, "Unable to parse 'trace_rate', got: \"ten\""),
        ({"trace_rate": "4294967296"}, None, "'trace_rate', value is out of range [ 0, 4294967295 ]"),
        ({"trace_count": "-2"}, None, "'trace_count', value is out of range [ -1, 2147483647 ]"),
        ({"log_frequency": "-1"}, None, "Unable to parse 'log_frequency', value is out of range"),
        ({"trace_mode": "zipkin"}, None, "'trace_mode' must be one of triton, opentelemetry"),
        ({"trace_file": "/tmp/trace.json"}, None, "trace file location can not be updated"),
        ({"trace_config": "url=http://x"}, None, "'trace_config' must be a list"),
        ({"trace_config": ["triton,file=/tmp/x"]}, None, "configures the triton mode"),
        ({"trace_config": ["endpoint=http://x"]}, None, "with an option of url, resource"),
        ({"trace_config": ["url=ftp://x"]}, None, "'url' must be an http:// or https:// URL"),
        ({"url": "collector:4318"}, None, "'url' must be an http:// or https:// URL"),
        ({"resource": "no pairs"}, None, "'resource' must be \"key=value[,key=value...]\""),
        ({"trace_config": ["bsp_max_export_batch_size=4096"]}, None, "must not exceed 'bsp_max_queue_size'"),
        ({"bsp_schedule_delay": "0"}, None, "'bsp_schedule_delay' must be positive"),
        ({"trace_mode": "opentelemetry"}, "tiny", "'trace_mode' is global"),
        ({"trace_config": ["url=http://x"]}, "tiny", "'trace_config' is global"),
        # One bad key refuses the request: the good one is not applied either.
        ({"trace_rate": "1", "trace_count": "x"}, None, "Unable to parse 'trace_count'"),
    ],
)  # fmt: skip
def test_a_bad_change_is_refused_naming_the_key(
    body: dict[str, object], model: str | None, needle: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _set(TraceSettings(), body, model)
    assert needle in caught.value.message


def test_null_trace_file_is_no_change() -> None:
    assert tracesettings.parse_changes({"trace_file": None}) == {"trace_file": CLEAR}
    assert _set(TraceSettings(), {"trace_file": None}) == TraceSettings()


def test_grpc_settings_read_as_the_json_they_stand_for() -> None:
    assert tracesettings.grpc_changes(
        {"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": ["5"], "trace_count": [], "trace_config": ["url=http://a:1"]}
    ) == {"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "5", "trace_count": None,
          "trace_config": ["url=http://a:1"]}  # fmt: skip
    with pytest.raises(InvalidArgument, match="'trace_rate' takes one value, got 2"):
        tracesettings.grpc_changes({"trace_rate": ["1", "2"]})


def test_settings_round_trip_the_wire() -> None:
    settings = _set(
        TraceSettings(), {"trace_level": ["TIMESTAMPS"], "trace_count": "7", "trace_mode": "opentelemetry"}
    )
    settings = _set(settings, {"trace_rate": "3", "trace_count": "1"}, "tiny")
    assert tracesettings.decode(tracesettings.encode(settings)) == settings


@pytest.mark.parametrize("data", [b"", b"{}", b"[]", b'{"models": 1}'])
def test_decoding_anything_else_is_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="trace settings record is unreadable"):
        tracesettings.decode(data)
