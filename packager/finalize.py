"""The ``finalize`` step of a build (``edgephi.packager.pipeline``): make the builder's
output folder ready to ship, and describe it.

* ``genai_config.json``: the builder sets ``search.max_length`` to the model's full
  context (128k for Phi-3.5-mini), and onnxruntime-genai preallocates the KV cache for
  it — 96 GiB. The shipped default is the target's context, capped by the model's; the
  runtime may plan another value through og's config overlay.
* the manifest's ``model`` and ``memory`` sections come from the same config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgephi.core.errors import BuildError
from edgephi.core.fsutil import sha256_file
from edgephi.packager.vision import VisionSpec
from edgephi.runtime import images
from edgephi.runtime.bundle import MANIFEST_MEMBER
from edgephi.runtime.manifest import FileEntry, check_member_path
from edgephi.runtime.memory import KV_BYTES, kv_elements_per_token, weights_on_disk
from edgephi.runtime.sections import (
    EncoderFacts,
    GenerationDefaults,
    MemoryFacts,
    ModelFacts,
    SessionFacts,
    VisionFacts,
)
from edgephi.targets import KVCache, Precision

# A vision bundle's default context: one picture at its most expensive (2653 tokens), a
# question and an answer.
VISION_CONTEXT = 4096
MAX_CROPS_WITH_GLOBAL = 17  # og's processor always passes 16 crop slots and the global view


def set_default_context(model_dir: Path, context: int) -> int:
    """Write the shipped ``search.max_length``; return the value written."""
    path = model_dir / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    model_context = int(genai["model"].get("context_length") or context)
    value = min(context, model_context)
    genai.setdefault("search", {})["max_length"] = value
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return value


SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
# For models whose authors give no generation settings (GGUF files never carry them):
# Ollama's default penalty, mild enough to leave answers alone and enough to break the
# loops greedy decoding falls into on small models (SmolLM2 repeated one sentence to the
# end of --max-tokens; a JSON answer filled it with digits).
DEFAULT_REPETITION_PENALTY = 1.1


def set_generation_defaults(model_dir: Path, generation_config: Path | None) -> GenerationDefaults:
    """The answer defaults, in ``search`` of genai_config.json (where og and the runtime read
    them) and returned for the manifest: the model author's, else edgephi's."""
    given: dict[str, Any] = {}
    if generation_config is not None and generation_config.is_file():
        loaded = json.loads(generation_config.read_text(encoding="utf-8"))
        given = loaded if isinstance(loaded, dict) else {}
    path = model_dir / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    search = genai.setdefault("search", {})
    origin = "generation_config"
    if not any(k in given for k in SAMPLING_KEYS):
        origin = "edgephi"
        search["repetition_penalty"] = DEFAULT_REPETITION_PENALTY
        path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return GenerationDefaults(
        do_sample=bool(search.get("do_sample", False)),
        temperature=float(search.get("temperature", 1.0)),
        top_k=int(search.get("top_k", 50)),
        top_p=float(search.get("top_p", 1.0)),
        repetition_penalty=float(search.get("repetition_penalty", 1.0)),
        origin=origin,
    )


def has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    return False


def model_facts(model_dir: Path, hf_config: dict[str, Any]) -> ModelFacts:
    """The manifest's ``model`` shapes, from genai_config.json (what og will run)."""
    genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    decoder = genai["model"]["decoder"]
    archs = hf_config.get("architectures") or ["?"]
    return ModelFacts(
        architecture=archs[0],
        model_type=genai["model"].get("type", hf_config.get("model_type", "?")),
        context_length=int(genai["model"].get("context_length", 0)),
        vocab_size=int(genai["model"].get("vocab_size", 0)),
        num_hidden_layers=int(decoder["num_hidden_layers"]),
        num_attention_heads=int(decoder["num_attention_heads"]),
        num_key_value_heads=int(decoder["num_key_value_heads"]),
        head_size=int(decoder["head_size"]),
        hidden_size=int(decoder["hidden_size"]),
    )


