"""The KV cache outlives the answer: reuse is never wrong, and it really is reuse.

Every check here compares an answer taken from a session's cache with the answer of a
fresh generator (a new ``Session``) on the same prompt, greedy, token for token — after
settling and without, after an interrupted answer, after the context overflowed, with
options that change per answer, through the chat, the Python API and the server.

Token for token, up to a tie (``as_fresh``): the cache prefills only what is new, a fresh
generator the whole prompt, and the INT4 kernels quantize activations to int8 per block,
so the two round differently and a score moves by a few tenths (0.23 seen on an AVX2
EPYC, none on the CPUs this was written on). Where the two answers part, the cached
token must score within ``TIE`` of the fresh generator's best: a wrong cache (a stale or
shifted position) parts at once and by whole units.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import serving
from edgephi.runtime import load
from edgephi.runtime.answer import Answer, Stats
from edgephi.runtime.chat import Conversation
from edgephi.runtime.engine import Engine
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.sampling import Penalties, penalize
from edgephi.runtime.server import ModelServer
from edgephi.runtime.session import Session
from edgephi.runtime.store import Store

GREEDY = GenerationOptions(max_tokens=24, temperature=0.0)
TIE = 0.5
QUESTIONS = [
    "What is the capital of France? Tell me about it.",
    "And the capital of Germany? What is it known for?",
    "Which of the two cities is older, and by how much?",
    "Name three rivers that flow through either of them.",
    "Summarise our conversation in one sentence.",
]
SYSTEM = "You are a concise geography tutor. Answer in plain sentences, without lists or headings."


def stats_of(answer: Answer) -> Stats:
    """Run ``answer`` out and give its stats."""
    "".join(answer)
    assert answer.stats is not None
    return answer.stats


def fresh(engine: Engine, prompt: str, options: GenerationOptions) -> str:
    """The answer of a generator that has seen nothing before: what reuse must reproduce."""
    session = Session(engine)
    try:
        return "".join(engine.stream_prompt(prompt, options, session=session))
    finally:
        session.reset()


def as_fresh(engine: Engine, prompt: str, options: GenerationOptions, answer: str) -> bool:
    """Whether ``answer`` (from a cache) is the greedy answer of a fresh generator: equal,
    or parting from it only where the fresh generator's scores were a tie (within ``TIE``,
    after the same penalties og applies)."""
    expected = fresh(engine, prompt, options)
    if answer == expected:
        return True
    steps: list[tuple[list[int], np.ndarray]] = []

    def watch(ids: list[int], logits: np.ndarray) -> np.ndarray:
        steps.append((list(ids), np.asarray(logits, dtype=np.float32).reshape(-1).copy()))
        return logits

    session = Session(engine)
    try:
        watched = "".join(engine.stream_prompt(prompt, options, session=session, logits_hook=watch))
    finally:
        session.reset()
    assert watched == expected  # the hook only watches

    def text(ids: list[int]) -> str:
        return str(engine._tokenizer.decode(np.array(ids, dtype=np.int32))) if ids else ""

    # The last step whose text so far the cached answer still shares is where they parted.
    ids, logits = next((step for step in reversed(steps) if answer.startswith(text(step[0]))), steps[0])
    chosen = int(engine._tokenizer.encode(answer[len(text(ids)) :])[0])
    prompt_ids = [int(t) for t in engine._tokenizer.encode(prompt)]
    penalties = Penalties.resolve(options, engine.search_defaults)
    scores = penalize(logits, prompt_ids + ids, len(ids), penalties, engine.eos_ids)
    gap = float(scores.max() - scores[chosen])
    print(f"cached and fresh answers part at a tie {gap:.3f} wide: {answer!r} / {expected!r}")
    return gap < TIE


def chat_matches_fresh(engine: Engine, options: GenerationOptions, settle: list[bool]) -> list[int]:
    """Chat one turn per ``settle`` entry; each answer must equal a fresh generator's. Returns
    the cached prompt tokens of each turn."""
    engine.session.reset()
    chat = Conversation(engine, system=SYSTEM)
    cached = []
    for question, settle_now in zip(QUESTIONS, settle, strict=False):
        asked = chat.ask(question, options)
        answer = "".join(asked)
        stats = asked.stats
        assert stats is not None
        cached.append(stats.cached_tokens)
        prompt = engine.format_prompt(chat._all()[0][:-1])  # the prompt that answer came from
        assert as_fresh(engine, prompt, options, answer), f"turn {len(cached)} differs"
        if settle_now:
            chat.settle()
    return cached


@pytest.mark.parametrize("model", ["smol", "phi"])
def test_chat_from_the_cache_answers_as_a_fresh_generator(model: str, request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue(model)
    cached = chat_matches_fresh(engine, GREEDY, [True, False, True, True, False])
    assert cached[0] == 0
    # Each later turn reuses at least the system prompt and the first question.
    assert all(c > 40 for c in cached[1:]), cached
    assert cached[2] > cached[1] and cached[4] > cached[3], cached


def test_an_answer_to_another_prompt_is_not_taken_for_a_tie(smol: Engine) -> None:
    # What a wrong cache gives — the answer to other positions — fails the check.
    first, second = (smol.format_prompt([{"role": "user", "content": q}]) for q in QUESTIONS[:2])
    assert as_fresh(smol, first, GREEDY, fresh(smol, first, GREEDY))
    assert not as_fresh(smol, first, GREEDY, fresh(smol, second, GREEDY))


def test_settling_takes_in_the_answer(smol: Engine) -> None:
    smol.session.reset()
    chat = smol.chat(system=SYSTEM)
    first = chat.ask(QUESTIONS[0], GenerationOptions(max_tokens=24, min_tokens=24, temperature=0.0))
    "".join(first)
    answered = first.stats
    assert answered is not None and answered.generated_tokens == 24
    pending = smol.session.pending_tokens
    assert pending >= answered.generated_tokens - 1
    chat.settle()
    assert smol.session.pending_tokens == 0
    second = chat.ask(QUESTIONS[1], GREEDY)
    "".join(second)
    after = second.stats
    assert after is not None
    # Settled: the whole previous prompt and its answer came from the cache.
    assert after.cached_tokens >= answered.prompt_tokens + answered.generated_tokens - 2


def test_background_settle_yields_to_the_next_answer(smol: Engine) -> None:
    smol.session.reset()
    chat = Conversation(smol, system=SYSTEM)
    long = GenerationOptions(max_tokens=200, min_tokens=200, temperature=0.0)
    "".join(chat.ask(QUESTIONS[0], long))
    chat.settle(background=True)
    # Asked at once: the settle stops after its chunk, and the answer is still exact.
    answer = "".join(chat.ask(QUESTIONS[1], GREEDY))
    prompt = smol.format_prompt(chat._all()[0][:-1])
    assert as_fresh(smol, prompt, GREEDY, answer)
    smol.session.wait()


def test_an_interrupted_answer_leaves_the_cache_consistent(smol: Engine) -> None:
    smol.session.reset()
    chat = Conversation(smol, system=SYSTEM)
    chunks = chat.ask(QUESTIONS[0], GenerationOptions(max_tokens=64, temperature=0.0))
    for _ in range(5):
        next(chunks)
    chunks.close()  # what Ctrl-C does to the chat's stream
    assert chunks.stats is not None and chunks.stats.finish_reason == "cancelled"
    assert chat.messages[-1]["role"] == "assistant"
    asked = chat.ask(QUESTIONS[1], GREEDY)
    answer = "".join(asked)
    prompt = smol.format_prompt(chat._all()[0][:-1])
    assert asked.stats is not None and asked.stats.cached_tokens > 0
    assert as_fresh(smol, prompt, GREEDY, answer)


def test_options_that_change_per_answer_keep_the_cache(smol: Engine) -> None:
    smol.session.reset()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    prompt = smol.format_prompt(messages)
    "".join(smol.stream_prompt(prompt, GREEDY))
    n = smol.count_tokens(prompt)
    sampled = GenerationOptions(max_tokens=24, temperature=0.9, top_p=0.9, seed=11)
    per_answer = [
        sampled,
        GenerationOptions(max_tokens=24, temperature=0.7, top_k=5, min_p=0.1, seed=3),
        GenerationOptions(max_tokens=24, temperature=0.0, repetition_penalty=1.3),
        GenerationOptions(max_tokens=24, temperature=0.0, no_repeat_ngram=2),
        GenerationOptions(max_tokens=30, temperature=0.0, min_tokens=30),
        GenerationOptions(max_tokens=24, temperature=0.0, stop=("Paris",)),
    ]
    for options in per_answer:
        streamed = smol.stream_prompt(prompt, options)
        text = "".join(streamed)
        stats = streamed.stats
        assert stats is not None and stats.cache_note == "", options
        assert stats.cached_tokens == n - 2, options  # all but the two tokens always appended
        if options.temperature == 0.0:
            assert as_fresh(smol, prompt, options, text), options
        else:  # sampled: the same seed draws the same tokens
            assert text == fresh(smol, prompt, options), options
    # A seed reproduces a sampled answer on the live generator too.
    assert "".join(smol.stream_prompt(prompt, sampled)) == "".join(smol.stream_prompt(prompt, sampled))
    # And it does sample: other seeds, other answers (deterministic: the seeds are fixed).
    others = {"".join(smol.stream_prompt(prompt, replace(sampled, seed=s))) for s in (12, 13, 14)}
    assert len(others | {"".join(smol.stream_prompt(prompt, sampled))}) >= 3


def test_min_tokens_and_penalties_act_on_the_live_generator(smol: Engine) -> None:
    smol.session.reset()
    prompt = smol.format_prompt([{"role": "user", "content": "Reply with one word: yes or no?"}])
    short = GenerationOptions(max_tokens=60, temperature=0.0)
    assert stats_of(smol.stream_prompt(prompt, short)).generated_tokens < 20
    longer = stats_of(
        smol.stream_prompt(prompt, GenerationOptions(max_tokens=60, temperature=0.0, min_tokens=40))
    )
    assert longer.generated_tokens >= 40 and longer.cached_tokens > 0
    # And they are gone again for the next answer on the same generator.
    assert stats_of(smol.stream_prompt(prompt, short)).generated_tokens < 20


@pytest.mark.parametrize(
    ("options", "note"),
    [
        (GenerationOptions(max_tokens=8, num_beams=2), "beam search"),
        (GenerationOptions(max_tokens=8, regex="(yes|no)"), "an output constraint"),
    ],
)
def test_what_needs_a_fresh_generator_falls_back_and_says_so(
    smol: Engine, options: GenerationOptions, note: str
) -> None:
    smol.session.reset()
    prompt = smol.format_prompt([{"role": "user", "content": "Is Paris in France?"}])
    "".join(smol.stream_prompt(prompt, GREEDY))
    streamed = smol.stream_prompt(prompt, options)
    text = "".join(streamed)
    stats = streamed.stats
    assert stats is not None and stats.cache_note == note and stats.cached_tokens == 0
    assert "not cached: " + note in stats.line() and stats.to_dict()["cache_note"] == note
    assert text == fresh(smol, prompt, options)
    # The session comes back: the next plain answer builds a cache, the one after reuses it.
    "".join(smol.stream_prompt(prompt, GREEDY))
    assert stats_of(smol.stream_prompt(prompt, GREEDY)).cached_tokens > 0


def test_overflow_drops_half_the_history_and_keeps_the_system_prompt_cached(phi3_bundle: Path) -> None:
    engine = load(phi3_bundle, store=Store(phi3_bundle.parent / "overflow-store"), context=256)
    chat = Conversation(engine, system=SYSTEM)
    opts = GenerationOptions(max_tokens=12, temperature=0.0)
    system_tokens = engine.count_tokens(engine.format_prompt([{"role": "system", "content": SYSTEM}]))
    drops, cached_after_drop = 0, []
    for i in range(24):
        before = chat.dropped
        asked = chat.ask(f"Question {i}: tell me about the waves and the tides.", opts)
        answer = "".join(asked)
        stats = asked.stats
        assert stats is not None and stats.prompt_tokens + 12 <= 256
        prompt = engine.format_prompt(chat._all()[0][:-1])
        assert as_fresh(engine, prompt, opts, answer), f"turn {i}"
        if chat.dropped > before:
            drops += 1
            cached_after_drop.append(stats.cached_tokens)
            assert chat.dropped - before >= 2  # half the history at once, not one exchange
        chat.settle()
    assert drops >= 2
    assert drops <= 24 // 3  # the expensive re-prefill comes once every several turns
    # The system prompt's cached prefix survived each drop (all but the template's last tokens).
    assert all(c >= system_tokens - 8 for c in cached_after_drop), (cached_after_drop, system_tokens)


@pytest.fixture(scope="module")
def served(smol: Engine) -> Iterator[tuple[ModelServer, openai.OpenAI]]:
    with serving(smol, slots=2) as server:
        yield server, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_server_slots_reuse_resent_history_and_answer_as_fresh(
    served: tuple[ModelServer, openai.OpenAI], smol: Engine
) -> None:
    server, client = served
    for slot in server.slots:
        slot.reset()
    conversations: list[list[dict[str, str]]] = [
        [{"role": "system", "content": SYSTEM}],
        [{"role": "system", "content": "You answer every question about rivers, briefly."}],
    ]
    cached: list[list[int]] = [[], []]
    for turn in range(3):
        for c, history in enumerate(conversations):  # two clients, interleaved
            history.append({"role": "user", "content": QUESTIONS[turn]})
            out = client.chat.completions.create(
                model=smol.model_name,
                messages=history,
                max_tokens=16,
                temperature=0,  # type: ignore[arg-type]
            )
            text = out.choices[0].message.content or ""
            assert out.usage is not None and out.usage.prompt_tokens_details is not None
            cached[c].append(out.usage.prompt_tokens_details.cached_tokens or 0)
            with server._gate:  # the reference runs where no request can interleave
                assert as_fresh(smol, smol.format_prompt(history), GenerationOptions(16, 0.0), text)
            history.append({"role": "assistant", "content": text})
    # Each client found its own slot again: its whole previous exchange was cached.
    for c in range(2):
        assert cached[c][0] == 0 and cached[c][1] > 30 and cached[c][2] > cached[c][1], cached


def test_server_stream_cut_by_the_client_keeps_the_slot_consistent(
    served: tuple[ModelServer, openai.OpenAI], smol: Engine
) -> None:
    server, client = served
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    stream = client.chat.completions.create(
        model=smol.model_name,
        messages=history,
        max_tokens=200,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    history.append({"role": "assistant", "content": "Paris is the capital."})
    history.append({"role": "user", "content": QUESTIONS[1]})
    out = client.chat.completions.create(
        model=smol.model_name,
        messages=history,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    assert (out.usage.prompt_tokens_details.cached_tokens or 0) > 20
    with server._gate:
        answer = out.choices[0].message.content or ""
        assert as_fresh(smol, smol.format_prompt(history), GenerationOptions(16, 0.0), answer)


def test_phi3_long_rope_positions_are_never_mixed(phi3_bundle: Path, tmp_path: Path) -> None:
    """Phi-3's long-RoPE factors switch past 4096 tokens: a cache written before the switch is
    not reused for a prompt past it, and answers still equal a fresh generator's."""
    engine = load(phi3_bundle, store=Store(tmp_path / "store"), context=4600)
    assert engine.rope_switch == 4096
    words = "the tide comes in and the tide goes out over the sand "
    opts = GenerationOptions(max_tokens=8, temperature=0.0)

    def prompt(repeats: int) -> str:
        return engine.format_prompt([{"role": "user", "content": words * repeats}])

    short = next(r for r in range(100, 1000, 10) if engine.count_tokens(prompt(r)) > 3800)
    long = next(r for r in range(short, 1000, 5) if engine.count_tokens(prompt(r)) > 4200)
    for repeats, reused in ((short, False), (short + 5, True), (long, False), (long + 5, True)):
        streamed = engine.stream_prompt(prompt(repeats), opts)
        text = "".join(streamed)
        stats = streamed.stats
        assert stats is not None and (stats.cached_tokens > 3000) == reused, (repeats, stats)
        assert as_fresh(engine, prompt(repeats), opts, text), repeats
        engine.session.settle()
    # An answer that crosses the switch while decoding keeps nothing, and settling does not
    # mix the factors either: the next prompt is computed whole, and still answers the same.
    edge = max(r for r in range(short, long) if engine.count_tokens(prompt(r)) < 4090)
    crossing = GenerationOptions(max_tokens=60, min_tokens=60, temperature=0.0)
    "".join(engine.stream_prompt(prompt(edge), crossing))
    assert engine.session.cached_ids == () and engine.session.settle() == 0
    streamed = engine.stream_prompt(prompt(edge + 2), opts)
    text = "".join(streamed)
    assert streamed.stats is not None and streamed.stats.cached_tokens == 0
    assert as_fresh(engine, prompt(edge + 2), opts, text)


def test_serve_refuses_more_slots_than_memory_holds(smollm2_bundle: Path) -> None:
    edge_run = str(Path(sys.executable).with_name("edge-run"))
    out = subprocess.run(
        [edge_run, "serve", str(smollm2_bundle), "--slots", "4", "--memory-budget", "420M", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2  # an option that cannot be honoured
    [line] = out.stderr.strip().splitlines()
    assert "--slots 4 needs 4 KV caches" in line and "the memory budget holds 1" in line
