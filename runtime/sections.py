"""The manifest's inner sections, typed: ``target``, ``source``, ``model`` (with its
``generation``, ``graph``, ``sessions`` and ``vision``) and ``memory``.

Where it sits: ``edgephi.runtime.manifest`` reads each section with ``from_dict`` when it
reads a manifest and writes it back with ``to_dict``; the packager (``pipeline``,
``finalize``) builds them, and the planner (``runtime.memory``), the loader and both CLIs
read their fields by name instead of spelling string keys.

The rules are the bundle format's (docs/bundle-format.md §2): every key is optional — a
bundle of an older minor version lacks some, and whoever needs a figure says which one is
missing — but a key that is present must have its type, so a malformed section is a
``BundleFormatError`` when the manifest is read, not a ``ConfigError`` in the planner
later. Keys this reader does not know (a newer minor version's) are kept in ``extra`` and
written back, and values are kept as read (an integer stays an integer in a float field),
so a parsed section serialises to the bytes it came from and signatures still verify.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from edgephi.core.errors import BundleFormatError
from edgephi.targets.profile import ExecutionProvider, KVCache, ModelFormat, Precision

S = TypeVar("S", bound="Section")


@dataclass(frozen=True)
class Section:
    """Base of the typed sections: known keys are fields (``None`` when absent), the rest
    stays in ``extra``. A field's JSON key is its name, or ``metadata["key"]``."""

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    @classmethod
    def from_dict(cls: type[S], data: Any, where: str = "") -> S:
        where = where or cls._where()
        if not isinstance(data, dict):
            raise BundleFormatError(f"manifest {where} must be an object")
        known = _known(cls)
        values = {
            name: _read(data[key], hint, f"{where}.{key}")
            for key, (name, hint) in known.items()
            if key in data
        }
        extra = {k: v for k, v in data.items() if k not in known}
        cls._check_extra(extra, where)
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for key, (name, _hint) in _known(type(self)).items():
            value = getattr(self, name)
            if value is not None:
                out[key] = _write(value)
        return dict(sorted(out.items()))  # as a canonical manifest lists them

    @classmethod
    def _where(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def _check_extra(cls, extra: dict[str, Any], where: str) -> None:
        """Rules for keys this reader does not know; none by default."""


_KNOWN: dict[type, dict[str, tuple[str, Any]]] = {}


def _known(cls: type[Section]) -> dict[str, tuple[str, Any]]:
    """JSON key → (field name, type) of a section class, from its annotations."""
    if cls in _KNOWN:
        return _KNOWN[cls]
    hints = typing.get_type_hints(cls)
    return {
        f.metadata.get("key", f.name): (f.name, _optional(hints[f.name]))
        for f in fields(cls)
        if f.name != "extra"
    }


def _optional(hint: Any) -> Any:
    """``X | None`` → ``X``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


_NAMES = {str: "a string", int: "a non-negative integer", float: "a number", bool: "true or false"}


def _read(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against ``hint`` and return it typed (sections, enums, tuples)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise BundleFormatError(f"manifest {where} must be a list")
        return tuple(_read(v, typing.get_args(hint)[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleFormatError(f"manifest {where} must be an object")
        inner = typing.get_args(hint)[1]
        return {k: _read(v, inner, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint.from_dict(value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in hint)
            raise BundleFormatError(f"manifest {where} is {value!r}, not one of {allowed}") from None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise BundleFormatError(f"manifest {where} must be {_NAMES[hint]}, not {value!r}")
    return value


def _write(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_write(v) for v in value]
    if isinstance(value, dict):
        return {k: _write(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class TargetFacts(Section):
    """``target``: the device profile the bundle was built for (``Target.to_dict()``)."""

    name: str | None = None
    description: str | None = None
    execution_provider: ExecutionProvider | None = None
    precision: Precision | None = None
    os: str | None = None
    arch: str | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    symmetric: bool | None = None
    algorithm: str | None = None
    kv_cache: KVCache | None = None
    threads: int | None = None
    ram_gb: float | None = None
    bandwidth_gbs: float | None = None
    context: int | None = None
    model_format: ModelFormat | None = None
    vision_precision: Precision | None = None

    @classmethod
    def _where(cls) -> str:
        return "target"


@dataclass(frozen=True)
class SourceFacts(Section):
    """``source``: where the weights came from."""

    kind: str | None = None  # hf-folder, hf-id or gguf
    ref: str | None = None  # a file name or a hub id

    @classmethod
    def _where(cls) -> str:
        return "source"


@dataclass(frozen=True)
class GenerationDefaults(Section):
    """``model.generation``: the answer defaults shipped in genai_config's ``search``."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    origin: str | None = field(default=None, metadata={"key": "from"})  # generation_config or edgephi


@dataclass(frozen=True)
class GraphFacts(Section):
    """``model.graph``: what strip-and-fuse made of the decoder (absent for GPU targets)."""

    optimization: str | None = None
    format: ModelFormat | None = None
    nodes: int | None = None
    nodes_before: int | None = None


@dataclass(frozen=True)
class SessionFacts(Section):
    """One of ``model.sessions``: an ONNX model og runs, with its non-cache inputs and outputs."""

    file: str | None = None
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EncoderFacts(Section):
    """``model.vision.encoder``: the image encoder's shape, which decides its scratch memory."""

    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    mlp: int | None = None
    patch: int | None = None
    image_size: int | None = None
    order: str | None = None  # sub_glb or glb_sub
    precision: Precision | None = None


@dataclass(frozen=True)
class VisionFacts(Section):
    """``model.vision``: what a picture costs and the encoder that sees it."""

    formats: tuple[str, ...] | None = None
    processor: str | None = None
    crop: int | None = None
    max_crops: int | None = None
    tokens_per_crop: int | None = None
    max_image_tokens: int | None = None
    max_pixels: int | None = None
    encoder: EncoderFacts | None = None


@dataclass(frozen=True)
class ModelFacts(Section):
    """``model``: the shapes the memory plan and the install-time checks read."""

    architecture: str | None = None
    model_type: str | None = None
    context_length: int | None = None  # the model's maximum
    default_context: int | None = None  # the shipped search.max_length
    vocab_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_size: int | None = None
    hidden_size: int | None = None
    kv_cache: KVCache | None = None
    lm_head_pruned: bool | None = None
    generation: GenerationDefaults | None = None
    graph: GraphFacts | None = None
    modalities: tuple[str, ...] | None = None
    sessions: dict[str, SessionFacts] | None = None
    vision: VisionFacts | None = None

    @classmethod
    def _where(cls) -> str:
        return "model"


@dataclass(frozen=True)
class MemoryFacts(Section):
    """``memory``: bytes the model needs, all non-negative integers (unknown keys too)."""

    weights_bytes: int | None = None
    kv_bytes_per_token: int | None = None  # for the cache type the bundle was built with
    kv_bytes_per_token_fp16: int | None = None
    vision_scratch_bytes: int | None = None  # the encoder's working memory for one picture

    @classmethod
    def _where(cls) -> str:
        return "memory"

    @classmethod
    def _check_extra(cls, extra: dict[str, Any], where: str) -> None:
        for key, value in extra.items():
            _read(value, int, f"{where}.{key}")
