"""The memory planner: how much context (KV cache) fits in this device's real memory.

onnxruntime-genai preallocates the KV cache for ``search.max_length`` when a generator is
created, so that number decides whether a model loads or the device runs out of memory
(Phi-3.5-mini at its 128k context needs 96 GiB of fp32 KV). The planner picks the largest
``max_length`` not above the requested context for which

    need = runtime overhead + weights × load factor + KV bytes/token × L + prefill scratch(L)

stays within the budget, and refuses below a useful minimum. Prefill scratch grows with
the prompt length (activations, one head's L × L attention scores) plus the logits of
every prompt position unless the LM head is pruned. The constants below were measured on
SmolLM2-135M (peak RSS from 86 to 5311 prompt tokens) and rounded up.

The budget is ``--memory-budget`` / ``EDGEPHI_MEMORY_BUDGET``, else what is really free:
``MemAvailable`` from /proc/meminfo, capped by the cgroup (v2 or v1) limit minus its
usage, less a headroom for the rest of the system. The plan is applied through og's
config overlay by ``Engine`` — installed files are never edited.

A KV cache lives as long as its session (``edgephi.runtime.session``), so the plan also
says how many whole-context caches the budget holds beside the first: one session of
``edge-run serve`` each (``kv_caches``); one answer at a time still needs one prefill's scratch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BundleFormatError, ConfigError, InsufficientMemory
from edgephi.runtime.images import image_tokens, max_image_tokens
from edgephi.runtime.manifest import Manifest
from edgephi.targets.profile import KVCache

MIB = 1 << 20
RUNTIME_OVERHEAD = 160 * MIB  # interpreter, onnxruntime(-genai) libraries, tokenizer, allocator slack
WEIGHT_LOAD_FACTOR = 1.5  # session creation reads the weights and prepacks MatMulNBits blocks
ACTIVATION_FLOATS_PER_HIDDEN = 24  # live hidden-sized fp32 buffers per prompt token during prefill
MIN_CONTEXT = 128
MAX_KV_CACHES = 4  # server slots by default: enough for a few clients; more is rarely worth the memory
HEADROOM_FRACTION = 0.10
MIN_HEADROOM = 256 * MIB
_UNLIMITED = 1 << 60
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
WEIGHT_SUFFIXES = (".onnx", ".ort", ".data", ".onnx_data", ".bin")  # files whose bytes load as weights
# A tokenizer.json is parsed into memory at about twice its size (HF tokenizers' vocab and
# merges tables); a small one is inside RUNTIME_OVERHEAD, a large one is counted.
TOKENIZER_LOAD_FACTOR = 2.5
_TOKENIZER_IN_OVERHEAD = 8 * MIB
KV_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}  # bytes per cached element, by KV cache type


def kv_elements_per_token(layers: int, kv_heads: int, head_size: int) -> int:
    """Key and value elements one token adds to the cache: the one formula the packager's
    memory facts, the planner and the install-time check all use."""
    return 2 * layers * kv_heads * head_size


def decoder_kv_elements(decoder: dict[str, Any]) -> int:
    """``kv_elements_per_token`` of genai_config.json's ``decoder`` section."""
    return kv_elements_per_token(
        int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    )


def weights_on_disk(files: Iterable[tuple[str, int]]) -> int:
    """Bytes of the files that load as weights, from (path, size) pairs: the one rule the
    packager's memory facts and the planner (of a bundle or of a bare folder) share."""
    return sum(size for path, size in files if path.endswith(WEIGHT_SUFFIXES))


def parse_size(text: str) -> int:
    """``"2G"``, ``"512M"``, ``"1.5GiB"`` or a byte count → bytes (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"memory size {text!r} is not like 2G, 512M or 1500000000")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m[2].upper()]
    return int(float(m[1]) * scale)


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# --- what the device has ------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def meminfo_available(root: Path = Path("/")) -> int | None:
    try:
        for line in (root / "proc" / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_room(root: Path = Path("/")) -> int | None:
    """Bytes the process's cgroup (v2 or v1, and its ancestors) still allows; None if unlimited."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            base, limit_file, usage_file = root / "sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = (
                root / "sys/fs/cgroup/memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        else:
            continue
        # Walk from the process's own group up to the root: any ancestor may hold the limit.
        # Inside a container the group path often does not exist under the mount; then the
        # mount root is the container's own group.
        path = base / rel.lstrip("/")
        candidates = [p for p in [path, *path.parents] if p == base or base in p.parents]
        for folder in candidates:
            limit = _read_int(folder / limit_file)
            if limit is None or limit >= _UNLIMITED:
                continue
            usage = _read_int(folder / usage_file) or 0
            rooms.append(max(0, limit - usage))
    return min(rooms) if rooms else None


def available_memory(root: Path = Path("/")) -> int | None:
    """Memory this process may still use: MemAvailable, capped by the cgroup's room."""
    figures = [v for v in (meminfo_available(root), cgroup_room(root)) if v is not None]
    if not figures and root == Path("/") and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            figures.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(figures) if figures else None


