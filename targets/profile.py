"""A device profile: what the packager builds for, and what the runtime expects to find.

Profiles are data. The built-in ones live as JSON files beside this module
(``profiles/*.json``) and a user can drop another JSON file into a profile folder
(see ``edgephi.targets.registry``) without writing code; both are checked by ``Target``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

from edgephi.core.errors import ConfigError


class Precision(str, enum.Enum):
    """Weight precision of the exported decoder."""

    INT4 = "int4"
    INT8 = "int8"
    FP16 = "fp16"
    FP32 = "fp32"


class ExecutionProvider(str, enum.Enum):
    """onnxruntime execution provider the model is built for (the builder's ``-e``)."""

    CPU = "cpu"
    CUDA = "cuda"
    DML = "dml"


class KVCache(str, enum.Enum):
    """Element type of the KV cache: fp32 (CPU default) or int8 (calibrated per channel)."""

    FP32 = "fp32"
    INT8 = "int8"


class ModelFormat(str, enum.Enum):
    """How the decoder graph is stored: ONNX, or onnxruntime's ORT format for mobile builds."""

    ONNX = "onnx"
    ORT = "ort"


# The builder's base methods and presets for weight-only quantisation (its ``algo_config``),
# and ``hqq``: edgephi's pass over the builder's FP32 graph (``edgephi.packager.hqq``).
ALGORITHMS = ("default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed", "hqq", "imatrix")
AUTO = "auto"  # a profile's precision chosen per model (``Target.precision`` None)
_BLOCK_SIZES = (16, 32, 64, 128, 256)
# A vision model's image encoder and embedding table (``edgephi.packager.vision``).
VISION_PRECISIONS = (Precision.FP32, Precision.INT8)


@dataclass(frozen=True)
class Target:
    """One device class.

    ``precision`` pins the weight precision; ``None`` (``"auto"`` in a profile, as every
    built-in CPU profile says) lets the packager choose per model from ``ram_gb`` and
    ``bandwidth_gbs`` (``edgephi.packager.precision``);
    ``os``/``arch`` describe where the bundle runs (``any`` for portable CPU bundles);
    ``block_size``, ``accuracy_level``, ``symmetric`` and ``algorithm`` are the INT4/INT8
    recipe the builder gets; ``kv_cache`` int8 quantises the KV cache (4x smaller than
    fp32, calibrated at build time); ``threads`` 0 means "one per usable core" at run
    time; ``ram_gb`` is the typical device memory, ``bandwidth_gbs`` its sustained memory
    bandwidth (what decode speed is bound by; 0: unknown) and ``context`` the default context;
    ``model_format`` ``ort`` ships the decoder in ORT format with the operator list a
    reduced onnxruntime build needs; ``vision_precision`` is how a vision model's image
    encoder and embedding table are stored (``fp32``, or ``int8``: a quarter of the bytes).
    """

    name: str
    description: str
    execution_provider: ExecutionProvider
    precision: Precision | None = None
    os: str = "any"
    arch: str = "any"
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True
    algorithm: str = "default"
    kv_cache: KVCache = KVCache.FP32
    threads: int = 0
    ram_gb: float = 0.0
    bandwidth_gbs: float = 0.0
    context: int = 2048
    model_format: ModelFormat = ModelFormat.ONNX
    vision_precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"target name {self.name!r} must be letters, digits, '-' or '_'")
        if self.block_size not in _BLOCK_SIZES:
            raise ConfigError(
                f"target {self.name}: block_size {self.block_size} is not one of {_BLOCK_SIZES}"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"target {self.name}: accuracy_level must be 0-4, not {self.accuracy_level}")
        if self.accuracy_level == 4 and self.execution_provider is not ExecutionProvider.CPU:
            raise ConfigError(
                f"target {self.name}: accuracy_level 4 (int8 activations) is a CPU setting, "
                f"but execution_provider is {self.execution_provider.value}"
            )
        if self.precision is Precision.FP16 and self.execution_provider is ExecutionProvider.CPU:
            raise ConfigError(
                f"target {self.name}: precision fp16 needs a GPU execution_provider, not cpu "
                "(the builder has no FP16 CPU model)"
            )
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"target {self.name}: algorithm {self.algorithm!r} is not one of {ALGORITHMS}")
        if self.kv_cache is KVCache.INT8 and self.execution_provider is not ExecutionProvider.CPU:
            raise ConfigError(
                f"target {self.name}: kv_cache int8 is built here for the cpu execution_provider only, "
                f"not {self.execution_provider.value}"
            )
        if self.model_format is ModelFormat.ORT and self.execution_provider is not ExecutionProvider.CPU:
            raise ConfigError(
                f"target {self.name}: model_format ort is built here for the cpu execution_provider only"
            )
        if self.vision_precision not in VISION_PRECISIONS:
            raise ConfigError(
                f"target {self.name}: vision_precision {self.vision_precision.value} is not one of "
                f"{', '.join(p.value for p in VISION_PRECISIONS)}"
            )
        if self.ram_gb < 0 or self.bandwidth_gbs < 0:
            raise ConfigError(f"target {self.name}: ram_gb and bandwidth_gbs must be >= 0 (0 = unknown)")
        if self.threads < 0:
            raise ConfigError(f"target {self.name}: threads must be >= 0 (0 = one per core)")
        if self.context < 64:
            raise ConfigError(f"target {self.name}: context {self.context} is below the useful minimum of 64")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        """Build a profile from JSON data, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"target profile has unknown keys {unknown}; known keys are {sorted(known)}")
        values = dict(data)
        try:
            values["execution_provider"] = ExecutionProvider(values["execution_provider"])
            if values.get("precision") == AUTO:
                values["precision"] = None
            for key in ("precision", "vision_precision"):
                if values.get(key) is not None:
                    values[key] = Precision(values[key])
            if "kv_cache" in values:
                values["kv_cache"] = KVCache(values["kv_cache"])
            if "model_format" in values:
                values["model_format"] = ModelFormat(values["model_format"])
            return cls(**values)
        except KeyError as exc:
            raise ConfigError(f"target profile is missing the key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"target profile {data.get('name', '?')!r} is invalid: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        if self.precision is None:
            out["precision"] = AUTO
        return out

    @property
    def precision_name(self) -> str:
        return self.precision.value if self.precision else AUTO
