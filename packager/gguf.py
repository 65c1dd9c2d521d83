"""GGUF → Hugging Face folder, for sources given as a ``.gguf`` file of any quantisation.

transformers reads the GGUF metadata into a config and a tokenizer and dequantises the
tensors to F32 (it needs ``accelerate`` for that). It refuses to save a model loaded
from GGUF, so the weights are moved into a fresh model of the same class, built on the
meta device so the copy costs no second set of memory, and that one is saved.

Chat models in GGUF often record only ``<|endoftext|>`` as end-of-sequence and rely on
llama.cpp's separate end-of-turn id; the turn-end tokens the chat template emits are
added to the EOS list of ``generation_config.json`` so generation stops at the end of a
reply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgephi.core.errors import DependencyMissing, NotAModel, UnsupportedArchitecture
from edgephi.packager.sources import check_architecture

# End-of-turn markers of common chat templates.
TURN_END_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


def to_hf_folder(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir`` as a Hugging Face checkpoint folder; return its config dict."""
    # transformers shows its own tqdm bar per tensor; edge-pack prints its own steps.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise DependencyMissing(f"reading GGUF needs {exc.name}, which is not installed") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as exc:
        raise UnsupportedArchitecture(
            f"{gguf_path}: transformers cannot read this GGUF model: {exc}"
        ) from None
    except Exception as exc:
        raise NotAModel(f"{gguf_path} is not a readable GGUF model: {exc}") from None
    if not getattr(config, "architectures", None):
        # GGUF configs carry no architectures list; the class transformers picks is the one.
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        config.architectures = [arch] if isinstance(arch, str) else []
    check_architecture(config.to_dict(), str(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise DependencyMissing(f"loading GGUF weights needs {exc.name or 'accelerate'}") from None
    model_cls = type(loaded)
    clean = type(loaded.config).from_dict(_clean_config(loaded.config.to_dict()))
    clean.architectures = [model_cls.__name__]
    with torch.device("meta"):
        fresh = model_cls(clean)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    del loaded
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _fix_eos(out_dir, tokenizer)
    return dict(json.loads((out_dir / "config.json").read_text(encoding="utf-8")))


def _clean_config(config: dict[str, Any]) -> dict[str, Any]:
    # The GGUF quantisation note would make the builder treat F32 weights as pre-quantised.
    config = dict(config)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    return config


def _fix_eos(out_dir: Path, tokenizer: Any) -> None:
    gen_path = out_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id")
    ids: list[int] = list(eos) if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    for token in TURN_END_TOKENS:
        if token in template and token in vocab and vocab[token] not in ids:
            ids.insert(0, int(vocab[token]))
    if ids:
        gen["eos_token_id"] = ids if len(ids) > 1 else ids[0]
        gen_path.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
