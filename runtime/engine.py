"""The generation loop on the device: an installed model folder in, text chunks out.

``Engine`` wraps onnxruntime-genai. It loads the model with an explicit thread count and
context length applied through og's config overlay (the installed files are never
edited), turns chat messages into a prompt with the model's own chat template, and
``stream()`` yields decoded text as tokens arrive; the statistics of the last call are
in ``last_stats``. onnxruntime-genai's telemetry is switched off before anything loads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.runtime.errors import ContextOverflow, GenerationError
from edgephi.runtime.options import GenerationOptions

Message = dict[str, str]


def default_threads() -> int:
    """Cores this process may run on (honours taskset/cgroup cpusets, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _og() -> Any:
    import onnxruntime_genai as og

    # og reports usage events unless told not to; a device runtime must not phone home.
    og.disable_telemetry_events()
    return og


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens) or "context" (window full)

    def line(self) -> str:
        return (
            f"[{self.prompt_tokens} prompt tokens, {self.generated_tokens} generated, "
            f"TTFT {self.ttft_s * 1000:.0f} ms, {self.decode_tokens_per_s:.1f} tok/s, "
            f"finish: {self.finish_reason}]"
        )


def _fold_system(messages: Sequence[Message]) -> list[Message]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    else:
        rest.insert(0, {"role": "user", "content": system})
    return rest


class Engine:
    """One loaded model. Not thread-safe: one generation at a time."""

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int | None = None,
        context: int | None = None,
        chat_template: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.threads = threads or default_threads()
        genai = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
        shipped = int(genai.get("search", {}).get("max_length") or 2048)
        model_limit = int(genai.get("model", {}).get("context_length") or shipped)
        self.context = min(context or shipped, model_limit)
        if self.context < 2:
            raise GenerationError(f"context length {self.context} is too small to generate anything")
        self.has_chat_template = chat_template
        og = _og()
        try:
            config = og.Config(str(self.model_dir))
            config.overlay(
                json.dumps(
                    {
                        "model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}},
                        "search": {"max_length": self.context},
                    }
                )
            )
            self._model = og.Model(config)
            self._tokenizer = og.Tokenizer(self._model)
        except Exception as exc:  # og raises plain RuntimeError/OSError with its own text
            raise GenerationError(f"onnxruntime-genai could not load {self.model_dir}: {exc}") from None
        self.last_stats: Stats | None = None
        self.verification: Any = None  # set by the loader: how the bundle's origin was checked
        self.plan: Any = None  # set by the loader: the memory plan behind ``context``

    # --- prompts ------------------------------------------------------------------------

    def format_prompt(self, messages: Sequence[Message]) -> str:
        """Render chat messages with the model's chat template (plain text without one)."""
        if not self.has_chat_template:
            return "\n\n".join(m["content"] for m in messages)
        prompt = self._render(messages)
        system = [m for m in messages if m["role"] == "system" and m["content"]]
        if system and system[0]["content"] not in prompt:
            # Some templates (Phi-3's original one among them) silently drop system messages;
            # the user asked for one, so put it at the head of the first user turn instead.
            prompt = self._render(_fold_system(messages))
        return prompt

    def _render(self, messages: Sequence[Message]) -> str:
        try:
            return str(
                self._tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)
            )
        except Exception as exc:
            raise GenerationError(f"the model's chat template failed on these messages: {exc}") from None

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    # --- generation ---------------------------------------------------------------------

    def stream(self, messages: Sequence[Message], options: GenerationOptions | None = None) -> Iterator[str]:
        """Yield the answer to ``messages`` chunk by chunk; stats land in ``last_stats``."""
        return self.stream_prompt(self.format_prompt(messages), options)

    def stream_prompt(self, prompt: str, options: GenerationOptions | None = None) -> Iterator[str]:
        """Like ``stream`` for a prompt that is already formatted."""
        options = options or GenerationOptions()
        og = _og()
        start = time.perf_counter()
        tokens = self._tokenizer.encode(prompt)
        n_prompt = len(tokens)
        if n_prompt >= self.context:
            raise ContextOverflow(f"the prompt is {n_prompt} tokens but the context holds {self.context}")
        # og preallocates the KV cache for max_length, so ask only for what this answer can use.
        max_length = min(self.context, n_prompt + options.max_tokens)
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=max_length, **options.search_options())
        generator = og.Generator(self._model, params)
        decoder = self._tokenizer.create_stream()
        return self._loop(generator, decoder, tokens, n_prompt, max_length, options.max_tokens, start)

    def _loop(
        self,
        generator: Any,
        decoder: Any,
        tokens: Any,
        n_prompt: int,
        max_length: int,
        max_tokens: int,
        start: float,
    ) -> Iterator[str]:
        generated = 0
        first_at = 0.0
        finish = "cancelled"
        try:
            generator.append_tokens(tokens)
            while not generator.is_done():
                generator.generate_next_token()
                token = generator.get_next_tokens()[0]
                generated += 1
                if generated == 1:
                    first_at = time.perf_counter()
                text = decoder.decode(token)
                if text:
                    yield text
            if n_prompt + generated >= max_length:
                finish = "length" if generated >= max_tokens else "context"
            else:
                finish = "stop"
        except GeneratorExit:
            raise
        except Exception as exc:
            raise GenerationError(f"generation failed after {generated} tokens: {exc}") from None
        finally:
            end = time.perf_counter()
            first_at = first_at or end
            decode_s = end - first_at
            self.last_stats = Stats(
                prompt_tokens=n_prompt,
                generated_tokens=generated,
                ttft_s=first_at - start,
                decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
                total_s=end - start,
                finish_reason=finish,
            )
            del generator

    def generate(self, messages: Sequence[Message], options: GenerationOptions | None = None) -> str:
        return "".join(self.stream(messages, options))
