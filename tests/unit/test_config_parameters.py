"""Boolean config parameters read the same way in every backend."""

from __future__ import annotations

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from natron import config as cfg


def config_with(key: str, value: str) -> pb.ModelConfig:
    config = pb.ModelConfig(name="m")
    config.parameters[key].string_value = value
    return config


@pytest.mark.parametrize("text", ["true", "TRUE", " 1 ", "on", "yes"])
def test_every_spelling_of_true_reads_true(text: str) -> None:
    assert cfg.parameter_bool(config_with("FLAG", text), "FLAG", False) is True


@pytest.mark.parametrize("text", ["false", "False", "0", "off", "no"])
def test_every_spelling_of_false_reads_false(text: str) -> None:
    assert cfg.parameter_bool(config_with("FLAG", text), "FLAG", True) is False


def test_an_absent_parameter_takes_the_default() -> None:
    assert cfg.parameter_bool(pb.ModelConfig(name="m"), "FLAG", True) is True
    assert cfg.parameter_bool(pb.ModelConfig(name="m"), "FLAG", False) is False


def test_anything_else_is_a_config_error_naming_model_key_and_value() -> None:
    with pytest.raises(cfg.ConfigError, match=r"model 'm': parameter 'FLAG' .* got 'maybe'"):
        cfg.parameter_bool(config_with("FLAG", "maybe"), "FLAG", False)
