"""Tokens chosen in Python for a live generator: og's penalties and og's sampling rules."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.sampling import Penalties, Sampler, SearchDefaults, forced, penalize

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))


def draws(sampler: Sampler, logits: np.ndarray, n: int = 4000) -> collections.Counter[int]:
    rng = sampler.rng()
    return collections.Counter(sampler.pick(logits, rng) for _ in range(n))


def test_greedy_is_left_to_og_and_defaults_come_from_the_bundle() -> None:
    defaults = SearchDefaults(do_sample=True, temperature=0.7, top_k=40, top_p=0.9)
    assert Sampler.resolve(GenerationOptions(temperature=0.0), defaults) is None
    assert Sampler.resolve(GenerationOptions(top_k=1), defaults) is None
    assert Sampler.resolve(GenerationOptions(), SearchDefaults()) is None  # og's default: greedy
    assert Sampler.resolve(GenerationOptions(), defaults) == Sampler(0.7, 40, 0.9, None, None)
    assert SearchDefaults.from_genai({"search": {"do_sample": True, "top_k": 20}}) == SearchDefaults(
        do_sample=True, top_k=20
    )


def test_top_k_samples_only_the_k_likeliest_in_proportion() -> None:
    counts = draws(Sampler(1.0, 3, 1.0, None, seed=1), LOGITS)
    assert set(counts) == {0, 1, 2}
    share = counts[0] / sum(counts.values())
    assert share == pytest.approx(0.5 / 0.85, abs=0.03)


def test_top_p_and_min_p_cut_the_tail() -> None:
    # Nucleus: 0.5 + 0.2 reaches 0.6, so only the first two remain.
    assert set(draws(Sampler(1.0, 0, 0.6, None, seed=2), LOGITS)) == {0, 1}
    # min-p 0.25: tokens at least 0.25 x the likeliest's 0.5 (0.2 and 0.15 stay, 0.1 does not).
    assert set(draws(Sampler(1.0, 0, 1.0, 0.25, seed=3), LOGITS)) == {0, 1, 2}
    # A low temperature sharpens: the likeliest token nearly always.
    assert draws(Sampler(0.05, 0, 1.0, None, seed=4), LOGITS)[0] > 3990


def test_a_seed_reproduces_the_draws() -> None:
    sampler = Sampler(1.0, 0, 1.0, None, seed=7)
    assert draws(sampler, LOGITS, 50) == draws(sampler, LOGITS, 50)
    assert list(draws(Sampler(1.0, 0, 1.0, None, seed=8), LOGITS, 50).elements()) != list(
        draws(sampler, LOGITS, 50).elements()
    )


def test_penalties_as_og_applies_them() -> None:
    logits = np.array([[2.0, -2.0, 1.0, 0.5]], dtype=np.float32)
    out = penalize(logits, [0, 1, 1], 5, Penalties(repetition=2.0), eos=(3,))
    assert out.shape == logits.shape
    assert out.reshape(-1).tolist() == [1.0, -4.0, 1.0, 0.5]  # positive halves, negative doubles
    lowest = np.finfo(np.float32).min
    early = penalize(logits, [0], 1, Penalties(min_tokens=2), eos=(3,))
    assert early.reshape(-1)[3] == lowest  # no end of turn before min_tokens
    assert penalize(logits, [0], 2, Penalties(min_tokens=2), eos=(3,)).reshape(-1)[3] == 0.5
    # No repeated bigram: after ... 2, 0 ... 2 the token that followed 2 before (0) is banned.
    banned = penalize(logits, [2, 0, 1, 2], 0, Penalties(no_repeat_ngram=2), eos=(3,)).reshape(-1)
    assert banned[0] == lowest and banned[1:].tolist() == [-2.0, 1.0, 0.5]
    assert int(np.argmax(forced(2, logits))) == 2 and forced(2, logits).shape == logits.shape
