"""The generation loop on the device: an installed model folder in, text chunks out.

``Engine`` wraps onnxruntime-genai. It loads the model with an explicit thread count and
context length applied through og's config overlay (the installed files are never
edited), turns chat messages into a prompt with the model's own chat template, and
``stream()`` returns an ``Answer`` (``edgephi.runtime.answer``) that yields decoded text
as tokens arrive and holds its statistics once it ends. The answer runs in a ``Session``
(``edgephi.runtime.session``), which keeps its generator's KV cache between answers: the
engine's own session serves ``stream``/``generate`` and every ``Conversation``, so a
prompt that repeats the start of the previous one (a chat's history, a shared system
prompt) computes only what is new. What goes into a prompt besides the chat template
(image tags, control tokens, a dropped system message) is ``edgephi.runtime.prompt``.

A vision model (Phi-3.5-vision, ``edgephi.packager.vision``) also takes pictures: each is
checked from its headers (``edgephi.runtime.images``), tagged ``<|image_k|>`` in the
prompt, counted at its cost in context tokens, and handed with the prompt to og's
multimodal processor — run in a forked child (``edgephi.runtime.sandbox``) — whose
tensors feed the image encoder, the embedding model and the decoder.
"""

from __future__ import annotations

import contextlib
import json
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgephi.core.errors import BadImage, ConfigError, ContextOverflow, GenerationError, TemplateError
from edgephi.runtime import sandbox, tools
from edgephi.runtime.answer import Answer, Stats
from edgephi.runtime.genai import default_threads, og, open_model
from edgephi.runtime.images import Image, load_image
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.prompt import IMAGE_TAG, Message, attach_images, control_tokens, defuse, fold_system
from edgephi.runtime.sampling import SearchDefaults
from edgephi.runtime.session import Request, Session

if TYPE_CHECKING:
    from edgephi.runtime.chat import Conversation