def memory_facts(files: list[FileEntry], model: ModelFacts) -> MemoryFacts:
    """Weights on disk and KV bytes per token for the cache type the bundle was built with."""
    assert model.num_hidden_layers and model.num_key_value_heads and model.head_size
    per_element = kv_elements_per_token(model.num_hidden_layers, model.num_key_value_heads, model.head_size)
    encoder = model.vision.encoder if model.vision else None
    return MemoryFacts(
        weights_bytes=weights_on_disk((f.path, f.size) for f in files),
        kv_bytes_per_token=per_element * KV_BYTES[(model.kv_cache or KVCache.FP32).value],
        kv_bytes_per_token_fp16=per_element * KV_BYTES["fp16"],
        vision_scratch_bytes=vision_scratch(encoder) if encoder else None,
    )


def vision_facts(spec: VisionSpec, precision: Precision) -> VisionFacts:
    """The manifest's ``model.vision``: what an image costs and the encoder that sees it."""
    return VisionFacts(
        formats=("png", "jpeg"),
        processor="processor_config.json",
        crop=images.CROP,
        max_crops=images.MAX_CROPS,
        tokens_per_crop=images.TOKENS_PER_CROP,
        max_image_tokens=images.max_image_tokens(),
        max_pixels=images.MAX_PIXELS,
        encoder=EncoderFacts(
            width=spec.width,
            layers=spec.layers,
            heads=spec.heads,
            mlp=spec.mlp,
            patch=spec.patch,
            image_size=spec.image_size,
            order=spec.order,
            precision=precision,
        ),
    )


def vision_scratch(encoder: EncoderFacts) -> int:
    """Peak working memory of one picture through the encoder: all 17 crops at once.

    Per layer onnxruntime holds every head's attention scores ([crops, heads, T, T]) twice
    — the MatMul's output and the Softmax's — and the MLP's hidden activations; add the
    pixel tensor og's processor makes. For Phi-3.5-vision's ViT-L (16 heads, 4096-wide
    MLP, 1024 wide): 1.22 GiB; ``scripts/vision_scale.py`` measured 1.10 GiB. An INT8
    encoder's MatMulNBits quantise their input into int8 blocks in a workspace of their
    own: that run added 0.14 GiB more, budgeted as one more MLP activation (0.15 GiB).
    """
    assert encoder.image_size and encoder.patch and encoder.heads and encoder.mlp and encoder.width
    crops = MAX_CROPS_WITH_GLOBAL
    tokens = (encoder.image_size // encoder.patch) ** 2 + 1
    scores = 2 * encoder.heads * tokens * tokens
    activations = 2 * tokens * encoder.mlp + 6 * tokens * encoder.width
    if encoder.precision is Precision.INT8:
        activations += tokens * encoder.mlp
    pixels = 3 * encoder.image_size**2
    return int(crops * (scores + activations + pixels) * 4)


def sessions(model_dir: Path) -> dict[str, SessionFacts]:
    """The manifest's ``sessions``: each ONNX model og runs, its file and its inputs and outputs."""
    import onnx

    genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    out: dict[str, SessionFacts] = {}
    for role in ("vision", "embedding", "decoder"):
        section = genai["model"].get(role)
        if not section:
            continue
        graph = onnx.load(str(model_dir / section["filename"]), load_external_data=False).graph
        out[role] = SessionFacts(
            file=section["filename"],
            inputs=tuple(i.name for i in graph.input if not i.name.startswith("past_key_values.")),
            outputs=tuple(o.name for o in graph.output if not o.name.startswith("present.")),
        )
    return out


def file_entries(model_dir: Path) -> list[FileEntry]:
    """Hash every file of the finished model folder, in a stable (sorted) order."""
    entries: list[FileEntry] = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel == MANIFEST_MEMBER:
            raise BuildError(f"the model folder contains a file named {MANIFEST_MEMBER}, which is reserved")
        check_member_path(rel)
        entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    if not entries:
        raise BuildError(f"the model folder {model_dir} is empty")
    return entries