def default_budget(root: Path = Path("/")) -> tuple[int | None, str]:
    env = os.environ.get("EDGEPHI_MEMORY_BUDGET")
    if env:
        return parse_size(env), "EDGEPHI_MEMORY_BUDGET"
    free = available_memory(root)
    if free is None:
        return None, "unknown (no /proc/meminfo): not limited"
    headroom = max(MIN_HEADROOM, int(free * HEADROOM_FRACTION))
    return max(
        0, free - headroom
    ), f"available memory {format_size(free)} less {format_size(headroom)} headroom"


# --- what the model needs ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The figures of a model that decide its memory use."""

    weights_bytes: int
    kv_bytes_per_token: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int
    context_length: int
    default_context: int
    lm_head_pruned: bool = False
    precision: str = ""  # the bundle's (int4, int8, fp16, fp32); "" for a bare folder
    # A vision model: the encoder's working memory for one image, and the most prompt
    # tokens one image can take (edgephi.runtime.images); zero for a text model.
    vision_scratch_bytes: int = 0
    max_image_tokens: int = 0

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelShape:
        """From the manifest's facts, the weights counted from its (hashed) file list too:
        a manifest that understates them does not shrink the plan."""
        model, memory = manifest.model, manifest.memory
        files = {f.path: f.size for f in manifest.files}
        tokenizer = max(0, files.get("tokenizer.json", 0) - _TOKENIZER_IN_OVERHEAD)
        missing: list[str] = []

        def figure(name: str, value: int | None) -> int:
            if value is None:
                missing.append(name)
            return value or 0

        hidden, head_size = figure("model.hidden_size", model.hidden_size), model.head_size
        shape = cls(
            weights_bytes=max(
                figure("memory.weights_bytes", memory.weights_bytes), weights_on_disk(files.items())
            )
            + int(tokenizer * TOKENIZER_LOAD_FACTOR),
            kv_bytes_per_token=figure("memory.kv_bytes_per_token", memory.kv_bytes_per_token),
            num_attention_heads=figure(
                "model.num_attention_heads",
                model.num_attention_heads or (hidden // head_size if hidden and head_size else None),
            ),
            hidden_size=hidden,
            vocab_size=figure("model.vocab_size", model.vocab_size),
            context_length=figure("model.context_length", model.context_length),
            default_context=model.default_context or model.context_length or 0,
            lm_head_pruned=bool(model.lm_head_pruned),
            precision=manifest.precision,
            vision_scratch_bytes=memory.vision_scratch_bytes or 0,
            max_image_tokens=(model.vision.max_image_tokens or 0) if model.vision else 0,
        )
        if missing:
            raise ConfigError(
                f"the manifest of {manifest.name} lacks the memory figures {', '.join(missing)}"
            )
        return shape

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelShape:
        """For an unpacked folder: its manifest if it has one, else genai_config and file sizes."""
        manifest_file = model_dir / "manifest.json"
        if manifest_file.is_file():
            return cls.from_manifest(Manifest.from_bytes(manifest_file.read_bytes()))
        genai: dict[str, Any] = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        model, decoder = genai["model"], genai["model"]["decoder"]
        weights = weights_on_disk((p.name, p.stat().st_size) for p in model_dir.rglob("*") if p.is_file())
        context = int(model.get("context_length") or genai["search"]["max_length"])
        return cls(
            weights_bytes=weights,
            kv_bytes_per_token=decoder_kv_elements(decoder) * KV_BYTES["fp32"],
            num_attention_heads=int(decoder["num_attention_heads"]),
            hidden_size=int(decoder["hidden_size"]),
            vocab_size=int(model["vocab_size"]),
            context_length=context,
            default_context=int(genai.get("search", {}).get("max_length") or context),
            max_image_tokens=max_image_tokens() if "vision" in model else 0,
        )

    def fixed_bytes(self) -> int:
        # Images are encoded after the KV cache is allocated, so the encoder's scratch adds to it.
        return RUNTIME_OVERHEAD + int(self.weights_bytes * WEIGHT_LOAD_FACTOR) + self.vision_scratch_bytes

    def prefill_bytes(self, tokens: int) -> int:
        # onnxruntime's CPU attention does not keep every head's L x L scores at once (measured:
        # prefill memory grows linearly); one head's worth is budgeted in case a kernel does.
        scores = tokens * tokens * 4
        activations = tokens * self.hidden_size * 4 * ACTIVATION_FLOATS_PER_HIDDEN
        logits = (1 if self.lm_head_pruned else tokens) * self.vocab_size * 4
        return scores + activations + logits

    def need(self, tokens: int) -> int:
        return self.fixed_bytes() + self.kv_bytes_per_token * tokens + self.prefill_bytes(tokens)


def check_facts(manifest: Manifest, model_dir: Path) -> None:
    """Refuse a manifest whose model facts (which the memory plan reads) disagree with the
    model files they describe: genai_config.json's shapes, the files' sizes."""
    try:
        genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        decoder = genai["model"]["decoder"]
        model, memory = manifest.model, manifest.memory
        pairs = [(k, getattr(model, k), decoder.get(k)) for k in _DECODER_FACTS]
        pairs += [(k, getattr(model, k), genai["model"].get(k)) for k in ("vocab_size", "context_length")]
        wrong = [
            f"{k} {said} (genai_config.json: {real})"
            for k, said, real in pairs
            if said is not None and said != real
        ]
        # The least a cache of these shapes takes: int8 where the bundle says it quantized
        # its KV cache (the rpi4 target does), else fp16.
        least = decoder_kv_elements(decoder) * KV_BYTES["int8" if model.kv_cache is KVCache.INT8 else "fp16"]
        if (memory.kv_bytes_per_token or 0) < least:
            wrong.append(f"kv_bytes_per_token {memory.kv_bytes_per_token} (the shapes need {least}+)")
        if "vision" in genai["model"] and not model.vision:
            wrong.append("no vision facts for a vision model")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleFormatError(f"genai_config.json lacks the model's shapes ({exc})") from None
    if wrong:
        raise BundleFormatError(
            f"the manifest's model facts do not match its files: {'; '.join(wrong)}",
            hint="the bundle is inconsistent: rebuild it with edge-pack",
        )


_DECODER_FACTS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_size",
    "hidden_size",
)


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    requested: int
    max_length: int
    budget: int | None
    budget_source: str
    limited_by: str  # "request", "model" or "memory"

    @property
    def need(self) -> int:
        return self.shape.need(self.max_length)

    def kv_caches(self, most: int = MAX_KV_CACHES) -> int:
        """How many KV caches of ``max_length`` tokens the budget holds (at least one, at most ``most``)."""
        one = self.shape.kv_bytes_per_token * self.max_length
        if self.budget is None or one <= 0:
            return 1
        extra = max(0, self.budget - self.need) // one
        return int(max(1, min(most, 1 + extra)))

    def describe(self) -> str:
        s = self.shape
        rows = [
            (
                "budget",
                f"{format_size(self.budget)} ({self.budget_source})"
                if self.budget is not None
                else self.budget_source,
            ),
            (
                "weights",
                f"{format_size(s.weights_bytes)} on disk, {format_size(s.fixed_bytes() - RUNTIME_OVERHEAD)}"
                f" loaded, + {format_size(RUNTIME_OVERHEAD)} runtime",
            ),
            (
                "KV cache",
                f"{format_size(s.kv_bytes_per_token)} per token, "
                f"{format_size(s.kv_bytes_per_token * self.max_length)} a cache; "
                f"{self.kv_caches()} fit (server slots)",
            ),
            ("prefill", f"up to {format_size(s.prefill_bytes(self.max_length))} at {self.max_length} tokens"),
            (
                "context",
                f"{self.max_length} tokens (asked {self.requested}, model max {s.context_length};"
                f" limited by {self.limited_by})",
            ),
            ("total", f"{format_size(self.need)} at most"),
        ]
        if s.max_image_tokens:
            rows.insert(-1, ("images", self.images_line()))
        return "\n".join(f"{k:<10}{v}" for k, v in rows)

    def images_line(self) -> str:
        square, photo = image_tokens(1024, 1024), image_tokens(4032, 3024)
        room = self.max_length - self.shape.max_image_tokens
        fits = (
            f"one image of any shape fits, leaving {room} tokens"
            if room >= MIN_CONTEXT
            else f"a {square}-token square image leaves {self.max_length - square} tokens"
            if self.max_length - square >= MIN_CONTEXT
            else "too small for a square image: raise --context or the memory budget"
        )
        scratch = format_size(self.shape.vision_scratch_bytes)
        return (
            f"{square} tokens for a square image, {photo} for a 4:3 photo, "
            f"{self.shape.max_image_tokens} at most; {fits}; encoder scratch {scratch}"
        )


