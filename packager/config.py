"""The typed configuration of one ``edge-pack build``, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgephi.core.errors import ConfigError
from edgephi.runtime.bundle import SUFFIX
from edgephi.runtime.manifest import is_valid_name, is_valid_version
from edgephi.targets import ExecutionProvider, ModelFormat, Precision, Target
from edgephi.targets.profile import VISION_PRECISIONS


@dataclass(frozen=True)
class Recipe:
    """One named weight-quantisation recipe: the builder's block size and algorithm (or
    edgephi's own, ``OWN_ALGORITHMS``), and for ``imatrix`` the share of the INT4 weights'
    bytes that may go to keeping the most sensitive MatMuls in INT8."""

    block_size: int
    algorithm: str
    int8_budget: float = 0.0


QUANT_RECIPES: dict[str, Recipe] = {
    "default-b32": Recipe(32, "default"),  # the CPU targets' recipe
    "rtn-b16": Recipe(16, "rtn"),
    "rtn-b32": Recipe(32, "rtn"),
    "rtn-b64": Recipe(64, "rtn"),
    "rtn-b128": Recipe(128, "rtn"),
    "rtn-b256": Recipe(256, "rtn"),
    "kquant-b32": Recipe(32, "k_quant"),
    "kquant-mixed-b32": Recipe(32, "k_quant_mixed"),
    # k-quant with the lm_head in INT8, as llama.cpp's Q4_0 keeps its output matrix in Q8_0.
    "kquant-last-b32": Recipe(32, "k_quant_last"),
    # onnxruntime's HQQ over the builder's FP32 graph (edgephi.packager.hqq): float zero
    # points, so 8 bytes of scale and zero per block instead of the default's 4.
    "hqq-b32": Recipe(32, "hqq"),
    # The default's kernel with integer zero points, each block's range chosen by the
    # activations it meets on a shipped text (edgephi.packager.imatrix).
    "imatrix-b32": Recipe(32, "imatrix"),
    # imatrix with the MatMuls whose INT4 rounding moves the next-token distribution most per
    # byte (KL, measured one MatMul at a time on the calibration text) kept in INT8, within a
    # share of the INT4 weights' bytes. Sized so that SmolLM2's bundle file is no larger than
    # llama.cpp's Q4_0 GGUF (-s) and Q4_K_M GGUF (-m) of the same weights; docs/quantization.md.
    "imatrix-mix-s-b32": Recipe(32, "imatrix", int8_budget=0.027),
    "imatrix-mix-m-b32": Recipe(32, "imatrix", int8_budget=0.18),
}
# Recipes edgephi computes itself: the builder exports for them with its default algorithm.
OWN_ALGORITHMS = ("hqq", "imatrix")


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs. ``precision``/``context`` default to the target's; a
    precision neither gives is chosen once the model is known (``chooses_precision``)."""

    source: str
    output: Path
    target: Target
    version: str = "0.1.0"
    name: str | None = None
    precision: Precision | None = None
    context: int | None = None
    sign_key: Path | None = None
    adapters: tuple[tuple[str, Path], ...] = ()  # (name, PEFT LoRA folder), switchable on the device
    quant: str | None = None  # a recipe name from QUANT_RECIPES; default: the target's recipe
    evaluate: bool = False  # measure the quality card against an FP32 build of the same source
    max_ppl_increase: float | None = None  # fail the build above this relative perplexity increase
    model_format: ModelFormat | None = None  # default: the target's
    vision_precision: Precision | None = None  # a vision model's image side; default: the target's
    keep_workdir: bool = False

    def __post_init__(self) -> None:
        if self.output.suffix != SUFFIX:
            raise ConfigError(f"output {self.output} must end in {SUFFIX}")
        if self.output.is_dir():
            raise ConfigError(f"output {self.output} is a directory; give a file name ending in {SUFFIX}")
        if not is_valid_version(self.version):
            raise ConfigError(f"version {self.version!r} is not a semantic version such as 1.0.0")
        if self.name is not None and not is_valid_name(self.name):
            raise ConfigError(
                f"name {self.name!r} must be lowercase letters, digits, '.', '_' or '-' (at most 64)"
            )
        if self.quant is not None and self.quant not in QUANT_RECIPES:
            raise ConfigError(f"unknown --quant {self.quant!r}; known recipes: {', '.join(QUANT_RECIPES)}")
        if self.quant is not None and self.effective_precision not in (Precision.INT4, Precision.INT8):
            raise ConfigError(
                f"--quant {self.quant} is an INT4/INT8 recipe, "
                f"but the precision is {self.effective_precision.value}"
            )
        if (
            self.quant is not None
            and self.recipe.algorithm in OWN_ALGORITHMS
            and self.effective_precision is not Precision.INT4
        ):
            raise ConfigError(f"--quant {self.quant} is an INT4 recipe, but the precision is int8")
        if (self.uses_hqq or self.uses_imatrix) and self.adapters:
            raise ConfigError(
                "switchable LoRA adapters are built with the builder's own quantisation; "
                f"choose a --quant that is not {self.quant or self.recipe.algorithm}, "
                "or build without --adapter"
            )
        if self.effective_model_format is ModelFormat.ORT:
            if self.target.execution_provider is not ExecutionProvider.CPU:
                raise ConfigError(
                    f"--format ort is built here for CPU targets; {self.target.name} is "
                    f"{self.target.execution_provider.value}"
                )
            if self.adapters:
                raise ConfigError("--format ort cannot carry switchable LoRA adapters; use --format onnx")
        if self.measures_quality and self.target.execution_provider is not ExecutionProvider.CPU:
            raise ConfigError(
                f"measuring quality runs the model here, on the CPU; target {self.target.name} is "
                f"{self.target.execution_provider.value}"
            )
        if self.max_ppl_increase is not None and not 0 <= self.max_ppl_increase < 10:
            raise ConfigError(
                f"max_ppl_increase {self.max_ppl_increase} must be a fraction such as 0.05 (5%)"
            )
        if self.vision_precision is not None and self.vision_precision not in VISION_PRECISIONS:
            raise ConfigError(
                f"--vision-precision {self.vision_precision.value} is not one of "
                f"{', '.join(p.value for p in VISION_PRECISIONS)}"
            )
        if self.context is not None and self.context < 64:
            raise ConfigError(f"context {self.context} is below the useful minimum of 64 tokens")
        if (
            not self.chooses_precision
            and self.effective_precision is Precision.FP16
            and self.target.execution_provider is ExecutionProvider.CPU
        ):
            raise ConfigError(
                f"precision fp16 needs a GPU target, but target {self.target.name} runs on the CPU; "
                "use int4, int8 or fp32 for CPU targets"
            )

    @property
    def measures_quality(self) -> bool:
        return self.evaluate or self.max_ppl_increase is not None

    @property
    def recipe(self) -> Recipe:
        """``quant`` if given, else the target's block size and algorithm."""
        if self.quant is not None:
            return QUANT_RECIPES[self.quant]
        return Recipe(self.target.block_size, self.target.algorithm)

    @property
    def chooses_precision(self) -> bool:
        """``--precision auto`` with nothing pinning one: no ``--precision``, a target profile
        that says ``auto``, no ``--quant`` (whose recipes are INT4 ones)."""
        return self.precision is None and self.target.precision is None and self.quant is None

    @property
    def effective_precision(self) -> Precision:
        if self.chooses_precision:
            raise AssertionError("the precision is chosen once the model is read (packager.precision)")
        return self.precision or self.target.precision or Precision.INT4

    @property
    def uses_hqq(self) -> bool:
        """HQQ runs on the builder's FP32 graph; only INT4 builds use it."""
        return (
            not self.chooses_precision
            and self.recipe.algorithm == "hqq"
            and self.effective_precision is Precision.INT4
        )

    @property
    def uses_imatrix(self) -> bool:
        """imatrix rewrites an INT4 build's weights from an FP32 export of the same source."""
        return (
            not self.chooses_precision
            and self.recipe.algorithm == "imatrix"
            and self.effective_precision is Precision.INT4
        )

    @property
    def builder_algorithm(self) -> str:
        """The algorithm the builder is asked for: its default where edgephi quantises itself."""
        return "default" if self.recipe.algorithm in OWN_ALGORITHMS else self.recipe.algorithm

    @property
    def effective_model_format(self) -> ModelFormat:
        return self.model_format or self.target.model_format

    @property
    def effective_vision_precision(self) -> Precision:
        return self.vision_precision or self.target.vision_precision

    @property
    def effective_context(self) -> int:
        return self.context or self.target.context

    def display(self) -> str:
        """The effective settings, printed before the build starts."""
        rows = [
            ("source", self.source),
            ("output", str(self.output)),
            ("name", self.name or "(from the source)"),
            ("version", self.version),
            ("target", f"{self.target.name} ({self.target.execution_provider.value})"),
            (
                "precision",
                "auto: chosen for the target once the model is read"
                if self.chooses_precision
                else self.effective_precision.value,
            ),
            ("image side", f"{self.effective_vision_precision.value} (vision models)"),
            (
                "quantisation",
                f"{self.quant or 'target default'}: block {self.recipe.block_size}, {self.recipe.algorithm}, "
                f"accuracy level {self.target.accuracy_level}, "
                f"{'symmetric' if self.target.symmetric and not self.uses_imatrix else 'asymmetric'}"
                + (
                    f", the most sensitive MatMuls in INT8 within +{self.recipe.int8_budget:.1%} bytes"
                    if self.recipe.int8_budget
                    else ""
                ),
            ),
            ("format", self.effective_model_format.value),
            ("default context", f"{self.effective_context} tokens"),
            ("signing key", str(self.sign_key) if self.sign_key else "(unsigned)"),
            ("adapters", ", ".join(f"{n}={p}" for n, p in self.adapters) or "(none)"),
        ]
        return "\n".join(f"  {k:<16}{v}" for k, v in rows)
