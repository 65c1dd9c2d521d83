"""What goes into a prompt besides the chat template: image tags, control tokens typed in a
message, system messages a template would drop.

Where it sits: ``Engine.format_prompt`` (``edgephi.runtime.engine``) defuses each message's
control tokens, renders the model's template and folds the system message in where the
template dropped it; ``Engine.stream`` places a vision model's pictures with
``attach_images``; the OpenAI server and ``Conversation`` tag pictures with ``image_tag``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgephi.core.errors import ConfigError

Message = dict[str, Any]  # role and content; tool turns carry tool_calls / tool_call_id
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


# An added token that reads like markup (<|im_end|>, </s>, <tool_call>, [INST]) is a
# control token: typed in a message, the tokenizer would encode it as the real thing.
_CONTROL = re.compile(r"^(<[^\s<>]{1,40}>|\[/?[A-Z_]{2,30}\])$")
_ZWSP = "\u200b"


def control_tokens(model_dir: Path) -> tuple[str, ...]:
    """The tokenizer's control-token strings (longest first), from its added tokens."""
    found = {
        a["content"]
        for a in added_tokens(model_dir / "tokenizer.json")
        if isinstance(a, dict) and isinstance(a.get("content"), str) and _CONTROL.match(a["content"])
    }
    return tuple(sorted((t for t in found if not IMAGE_TAG.fullmatch(t)), key=len, reverse=True))


# The top-level keys before ``added_tokens``: nulls, strings and flat objects (a nested one,
# as some ``padding`` settings are, sends the file to the whole parse).
_STRING = rb'"(?:[^"\\]|\\.)*"'
_ADDED_KEY = re.compile(
    rb"^\{\s*(?:"
    + _STRING
    + rb"\s*:\s*(?:null|true|false|-?\d+|"
    + _STRING
    + rb"|\{[^{}\[\]]*\})\s*,\s*)*"
    + rb'"added_tokens"\s*:\s*(?=\[)'
)
HEAD_BYTES = 4 << 20


def added_tokens(path: Path) -> list[Any]:
    """tokenizer.json's ``added_tokens`` list, without parsing its vocabulary when it can:
    Hugging Face writes the list right after ``version``, ``truncation`` and ``padding``, so
    the head of the file holds it; a vocabulary can be tens of MB, which parsed in Python
    would cost the device that much memory again at every load. A file laid out otherwise
    is parsed whole. A missing or unreadable file has none."""
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
            whole = len(head) < HEAD_BYTES
            m = _ADDED_KEY.match(head)
            if m is not None:
                with contextlib.suppress(UnicodeDecodeError, ValueError):
                    value, _ = json.JSONDecoder().raw_decode(head[m.end() :].decode("utf-8", "ignore"))
                    return value if isinstance(value, list) else []
            data = json.loads(head.decode("utf-8") if whole else head + fh.read())
    except (OSError, ValueError):
        return []
    value = data.get("added_tokens", []) if isinstance(data, dict) else []
    return value if isinstance(value, list) else []


def defuse(text: str, controls: Sequence[str]) -> str:
    """``text`` with each control-token string broken by a zero-width space after its first
    character: the model reads the same characters, the tokenizer no longer sees the token."""
    for token in controls:
        if token in text:
            text = text.replace(token, token[0] + _ZWSP + token[1:])
    return text


def fold_system(messages: Sequence[Message]) -> list[Message]:
    """The system messages put at the head of the first user turn, for templates that drop them."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    else:
        rest.insert(0, {"role": "user", "content": system})
    return rest
