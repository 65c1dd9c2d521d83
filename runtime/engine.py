"""The generation loop on the device: an installed model folder in, text chunks out.

``Engine`` wraps onnxruntime-genai. It loads the model with an explicit thread count and
context length applied through og's config overlay (the installed files are never
edited), turns chat messages into a prompt with the model's own chat template, and
``stream()`` yields decoded text as tokens arrive; the statistics of the last call are
in ``last_stats``. onnxruntime-genai's telemetry is switched off before anything loads.

A vision model (Phi-3.5-vision, ``edgephi.packager.vision``) also takes pictures: each is
checked from its headers (``edgephi.runtime.images``), tagged ``<|image_k|>`` in the
prompt, counted at its cost in context tokens, and handed with the prompt to og's
multimodal processor — run in a forked child (``edgephi.runtime.sandbox``) — whose
tensors feed the image encoder, the embedding model and the decoder.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.runtime import sandbox
from edgephi.runtime.errors import BadImage, ConfigError, ContextOverflow, EdgeError, GenerationError
from edgephi.runtime.images import Image, load_image
from edgephi.runtime.options import GenerationOptions

Message = dict[str, str]
LogitsHook = Callable[[list[int], Any], Any]
ImageLike = Image | str | Path | bytes
# og's Phi-3-vision processor finds image k of a prompt by this tag and replaces it with
# the image's features; the tags must number the images given, 1..n, each once.
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def image_tag(k: int) -> str:
    return f"<|image_{k}|>\n"


def attach_images(messages: Sequence[Message], count: int) -> list[Message]:
    """Messages whose text places ``count`` images: their own tags, else before the last question."""
    out = [dict(m) for m in messages]
    tags = [int(t) for m in out for t in IMAGE_TAG.findall(m["content"])]
    if tags:
        if sorted(tags) != list(range(1, count + 1)):
            raise ConfigError(
                f"the messages tag images {sorted(tags)} but {count} image(s) were given; "
                "tag each image once as <|image_1|>, <|image_2|>, …, or leave the tags out"
            )
        return out
    if count:
        users = [m for m in out if m["role"] == "user"]
        if not users:
            raise ConfigError("images need a user message to go with")
        users[-1]["content"] = "".join(image_tag(k) for k in range(1, count + 1)) + users[-1]["content"]
    return out


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


def open_model(model_dir: Path, threads: int, max_length: int | None = None) -> Any:
    """An ``og.Model`` on ``threads`` threads: og runs on one unless the config says otherwise."""
    og = _og()
    overlay: dict[str, Any] = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    if max_length is not None:
        overlay["search"] = {"max_length": max_length}
    config = og.Config(str(model_dir))
    config.overlay(json.dumps(overlay))
    return og.Model(config)


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens) or "context" (window full)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_s": round(self.ttft_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "total_s": round(self.total_s, 4),
            "finish_reason": self.finish_reason,
        }

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


@dataclass(frozen=True)
class Completion:
    """A whole answer: ``text`` and the ``stats`` of producing it."""

    text: str
    stats: Stats

    def __str__(self) -> str:
        return self.text


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
        manifest_file = self.model_dir / "manifest.json"
        self.model_name = (
            str(json.loads(manifest_file.read_text(encoding="utf-8")).get("name", self.model_dir.name))
            if manifest_file.is_file()
            else self.model_dir.name
        )
        self.threads = threads or default_threads()
        genai = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
        shipped = int(genai.get("search", {}).get("max_length") or 2048)
        model_limit = int(genai.get("model", {}).get("context_length") or shipped)
        self.context = min(context or shipped, model_limit)
        if self.context < 2:
            raise GenerationError(f"context length {self.context} is too small to generate anything")
        self.has_chat_template = chat_template
        # A vision model (Phi-3.5-vision): og runs its image encoder and embedding sessions
        # before the decoder, fed by the multimodal processor instead of the tokenizer.
        self.vision = "vision" in genai.get("model", {})
        og = _og()
        try:
            self._model = open_model(self.model_dir, self.threads, self.context)
            self._tokenizer = og.Tokenizer(self._model)
            self._processor: Any = self._model.create_multimodal_processor() if self.vision else None
        except Exception as exc:  # og raises plain RuntimeError/OSError with its own text
            raise GenerationError(f"onnxruntime-genai could not load {self.model_dir}: {exc}") from None
        self.last_stats: Stats | None = None
        # LoRA adapters shipped beside the model (edgephi.packager.adapters), loaded on first use.
        self.adapter_names = sorted(
            p.name[: -len(".onnx_adapter")] for p in (self.model_dir / "adapters").glob("*.onnx_adapter")
        )
        self._adapters: Any = None
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

    def stream(
        self,
        messages: Sequence[Message],
        options: GenerationOptions | None = None,
        *,
        images: Sequence[ImageLike] = (),
        logits_hook: LogitsHook | None = None,
    ) -> Iterator[str]:
        """Yield the answer to ``messages`` chunk by chunk; stats land in ``last_stats``.

        ``images`` (paths, bytes or checked ``Image``s) go with a vision model's prompt:
        where the messages tag them (``<|image_1|>``, …), else before the last user turn.

        ``logits_hook(token_ids, logits) -> logits`` sees the ids generated so far and the
        next-token logits (a float32 array of the vocabulary size) before each token is
        chosen, and returns the logits to choose from: custom scoring from Python.
        """
        checked = self.check_images(images)
        prompt = self.format_prompt(attach_images(messages, len(checked)) if checked else messages)
        return self.stream_prompt(prompt, options, images=checked, logits_hook=logits_hook)

    def check_images(self, images: Sequence[ImageLike]) -> list[Image]:
        """Read and check images for this model; refuse them if it cannot see."""
        if images and not self.vision:
            raise ConfigError(f"{self.model_name} is a text model; it cannot look at images")
        return [i if isinstance(i, Image) else load_image(i) for i in images]

    def count_prompt_tokens(self, prompt: str, images: Sequence[Image] = ()) -> int:
        """Tokens ``prompt`` takes in the context, each image tag counted as its image's features."""
        if not images:
            return self.count_tokens(prompt)
        # og's processor encodes the text between tags piece by piece, as done here.
        pieces = IMAGE_TAG.sub("\0", prompt).split("\0")
        return sum(self.count_tokens(p) for p in pieces) + sum(i.tokens for i in images)

    def stream_prompt(
        self,
        prompt: str,
        options: GenerationOptions | None = None,
        *,
        images: Sequence[Image] = (),
        logits_hook: LogitsHook | None = None,
    ) -> Iterator[str]:
        """Like ``stream`` for a prompt that is already formatted (and tags its ``images``)."""
        options = options or GenerationOptions()
        if logits_hook is not None and options.beam_search:
            raise ConfigError("a logits hook steers one sequence; use it with num_beams 1")
        og = _og()
        start = time.perf_counter()
        tags = sorted(int(t) for t in IMAGE_TAG.findall(prompt)) if self.vision else []
        if tags != list(range(1, len(images) + 1)):
            raise ConfigError(f"the prompt tags images {tags} but {len(images)} image(s) were given")
        if images:
            # Refuse from the headers, before og decodes anything.
            need = self.count_prompt_tokens(prompt, images)
            if need >= self.context:
                costs = ", ".join(f"{i.width}x{i.height}: {i.tokens}" for i in images)
                raise ContextOverflow(
                    f"the prompt is {need} tokens with its image(s) ({costs} tokens) "
                    f"but the context holds {self.context}",
                    # Resolution does not matter: og scales every picture to up to 16 crops.
                    hint="send fewer pictures, or raise --context if memory allows",
                )
            tokens = self._process(prompt, images)
        else:
            tokens = self._tokenizer.encode(prompt)
        n_prompt = len(tokens) if not images else int(tokens["input_ids"].as_numpy().shape[-1])
        if n_prompt >= self.context:
            raise ContextOverflow(f"the prompt is {n_prompt} tokens but the context holds {self.context}")
        # og preallocates the KV cache for max_length, so ask only for what this answer can use.
        max_length = min(self.context, n_prompt + options.max_tokens)
        params = og.GeneratorParams(self._model)
        search = options.search_options()
        if options.min_tokens:
            search["min_length"] = min(max_length, n_prompt + options.min_tokens)
        params.set_search_options(max_length=max_length, **search)
        try:
            if options.json_schema is not None:
                params.set_guidance("json_schema", options.json_schema)
            elif options.regex is not None:
                params.set_guidance("regex", options.regex)
        except Exception as exc:
            raise ConfigError(f"the output constraint was refused: {exc}") from None
        generator = og.Generator(self._model, params)
        if options.adapter is not None:
            self._activate(generator, options.adapter)
        run = _Run(n_prompt, max_length, options, logits_hook, start)
        run.images = len(images)
        return self._loop(generator, tokens, run)

    def _process(self, prompt: str, images: Sequence[Image]) -> Any:
        """og's processor on ``prompt`` and its pictures: token ids, pixels, image sizes.

        Decoding runs in a forked child where the OS has ``fork`` (``edgephi.runtime.sandbox``):
        og's JPEG decoder exits the whole process on some corrupt files.
        """
        og = _og()
        names = ", ".join(i.name for i in images)

        def process() -> Any:
            return self._processor(prompt, images=og.Images.open_bytes(*(i.data for i in images)))

        def work() -> dict[str, Any]:
            inputs = process()
            return {k: inputs[k].as_numpy() for k in inputs.keys()}  # noqa: SIM118 - not a mapping

        try:
            if not sandbox.available():
                return process()
            arrays = sandbox.run_forked(work)
        except sandbox.ChildDied as exc:
            raise BadImage(f"{names} could not be decoded ({exc}): the file is corrupt") from None
        except Exception as exc:  # og's own error, raised in the child or here
            raise BadImage(f"onnxruntime-genai could not read {names}: {exc}") from None
        named = og.NamedTensors()
        for key, value in arrays.items():
            named[key] = value
        return named

    def _activate(self, generator: Any, name: str) -> None:
        if name not in self.adapter_names:
            raise ConfigError(
                f"adapter {name!r} is not in this model; "
                f"it has: {', '.join(self.adapter_names) or 'no adapters'}"
            )
        if self._adapters is None:
            adapters = _og().Adapters(self._model)
            for n in self.adapter_names:
                adapters.load(str(self.model_dir / "adapters" / f"{n}.onnx_adapter"), n)
            self._adapters = adapters
        generator.set_active_adapter(self._adapters, name)

    def _loop(self, generator: Any, tokens: Any, run: _Run) -> Iterator[str]:
        stops = StopMatcher(run.options.stop)
        try:
            if run.images:  # the multimodal processor's named tensors: ids, pixels, image sizes
                generator.set_inputs(tokens)
            else:
                generator.append_tokens(tokens)
            if run.options.beam_search:
                yield from self._beams(generator, tokens, run, stops)
            else:
                decoder = self._tokenizer.create_stream()
                while not generator.is_done():
                    if run.needs_logits:
                        generator.set_logits(run.adjust(generator.get_logits()))
                    generator.generate_next_token()
                    token = int(generator.get_next_tokens()[0])
                    run.took(token)
                    emit, stopped = stops.feed(decoder.decode(token))
                    if emit:
                        yield emit
                    if stopped:
                        run.finish = "stop"
                        return
                tail = stops.flush()
                if tail:
                    yield tail
            run.finish = run.natural_finish()
        except GeneratorExit:
            raise
        except Exception as exc:
            if isinstance(exc, EdgeError):
                raise
            raise GenerationError(f"generation failed after {run.generated} tokens: {exc}") from None
        finally:
            self.last_stats = run.stats()
            del generator

    def _beams(self, generator: Any, tokens: Any, run: _Run, stops: StopMatcher) -> Iterator[str]:
        # Beam search only knows its best sequence at the end, so it streams as one chunk.
        while not generator.is_done():
            generator.generate_next_token()
            run.steps += 1
            if run.steps == 1:
                run.first_at = time.perf_counter()
        best = list(generator.get_sequence(0))[run.n_prompt :]
        run.generated = len(best)
        run.ids = best
        emit, stopped = stops.feed(self._tokenizer.decode(best))
        text = emit + ("" if stopped else stops.flush())
        if stopped:
            run.finish = "stop"
        if text:
            yield text

    def generate(
        self,
        messages: Sequence[Message],
        options: GenerationOptions | None = None,
        *,
        images: Sequence[ImageLike] = (),
        logits_hook: LogitsHook | None = None,
    ) -> Completion:
        """The whole answer and its statistics."""
        text = "".join(self.stream(messages, options, images=images, logits_hook=logits_hook))
        assert self.last_stats is not None
        return Completion(text, self.last_stats)


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


class _Run:
    """The bookkeeping of one generation: counts, timings, logits adjustments."""

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
        self.images = 0
        self.steps = 0
        self.ids: list[int] = []
        self.first_at = 0.0
        self.finish = "cancelled"
        self.needs_logits = hook is not None or options.min_p is not None

    def took(self, token: int) -> None:
        self.generated += 1
        self.ids.append(token)
        if self.generated == 1:
            self.first_at = time.perf_counter()

    def adjust(self, logits: Any) -> Any:
        import numpy as np

        out = np.array(logits, dtype=np.float32, copy=True)
        if self.hook is not None:
            out = np.asarray(self.hook(list(self.ids), out), dtype=np.float32)
            if out.shape != logits.shape:
                raise ConfigError(f"the logits hook returned shape {out.shape}, expected {logits.shape}")
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
        )
