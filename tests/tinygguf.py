"""Tiny GGUF files of real architectures, written with the ``gguf`` package, for the tests.

A tiny model from ``tiny.py`` (widened so every weight row is a whole number of 256-value
K-quant super-blocks) is written as llama.cpp lays a GGUF out: its architecture's
metadata keys and tensor names, Gemma's norms stored as ``1 + w``, the tokenizer and chat
template copied from the family's real vocab-only GGUF, and the weights quantised to
Q8_0 (the ``gguf`` package's own quantiser) or to the K-quants Q4_K, Q5_K and Q6_K,
which ``gguf`` can read but not write: their block encoders below are the exact inverses
of its decoders, with plain min/max scales (llama.cpp searches for better ones; the
format is the same). ``Q4_K_M`` mixes them as llama.cpp's does: Q6_K for the output and
embedding, the attention V and the FFN down projections, Q4_K for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import assets
import numpy as np
import tiny

QK_K = 256

# name -> (tiny spec it widens, llama.cpp architecture)
GGUF_MODELS: dict[str, tuple[str, str]] = {
    "phi3": ("phi3.5-mini", "phi3"),
    "qwen3": ("qwen3", "qwen3"),
    "gemma3": ("gemma3", "gemma3"),
}
# Wide enough for K-quants; Phi-3 as the 4k-context Phi-3-mini (no longrope factors,
# which llama.cpp keeps in tensors transformers does not read back).
_WIDEN: dict[str, dict[str, Any]] = {
    "phi3": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "rope_scaling": None,
        "sliding_window": 2047,
    },
    # head_dim 128 as Qwen3-0.6B has it: transformers reads no head_dim from a qwen3 GGUF and
    # takes that default.
    "qwen3": {"hidden_size": 256, "intermediate_size": 512, "head_dim": 128},
    "gemma3": {"hidden_size": 256, "intermediate_size": 512},
}
QUANT_TYPES = ("Q8_0", "Q4_K_M", "Q5_K", "Q6_K")
# general.file_type as llama-quantize records it (a file of only Q5_K blocks is its Q5_K_M).
FILE_TYPES = {
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_K_M": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M",
    "Q6_K": "MOSTLY_Q6_K",
}


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block into llama.cpp's 12 bytes."""
    d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def _affine_k(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per 32-value sub-block ``x ≈ d·sc·q − dmin·m``; returns (head, scales, q)."""
    sub = blocks.reshape(len(blocks), 8, 32)
    lo = np.minimum(sub.min(axis=2), 0.0)
    step = (sub.max(axis=2) - lo) / levels
    d = step.max(axis=1) / 63
    dmin = (-lo).max(axis=1) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16[:, None] > 0, np.round(step / d16[:, None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin16[:, None] > 0, np.round(-lo / dmin16[:, None]), 0).clip(0, 63).astype(np.uint8)
        scale = (d16[:, None] * sc)[:, :, None]
        offset = (dmin16[:, None] * mn)[:, :, None]
        q = np.where(scale > 0, np.round((sub + offset) / scale), 0).clip(0, levels).astype(np.uint8)
    head = np.concatenate([_f16(d16), _f16(dmin16), _pack_k_scales(sc, mn)], axis=1)
    return head, sc, q.reshape(len(blocks), QK_K)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Value i of a super-block: chunk i//64, byte (i%64)%32, low nibble if (i%64) < 32."""
    q = (q & 0x0F).reshape(len(q), 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(q), 128).astype(np.uint8)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    head, _, q = _affine_k(blocks, 15)
    return np.concatenate([head, _nibbles(q)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    head, _, q = _affine_k(blocks, 31)
    high = ((q >> 4) & 1).reshape(len(q), 8, 32)  # bit b of byte l: value 32·b + l
    qh = np.zeros((len(q), 32), dtype=np.uint8)
    for bit in range(8):
        qh |= (high[:, bit] << bit).astype(np.uint8)
    return np.concatenate([head, qh, _nibbles(q)], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    """Per 16-value sub-block ``x ≈ d·sc·(q − 32)`` with int8 ``sc``."""
    n = len(blocks)
    sub = blocks.reshape(n, 16, 16)
    step = np.abs(sub).max(axis=2) / 31
    d16 = (step.max(axis=1) / 127).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16[:, None] > 0, np.round(step / d16[:, None]), 0).clip(0, 127).astype(np.int8)
        scale = (d16[:, None] * sc)[:, :, None]
        q = (np.where(scale > 0, np.round(sub / scale), 0).clip(-32, 31) + 32).astype(np.uint8)
    q = q.reshape(n, 2, 128)  # halves of 128 values
    low = (q & 0x0F).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16(d16)], axis=1).astype(np.uint8)


_K_ENCODERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(weights: np.ndarray, qtype: str) -> np.ndarray:
    """``weights`` (rows × cols, cols a multiple of 256 for K-quants) as GGUF block bytes."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype not in _K_ENCODERS:
        return np.asarray(gguf.quants.quantize(weights, kind))
    rows = weights.shape[0]
    blocks = weights.astype(np.float32).reshape(-1, QK_K)
    return _K_ENCODERS[qtype](blocks).reshape(rows, -1)


def _tensor_type(gguf_name: str, mix: str) -> str | None:
    """The block type a tensor gets in a ``mix`` file; None keeps it F32 (norms, biases)."""
    if not gguf_name.endswith(".weight") or "norm" in gguf_name:
        return None
    if mix != "Q4_K_M":
        return mix
    heavy = ("output.weight", "token_embd.weight", "attn_v.weight", "ffn_down.weight")
    return "Q6_K" if gguf_name.endswith(heavy) else "Q4_K"


def _metadata(writer: Any, arch: str, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope:
        rope = rope["full_attention"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 1.0)))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])


def _copy_tokenizer(writer: Any, vocab: Path) -> None:
    """Every ``tokenizer.*`` field of the family's real vocab-only GGUF, as it is."""
    import gguf

    reader = gguf.GGUFReader(str(vocab))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), kind)


def tiny_gguf(name: str, qtype: str) -> Path:
    """A cached GGUF of the tiny ``name`` model (``GGUF_MODELS``) in ``qtype`` (``QUANT_TYPES``)."""
    import gguf
    import torch
    from safetensors.torch import load_file

    spec_name, arch = GGUF_MODELS[name]
    spec = {**tiny.SPECS[spec_name], "config": {**tiny.SPECS[spec_name]["config"], **_WIDEN[name]}}
    key = hashlib.sha256(json.dumps([spec, arch, qtype, "v1"], sort_keys=True).encode()).hexdigest()[:12]
    out = assets.cache_dir() / "tiny" / f"{name}-{qtype}-{key}.gguf"
    if out.is_file():
        return out
    src = tiny.tiny_model_from_spec(f"{name}-wide", spec, written="transformers")
    config = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(f"tiny {name}")
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[qtype]]))
    _metadata(writer, arch, config)
    _copy_tokenizer(writer, assets.vocab_gguf(spec["tokenizer"]))
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {hf_name} in {arch}")
        data = tensor.to(torch.float32).numpy()
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's RMSNorm scale as 1 + w
        kind = _tensor_type(gguf_name, qtype)
        if kind is None:
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, quantize(data, kind), raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out
