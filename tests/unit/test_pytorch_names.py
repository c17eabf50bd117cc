"""Triton's rules for mapping a PyTorch model's config names to forward() arguments and outputs:
by argument name, by `__<index>` suffix, else in config order. Pure functions: torch is not
needed to run them."""

from __future__ import annotations

import pytest

from natron.errors import InvalidArgument
from workers.backends.pytorch import map_inputs, map_outputs, named_index


def test_config_inputs_named_after_forward_arguments_map_by_name() -> None:
    assert map_inputs("m", ["y", "x"], ["x", "y"]) == {"y": 1, "x": 0}


def test_config_inputs_named_with_an_index_map_by_that_index() -> None:
    assert map_inputs("m", ["INPUT__1", "INPUT__0"], ["a", "b"]) == {"INPUT__1": 1, "INPUT__0": 0}
    assert named_index("OUTPUT__12") == 12
    assert named_index("OUTPUT__x") is None
    assert named_index("OUTPUT") is None


def test_other_config_inputs_map_in_config_order() -> None:
    assert map_inputs("m", ["first", "INPUT__0"], ["a", "b"]) == {"first": 0, "INPUT__0": 1}


def test_a_config_with_more_inputs_than_forward_takes_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="configuration expects 3 inputs, model provides 2"):
        map_inputs("m", ["a", "b", "c"], ["a", "b"])


def test_an_index_past_the_last_argument_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="names forward\\(\\) argument 5"):
        map_inputs("m", ["INPUT__0", "INPUT__5"], ["a", "b"])


def test_outputs_map_by_index_only_when_every_name_has_one() -> None:
    assert map_outputs(["OUTPUT__1", "OUTPUT__0"]) == {"OUTPUT__1": 1, "OUTPUT__0": 0}
    assert map_outputs(["sum", "OUTPUT__0"]) == {"sum": 0, "OUTPUT__0": 1}
