"""The dynamic batcher's queue policy and priority levels as parsed from config.pbtxt: Triton's
defaults, its checks and messages, its rules for a request's `priority` and `timeout`, and the
gateway's reading of a request against them."""

from __future__ import annotations

import pytest

from gateway.admission import log_request, queueing
from natron import config as cfg
from natron.inference import InferRequest
from natron.spec import ModelSpec, QueuePolicy, Scheduling

pytestmark = pytest.mark.unit

_HEAD = (
    'name: "m"\nmax_batch_size: 4\n'
    'input [ { name: "I" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    'output [ { name: "O" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
)


def spec_of(batching: str | None) -> ModelSpec:
    text = _HEAD + (f"dynamic_batching {{ {batching} }}\n" if batching is not None else "")
    config = cfg.parse_config_text(text, "config.pbtxt")
    cfg.fill_defaults(config)
    return ModelSpec.from_config(config)


def test_without_a_queue_policy_nothing_is_bounded_and_timeout_keeps_its_old_meaning() -> None:
    for batching in (None, ""):
        scheduling = spec_of(batching).scheduling
        assert scheduling == Scheduling()
        assert not scheduling.configured
        assert scheduling.level_numbers == (0,)
        assert scheduling.policy(0) == QueuePolicy()


def test_the_default_queue_policy_is_read_field_by_field() -> None:
    scheduling = spec_of(
        "default_queue_policy { max_queue_size: 8 default_timeout_microseconds: 2500 "
        "allow_timeout_override: true timeout_action: DELAY }"
    ).scheduling
    assert scheduling.configured
    assert scheduling.policy(0) == QueuePolicy(8, 2500, True, True)
    # REJECT is Triton's default action.
    assert not spec_of("default_queue_policy { max_queue_size: 8 }").scheduling.policy(0).delay


def test_each_priority_level_has_its_policy_or_the_default_one() -> None:
    scheduling = spec_of(
        "priority_levels: 3 default_priority_level: 2 "
        "default_queue_policy { max_queue_size: 5 } "
        "priority_queue_policy { key: 1 value { max_queue_size: 1 default_timeout_microseconds: 7 } }"
    ).scheduling
    assert (scheduling.levels, scheduling.default_level) == (3, 2)
    assert scheduling.level_numbers == (1, 2, 3)
    assert scheduling.policy(1) == QueuePolicy(1, 7)
    assert scheduling.policy(2) == scheduling.policy(3) == QueuePolicy(5)


def test_priority_levels_alone_configure_no_queue_policy() -> None:
    scheduling = spec_of("priority_levels: 2 default_priority_level: 1").scheduling
    assert scheduling.levels == 2 and not scheduling.configured


@pytest.mark.parametrize(
    ("priority", "level"), [(1, 1), (2, 2), (3, 3), (0, 2), (4, 2), (10**12, 2), (-1, 2)]
)
def test_a_priority_of_zero_or_beyond_the_levels_means_the_default_level(priority: int, level: int) -> None:
    scheduling = spec_of("priority_levels: 3 default_priority_level: 2").scheduling
    assert scheduling.level_of(priority) == level


def test_without_priority_levels_every_priority_is_level_zero() -> None:
    assert Scheduling().level_of(5) == 0


@pytest.mark.parametrize(
    ("policy", "requested_us", "expected_us"),
    [
        (QueuePolicy(default_timeout_us=1000), 10, 1000),  # override not allowed
        (QueuePolicy(default_timeout_us=1000, allow_timeout_override=True), 10, 10),  # shorter
        (QueuePolicy(default_timeout_us=1000, allow_timeout_override=True), 5000, 1000),  # not longer
        (QueuePolicy(default_timeout_us=1000, allow_timeout_override=True), 0, 1000),  # none asked
        (QueuePolicy(allow_timeout_override=True), 10, 0),  # no default: none (core's rule)
    ],
)
def test_a_requested_timeout_replaces_the_default_only_when_allowed_and_shorter(
    policy: QueuePolicy, requested_us: int, expected_us: int
) -> None:
    assert policy.timeout_us(requested_us) == expected_us


@pytest.mark.parametrize(
    ("batching", "message"),
    [
        ("priority_levels: 2", "default priority level must be in range [1, 2] for m"),
        (
            "priority_levels: 2 default_priority_level: 3",
            "default priority level must be in range [1, 2] for m",
        ),
        (
            "priority_levels: 2 default_priority_level: 1 priority_queue_policy { key: 3 value { } }",
            "priority queue policy must have priority level in range [1, 2] for m",
        ),
        (
            "priority_levels: 2 default_priority_level: 1 priority_queue_policy { key: 0 value { } }",
            "priority queue policy must have priority level in range [1, 2] for m",
        ),
        ("priority_queue_policy { key: 1 value { } }", "priority_queue_policy needs priority_levels"),
        ("priority_levels: 17 default_priority_level: 1", "priority_levels 17 is more than natron serves"),
    ],
)
def test_bad_priority_settings_are_refused_with_triton_s_message(batching: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec_of(batching)


def _request(**parameters: object) -> InferRequest:
    return InferRequest("r", "m", "1", [], parameters=dict(parameters))


def test_the_gateway_places_a_request_at_its_level_on_the_level_subject() -> None:
    scheduling = spec_of("priority_levels: 3 default_priority_level: 2").scheduling
    high = queueing(scheduling, _request(priority=1), None, 60.0)
    assert (high.level, high.subject_level, high.timeout_s) == (1, 1, 60.0)
    # The default level travels on the plain subject, as requests of clients unaware of levels.
    default = queueing(scheduling, _request(), None, 60.0)
    assert (default.level, default.subject_level) == (2, 0)
    assert queueing(scheduling, _request(priority=3), None, 60.0).subject_level == 3


def test_timeout_is_the_deadline_without_a_queue_policy_and_the_queue_timeout_with_one() -> None:
    plain = _request()
    assert queueing(Scheduling(), plain, 250_000, 60.0).timeout_s == 0.25
    assert "timeout" not in plain.parameters
    scheduling = spec_of("default_queue_policy { default_timeout_microseconds: 1000 }").scheduling
    governed = _request()
    assert queueing(scheduling, governed, 250_000, 60.0).timeout_s == 60.0
    assert governed.parameters["timeout"] == 250_000  # for the worker, which applies the policy


def test_errors_name_the_request_as_triton_does() -> None:
    assert log_request("abc") == "[request id: abc] "
    assert log_request("") == ""
