"""The family matrix: every architecture edgephi packs, as transformers 5 writes its config.

For each family a tiny random model of the real checkpoint's shape (``tiny.SPECS``, config
written by transformers itself):

* packs with the defaults of the ``cpu`` target, and ``edge-run`` answers exactly what
  the plain onnxruntime-genai loop generates from the installed files; the ``rpi5``
  target's defaults build the same model files;
* packed at FP32, onnxruntime-genai's greedy tokens are transformers' own greedy tokens
  for the same weights and prompt ids — for the sliding-window families also with a
  prompt longer than the window, where the window decides what is attended to;
* GGUF files of three families, written here in Q4_K_M, Q5_K, Q6_K and Q8_0, pack with
  their chat template and stop tokens and answer as transformers does from the same file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import pytest
import tiny
import tinygguf
from conftest import build_bundle, edge_run_peak
from edgephi import targets
from edgephi.runtime import load
from edgephi.runtime.store import Store
from edgephi.targets import Precision, Target

FAMILIES = (
    "llama3.2",
    "mistral",
    "qwen2.5",
    "qwen3",
    "phi3.5-mini",
    "phi4-mini",
    "gemma",
    "gemma2",
    "gemma3",
    "smollm3",
    "granite3",
    "olmo",
    "phi2",
    "ernie4.5",
    "hunyuan",
)
QUESTION = "Tell me about the sea."
TOKENS = 12


def family_dir(family: str) -> Path:
    return tiny.tiny_model(family, written="transformers")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``bundles(family, target, precision)``: built once per module, INT4 unless asked:
    what these families get at their real sizes (``--precision auto`` keeps INT8 for
    models under ~1B on the default target, and every tiny model here is one)."""
    out_dir = tmp_path_factory.mktemp("families")
    built: dict[tuple[str, str, str], Path] = {}

    def get(family: str, target: str = "cpu", precision: Precision = Precision.INT4) -> Path:
        key = (family, target, precision.value)
        if key not in built:
            name = f"{family}-{target}-{key[2]}"
            kw: dict[str, object] = {"target": target, "name": name.replace(".", "-"), "precision": precision}
            built[key] = build_bundle(family_dir(family), out_dir / f"{name}.phi", **kw)
        return built[key]

    return get


def og_greedy(model_dir: Path, ids: list[int], max_tokens: int) -> list[int]:
    """The plain onnxruntime-genai loop, as its docs show it, from prompt ids."""
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def og_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """onnxruntime-genai's next-token logits after the prompt ``ids``."""
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    return np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)


def _hf_model(model_dir: Path, **overrides: object):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    # Eager attention: the reference implementation (Gemma 2's soft-capping needs it).
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **overrides
    )


def hf_logits(model_dir: Path, ids: list[int], **overrides: object) -> np.ndarray:
    """transformers' next-token logits, FP32, after the same prompt ids."""
    import torch

    with torch.no_grad():
        return _hf_model(model_dir, **overrides)(torch.tensor([ids])).logits[0, -1].numpy()


def hf_greedy(
    model_dir: Path, ids: list[int], max_tokens: int, eos: tuple[int, ...], repetition_penalty: float
) -> list[int]:
    """transformers' own greedy generation, FP32, from the same prompt ids, with the
    bundle's repetition penalty (the same CTRL rule over prompt and answer as og's)."""
    import torch

    with torch.no_grad():
        out = _hf_model(model_dir).generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            eos_token_id=list(eos),
            pad_token_id=eos[0],
        )
    return [int(t) for t in out[0, len(ids) :]]