def plan(
    shape: ModelShape,
    *,
    requested: int | None = None,
    budget: int | None = None,
    budget_source: str = "",
    minimum: int = MIN_CONTEXT,
) -> MemoryPlan:
    """Choose ``max_length``: as asked (default: the bundle's), capped by the model and the budget."""
    asked = requested or shape.default_context
    if asked < 2:
        raise ConfigError(f"context {asked} is too small")
    cap = min(asked, shape.context_length)
    limited = "request" if cap == asked else "model"
    if budget is None or shape.need(cap) <= budget:
        return MemoryPlan(shape, asked, cap, budget, budget_source or "not limited", limited)
    lo, hi = 0, cap  # need() grows with L: find the largest L with need(L) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shape.need(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    floor = min(minimum, cap)
    if lo < floor:
        raise InsufficientMemory(
            f"the model needs {format_size(shape.fixed_bytes())} before any context and "
            f"{format_size(shape.kv_bytes_per_token)} of KV cache per token; the budget of "
            f"{format_size(budget)} ({budget_source}) leaves room for {lo} tokens, "
            f"below the minimum of {floor}",
            hint="free memory, raise --memory-budget, or use a smaller model"
            + ("" if shape.precision == "int4" else " or an --precision int4 build"),
        )
    return MemoryPlan(shape, asked, lo, budget, budget_source, "memory")
