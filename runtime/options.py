"""Generation options: one typed object shared by the CLI, the Python API and the server.

Each option maps to onnxruntime-genai's search options where og has it; min-p, stop
strings and minimum new tokens are applied by ``Engine`` itself. ``check()`` rejects
combinations that cannot mean anything, naming both options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgephi.core.errors import ConfigError

MAX_STOP_STRINGS = 8


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate one answer.

    ``None`` means "the bundle's default", which comes from the model author's generation
    config as recorded by the builder. ``temperature=0`` means greedy. Setting ``top_p``,
    ``top_k``, ``min_p`` or ``seed`` without a temperature turns sampling on.
    ``json_schema`` / ``regex`` / ``grammar`` (Lark, as llguidance reads it; the server's
    tool calls use it) constrain the output (og's guidance).
    """

    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    repetition_penalty: float | None = None
    no_repeat_ngram: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = True
    stop: tuple[str, ...] = ()
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    adapter: str | None = None  # a LoRA adapter shipped in the bundle

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(
                f"min_tokens {self.min_tokens} must be between 0 and max_tokens {self.max_tokens}"
            )
        if self.temperature is not None and not 0.0 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature must be between 0 and 10, not {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k is not None and not 1 <= self.top_k < 2**31:
            raise ConfigError(f"top_k must be between 1 and 2^31-1, not {self.top_k}")
        if self.min_p is not None and not 0.0 < self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in (0, 1], not {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be between 0 and 2^31-1, not {self.seed}")
        if self.repetition_penalty is not None and not 0.0 < self.repetition_penalty <= 10.0:
            raise ConfigError(f"repetition_penalty must be in (0, 10], not {self.repetition_penalty}")
        if not 0 <= self.no_repeat_ngram < 2**31:
            raise ConfigError(f"no_repeat_ngram must be between 0 and 2^31-1, not {self.no_repeat_ngram}")
        if not 1 <= self.num_beams <= 16:
            raise ConfigError(f"num_beams must be between 1 and 16, not {self.num_beams}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ConfigError(f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings")
        self._check_combinations()

    def _check_combinations(self) -> None:
        sampling_opts = [n for n in ("top_p", "top_k", "min_p", "seed") if getattr(self, n) is not None]
        if self.temperature == 0.0 and sampling_opts:
            raise ConfigError(
                f"temperature 0 means greedy decoding; {', '.join(sampling_opts)} only apply when sampling"
            )
        if self.num_beams > 1:
            if self.sampling:
                raise ConfigError(
                    f"num_beams {self.num_beams} is beam search, which is deterministic; "
                    "drop temperature/top_p/top_k/min_p/seed or use num_beams 1"
                )
            if self.constraint is not None:
                raise ConfigError("json_schema/regex constrain one sequence; use them with num_beams 1")
        given = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} are ways to constrain the output; give one")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except ValueError as exc:
                raise ConfigError(f"json_schema is not valid JSON: {exc}") from None

    @property
    def sampling(self) -> bool | None:
        if self.temperature is not None:
            return self.temperature > 0.0
        if any(v is not None for v in (self.top_p, self.top_k, self.min_p, self.seed)):
            return True
        return None

    @property
    def constraint(self) -> tuple[str, str] | None:
        """og's guidance for these options: ``(type, data)``, or ``None``."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "lark_grammar", self.grammar
        return None

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    def search_options(self) -> dict[str, Any]:
        """The onnxruntime-genai search options these settings translate to (lengths aside)."""
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
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = float(self.repetition_penalty)
        if self.no_repeat_ngram:
            out["no_repeat_ngram_size"] = int(self.no_repeat_ngram)
        if self.beam_search:
            out.update(
                num_beams=self.num_beams,
                length_penalty=float(self.length_penalty),
                early_stopping=self.early_stopping,
                num_return_sequences=1,
            )
        return out