# FP32 onnxruntime against FP32 torch: summation order differs, nothing else. Measured
# up to 0.004 on these models (logits of magnitude 10-20, prompts up to 6k tokens).
LOGIT_TOLERANCE = 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_family_packs_and_edge_run_matches_og(family: str, bundles, store: Store) -> None:  # type: ignore[no-untyped-def]
    bundle = bundles(family)
    installed = store.install(bundle)
    manifest = installed.manifest
    assert manifest.model.architecture == tiny.SPECS[family]["config"]["architectures"][0]
    assert (manifest.precision, manifest.target.name) == ("int4", "cpu")
    engine = load(bundle, store=store)
    ids = list(engine.prepare(engine.format_prompt([{"role": "user", "content": QUESTION}])).ids)
    expected = og_greedy(installed.path, ids, TOKENS)
    assert expected, "og generated nothing"

    # The real command in its own process, on the bundle file (installed already: reused).
    edge_run = str(Path(sys.executable).with_name("edge-run"))
    result = subprocess.run(
        [edge_run, str(bundle), "-p", QUESTION, "-n", str(TOKENS), "-t", "0"],
        capture_output=True,
        env={**os.environ, "EDGEPHI_HOME": str(store.root)},
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    stream = og.Tokenizer(og.Model(str(installed.path))).create_stream()
    answer = "".join(stream.decode(t) for t in expected)
    assert result.stdout.decode("utf-8") == answer + "\n"


# Where the bundle runs, not how it is built: the fields the build does not read once the
# precision is given (ram_gb and bandwidth_gbs steer --precision auto).
WHERE = ("name", "description", "os", "arch", "threads", "ram_gb", "bandwidth_gbs")


def test_the_rpi5_profile_builds_as_cpu_does() -> None:
    """rpi5 differs from cpu only in where the bundle runs, whatever the family: so the
    files are compared on three families below, not on every one (a build each, on CI)."""
    cpu, pi = targets.get("cpu"), targets.get("rpi5")
    differ = {f.name for f in dataclasses.fields(Target) if getattr(cpu, f.name) != getattr(pi, f.name)}
    assert differ <= set(WHERE) and {"arch", "threads"} <= differ


# Phi-3.5 (untied embedding), Qwen3 (tied), Gemma 3 (sliding window)
@pytest.mark.parametrize("family", ["phi3.5-mini", "qwen3", "gemma3"])
def test_family_packs_for_rpi5(family: str, bundles) -> None:  # type: ignore[no-untyped-def]
    """At the same precision the rpi5 profile builds the very files edge-run was checked on above.

    (This x86 host refuses to run an aarch64 bundle; tests/test_emulated_pi.py runs a
    bundle of these files on an emulated Pi.)
    """
    pi = read_manifest(bundles(family, "rpi5"))
    cpu = read_manifest(bundles(family))
    assert (pi["target"]["name"], pi["target"]["arch"], pi["precision"]) == ("rpi5", "aarch64", "int4")
    assert {f["path"]: f["sha256"] for f in pi["files"]} == {f["path"]: f["sha256"] for f in cpu["files"]}


def read_manifest(bundle: Path) -> dict[str, Any]:
    with zipfile.ZipFile(bundle) as zf:
        return dict(json.loads(zf.read("manifest.json")))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fp32_matches_transformers(family: str, bundles, store: Store) -> None:  # type: ignore[no-untyped-def]
    bundle = bundles(family, "cpu", Precision.FP32)
    engine = load(bundle, store=store)
    installed = store.install(bundle).path
    ids = list(engine.prepare(engine.format_prompt([{"role": "user", "content": QUESTION}])).ids)
    ours = og_logits(installed, ids)
    theirs = hf_logits(family_dir(family), ids)
    assert ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max()) < LOGIT_TOLERANCE
    tokens = og_greedy(installed, ids, TOKENS)
    assert len(tokens) >= 4, f"{family}: only {tokens} before an end token; the comparison would say little"
    penalty = engine.search_defaults.repetition_penalty
    assert penalty == 1.1  # edgephi's default: these tiny models' generation_config gives none
    assert tokens == hf_greedy(family_dir(family), ids, TOKENS, engine.eos_ids, penalty)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_matches_transformers_past_the_window(family: str, bundles, store: Store) -> None:  # type: ignore[no-untyped-def]
    window = int(tiny.SPECS[family]["config"]["sliding_window"])
    installed = store.install(bundles(family, "cpu", Precision.FP32)).path
    filler = " ".join(f"wave {i} of the sea," for i in range(window // 2))
    ids = [int(t) for t in og.Tokenizer(og.Model(str(installed))).encode(filler)]
    assert len(ids) > window + window // 2
    ids = ids[: window + window // 2]
    ours = og_logits(installed, ids)
    windowed = hf_logits(family_dir(family), ids)
    unwindowed = hf_logits(family_dir(family), ids, sliding_window=1 << 20)
    # The window decides this answer: attending to everything gives other logits.
    assert float(np.abs(windowed - unwindowed).max()) > 25 * LOGIT_TOLERANCE
    assert float(np.abs(ours - windowed).max()) < LOGIT_TOLERANCE


def _kv_bytes_per_token(model_dir: Path) -> int:
    """K and V of one token in FP32, from the model's own transformers config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_the_memory_plan_counts_the_kv_cache_og_allocates(family: str, bundles, store: Store) -> None:  # type: ignore[no-untyped-def]
    installed = store.install(bundles(family))
    # og sizes every layer's cache for max_length unless genai_config gives it a window
    # ring; edgephi builds never do (see edgephi.packager.builder), so one per-token figure
    # holds for every layer: the model's own K/V width (explicit head_dim included).
    genai = json.loads((installed.path / "genai_config.json").read_text())
    assert "sliding_window" not in genai["model"]["decoder"]
    assert installed.manifest.memory.kv_bytes_per_token == _kv_bytes_per_token(family_dir(family))


def test_a_sliding_window_model_stays_within_its_plan_at_a_long_context(bundles, store: Store) -> None:  # type: ignore[no-untyped-def]
    """Gemma 3 (512-token window) filled to a 16k context: measured peak RSS within the plan."""
    from edgephi.runtime.loader import plan as plan_for

    bundle = bundles("gemma3")
    context = 16384
    p = plan_for(bundle, context=context, store=store)
    kv = p.max_length * store.install(bundle).manifest.memory.kv_bytes_per_token
    assert p.max_length == context and kv > 40 * 2**20  # the KV cache is the bulk of the plan
    prompt = " ".join(f"wave {i} of the sea," for i in range(context // 12))
    code, peak, stderr = edge_run_peak(
        str(bundle),
        "-p",
        prompt,
        "-n",
        "8",
        "-t",
        "0",
        "--context",
        str(context),
        "--stats",
        env={**os.environ, "EDGEPHI_HOME": str(store.root)},
        timeout=600,
    )
    assert code == 0, stderr
    prompt_tokens = int(re.search(r"\[(\d+) prompt tokens", stderr)[1])  # type: ignore[index]
    assert prompt_tokens > context // 2  # far past the window
    assert peak <= p.need, (peak, p.need)


# GGUF sources: (tiny model, quantisation, the turn-end token its chat template stops on)
GGUF_CASES = [
    ("phi3", "Q4_K_M", "<|end|>"),
    ("phi3", "Q8_0", "<|end|>"),
    ("qwen3", "Q5_K", "<|im_end|>"),
    ("gemma3", "Q6_K", None),  # the stand-in SentencePiece vocab carries no chat template
]


@pytest.mark.parametrize(("name", "qtype", "turn_end"), GGUF_CASES)
def test_gguf_source_packs_and_matches_transformers(
    name: str, qtype: str, turn_end: str | None, tmp_path: Path, store: Store
) -> None:
    """A K-quant or Q8_0 GGUF packs with its chat template and stop tokens, and answers
    as transformers does from the same file (dequantised by both to the same FP32)."""
    from transformers import AutoTokenizer

    source = tinygguf.tiny_gguf(name, qtype)
    bundle = build_bundle(source, tmp_path / f"{name}.phi", precision=Precision.FP32)
    installed = store.install(bundle)
    engine = load(bundle, store=store)
    prompt = engine.format_prompt([{"role": "user", "content": QUESTION}])
    assert installed.manifest.chat_template is (turn_end is not None)
    if turn_end is not None:
        vocab = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).get_vocab()
        assert turn_end in prompt  # the GGUF's own template rendered the turn
        assert vocab[turn_end] in engine.eos_ids  # and its end stops the answer
    ids = list(engine.prepare(prompt).ids)
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0, -1].numpy()
    ours = og_logits(installed.path, ids)
    assert float(np.abs(ours - theirs).max()) < LOGIT_TOLERANCE
