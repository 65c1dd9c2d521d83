"""A session: one onnxruntime-genai generator whose KV cache outlives the answer.

Where it sits: ``Engine`` (``edgephi.runtime.engine``) loads the model and turns messages
into token ids; a ``Session`` owns the generator those ids run on and the ids its KV cache
holds. The engine keeps one session for its own ``stream``/``generate`` (so does every
``Conversation`` of it), and ``edge-run serve`` keeps one per slot the memory plan allows.

How a request reuses the cache. The new prompt is tokenized whole, its longest common
prefix with the cached ids is found, the generator is rewound to it (``rewind_to``) and only
the rest is appended. The generator is created once with ``max_length`` = the planned
context, so its KV buffer is allocated once, as the memory plan counted it.

Why reuse is exact. onnxruntime computes a position's keys and values identically in any
prefill of two or more tokens, wherever the prefill starts, but a one-token decode step
takes other kernels and differs slightly (measured on SmolLM2 INT4: logits up to 0.5 apart) —
enough to turn a greedy answer. So only positions written by a prefill are reused; the
positions an answer's decode steps wrote are re-prefilled first, either by ``settle()`` when
there is time (the chat runs it while the user types, the server once the response is sent)
or as part of the next request. And no prompt tail shorter than two tokens is appended.
With that, an answer from the cache is token for token the answer from a fresh generator.

What does not reuse. og fixes beam search and a JSON-schema/regex constraint when a
generator is created, and cannot rewind a vision model's (phi3v) generator at all: those
answers run on a generator of their own, made after the session's is released (still one
KV cache in memory). Another LoRA adapter changes every key and value, so nothing cached
under the previous one serves: it gets a new session generator (the adapter is bound to it),
whose cache the next answer with that adapter reuses.
``Stats.cache_note`` says why an answer reused nothing. And og fixes the sampling method
and its random generator at creation, so a sampled answer picks its tokens in
``edgephi.runtime.sampling``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgephi.core.errors import ConfigError, EdgeError, GenerationError
from edgephi.runtime.answer import Answer, Run, StopMatcher
from edgephi.runtime.genai import og
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.sampling import NEUTRAL, Penalties, Sampler, forced, penalize

if TYPE_CHECKING:
    from edgephi.runtime.engine import Engine, LogitsHook

VISION_NOTE = "a vision model: og cannot rewind its generator"
ADAPTER_NOTE = "another LoRA adapter: the cache holds the previous one's keys and values"
# A server request takes a slot's cache only if it keeps more than this share of it.
SIMILARITY = 0.5
# Tokens per prefill while settling: a request that arrives waits for one chunk at most.
SETTLE_CHUNK = 64


@dataclass(frozen=True)
class Request:
    """One answer's input, tokenized: what a session matches against its cache."""

    ids: tuple[int, ...]  # the prompt's token ids (a vision prompt's come from og's processor)
    inputs: Any = None  # a vision prompt's named tensors (ids, pixels, image sizes) for og

    @property
    def n_prompt(self) -> int:
        return len(self.ids)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading ids ``a`` and ``b`` share, at most ``limit``."""
    n = 0
    for x, y in zip(a[:limit], b[:limit]):  # noqa: B905 - the shorter one bounds the prefix
        if x != y:
            break
        n += 1
    return n


class Session:
    """One generator and the token ids its KV cache holds. One answer at a time.

    ``one_shot`` sizes the generator for the answer at hand instead of the whole context
    (``edge-run -p``: no next turn will come, so no memory is taken for one).
    """

    def __init__(self, engine: Engine, *, one_shot: bool = False) -> None:
        self.engine = engine
        self.one_shot = one_shot
        self._capacity = 0  # the generator's max_length: its KV buffer, allocated and zeroed once
        self._generator: Any = None
        self._params: Any = None  # kept alive: og reads the penalties from it on every step
        self._adapter: str | None = None
        self._ids: list[int] = []  # what the generator's sequence holds
        self._exact = 0  # leading positions whose KV a prefill wrote: the reusable part
        self._long: bool | None = None  # for a long-RoPE model: which factors those positions used
        self._turn = 0
        self._active = False
        self._lock = threading.Lock()  # held by settle(); a new answer waits for one chunk
        self._stop = threading.Event()
        self._settler: threading.Thread | None = None

    # --- what the cache holds ------------------------------------------------------------

    @property
    def cached_ids(self) -> tuple[int, ...]:
        """The token ids a new request can reuse without computing them again."""
        return tuple(self._ids[: self._exact])

    @property
    def pending_tokens(self) -> int:
        """Tokens the last answer's decode steps wrote, which ``settle`` would re-prefill."""
        return max(0, len(self._ids) - self._exact) if self._generator is not None else 0

    def reusable(self, ids: Sequence[int]) -> int:
        """How many leading ``ids`` this session would take from its cache."""
        if self._generator is None:
            return 0
        # At least two tokens are appended: a one-token run computes other values.
        p = common_prefix(self._ids, ids, max(0, min(self._exact, len(ids) - 2)))
        if p and self._factor(len(ids)) != self._long:
            return 0  # the cached positions used the other RoPE factors
        return p

    def _factor(self, length: int) -> bool | None:
        # Phi-3's long-RoPE models switch rotary factors once the sequence passes the
        # original context: positions written before and after the switch do not mix.
        switch = self.engine.rope_switch
        return None if switch is None else length > switch

    # --- the generator -----------------------------------------------------------------

    def reset(self) -> None:
        """Forget the cache and free the generator's memory (a stream still open stops)."""
        self.wait()
        self._claim()
        self._active = False
        self._release()

    def _release(self) -> None:
        self._generator = self._params = None
        self._capacity = 0
        self._adapter = None
        self._ids, self._exact, self._long = [], 0, None

    def _live(self, adapter: str | None, need: int) -> Any:
        """The session's generator, made for ``adapter`` and holding ``need`` tokens."""
        if self._generator is not None and self._adapter == adapter and self._capacity >= need:
            return self._generator
        self._release()
        genai = og()
        params = genai.GeneratorParams(self.engine._model)
        capacity = need if self.one_shot else self.engine.context
        # Greedy in og, always: a sampled answer picks its tokens in Python (sampling.py).
        params.set_search_options(max_length=capacity, do_sample=False, num_beams=1, **NEUTRAL.og_options(0))
        generator = genai.Generator(self.engine._model, params)
        if adapter is not None:
            self.engine._activate(generator, adapter)
        self._generator, self._params, self._adapter = generator, params, adapter
        self._capacity = capacity
        return generator

    def _claim(self) -> int:
        """Stop a settle in progress (it ends after its current chunk) and start a new turn."""
        self._stop.set()
        with self._lock:
            self._stop.clear()
            self._turn += 1
            self._active = True
            return self._turn

    # --- answering ---------------------------------------------------------------------

    def generate(
        self,
        request: Request,
        options: GenerationOptions,
        *,
        logits_hook: LogitsHook | None = None,
        start: float | None = None,
    ) -> Answer:
        """Stream the answer to ``request``; the ``Answer`` holds its stats once it ends.

        Settings are checked here; the model runs as the chunks are asked for.
        """
        start = time.perf_counter() if start is None else start
        if logits_hook is not None and options.beam_search:
            raise ConfigError("a logits hook steers one sequence; use it with num_beams 1")
        if options.adapter is not None:
            self.engine.check_adapter(options.adapter)
        run = Run(
            request.n_prompt,
            min(self.engine.context, request.n_prompt + options.max_tokens),
            options,
            logits_hook,
            start,
        )
        note = (
            VISION_NOTE
            if self.engine.vision
            else "beam search"
            if options.beam_search
            else "an output constraint"
            if options.constraint is not None
            else ""
        )
        if note:
            run.cache_note = note
            return Answer(self._one_off(request, run, self._one_off_params(run)), lambda: run.final)
        return Answer(self._reuse(request, run), lambda: run.final)

    def _one_off_params(self, run: Run) -> Any:
        """og's parameters for an answer on a generator of its own, as og runs it entire."""
        options = run.options
        params = og().GeneratorParams(self.engine._model)
        search = options.search_options()
        if options.min_tokens:
            search["min_length"] = min(run.max_length, run.n_prompt + options.min_tokens)
        # og preallocates the KV cache for max_length: only what this answer can use.
        params.set_search_options(max_length=run.max_length, **search)
        try:
            if options.constraint is not None:
                kind, data = options.constraint
                params.set_guidance(kind, compact_json(data) if kind == "json_schema" else data)
        except Exception as exc:
            raise ConfigError(f"the output constraint was refused: {exc}") from None
        return params

    def _one_off(self, request: Request, run: Run, params: Any) -> Iterator[str]:
        turn = self._claim()
        generator = None
        try:
            self._release()  # one KV cache in memory at a time, as the plan counts
            try:
                generator = og().Generator(self.engine._model, params)
            except Exception as exc:
                if run.options.constraint is None:
                    raise
                # llguidance compiles the grammar here, not in set_guidance: a schema it cannot
                # take (invalid, or nested past its limits) is the request's fault.
                first = (str(exc).strip().splitlines() or ["no reason given"])[0][:300]
                raise ConfigError(f"the output constraint was refused: {first}") from None
            if run.options.adapter is not None:
                self.engine._activate(generator, run.options.adapter)
            if request.inputs is not None:  # the multimodal processor's ids, pixels, image sizes
                generator.set_inputs(request.inputs)
            else:
                generator.append_tokens(_array(request.ids))
            if run.options.beam_search:
                yield from self._beams(generator, run)
            else:
                yield from self._decode(generator, run, turn, None, NEUTRAL, list(request.ids))
        except (GeneratorExit, EdgeError):
            raise
        except Exception as exc:
            raise GenerationError(f"generation failed after {run.generated} tokens: {exc}") from None
        finally:
            del generator
            self._finish(run, turn)

    def _reuse(self, request: Request, run: Run) -> Iterator[str]:
        turn = self._claim()
        ids = list(request.ids)
        defaults = self.engine.search_defaults
        sampler = Sampler.resolve(run.options, defaults)
        penalties = Penalties.resolve(run.options, defaults)
        try:
            if self._generator is not None and self._adapter != run.options.adapter:
                run.cache_note = ADAPTER_NOTE  # the next answer with this adapter reuses again
            generator = self._live(run.options.adapter, run.max_length)
            p = self.reusable(ids)
            # Forget what the rewind overwrites before touching og, so an interrupt leaves the
            # bookkeeping on the safe side.
            self._exact = min(self._exact, p)
            if p < len(self._ids):
                try:
                    generator.rewind_to(p)
                except Exception:  # og refuses some rewinds (a sliding window that evicted)
                    self._release()
                    generator, p = self._live(run.options.adapter, run.max_length), 0
            self._ids = self._ids[:p]
            generator.append_tokens(_array(ids[p:]))
            self._ids, self._exact, self._long = list(ids), len(ids), self._factor(len(ids))
            run.cached = p
            # Greedy: og applies the penalties itself, read from the live parameters each step.
            live = penalties.og_options(len(ids)) if sampler is None else NEUTRAL.og_options(0)
            self._params.set_search_options(**live)
            yield from self._decode(generator, run, turn, sampler, penalties, ids)
        except (GeneratorExit, EdgeError):
            raise
        except Exception as exc:
            self._release()
            raise GenerationError(f"generation failed after {run.generated} tokens: {exc}") from None
        finally:
            if self._turn == turn and self._generator is not None:
                self._sync()
            self._finish(run, turn)

    def _sync(self) -> None:
        """Take the generator's sequence as it is after an answer, finished or not."""
        try:
            self._ids = [int(t) for t in self._generator.get_sequence(0)]
        except Exception:
            self._release()
            return
        self._exact = min(self._exact, len(self._ids))
        if self._factor(len(self._ids)) != self._long:
            # The answer crossed the RoPE switch; og re-ran the sequence with the other
            # factors. Keep nothing rather than guess which positions used which.
            self._exact = 0

    def _finish(self, run: Run, turn: int) -> None:
        run.final = run.stats()
        if self._turn == turn:  # else superseded: the newer answer owns the session
            self._active = False

    def _decode(
        self,
        generator: Any,
        run: Run,
        turn: int,
        sampler: Sampler | None,
        penalties: Penalties,
        sequence: list[int],
    ) -> Iterator[str]:
        stops = StopMatcher(run.options.stop)
        decoder = self.engine._tokenizer.create_stream()
        rng = sampler.rng() if sampler is not None else None
        eos = self.engine.eos_ids
        while run.n_prompt + run.generated < run.max_length and not generator.is_done():
            if sampler is not None:
                logits = generator.get_logits()
                scores = penalize(
                    run.hooked(logits) if run.hook else logits, sequence, run.generated, penalties, eos
                )
                generator.set_logits(forced(sampler.pick(scores, rng), logits))
            elif run.needs_logits:
                generator.set_logits(run.adjust(generator.get_logits()))
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            run.took(token)
            sequence.append(token)
            emit, stopped = stops.feed(decoder.decode(token))
            if emit:
                yield emit
                if self._turn != turn:
                    raise GenerationError(
                        "a newer answer started on this session; this one stopped",
                        hint="finish or close one stream before starting the next",
                    )
            if stopped:
                run.finish = "stop"
                return
        tail = stops.flush()
        if tail:
            yield tail
        run.finish = run.natural_finish()

    def _beams(self, generator: Any, run: Run) -> Iterator[str]:
        # Beam search only knows its best sequence at the end, so it streams as one chunk.
        stops = StopMatcher(run.options.stop)
        while not generator.is_done():
            generator.generate_next_token()
            run.steps += 1
            if run.steps == 1:
                run.first_at = time.perf_counter()
        best = list(generator.get_sequence(0))[run.n_prompt :]
        run.generated = len(best)
        run.ids = best
        emit, stopped = stops.feed(self.engine._tokenizer.decode(best))
        text = emit + ("" if stopped else stops.flush())
        run.finish = "stop" if stopped else run.natural_finish()
        if text:
            yield text

    # --- settling ----------------------------------------------------------------------

    def settle(self, give_way: Callable[[], bool] | None = None) -> int:
        """Re-prefill what the last answer's decode steps wrote, so the next request reuses it.

        Runs in chunks and stops after the current one when an answer starts on this session
        (or ``give_way()`` says so: the server's other slots). Returns the tokens prefilled.
        Does nothing while an answer streams.
        """
        with self._lock:
            ids, start = self._ids, self._exact
            if self._active or self._generator is None or start >= len(ids):
                return 0
            start = min(start, max(0, len(ids) - 2))
            final = self._factor(len(ids))
            if self._factor(self._chunk_end(start, len(ids))) != final or (start and self._long != final):
                return 0  # chunks would mix RoPE factors; the next request prefills it in one run
            done = 0
            try:
                self._generator.rewind_to(start)
                self._ids, self._exact = ids[:start], start
                while start < len(ids) and not self._stop.is_set() and not (give_way and give_way()):
                    end = self._chunk_end(start, len(ids))
                    self._generator.append_tokens(_array(ids[start:end]))
                    self._ids, self._exact, self._long = ids[:end], end, self._factor(end)
                    done += end - start
                    start = end
            except Exception:
                self._release()  # a failed settle costs the cache, never a wrong answer
            return done

    @staticmethod
    def _chunk_end(start: int, length: int) -> int:
        # A chunk of SETTLE_CHUNK, or all the rest if that would leave fewer than two tokens.
        return length if length - start < SETTLE_CHUNK + 2 else start + SETTLE_CHUNK

    def settle_in_background(self) -> None:
        """``settle`` on a thread: the chat's prompt is back at once; the next answer waits
        for the chunk in progress at most."""
        self.wait()
        if self.pending_tokens:
            self._settler = threading.Thread(target=self.settle, name="edgephi-settle")
            self._settler.start()

    def wait(self) -> None:
        """Stop a background settle after its current chunk and wait for it."""
        settler, self._settler = self._settler, None
        if settler is not None:
            self._stop.set()
            settler.join()
            self._stop.clear()


