"""One answer: its bookkeeping while it runs (``Run``), its statistics (``Stats``), where a
stop string cuts it (``StopMatcher``), and the stream a caller iterates (``Answer``).

Where it sits: a ``Session`` (``edgephi.runtime.session``) makes a ``Run`` for each answer,
feeds it the tokens its generator chose and hands the caller an ``Answer`` whose ``stats``
the run fills in when the answer ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgephi.core.errors import ConfigError
from edgephi.runtime.options import GenerationOptions

if TYPE_CHECKING:
    from edgephi.runtime.engine import LogitsHook


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens) or "context" (window full)
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused, not computed again
    cache_note: str = ""  # why this answer could not use the session's cache, if it could not

    def to_dict(self) -> dict[str, Any]:
        out = {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_s": round(self.ttft_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "total_s": round(self.total_s, 4),
            "finish_reason": self.finish_reason,
        }
        if self.cache_note:
            out["cache_note"] = self.cache_note
        return out

    def line(self) -> str:
        cache = f"not cached: {self.cache_note}" if self.cache_note else f"{self.cached_tokens} cached"
        return (
            f"[{self.prompt_tokens} prompt tokens ({cache}), {self.generated_tokens} generated, "
            f"TTFT {self.ttft_s * 1000:.0f} ms, {self.decode_tokens_per_s:.1f} tok/s, "
            f"finish: {self.finish_reason}]"
        )


class StopMatcher:
    """Cuts the output at the first stop string, even one split across tokens.

    Text that could be the start of a stop string is held back until the next chunk
    shows whether it is; ``flush`` releases it when generation ends without a stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            emit, self.pending = self.pending[:cut], ""
            return emit, True
        safe = len(self.pending) - self.hold
        # Keep back the longest tail that is a prefix of some stop string.
        for start in range(max(0, safe), len(self.pending)):
            tail = self.pending[start:]
            if any(s.startswith(tail) for s in self.stops):
                emit, self.pending = self.pending[:start], self.pending[start:]
                return emit, False
        emit, self.pending = self.pending, ""
        return emit, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Run:
    """The bookkeeping of one answer: counts, timings, logits adjustments."""

    def __init__(
        self,
        n_prompt: int,
        max_length: int,
        options: GenerationOptions,
        hook: LogitsHook | None,
        start: float,
    ) -> None:
        self.n_prompt, self.max_length, self.options, self.hook, self.start = (
            n_prompt,
            max_length,
            options,
            hook,
            start,
        )
        self.generated = 0
        self.steps = 0
        self.cached = 0
        self.cache_note = ""
        self.ids: list[int] = []
        self.first_at = 0.0
        self.finish = "cancelled"
        self.final: Stats | None = None  # the stats, once the answer has ended
        self.needs_logits = hook is not None or options.min_p is not None

    def took(self, token: int) -> None:
        self.generated += 1
        self.ids.append(token)
        if self.generated == 1:
            self.first_at = time.perf_counter()

    def hooked(self, logits: Any) -> Any:
        """A copy of ``logits`` as the logits hook (if any) changed them."""
        import numpy as np

        out = np.array(logits, dtype=np.float32, copy=True)
        if self.hook is not None:
            out = np.asarray(self.hook(list(self.ids), out), dtype=np.float32)
            if out.shape != logits.shape:
                raise ConfigError(f"the logits hook returned shape {out.shape}, expected {logits.shape}")
        return out

    def adjust(self, logits: Any) -> Any:
        """The hook's and min-p's changes to og's logits, for og to choose from."""
        import numpy as np

        out = self.hooked(logits)
        if self.options.min_p is not None:
            # min-p: keep tokens whose probability is at least min_p x that of the likeliest.
            flat = out.reshape(-1)
            temperature = self.options.temperature or 1.0
            scaled = flat / temperature
            probs = np.exp(scaled - scaled.max())
            flat[probs < self.options.min_p * probs.max()] = -np.inf
        return out

    def natural_finish(self) -> str:
        if self.n_prompt + self.generated >= self.max_length:
            return "length" if self.generated >= self.options.max_tokens else "context"
        return "stop"

    def stats(self) -> Stats:
        end = time.perf_counter()
        first_at = self.first_at or end
        decode_s = end - first_at
        n = self.generated
        return Stats(
            prompt_tokens=self.n_prompt,
            generated_tokens=n,
            ttft_s=first_at - self.start,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=end - self.start,
            finish_reason=self.finish,
            cached_tokens=self.cached,
            cache_note=self.cache_note,
        )


class Answer(Iterator[str]):
    """One answer as it streams: iterate it for the text; its ``stats`` are there once it
    has ended — run out, closed early (Ctrl-C, a client gone) or failed. What
    ``Session.generate``, ``Engine.stream`` and ``Conversation.ask`` return: the statistics
    come with the stream they describe, not through the engine or the session."""

    def __init__(self, chunks: Iterator[str], stats: Callable[[], Stats | None]) -> None:
        self._chunks = chunks
        self._stats = stats

    def __iter__(self) -> Answer:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        """Stop the answer here (its stats then say how far it got)."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    @property
    def stats(self) -> Stats | None:
        """The answer's statistics once it has ended; ``None`` before."""
        return self._stats()
