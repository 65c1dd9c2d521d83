"""End to end with the real builder and the real onnxruntime-genai loop.

A tiny Phi-3.5-mini (longrope) with the real Phi-3 tokenizer and chat template, tiny
Llama/Mistral/Gemma/Qwen2 models, and the real SmolLM2-135M-Instruct GGUF are packed to
INT4 bundles and run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnxruntime_genai as og
import pytest
import tiny
from conftest import build_bundle
from edgephi.core.errors import ContextOverflow
from edgephi.packager import pipeline
from edgephi.packager.cli import app as pack_app
from edgephi.runtime import load
from edgephi.runtime.chat import Conversation
from edgephi.runtime.cli import app as run_app
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store
from typer.testing import CliRunner

GREEDY = GenerationOptions(max_tokens=16, temperature=0.0)
HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def raw_og_greedy(model_dir: Path, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[int], str]:
    """The plain onnxruntime-genai loop on an unpacked model folder, as its docs show it."""
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    stream = tokenizer.create_stream()
    out: list[int] = []
    text = ""
    while not gen.is_done():
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        out.append(token)
        text += stream.decode(token)
    return out, text


def test_the_build_steps_are_listed_once() -> None:
    # The module docstring lists the steps the pipeline runs, in order, by their names.
    listed = re.findall(r"^\d+\. ``(\w+)``", pipeline.__doc__ or "", flags=re.MULTILINE)
    assert listed == [step.name for step in pipeline.STEPS] and len(listed) == 5


def test_phi35_bundle_describes_itself(phi3_bundle: Path, store: Store) -> None:
    installed = store.install(phi3_bundle)
    m = installed.manifest
    assert (m.name, m.version, m.precision) == ("phi35-tiny", "1.0.0", "int4")
    assert m.model.architecture == "Phi3ForCausalLM"
    assert m.model.context_length == 131072
    assert m.chat_template is True
    assert m.memory.weights_bytes > 0
    # 2 layers x 4 KV heads x 32 dims x (K and V) x 4 bytes
    assert m.memory.kv_bytes_per_token == 2 * 4 * 32 * 2 * 4
    genai = json.loads((installed.path / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == 2048  # not the builder's 131072
    assert 32007 in genai["model"]["eos_token_id"]  # Phi-3's <|end|> ends a turn


def test_phi35_streams_and_matches_the_raw_og_loop(phi3_bundle: Path, store: Store) -> None:
    engine = load(phi3_bundle, store=store)
    answer = engine.stream(HELLO, GREEDY)
    chunks = list(answer)
    assert len(chunks) > 1  # streamed, not returned at once
    stats = answer.stats
    assert stats is not None and stats.generated_tokens == 16 and stats.finish_reason == "length"
    prompt = engine.format_prompt(HELLO)
    assert prompt.startswith("<s><|user|>") or "<|user|>" in prompt  # the real Phi-3 template
    installed = store.install(phi3_bundle)
    _, raw_text = raw_og_greedy(installed.path, HELLO, 16)
    assert "".join(chunks) == raw_text

    result = CliRunner().invoke(
        run_app, ["run", str(phi3_bundle), "-p", HELLO[0]["content"], "-n", "16", "-t", "0", "--stats"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(raw_text)
    assert "16 generated" in result.output


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "qwen2"])
def test_other_families_pack_and_generate(family: str, bundles_dir: Path, store: Store) -> None:
    out = build_bundle(tiny.tiny_model(family), bundles_dir / f"{family}.phi", name=f"tiny-{family}")
    engine = load(out, store=store)
    done = engine.generate(HELLO, GREEDY)
    first = done.text
    assert done.stats.generated_tokens >= 1
    assert engine.generate(HELLO, GREEDY).text == first  # greedy is deterministic
    assert store.install(out).manifest.model.architecture == tiny.SPECS[family]["config"]["architectures"][0]


def test_smollm2_knows_the_capital_of_france(smollm2_bundle: Path) -> None:
    result = CliRunner().invoke(
        run_app, ["run", str(smollm2_bundle), "-p", "What is the capital of France?", "-t", "0", "-n", "48"]
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


def test_sampling_with_a_seed_is_reproducible(smollm2_bundle: Path, store: Store) -> None:
    engine = load(smollm2_bundle, store=store)
    opts = GenerationOptions(max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    a = engine.generate(HELLO, opts).text
    assert engine.generate(HELLO, opts).text == a
    assert (
        engine.generate(HELLO, GenerationOptions(max_tokens=24, temperature=0.9, top_p=0.95, seed=8)).text
        != a
    )


def test_context_overflow_and_trimming(phi3_bundle: Path, store: Store) -> None:
    engine = load(phi3_bundle, store=store, context=96)
    assert engine.context == 96
    with pytest.raises(ContextOverflow, match="96"):
        engine.generate([{"role": "user", "content": "word " * 200}], GREEDY)
    chat = Conversation(engine)
    for i in range(6):
        "".join(
            chat.ask(
                f"question number {i} about the sea and the sky",
                GenerationOptions(max_tokens=8, temperature=0),
            )
        )
    assert chat.dropped > 0  # old exchanges made room
    assert chat.messages[-2]["content"].startswith("question number 5")
    # The last turn's prompt left room for its 8-token answer. (The history with the answer
    # may not fit: the template closes the answer with tokens it never generated, and the
    # next turn drops again first.)
    assert engine.count_tokens(engine.format_prompt(chat.messages[:-1])) <= 96 - 8


def _most_repeated_phrase(text: str, words: int = 6) -> int:
    tokens = text.split()
    grams = [" ".join(tokens[i : i + words]) for i in range(len(tokens) - words + 1)]
    return max((grams.count(g) for g in set(grams)), default=0)


def test_a_model_without_generation_settings_gets_a_mild_repetition_penalty(
    smollm2_bundle: Path, store: Store
) -> None:
    """The GGUF carries no generation settings: greedy alone loops on the README's example."""
    installed = store.install(smollm2_bundle)
    assert installed.manifest.model.generation.to_dict() == {
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "repetition_penalty": 1.1,
        "from": "edgephi",
    }
    inspect = CliRunner().invoke(pack_app, ["inspect", str(smollm2_bundle)])
    assert "greedy, repetition penalty 1.1 (edgephi's: the model gives none)" in inspect.stdout
    question = "Why is the sea salty?"

    def answer(*extra: str) -> str:
        result = CliRunner().invoke(
            run_app, ["run", str(smollm2_bundle), "-p", question, "-n", "200", *extra]
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    looping = answer("-t", "0", "--repetition-penalty", "1.0")
    assert _most_repeated_phrase(looping) >= 3  # the loop the default is there for
    assert _most_repeated_phrase(answer()) <= 2
    assert answer() == answer("-t", "0")  # the default is greedy: -t 0 changes nothing


def test_the_model_authors_generation_settings_are_kept(tmp_path: Path, store: Store) -> None:
    source = tmp_path / "llama-sampling"
    shutil.copytree(tiny.tiny_model("llama"), source)
    (source / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        )
    )
    installed = store.install(build_bundle(source, tmp_path / "s.phi"))
    generation = installed.manifest.model.generation.to_dict()
    assert (generation["from"], generation["do_sample"], generation["temperature"]) == (
        "generation_config",
        True,
        0.6,
    )
    assert generation["repetition_penalty"] == 1.0
    genai = json.loads((installed.path / "genai_config.json").read_text())
    assert (genai["search"]["temperature"], genai["search"]["top_p"]) == (0.6, 0.9)
