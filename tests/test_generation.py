"""Each generation option changes the output as it should, on real models through og."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
from edgephi.core.errors import ConfigError
from edgephi.runtime.answer import StopMatcher
from edgephi.runtime.engine import Engine
from edgephi.runtime.options import GenerationOptions

SEA = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = GenerationOptions(max_tokens=12, temperature=0.0)


def sequence_logprob(engine: Engine, messages: list[dict[str, str]], text: str) -> float:
    """Sum of log-probabilities of ``text``'s tokens after the prompt (teacher forcing)."""
    model = engine._model
    tokenizer = engine._tokenizer
    prompt = list(tokenizer.encode(engine.format_prompt(messages)))
    continuation = list(tokenizer.encode(text))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(continuation) + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    total = 0.0
    for token in continuation:
        logits = gen.get_logits().reshape(-1).astype(np.float64)
        total += float(logits[token] - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
        gen.append_tokens([token])
    return total


def test_greedy_is_deterministic(phi: Engine) -> None:
    assert phi.generate(SEA, GREEDY).text == phi.generate(SEA, GREEDY).text


def test_top_k_1_equals_greedy(phi: Engine) -> None:
    sampled = phi.generate(SEA, GenerationOptions(max_tokens=12, temperature=1.0, top_k=1, seed=3)).text
    assert sampled == phi.generate(SEA, GREEDY).text


def test_min_p_1_keeps_only_the_likeliest_token(phi: Engine) -> None:
    sampled = phi.generate(SEA, GenerationOptions(max_tokens=12, temperature=1.5, min_p=1.0, seed=5)).text
    assert sampled == phi.generate(SEA, GREEDY).text
    free = phi.generate(SEA, GenerationOptions(max_tokens=12, temperature=1.5, seed=5)).text
    assert free != sampled  # without min-p, sampling at this temperature wanders off


def test_seed_reproducibility(phi: Engine) -> None:
    opts = GenerationOptions(max_tokens=12, temperature=1.0, seed=11)
    assert phi.generate(SEA, opts).text == phi.generate(SEA, opts).text


def test_beam_search_returns_a_better_scoring_sequence(phi: Engine) -> None:
    beam = phi.generate(SEA, GenerationOptions(max_tokens=8, num_beams=4, length_penalty=0.0))
    greedy = phi.generate(SEA, GenerationOptions(max_tokens=8, temperature=0.0))
    assert beam.stats.generated_tokens == 8
    assert beam.text != greedy.text
    assert sequence_logprob(phi, SEA, beam.text) > sequence_logprob(phi, SEA, greedy.text)


def test_stop_strings_cut_cleanly(phi: Engine) -> None:
    full = phi.generate(SEA, GenerationOptions(max_tokens=24, temperature=0.0)).text
    stop = full[6:10]
    cut = phi.generate(SEA, GenerationOptions(max_tokens=24, temperature=0.0, stop=(stop,)))
    assert cut.text == full[: full.find(stop)]
    assert cut.stats.finish_reason == "stop"


@pytest.mark.parametrize(
    ("chunks", "stops", "emitted", "stopped"),
    [
        (["Hel", "lo wo", "rld"], ["lo w"], "Hel", True),  # split across three chunks
        (["ab", "c<", "|e", "nd|>x"], ["<|end|>"], "abc", True),
        (["abc", "def"], ["xyz"], "abcdef", False),
        (["a<", "b"], ["<|"], "a<b", False),  # a held-back prefix that turned out not to stop
    ],
)
def test_stop_matcher(chunks: list[str], stops: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out, done = "", False
    for c in chunks:
        text, done = matcher.feed(c)
        out += text
        if done:
            break
    if not done:
        out += matcher.flush()
    assert (out, done) == (emitted, stopped)


def test_repetition_penalty_lowers_repeats(smol: Engine) -> None:
    def top_repeat(opts: GenerationOptions) -> int:
        words = smol.generate(
            [{"role": "user", "content": "What is the capital of France?"}], opts
        ).text.split()
        return collections.Counter(w.strip(".,").lower() for w in words).most_common(1)[0][1]

    # The bundle's own default is a mild penalty (1.1): compare against none at all.
    plain = top_repeat(GenerationOptions(max_tokens=96, temperature=0.0, repetition_penalty=1.0))
    penalised = top_repeat(GenerationOptions(max_tokens=96, temperature=0.0, repetition_penalty=1.5))
    assert penalised < plain


def test_no_repeat_ngram_changes_a_repetitive_answer(smol: Engine) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    plain = smol.generate(msgs, GenerationOptions(max_tokens=96, temperature=0.0)).text
    fixed = smol.generate(msgs, GenerationOptions(max_tokens=96, temperature=0.0, no_repeat_ngram=3)).text
    assert fixed != plain


def test_min_tokens_keeps_going_past_the_end_of_turn(smol: Engine) -> None:
    msgs = [{"role": "user", "content": "Reply with just the word yes."}]
    # Without the default repetition penalty: this is about min_tokens alone.
    short = smol.generate(msgs, GenerationOptions(max_tokens=64, temperature=0.0, repetition_penalty=1.0))
    assert short.stats.finish_reason == "stop" and short.stats.generated_tokens < 60
    floor = short.stats.generated_tokens + 3
    longer = smol.generate(
        msgs, GenerationOptions(max_tokens=64, min_tokens=floor, temperature=0.0, repetition_penalty=1.0)
    )
    assert longer.stats.generated_tokens >= floor


def test_logits_hook_steers_generation(phi: Engine) -> None:
    banned: list[int] = []

    def ban_greedy_first(ids: list[int], logits: np.ndarray) -> np.ndarray:
        if not ids:
            banned.append(int(logits.reshape(-1).argmax()))
            logits.reshape(-1)[banned[0]] = -np.inf
        return logits

    steered = phi.generate(SEA, GREEDY, logits_hook=ban_greedy_first)
    plain = phi.generate(SEA, GREEDY)
    assert banned and steered.text != plain.text
    first_plain = phi._tokenizer.decode([banned[0]])
    assert not steered.text.startswith(first_plain) or not first_plain.strip()


def test_json_schema_output_parses_and_validates(smol: Engine, tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "country": {"type": "string", "maxLength": 24},
            "is_capital": {"type": "boolean"},
        },
        "required": ["city", "country", "is_capital"],
        "additionalProperties": False,
    }
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    out = smol.generate(
        msgs, GenerationOptions(max_tokens=96, temperature=0.0, json_schema=json.dumps(schema))
    )
    data = json.loads(out.text)
    assert set(data) == {"city", "country", "is_capital"}
    assert isinstance(data["city"], str) and isinstance(data["is_capital"], bool)
    assert len(data["city"]) <= 24


def test_regex_constrains_output(smol: Engine) -> None:
    msgs = [{"role": "user", "content": "Is Paris in France?"}]
    out = smol.generate(msgs, GenerationOptions(max_tokens=8, temperature=0.0, regex="(Yes|No)"))
    assert out.text in ("Yes", "No")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 3, "temperature": 0.7}, "deterministic"),
        ({"num_beams": 3, "regex": "a+"}, "num_beams 1"),
        ({"json_schema": "{}", "regex": "a"}, "give one"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"temperature": 0.0, "min_p": 0.1}, "greedy"),
        ({"stop": ("",)}, "non-empty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 0}, "num_beams"),
    ],
)
def test_invalid_combinations_are_named(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        GenerationOptions(**kwargs)


def test_hook_with_beams_is_refused(phi: Engine) -> None:
    with pytest.raises(ConfigError, match="num_beams 1"):
        phi.generate(SEA, GenerationOptions(max_tokens=4, num_beams=2), logits_hook=lambda ids, lg: lg)
