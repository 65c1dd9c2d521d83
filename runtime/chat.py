"""A conversation that fits the model's context window.

``Conversation`` keeps the messages of an interactive chat. Before each answer it drops
the oldest exchanges (never the system message, never the newest user turn) until the
prompt plus the room asked for the answer fits the engine's context, and reports how many
it dropped so the CLI can tell the user.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from edgephi.runtime.engine import Engine, Message
from edgephi.runtime.errors import ContextOverflow
from edgephi.runtime.options import GenerationOptions


@dataclass
class Conversation:
    engine: Engine
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    dropped: int = 0

    def reset(self) -> None:
        """Forget the exchanges (the system message stays)."""
        self.messages.clear()
        self.dropped = 0

    def _all(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def _fit(self, reserve: int) -> str:
        """Drop old exchanges until the prompt leaves ``reserve`` tokens; return the prompt."""
        budget = self.engine.context - reserve
        while True:
            prompt = self.engine.format_prompt(self._all())
            if self.engine.count_tokens(prompt) <= budget:
                return prompt
            if len(self.messages) <= 1:
                raise ContextOverflow(
                    f"this message does not fit the {self.engine.context}-token context "
                    f"with room for a {reserve}-token answer"
                )
            # Drop the oldest user turn and the answer that followed it.
            del self.messages[: 2 if len(self.messages) > 2 else 1]
            self.dropped += 1

    def ask(self, text: str, options: GenerationOptions) -> Iterator[str]:
        """Add a user turn and stream the answer; the answer joins the history when complete."""
        self.messages.append({"role": "user", "content": text})
        reserve = min(options.max_tokens, max(1, self.engine.context // 4))
        try:
            prompt = self._fit(reserve)
        except ContextOverflow:
            self.messages.pop()
            raise
        parts: list[str] = []
        try:
            for chunk in self.engine.stream_prompt(prompt, options):
                parts.append(chunk)
                yield chunk
        finally:
            # Also an answer cut short (Ctrl-C) joins the history, so turns keep alternating.
            self.messages.append({"role": "assistant", "content": "".join(parts)})
