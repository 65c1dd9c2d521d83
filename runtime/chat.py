"""A conversation that fits the model's context window.

``Conversation`` keeps the messages of an interactive chat. Before each answer it drops
the oldest exchanges (never the system message, never the newest user turn) until the
prompt plus the room asked for the answer fits the engine's context, and reports how many
it dropped so the CLI can tell the user. Images asked about go with their turn: each is
tagged in the prompt where it was given, counted at its cost in image tokens, and
forgotten with its turn when that is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from edgephi.runtime.engine import Engine, Message, image_tag
from edgephi.runtime.errors import ContextOverflow
from edgephi.runtime.images import Image
from edgephi.runtime.options import GenerationOptions


@dataclass
class Conversation:
    engine: Engine
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    dropped: int = 0
    images: list[list[Image]] = field(default_factory=list)  # per message, beside ``messages``

    def reset(self) -> None:
        """Forget the exchanges (the system message stays)."""
        self.messages.clear()
        self.images.clear()
        self.dropped = 0

    def _all(self, start: int = 0) -> tuple[list[Message], list[Image]]:
        """The prompt's messages from exchange ``start`` on, each picture tagged in its turn."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        out, shown = list(head), list[Image]()
        for message, images in zip(self.messages[start:], self.images[start:], strict=True):
            tags = "".join(image_tag(len(shown) + k) for k in range(1, len(images) + 1))
            shown += images
            out.append({**message, "content": tags + message["content"]} if tags else message)
        return out, shown

    def _fit(self, reserve: int) -> tuple[str, list[Image]]:
        """Drop old exchanges until the prompt leaves ``reserve`` tokens; return it and its images.

        Nothing is dropped unless the newest turn then fits: a turn that cannot be answered
        leaves the history as it was.
        """
        budget = self.engine.context - reserve
        start = 0
        while True:
            messages, images = self._all(start)
            prompt = self.engine.format_prompt(messages)
            if self.engine.count_prompt_tokens(prompt, images) <= budget:
                if start:
                    del self.messages[:start], self.images[:start]
                    self.dropped += (start + 1) // 2
                return prompt, images
            if len(self.messages) - start <= 1:
                raise ContextOverflow(
                    f"this message does not fit the {self.engine.context}-token context "
                    f"with room for a {reserve}-token answer"
                    + (f" (its images take {sum(i.tokens for i in images)} tokens)" if images else ""),
                    hint="send fewer pictures, or raise --context if memory allows" if images else None,
                )
            # Drop the oldest user turn and the answer that followed it.
            start += 2 if len(self.messages) - start > 2 else 1

    def ask(self, text: str, options: GenerationOptions, images: Sequence[Image] = ()) -> Iterator[str]:
        """Add a user turn (with any images) and stream the answer; it joins the history when complete."""
        self.engine.check_images(images)
        self.messages.append({"role": "user", "content": text})
        self.images.append(list(images))
        reserve = min(options.max_tokens, max(1, self.engine.context // 4))
        try:
            prompt, shown = self._fit(reserve)
            # Checks (context, images, options) run here, before the first chunk is asked for.
            chunks = self.engine.stream_prompt(prompt, options, images=shown)
        except Exception:
            # A turn that cannot be answered leaves no trace, so the next one is not refused too.
            self.messages.pop()
            self.images.pop()
            raise
        parts: list[str] = []
        try:
            for chunk in chunks:
                parts.append(chunk)
                yield chunk
        finally:
            # Also an answer cut short (Ctrl-C) joins the history, so turns keep alternating.
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            self.images.append([])
