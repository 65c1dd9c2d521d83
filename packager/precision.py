"""``--precision auto``, the default: which weights a build packs for its target.

Runs inside the pipeline's source step, once the model's Hugging Face config is known and
before anything is exported. ``choose`` estimates from that config alone what each rung of
a quality ladder would weigh (``weight_bytes``; within 1% of the built files, a test
checks) and takes the best rung that

- fits the target's typical memory (``Target.ram_gb``, of which ``FREE_FRACTION`` is taken
  to be free for the model) with the build's default context, by the runtime's own formula
  (``runtime.memory.ModelShape.need``: weights as loaded, KV cache, prefill scratch), and
- decodes at least ``SPEED_FLOOR`` tokens a second by the target's memory bandwidth
  (``Target.bandwidth_gbs``): a token reads every weight but the embedding table once, and
  decode reaches about half that bound (44% on SmolLM2, docs/benchmarks.md).

The ladder, best first, by perplexity measured against FP32 on SmolLM2
(docs/quantization.md): INT8 (+0.6%), then calibrated INT4 (``imatrix-b32``, +23%; the
builder's round-to-nearest INT4 loses +34%). The last rung is taken when nothing above
qualifies, saying so when it misses too: no smaller recipe answers better, and the device's
planner shortens the context to what fits. FP32 is not a rung: INT8 is within 1% of its
perplexity at a quarter of the bytes. Where calibration cannot run (switchable adapters, a
vision model's embeddings input), the last rung is the target's own INT4 recipe; GPU
targets get that recipe directly, since nothing here measures GPU kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgephi.core.errors import BuildError, InsufficientMemory
from edgephi.runtime import memory
from edgephi.runtime.memory import KV_BYTES, ModelShape, format_size, kv_elements_per_token
from edgephi.targets import ExecutionProvider, KVCache, Precision, Target

SPEED_FLOOR = 10.0  # tokens/s: faster than anyone reads (about 7 tokens/s at 5 words/s)
DECODE_EFFICIENCY = 0.5  # the fraction of the bandwidth bound decode reaches
FREE_FRACTION = 0.75  # of a device's memory, what the model may take; the system keeps the rest
CALIBRATED = "imatrix-b32"
GIB = 1 << 30


@dataclass(frozen=True)
class Rung:
    """One recipe on the ladder and what a weight costs in it (block 32, FP32 scales)."""

    precision: Precision
    quant: str | None  # a QUANT_RECIPES name; None: the target's own recipe
    bytes_per_weight: float
    measured: str  # its perplexity rise on SmolLM2, as docs/quantization.md has it
    # An untied embedding table, looked up in blocks of the rung's bits (``packager.embedding``).
    embedding_bytes_per_weight: float

    @property
    def label(self) -> str:
        return f"{self.precision.value} {self.quant}" if self.quant else self.precision.value


_Q8 = 1 + 4 / 32  # a weight and its share of an FP32 scale
_Q4 = 0.5 + 4 / 32
_Q4_ZERO = _Q4 + 0.5 / 32  # and of an integer zero point
INT8 = Rung(Precision.INT8, None, _Q8, "+0.6%", _Q8)
INT4_CALIBRATED = Rung(Precision.INT4, CALIBRATED, _Q4_ZERO, "+23%", _Q4_ZERO)
INT4 = Rung(Precision.INT4, None, _Q4, "+34%", _Q4_ZERO)


@dataclass(frozen=True)
class Shapes:
    """The figures of a Hugging Face config that decide a packed model's size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    positions: int
    rope_positions: int  # rows of the builder's cos/sin caches (longrope keeps two tables)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shapes:
        text = config.get("text_config") or config  # a multimodal checkpoint's language model
        try:
            hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
            positions = int(text.get("max_position_embeddings") or 4096)
            scaling = text.get("rope_scaling") or {}
            rope = positions
            if scaling.get("type", scaling.get("rope_type")) == "longrope":
                rope += int(text.get("original_max_position_embeddings") or 0)
            return cls(
                hidden=hidden,
                layers=int(text["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                intermediate=int(text["intermediate_size"]),
                vocab=int(text["vocab_size"]),
                # As the pipeline asks the builder (``tie_word_embeddings`` absent: untied).
                tied=bool(config.get("tie_word_embeddings", False)),
                positions=positions,
                rope_positions=rope,
            )
        except KeyError as exc:
            raise BuildError(
                f"--precision auto cannot size this model: its config lacks {exc}",
                hint="choose one with --precision int4 or int8",
            ) from None
        except (TypeError, ValueError) as exc:
            raise BuildError(
                f"--precision auto cannot size this model: a shape in its config is not a number ({exc})",
                hint="choose one with --precision int4 or int8",
            ) from None

    @property
    def matmul_weights(self) -> int:
        """Weights in the quantised MatMuls: every layer's attention and gated MLP, the lm_head."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.vocab * self.hidden

    def weight_bytes(self, rung: Rung) -> int:
        """The decoder's bytes on disk: quantised MatMuls; an untied embedding as the rung keeps
        it (a tied one reads the lm_head's blocks); the rotary cos/sin caches are FP32."""
        embedding = 0 if self.tied else int(self.vocab * self.hidden * rung.embedding_bytes_per_weight)
        rope = self.rope_positions * self.head_dim // 2 * 4 * 2
        return int(self.matmul_weights * rung.bytes_per_weight) + embedding + rope

    def read_per_token(self, rung: Rung) -> int:
        """Bytes one decoded token reads: all MatMul weights; the embedding only a row of."""
        return int(self.matmul_weights * rung.bytes_per_weight)


@dataclass(frozen=True)
class Estimate:
    rung: Rung
    weights: int
    need: int  # bytes at the default context, by the runtime's formula
    tokens_per_s: float  # by the target's bandwidth
    planned: int  # the context the device's planner would give it in the budget (0: none)

    def fits(self, budget: int) -> bool:
        return self.need <= budget

    def fast(self) -> bool:
        return self.tokens_per_s >= SPEED_FLOOR

    def line(self, budget: int) -> str:
        return (
            f"{format_size(self.weights)} of weights, needs {format_size(self.need)} of "
            f"{format_size(budget)}, ~{self.tokens_per_s:.0f} tok/s"
        )


@dataclass(frozen=True)
class Choice:
    precision: Precision
    quant: str | None
    reason: str  # one line: what was chosen and why


def ladder(*, calibrate: bool) -> tuple[Rung, ...]:
    """Best first; the last rung is the smallest."""
    return (INT8, INT4_CALIBRATED if calibrate else INT4)


def estimate(shapes: Shapes, rung: Rung, target: Target, context: int, budget: int) -> Estimate:
    weights = shapes.weight_bytes(rung)
    kv = KV_BYTES["int8" if target.kv_cache is KVCache.INT8 else "fp32"]
    shape = ModelShape(
        weights_bytes=weights,
        kv_bytes_per_token=kv_elements_per_token(shapes.layers, shapes.kv_heads, shapes.head_dim) * kv,
        num_attention_heads=shapes.heads,
        hidden_size=shapes.hidden,
        vocab_size=shapes.vocab,
        context_length=shapes.positions,
        default_context=context,
        lm_head_pruned=True,
    )
    speed = target.bandwidth_gbs * 1e9 * DECODE_EFFICIENCY / max(1, shapes.read_per_token(rung))
    try:
        planned = memory.plan(shape, budget=budget).max_length
    except InsufficientMemory:
        planned = 0
    return Estimate(rung, weights, shape.need(min(context, shapes.positions)), speed, planned)


def choose(hf_config: dict[str, Any], target: Target, context: int, *, calibrate: bool = True) -> Choice:
    """The best rung of the ladder for this model on ``target`` (see the module docstring)."""
    if target.execution_provider is not ExecutionProvider.CPU:
        return Choice(
            Precision.INT4,
            None,
            f"int4, the {target.name} target's recipe: the choice among precisions is measured "
            "on CPU kernels only",
        )
    rungs = ladder(calibrate=calibrate)
    if target.ram_gb <= 0 or target.bandwidth_gbs <= 0:
        smallest = rungs[-1]
        return Choice(
            smallest.precision,
            smallest.quant,
            f"{smallest.label}, the smallest recipe: target {target.name} gives no ram_gb and "
            "bandwidth_gbs to choose by",
        )
    shapes = Shapes.from_config(hf_config)
    budget = int(target.ram_gb * GIB * FREE_FRACTION)
    where = f"{target.name} ({target.ram_gb:g} GB, {target.bandwidth_gbs:g} GB/s, {context}-token context)"
    estimates = [estimate(shapes, rung, target, context, budget) for rung in rungs]
    for e in estimates[:-1]:
        if e.fits(budget) and e.fast():
            return Choice(
                e.rung.precision,
                e.rung.quant,
                f"{e.rung.label} ({e.rung.measured} perplexity on SmolLM2), the best that fits "
                f"{where}: {e.line(budget)}",
            )
    last, above = estimates[-1], estimates[-2]
    why = (
        f"{above.rung.label} would need {format_size(above.need)} of {format_size(budget)}"
        if not above.fits(budget)
        else f"{above.rung.label} would decode ~{above.tokens_per_s:.0f} tok/s, below {SPEED_FLOOR:.0f}"
    )
    misses = ""
    if not last.planned:
        misses = f"; it does not fit either, even with {memory.MIN_CONTEXT} tokens: choose a smaller model"
    elif not last.fits(budget):
        misses = f"; it does not fit either: the device will plan {last.planned} tokens of context"
    elif not last.fast():
        misses = f"; below {SPEED_FLOOR:.0f} tok/s too, but nothing smaller answers better"
    return Choice(
        last.rung.precision,
        last.rung.quant,
        f"{last.rung.label} ({last.rung.measured} perplexity on SmolLM2) for {where}: {why}; "
        f"{last.rung.label}: {last.line(budget)}{misses}",
    )
