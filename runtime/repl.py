"""The chat of ``edge-run``: the answer printers, the input line and the loop.

Where it sits: ``edgephi.runtime.cli``'s ``run`` loads the model and hands a
``Conversation`` (``edgephi.runtime.chat``) to ``chat`` on a terminal, or to one printer for
a single prompt; this module owns what the user sees and types, nothing of loading.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgephi.core.errors import EdgeError
from edgephi.runtime import console
from edgephi.runtime.answer import Stats
from edgephi.runtime.chat import Conversation
from edgephi.runtime.engine import Engine
from edgephi.runtime.images import Image, load_image
from edgephi.runtime.options import GenerationOptions

PROG = "edge-run"


# Prints one answer of the chat and gives back its stats.
Printer = Callable[[Conversation, str, GenerationOptions, bool, Sequence[Image]], Stats | None]


def print_answer(
    conversation: Conversation, text: str, options: GenerationOptions, stats: bool, images: Sequence[Image]
) -> Stats | None:
    dropped = conversation.dropped
    reply = conversation.ask(text, options, images)
    try:
        for chunk in reply:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    finally:
        reply.close()  # Ctrl-C: the answer stops here
    sys.stdout.write("\n")
    sys.stdout.flush()
    if conversation.dropped > dropped:
        console.info(f"(dropped {conversation.dropped - dropped} oldest exchange(s) to fit the context)")
    if stats and reply.stats:
        console.info(reply.stats.line())
    return reply.stats


def print_json(
    conversation: Conversation, text: str, options: GenerationOptions, stats: bool, images: Sequence[Image]
) -> Stats | None:
    dropped = conversation.dropped
    reply = conversation.ask(text, options, images)
    record: dict[str, object] = {"text": "".join(reply), "dropped_exchanges": conversation.dropped - dropped}
    if reply.stats:
        record["stats"] = reply.stats.to_dict()
    print(json.dumps(record, ensure_ascii=False), flush=True)
    return reply.stats


CHAT_HELP = (
    '/reset clears the conversation, /system TEXT sets the system message, """ starts and ends '
    "a multi-line message, /exit or Ctrl-D quits"
)
HISTORY_LINES = 1000


class ChatLine:
    """The chat's input line: editing and history through readline where the OS has it.

    History persists in ``chat_history`` beside the store (as Ollama keeps its own);
    a line of three double quotes starts a multi-line message and another ends it.
    """

    def __init__(self, history: Path) -> None:
        self.history = history
        try:
            import readline
        except ImportError:  # no readline on this Python: plain input() still works
            self.readline = None
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LINES)
        with contextlib.suppress(OSError):  # no history yet
            readline.read_history_file(str(history))

    def read(self) -> str:
        """One message; raises EOFError at end of input, KeyboardInterrupt on Ctrl-C."""
        text = input("> ").strip()
        if not text.startswith('"""'):
            return text
        body, lines = text[3:], []
        while not body.rstrip().endswith('"""'):
            lines.append(body)
            body = input("... ")
        lines.append(body.rstrip()[:-3])
        return "\n".join(lines).strip()

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.history))
        except OSError as exc:
            console.info(f"(chat history not saved to {self.history}: {exc.strerror or exc})")


IMAGE_HELP = "/image PATH shows the model a picture with your next message"


def chat(
    conversation: Conversation,
    options: GenerationOptions,
    stats: bool,
    printer: Printer,
    pending: list[Image],
    line: ChatLine,
) -> None:
    engine: Engine = conversation.engine
    if engine.vision:
        console.info(f"(a vision model: {IMAGE_HELP}" + (f"; {len(pending)} waiting)" if pending else ")"))
    console.info(
        f"Chatting with the model (context {engine.context} tokens). {CHAT_HELP}; Ctrl-C stops an answer."
    )
    try:
        while True:
            try:
                text = line.read()
            except EOFError:
                console.info("")
                return
            except KeyboardInterrupt:
                console.info("")
                continue
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                conversation.reset()
                console.info("(conversation cleared)")
                continue
            if text == "/system" or text.startswith("/system "):
                conversation.system = text[len("/system") :].strip() or None
                console.info(f"(system message {'set' if conversation.system else 'removed'})")
                continue
            if engine.vision and text.startswith("/image"):
                try:
                    picture = load_image(Path(text[len("/image") :].strip()))
                    pending.append(picture)
                    console.info(
                        f"(image {picture.name} will go with your next message, {picture.tokens} tokens)"
                    )
                except EdgeError as exc:
                    console.info(console.error_line(PROG, exc))
                continue
            if text.startswith("/"):
                console.info(CHAT_HELP + (f"; {IMAGE_HELP}" if engine.vision else ""))
                continue
            try:
                shown, pending[:] = list(pending), []
                last = printer(conversation, text, options, stats, shown)
                if printer is print_answer and last is not None and last.finish_reason == "length":
                    console.info(f"(cut at --max-tokens {options.max_tokens}; raise -n for longer answers)")
            except EdgeError as exc:
                # One turn that cannot be answered (too long, an unreadable picture) ends only that turn.
                console.info(console.error_line(PROG, exc))
            except KeyboardInterrupt:
                # Ctrl-C stops this answer, not the chat.
                console.info("\n(interrupted)")
            # While the user reads and types, the cache takes in the answer (also a cut one).
            conversation.settle(background=True)
    finally:
        line.save()
        # Exit only once a background settle has stopped (after its current chunk).
        conversation.cache.wait()