LogitsHook = Callable[[list[int], Any], Any]
ImageLike = Image | str | Path | bytes
# Sequence length past which Phi-3's long-RoPE models use their long rotary factors (og's
# own rewind threshold for model types phi3 and phimoe).
PHI3_ROPE_SWITCH = 4096
# A chat template renders in a forked child with these limits (``_render``). Real templates
# take milliseconds and kilobytes; a prompt is at most a context of text.
TEMPLATE_DEADLINE_S = 5.0
TEMPLATE_MEMORY = 128 << 20


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
        name: str | None = None,
        in_use: object = None,
    ) -> None:
        """``name`` is the manifest's (the loader has read it; else it is read here);
        ``in_use`` is held as long as the engine: the store's lock on an installed model,
        which `edge-run rm` and `prune` respect."""
        self.model_dir = Path(model_dir)
        manifest_file = self.model_dir / "manifest.json"
        if name is None:
            name = (
                str(json.loads(manifest_file.read_text(encoding="utf-8")).get("name", self.model_dir.name))
                if manifest_file.is_file()
                else self.model_dir.name
            )
        self.model_name = name
        self.in_use = in_use
        self.threads = threads or default_threads()
        genai = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
        shipped = int(genai.get("search", {}).get("max_length") or 2048)
        model_limit = int(genai.get("model", {}).get("context_length") or shipped)
        self.context = min(context or shipped, model_limit)
        if self.context < 2:
            raise GenerationError(f"context length {self.context} is too small to generate anything")
        self.has_chat_template = chat_template
        # Control tokens typed in a message are text, not turns (a request cannot forge one).
        self.control_tokens = control_tokens(self.model_dir)
        # The tool-call format its template was trained on, and whether it renders tools.
        self.tool_format = tools.call_format(tools.template_text(self.model_dir) if chat_template else "")
        # A vision model (Phi-3.5-vision): og runs its image encoder and embedding sessions
        # before the decoder, fed by the multimodal processor instead of the tokenizer.
        self.vision = "vision" in genai.get("model", {})
        self.search_defaults = SearchDefaults.from_genai(genai)
        eos = genai.get("model", {}).get("eos_token_id", [])
        self.eos_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else (int(eos),)
        kind = genai.get("model", {}).get("type")
        self.rope_switch = (
            PHI3_ROPE_SWITCH if kind in ("phi3", "phimoe") and self.context > PHI3_ROPE_SWITCH else None
        )
        try:
            self._model = open_model(self.model_dir, self.threads, self.context)
            self._tokenizer = og().Tokenizer(self._model)
            self._processor: Any = self._model.create_multimodal_processor() if self.vision else None
        except Exception as exc:  # og raises plain RuntimeError/OSError with its own text
            raise GenerationError(f"onnxruntime-genai could not load {self.model_dir}: {exc}") from None
        # LoRA adapters shipped beside the model (edgephi.packager.adapters), loaded on first use.
        self.adapter_names = sorted(
            p.name[: -len(".onnx_adapter")] for p in (self.model_dir / "adapters").glob("*.onnx_adapter")
        )
        self._adapters: Any = None
        self.session = Session(self)  # the KV cache that stream() and generate() reuse
        # Chat templates render in a child forked now, while it shares little but the weights.
        self._templates: sandbox.Worker | None = None
        if chat_template and sandbox.available():
            self._templates = sandbox.Worker(self._render_job, memory=TEMPLATE_MEMORY)
            weakref.finalize(self, self._templates.close)

    # --- prompts ------------------------------------------------------------------------

    def format_prompt(self, messages: Sequence[Message], offered: Sequence[tools.Tool] = ()) -> str:
        """Render chat messages with the model's chat template (plain text without one).

        ``offered`` tools go where the template puts them, or into a system note of ours
        (``edgephi.runtime.tools``); messages may then carry ``tool_calls`` and ``tool`` turns.
        """
        messages = [
            {**m, "content": defuse(m["content"], self.control_tokens)}
            if isinstance(m.get("content"), str)
            else m
            for m in messages
        ]
        if not self.has_chat_template:
            return "\n\n".join(m["content"] or "" for m in messages)
        listing = None
        if offered or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            fmt, native = self.tool_format
            messages, listing = tools.prompt_messages(messages, offered, fmt, native)
        prompt = self._render(messages, listing)
        system = [m for m in messages if m["role"] == "system" and m["content"]]
        if system and system[0]["content"] not in prompt:
            # Some templates (Phi-3's original one among them) silently drop system messages;
            # the user asked for one, so put it at the head of the first user turn instead.
            prompt = self._render(fold_system(messages), listing)
        return prompt

    def _render_job(self, job: bytes) -> bytes:
        """og renders the template: ``job`` is JSON ``{"messages", "tools"}``, the result UTF-8."""
        request = json.loads(job)
        prompt = self._tokenizer.apply_chat_template(
            request["messages"], tools=request["tools"], add_generation_prompt=True
        )
        return str(prompt).encode("utf-8", "surrogatepass")

    def _render(self, messages: Sequence[Message], listing: str | None = None) -> str:
        """og renders the bundle's template, in the sandbox: a template is code from the
        bundle, and og runs it with no limit on depth, time or memory. The template worker
        takes it; once a template has crashed or hung that worker, a one-shot child does."""
        job = json.dumps({"messages": json.dumps(list(messages)), "tools": listing}).encode()
        try:
            if self._templates is not None and self._templates.alive:
                with contextlib.suppress(sandbox.ChildDied):  # tried once more, in a fresh child
                    return self._templates.run(job, TEMPLATE_DEADLINE_S).decode("utf-8", "surrogatepass")
            if not sandbox.available():
                return self._render_job(job).decode("utf-8", "surrogatepass")
            out = sandbox.run_forked(
                lambda: self._render_job(job), TEMPLATE_DEADLINE_S, tries=1, memory=TEMPLATE_MEMORY
            )
            return out.decode("utf-8", "surrogatepass")
        except Exception as exc:  # og's own error, raised in the child or here
            # og quotes the template around the failing spot over many lines: the first says it.
            reason = (str(exc).strip().splitlines() or ["no reason given"])[0]
            if isinstance(exc, sandbox.ChildDied) or "bad_alloc" in reason:
                reason = "it ran out of its memory allowance" if "bad_alloc" in reason else str(exc)
                raise TemplateError(
                    f"the model's chat template was stopped ({reason}): "
                    f"it must render within {TEMPLATE_DEADLINE_S:.0f} s and {TEMPLATE_MEMORY >> 20} MiB"
                ) from None
            raise GenerationError(f"the model's chat template failed on these messages: {reason}") from None

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
    ) -> Answer:
        """The answer to ``messages``, chunk by chunk; ``Answer.stats`` once it has ended.

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
        session: Session | None = None,
    ) -> Answer:
        """Like ``stream`` for a prompt that is already formatted (and tags its ``images``).

        ``session`` is the KV cache to answer in (default: the engine's own).
        """
        options = options or GenerationOptions()
        start = time.perf_counter()
        request = self.prepare(prompt, images)
        return (session or self.session).generate(request, options, logits_hook=logits_hook, start=start)

    def prepare(self, prompt: str, images: Sequence[Image] = ()) -> Request:
        """Tokenize ``prompt`` (with og's processor when it shows ``images``) and check it fits."""
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
            inputs = self._process(prompt, images)
            ids = tuple(int(t) for t in inputs["input_ids"].as_numpy().reshape(-1))
            request = Request(ids, inputs)
        else:
            request = Request(tuple(int(t) for t in self._tokenizer.encode(prompt)))
        if request.n_prompt >= self.context:
            raise ContextOverflow(
                f"the prompt is {request.n_prompt} tokens but the context holds {self.context}"
            )
        return request

    def _process(self, prompt: str, images: Sequence[Image]) -> Any:
        """og's processor on ``prompt`` and its pictures: token ids, pixels, image sizes.

        Decoding runs in a forked child where the OS has ``fork`` (``edgephi.runtime.sandbox``):
        og's JPEG decoder exits the whole process on some corrupt files.
        """
        genai = og()
        names = ", ".join(i.name for i in images)

        def process() -> Any:
            return self._processor(prompt, images=genai.Images.open_bytes(*(i.data for i in images)))

        def work() -> bytes:
            inputs = process()
            return sandbox.pack_arrays({k: inputs[k].as_numpy() for k in inputs.keys()})  # noqa: SIM118

        try:
            if not sandbox.available():
                return process()
            pixels = sum(i.width * i.height for i in images)
            arrays = sandbox.unpack_arrays(sandbox.run_forked(work, sandbox.deadline_for(pixels)))
        except sandbox.ChildDied as exc:
            raise BadImage(f"{names} could not be decoded ({exc}): the file is corrupt") from None
        except Exception as exc:  # og's own error, raised in the child or here
            raise BadImage(f"onnxruntime-genai could not read {names}: {exc}") from None
        named = genai.NamedTensors()
        for key, value in arrays.items():
            named[key] = value
        return named

    def check_adapter(self, name: str) -> None:
        if name not in self.adapter_names:
            raise ConfigError(
                f"adapter {name!r} is not in this model; "
                f"it has: {', '.join(self.adapter_names) or 'no adapters'}"
            )

    def _activate(self, generator: Any, name: str) -> None:
        self.check_adapter(name)
        if self._adapters is None:
            adapters = og().Adapters(self._model)
            for n in self.adapter_names:
                adapters.load(str(self.model_dir / "adapters" / f"{n}.onnx_adapter"), n)
            self._adapters = adapters
        generator.set_active_adapter(self._adapters, name)

    def chat(self, system: str | None = None) -> Conversation:
        """A conversation that keeps its history, answered from this engine's KV cache."""
        from edgephi.runtime.chat import Conversation

        return Conversation(self, system=system)

    def generate(
        self,
        messages: Sequence[Message],
        options: GenerationOptions | None = None,
        *,
        images: Sequence[ImageLike] = (),
        logits_hook: LogitsHook | None = None,
    ) -> Completion:
        """The whole answer and its statistics."""
        answer = self.stream(messages, options, images=images, logits_hook=logits_hook)
        text = "".join(answer)
        assert answer.stats is not None  # it ran out
        return Completion(text, answer.stats)
