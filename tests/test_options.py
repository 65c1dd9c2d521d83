from __future__ import annotations

import pytest
from edgephi.core.errors import ConfigError
from edgephi.runtime.options import GenerationOptions


def test_defaults_leave_the_bundle_in_charge() -> None:
    assert GenerationOptions().search_options() == {}


def test_zero_temperature_is_greedy() -> None:
    assert GenerationOptions(temperature=0.0).search_options() == {"do_sample": False}


def test_sampling_options_map_to_og_names() -> None:
    opts = GenerationOptions(temperature=0.7, top_p=0.9, top_k=40, seed=3).search_options()
    assert opts == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "random_seed": 3}


def test_top_p_alone_turns_sampling_on() -> None:
    assert GenerationOptions(top_p=0.5).search_options()["do_sample"] is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"temperature": 0.0, "top_k": 5}, "greedy"),
    ],
)
def test_invalid_options_are_named(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        GenerationOptions(**kwargs)
