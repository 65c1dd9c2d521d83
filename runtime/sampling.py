"""Choosing a token in Python: what a generator that outlives its answer cannot change.

Where it sits: a ``Session`` (``edgephi.runtime.session``) keeps one onnxruntime-genai
generator across answers. og reads some search options afresh on every step from the
generator's parameters — min length, repetition penalty, no-repeat n-grams — so a greedy
answer sets those per answer and og's C++ loop does the rest. But og fixes the sampling
method and its random generator when a generator is created, so an answer that samples
draws its tokens here, from the raw logits, as og would: the same penalties first
(``penalize``), then temperature, top-k, top-p (og's order), min-p, and a numpy generator
seeded per answer, so ``seed`` reproduces an answer on a live generator too.

Settings left unset come from the bundle's ``genai_config.json`` search section, which the
builder filled from the model author's generation config: the defaults og itself applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgephi.runtime.options import GenerationOptions

# Tokens whose probability is looked at before a full sort, for top-p over the whole vocabulary.
_NUCLEUS_WINDOW = 1024


@dataclass(frozen=True)
class SearchDefaults:
    """The bundle's own search settings (og's defaults where the config says nothing)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_genai(cls, genai: dict[str, Any]) -> SearchDefaults:
        search = genai.get("search") or {}
        base = cls()
        return cls(
            do_sample=bool(search.get("do_sample", base.do_sample)),
            temperature=float(search.get("temperature", base.temperature)),
            top_k=int(search.get("top_k", base.top_k)),
            top_p=float(search.get("top_p", base.top_p)),
            repetition_penalty=float(search.get("repetition_penalty", base.repetition_penalty)),
        )


@dataclass(frozen=True)
class Penalties:
    """What og applies to the logits before choosing: resolved for one answer."""

    repetition: float = 1.0
    no_repeat_ngram: int = 0
    min_tokens: int = 0

    @classmethod
    def resolve(cls, options: GenerationOptions, defaults: SearchDefaults) -> Penalties:
        repetition = options.repetition_penalty
        return cls(
            repetition=defaults.repetition_penalty if repetition is None else repetition,
            no_repeat_ngram=options.no_repeat_ngram,
            min_tokens=options.min_tokens,
        )

    def og_options(self, prompt_tokens: int) -> dict[str, Any]:
        """The same penalties as og search options for a live generator (min length is absolute)."""
        return {
            "repetition_penalty": float(self.repetition),
            "no_repeat_ngram_size": int(self.no_repeat_ngram),
            "min_length": prompt_tokens + self.min_tokens if self.min_tokens else 0,
        }


NEUTRAL = Penalties()


def penalize(logits: Any, sequence: Any, generated: int, penalties: Penalties, eos: tuple[int, ...]) -> Any:
    """``logits`` (float32, vocabulary-sized) after og's penalties, for the token after ``sequence``.

    Mirrors og's ``ApplyMinLengthToLogits``, ``ApplyRepetitionPenaltyToLogits`` (every token
    seen in the whole sequence, prompt included) and ``ApplyNoRepeatNgramToLogits``.
    """
    import numpy as np

    out = np.array(logits, dtype=np.float32, copy=True).reshape(-1)
    lowest = np.finfo(np.float32).min
    if generated < penalties.min_tokens:
        out[[e for e in eos if 0 <= e < out.size]] = lowest
    seq = np.asarray(sequence, dtype=np.int64)
    if penalties.repetition != 1.0 and seq.size:
        seen = np.unique(seq[(seq >= 0) & (seq < out.size)])
        scores = out[seen]
        out[seen] = np.where(scores < 0, scores * penalties.repetition, scores / penalties.repetition)
    n = penalties.no_repeat_ngram
    if n > 0 and seq.size >= n:
        if n == 1:
            banned = seq
        else:
            windows = np.lib.stride_tricks.sliding_window_view(seq, n)
            hits = np.all(windows[:, :-1] == seq[-(n - 1) :], axis=1)
            banned = windows[hits, -1]
        out[banned[(banned >= 0) & (banned < out.size)]] = lowest
    return out.reshape(np.shape(logits))


@dataclass(frozen=True)
class Sampler:
    """Sampling settings resolved for one answer; ``None`` from ``resolve`` means greedy."""

    temperature: float
    top_k: int  # og's rule: only above 1 does it cut
    top_p: float  # only in (0, 1) does it cut
    min_p: float | None
    seed: int | None

    @classmethod
    def resolve(cls, options: GenerationOptions, defaults: SearchDefaults) -> Sampler | None:
        sample = options.sampling if options.sampling is not None else defaults.do_sample
        temperature = options.temperature if options.temperature is not None else defaults.temperature
        top_k = options.top_k if options.top_k is not None else defaults.top_k
        # og's greedy test: no sampling, top-k of 1 or temperature 0.
        if not sample or top_k == 1 or temperature == 0:
            return None
        top_p = options.top_p if options.top_p is not None else defaults.top_p
        return cls(float(temperature), int(top_k), float(top_p), options.min_p, options.seed)

    def rng(self) -> Any:
        """The answer's random generator: ``seed`` reproduces it, none draws a fresh one."""
        import numpy as np

        return np.random.default_rng(self.seed)

    def pick(self, logits: Any, rng: Any) -> int:
        """Draw one token id from ``logits`` (already penalized) with ``rng``."""
        import numpy as np

        scores = np.asarray(logits, dtype=np.float32).reshape(-1)
        ids, probs = self._candidates(scores)
        if self.min_p is not None:
            keep = probs >= self.min_p * probs.max()
            ids, probs = ids[keep], probs[keep]
        index = int(np.searchsorted(np.cumsum(probs / probs.sum()), rng.random(), side="right"))
        return int(ids[min(index, ids.size - 1)])

    def _candidates(self, scores: Any) -> tuple[Any, Any]:
        """The token ids og would sample from, likeliest first, with their probabilities."""
        import numpy as np

        vocab = scores.size
        cut_p = 0.0 < self.top_p < 1.0
        if self.top_k > 1:
            order = self._top(scores, min(self.top_k, vocab))
        elif cut_p:
            order = self._top(scores, min(_NUCLEUS_WINDOW, vocab))
        else:
            order = np.arange(vocab)
        probs = np.exp((scores[order] - scores[order].max()) / self.temperature).astype(np.float64)
        if cut_p:
            if self.top_k <= 1:
                # The window's probabilities against the whole vocabulary's mass.
                whole = np.exp((scores - scores.max()) / self.temperature, dtype=np.float64).sum()
                cum = np.cumsum(probs) / whole
                if cum[-1] < self.top_p and order.size < vocab:
                    order = np.argsort(-scores, kind="stable")
                    probs = np.exp((scores[order] - scores[order[0]]) / self.temperature).astype(np.float64)
                    cum = np.cumsum(probs) / probs.sum()
            else:
                cum = np.cumsum(probs) / probs.sum()
            keep = int(np.searchsorted(cum, self.top_p)) + 1
            order, probs = order[:keep], probs[:keep]
        return order, probs

    @staticmethod
    def _top(scores: Any, k: int) -> Any:
        import numpy as np

        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]


def forced(token: int, like: Any) -> Any:
    """Logits shaped as ``like`` under which og's greedy step picks ``token``: how a Python
    choice reaches og (a forced token goes through og's own step, so its bookkeeping holds)."""
    import numpy as np

    out = np.full(np.shape(like), np.finfo(np.float32).min, dtype=np.float32)
    out.reshape(-1)[token] = 0.0
    return out
