"""``edge-run bench``: how fast a model runs on this device, measured the way users feel it.

Load time once; then ``runs`` repetitions of a prompt of exactly ``prompt_tokens`` tokens
answered with exactly ``tokens`` greedy tokens (end-of-turn suppressed until then), each
giving a time to first token and a decode rate. Reported as medians with the min-max
spread, plus the process's peak resident memory. Numbers, not judgements: comparisons
belong in ``scripts/bench_vs_llamacpp``, which runs everything in one session.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from edgephi.core.errors import ConfigError
from edgephi.runtime.engine import Engine
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.session import Session

FILLER = "The quick brown fox jumps over the lazy dog while the sea rolls in. "


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values))

    def text(self, unit: str, scale: float = 1.0, digits: int = 1) -> str:
        lo, mid, hi = (f"{v * scale:.{digits}f}" for v in (self.low, self.median, self.high))
        return f"{mid} {unit} ({lo}-{hi})"


@dataclass(frozen=True)
class BenchResult:
    model: str
    threads: int
    load_s: float
    prompt_tokens: int
    generated_tokens: int
    runs: int
    ttft_s: Spread
    decode_tokens_per_s: Spread
    peak_rss_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("model", f"{self.model} ({self.threads} threads)"),
            ("load", f"{self.load_s * 1000:.0f} ms"),
            ("TTFT", self.ttft_s.text("ms", 1000, 0) + f" for {self.prompt_tokens} prompt tokens"),
            ("decode", self.decode_tokens_per_s.text("tok/s") + f" over {self.generated_tokens} tokens"),
            ("peak RSS", f"{self.peak_rss_bytes / 2**20:.0f} MiB"),
            ("runs", f"{self.runs} (median, min-max)"),
        ]
        return "\n".join(f"{k:<10}{v}" for k, v in rows)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def prompt_of(engine: Engine, tokens: int) -> str:
    """A plain prompt of exactly ``tokens`` tokens (as the model's tokenizer counts)."""
    if tokens < 1 or tokens >= engine.context:
        raise ConfigError(f"prompt tokens must be between 1 and {engine.context - 1}, not {tokens}")
    text = FILLER * (tokens // max(1, engine.count_tokens(FILLER)) + 2)
    ids = engine._tokenizer.encode(text)[:tokens]
    prompt = str(engine._tokenizer.decode(ids))
    # Decoding and re-encoding can merge or split at the edges; trim until it is exact.
    while engine.count_tokens(prompt) > tokens:
        prompt = prompt[:-1]
    return prompt


def run(engine_factory: Any, *, prompt_tokens: int = 128, tokens: int = 64, runs: int = 5) -> BenchResult:
    """``engine_factory()`` loads the model (timed); then measure ``runs`` answers."""
    if runs < 1 or tokens < 2:
        raise ConfigError("bench needs at least 1 run and 2 generated tokens")
    start = time.perf_counter()
    engine: Engine = engine_factory()
    load_s = time.perf_counter() - start
    prompt = prompt_of(engine, prompt_tokens)
    options = GenerationOptions(max_tokens=tokens, min_tokens=tokens, temperature=0.0)
    if engine.count_tokens(prompt) + tokens > engine.context:
        raise ConfigError(f"{prompt_tokens} + {tokens} tokens do not fit the {engine.context}-token context")
    # A one-shot session, as `edge-run -p` answers: its KV cache sized for this answer.
    session = Session(engine, one_shot=True)
    "".join(engine.stream_prompt(prompt, options, session=session))  # warm-up: first-run allocations
    ttft, decode = [], []
    for _ in range(runs):
        # The same prompt again would come from the KV cache: time a cold prefill.
        session.reset()
        answer = engine.stream_prompt(prompt, options, session=session)
        "".join(answer)
        stats = answer.stats
        assert stats is not None
        ttft.append(stats.ttft_s)
        decode.append(stats.decode_tokens_per_s)
    return BenchResult(
        model=engine.model_name,
        threads=engine.threads,
        load_s=load_s,
        prompt_tokens=engine.count_tokens(prompt),
        generated_tokens=tokens,
        runs=runs,
        ttft_s=Spread.of(ttft),
        decode_tokens_per_s=Spread.of(decode),
        peak_rss_bytes=peak_rss_bytes(),
    )