def _array(ids: Sequence[int]) -> Any:
    import numpy as np

    return np.asarray(ids, dtype=np.int32)


def compact_json(schema: str) -> str:
    """``schema`` with llguidance told to allow no whitespace between JSON tokens.

    Left flexible, the grammar lets a small model fill the answer with spaces and newlines
    (SmolLM2 spent --max-tokens on ``{\\n \\n    "city":\\n     \\n…``); llama.cpp's JSON
    grammars bound whitespace too. A schema that says otherwise (its own ``x-guidance``)
    is left as it is.
    """
    try:
        parsed = json.loads(schema)
    except ValueError:
        return schema  # og reports it, as for any schema it refuses
    if not isinstance(parsed, dict) or "x-guidance" in parsed:
        return schema
    return json.dumps({**parsed, "x-guidance": {"whitespace_flexible": False}})


def pick(sessions: Sequence[Session], ids: Sequence[int], last_used: Sequence[float]) -> int:
    """Index of the session to answer ``ids`` in: the one sharing the longest prefix with it, if
    that keeps more than half of what the session holds; else the one used longest ago. So a
    new conversation takes an idle slot rather than evicting another's history for a few shared
    tokens (llama-server's rule, with its default similarity of 0.5)."""
    best, best_len = -1, 0
    for i, session in enumerate(sessions):
        n = session.reusable(ids)
        if n > best_len and n > SIMILARITY * len(session.cached_ids):
            best, best_len = i, n
    if best >= 0:
        return best
    return min(range(len(sessions)), key=lambda i: last_used[i])
