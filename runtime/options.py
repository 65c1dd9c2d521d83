"""Generation options: one typed object shared by the CLI, the Python API and (later) the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgephi.runtime.errors import ConfigError


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate one answer.

    ``None`` means "the bundle's default", which comes from the model author's
    generation config as recorded by the builder. ``temperature=0`` means greedy.
    Setting ``top_p``, ``top_k`` or ``seed`` without a temperature turns sampling on.
    """

    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature is not None and not 0.0 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature must be between 0 and 10, not {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, not {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be between 0 and 2^31-1, not {self.seed}")
        if self.temperature == 0.0 and (self.top_p is not None or self.top_k is not None):
            raise ConfigError("temperature 0 means greedy decoding; top_p and top_k only apply when sampling")

    @property
    def sampling(self) -> bool | None:
        if self.temperature is not None:
            return self.temperature > 0.0
        if self.top_p is not None or self.top_k is not None or self.seed is not None:
            return True
        return None

    def search_options(self) -> dict[str, Any]:
        """The onnxruntime-genai search options these settings translate to (max_length aside)."""
        out: dict[str, Any] = {}
        if self.sampling is not None:
            out["do_sample"] = self.sampling
        if self.temperature:
            out["temperature"] = float(self.temperature)
        if self.top_p is not None:
            out["top_p"] = float(self.top_p)
        if self.top_k is not None:
            out["top_k"] = int(self.top_k)
        if self.seed is not None:
            out["random_seed"] = int(self.seed)
        return out
