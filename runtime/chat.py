"""A conversation that fits the model's context window.

``Conversation`` keeps the messages of an interactive chat and answers them in a
``Session`` (``edgephi.runtime.session``; the engine's own unless given one), whose KV
cache already holds the history: each turn computes only the new question. When the prompt
plus the room asked for the answer no longer fits the context, it drops old exchanges
(never the system message, never the newest user turn) — half the history at once, as
llama.cpp's context shift does, because a drop changes the prompt after the system message
and so costs one prefill of everything kept: in large steps that happens once every many
turns, not on every turn once the window is full. The system message's cached prefix
survives a drop. It reports how many exchanges it dropped so the CLI can tell the user.
Images asked about go with their turn: each is tagged in the prompt where it was given,
counted at its cost in image tokens, and forgotten with its turn when that is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from edgephi.core.errors import ContextOverflow
from edgephi.runtime.answer import Answer
from edgephi.runtime.engine import Engine
from edgephi.runtime.images import Image
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.prompt import Message, image_tag
from edgephi.runtime.session import Session


@dataclass
class Conversation:
    engine: Engine
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    dropped: int = 0
    images: list[list[Image]] = field(default_factory=list)  # per message, beside ``messages``
    session: Session | None = None  # the KV cache it answers in; None: the engine's own

    @property
    def cache(self) -> Session:
        return self.session or self.engine.session

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
            if start == 0:
                # The first drop takes half the exchanges, so the next ones fit too.
                start = max(2, (len(self.messages) - 1) // 4 * 2)
            else:
                # Then the oldest user turn left and the answer that followed it.
                start += 2 if len(self.messages) - start > 2 else 1
            start = min(start, len(self.messages) - 1)

    def ask(self, text: str, options: GenerationOptions, images: Sequence[Image] = ()) -> Answer:
        """Add a user turn (with any images) and stream the answer; it joins the history when
        complete. Checks run when the first chunk is asked for."""
        answered: list[Answer] = []  # the session's answer, once the turn has started
        return Answer(
            self._turn(text, options, images, answered), lambda: answered[0].stats if answered else None
        )

    def _turn(
        self, text: str, options: GenerationOptions, images: Sequence[Image], answered: list[Answer]
    ) -> Iterator[str]:
        self.engine.check_images(images)
        self.messages.append({"role": "user", "content": text})
        self.images.append(list(images))
        reserve = min(options.max_tokens, max(1, self.engine.context // 4))
        try:
            prompt, shown = self._fit(reserve)
            # Checks (context, images, options) run here, before the first chunk is asked for.
            chunks = self.engine.stream_prompt(prompt, options, images=shown, session=self.cache)
        except Exception:
            # A turn that cannot be answered leaves no trace, so the next one is not refused too.
            self.messages.pop()
            self.images.pop()
            raise
        answered.append(chunks)
        parts: list[str] = []
        try:
            for chunk in chunks:
                parts.append(chunk)
                yield chunk
        finally:
            chunks.close()
            # Also an answer cut short (Ctrl-C) joins the history, so turns keep alternating.
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            self.images.append([])

    def settle(self, background: bool = False) -> None:
        """Let the cache take in the last answer now, so the next question computes only
        itself (``Session.settle``); ``background`` does it on a thread, as the chat does
        while the user types."""
        if background:
            self.cache.settle_in_background()
        else:
            self.cache.settle()
