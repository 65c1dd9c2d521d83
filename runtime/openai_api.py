"""The OpenAI API's shapes, as values: a request body becomes an ``ApiRequest`` (the
prompt, ``GenerationOptions``, pictures, tools offered), an answer's stats become the
response's ``usage`` and ``finish_reason``.

Where it sits: ``edgephi.runtime.server`` speaks HTTP (sockets, the gate, slots, streaming)
and hands this module the parsed JSON; nothing here knows of connections. Every refusal is
an ``ApiError`` carrying the HTTP status and OpenAI's error ``type``/``code``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from edgephi.core.errors import BadImage, ConfigError
from edgephi.runtime import tools
from edgephi.runtime.answer import Stats
from edgephi.runtime.engine import Engine
from edgephi.runtime.images import Image, load_image
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.prompt import IMAGE_TAG, Message, image_tag

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.kind, "code": self.code}}).encode()


def _number(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}", code="invalid_value")
    return kind(value)


def options_from(body: dict[str, Any], default_max_tokens: int) -> GenerationOptions:
    """OpenAI request fields (plus llama.cpp/vLLM-style extras) → ``GenerationOptions``."""
    if (_number(body, "n", int) or 1) != 1:
        raise ApiError(400, "only n=1 is supported", code="invalid_value")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", code="invalid_value")
    schema = None
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            schema = json.dumps({"type": "object"})
        elif fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ApiError(
                    400, "response_format.json_schema.schema must be an object", code="invalid_value"
                )
            schema = json.dumps(spec["schema"])
        elif fmt.get("type") not in (None, "text"):
            raise ApiError(
                400, f"response_format type {fmt.get('type')!r} is not supported", code="invalid_value"
            )
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise ApiError(
            400, "'adapter' must be the name of one of the model's LoRA adapters", code="invalid_value"
        )
    try:
        return GenerationOptions(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            min_tokens=_number(body, "min_tokens", int) or 0,
            temperature=_number(body, "temperature", float),
            top_p=_number(body, "top_p", float),
            top_k=_number(body, "top_k", int),
            min_p=_number(body, "min_p", float),
            seed=_number(body, "seed", int),
            repetition_penalty=_number(body, "repetition_penalty", float),
            stop=tuple(stop),
            json_schema=schema,
            adapter=adapter,
        )
    except ConfigError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None


def image_from_url(url: Any, number: int) -> Image:
    """An ``image_url`` part's picture: a base64 ``data:`` URL, checked like a file."""
    if not isinstance(url, str):
        raise ApiError(400, "an image_url part needs a url string", code="invalid_value")
    m = _DATA_URL.match(url)
    if m is None:
        raise ApiError(
            400,
            "image_url must be a data: URL (data:image/png;base64,…); this server does not fetch URLs",
            code="invalid_value",
        )
    if ";base64" not in m["params"]:
        raise ApiError(400, "image data: URLs must be base64-encoded", code="invalid_value")
    try:
        data = base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {number}'s data: URL is not valid base64", code="invalid_image") from None
    try:
        return load_image(data, name=f"image {number}")
    except BadImage as exc:
        raise ApiError(400, str(exc), code="invalid_image") from None


def messages_from(body: dict[str, Any], vision: bool = False) -> tuple[list[Message], list[Image]]:
    """The chat messages, with each ``image_url`` part's picture tagged where it was sent."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", code="invalid_value")
    out: list[Message] = []
    images: list[Image] = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise ApiError(
                400, "each message needs a role of system, user, assistant or tool", code="invalid_value"
            )
        if m["role"] == "tool" or m.get("tool_calls"):
            out.append(_tool_turn(m))
            continue
        content = m.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        texts: list[str] = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise ApiError(400, "message content must be a string", code="invalid_value")
                if vision and IMAGE_TAG.search(text):
                    # Tags are ours to place; a client's would point at the wrong pictures.
                    raise ApiError(
                        400,
                        "text may not contain <|image_N|> tags; send pictures as image_url parts",
                        code="invalid_value",
                    )
                texts.append(text)
            elif kind == "image_url":
                if not vision:
                    raise ApiError(
                        400, "this model is a text model; it cannot look at images", code="invalid_value"
                    )
                url = part.get("image_url")
                images.append(
                    image_from_url(url.get("url") if isinstance(url, dict) else url, len(images) + 1)
                )
                texts.append(image_tag(len(images)))
            else:
                allowed = "text and image_url" if vision else "text"
                raise ApiError(400, f"only {allowed} content parts are supported", code="invalid_value")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": "".join(texts)})
    return out, images


def _tool_turn(m: dict[str, Any]) -> Message:
    """A ``tool`` result, or an assistant turn that called tools, checked and kept whole."""
    content = m.get("content")
    if isinstance(content, list):  # text parts only
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ApiError(400, "tool turns take text content only", code="invalid_value")
        content = "".join(str(p.get("text", "")) for p in content)
    if m["role"] == "tool":
        if not isinstance(content, str) or not isinstance(m.get("tool_call_id"), str):
            raise ApiError(400, "a tool message needs content and a tool_call_id", code="invalid_value")
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": content}
    calls = m["tool_calls"]
    if not isinstance(calls, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("id"), str)
        and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments"), str)
        for c in calls
    ):
        raise ApiError(
            400,
            "tool_calls must be [{'id', 'type': 'function', 'function': {'name', 'arguments'}}]",
            code="invalid_value",
        )
    if content is not None and not isinstance(content, str):
        raise ApiError(400, "message content must be a string", code="invalid_value")
    kept = [{"id": c["id"], "type": "function", "function": dict(c["function"])} for c in calls]
    return {"role": "assistant", "content": content or "", "tool_calls": kept}


def tool_request_from(body: dict[str, Any], chat: bool) -> tools.ToolRequest | None:
    """The request's ``tools`` / ``tool_choice``; ``None`` when no call may be made."""
    if not chat and (body.get("tools") is not None or body.get("tool_choice") is not None):
        raise ApiError(400, "tools are offered through /v1/chat/completions", code="invalid_value")
    try:
        request = tools.parse_request(body.get("tools"), body.get("tool_choice"))
    except ConfigError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    fmt = body.get("response_format")
    if request is not None and isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise ApiError(
            400,
            "give 'tools' or a 'response_format', not both: a tool call is JSON already",
            code="invalid_value",
        )
    return request


@dataclass(frozen=True)
class ApiRequest:
    """One chat or text completion request, checked and formatted for the engine."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompt: str  # as the model's chat template rendered the messages, or the raw prompt
    options: GenerationOptions
    images: tuple[Image, ...] = ()
    calling: tools.ToolRequest | None = None  # the tools offered, when a call may be made
    stream: bool = False
    usage: bool = False  # streamed: a last chunk with the usage (stream_options.include_usage)

    @classmethod
    def parse(cls, body: dict[str, Any], chat: bool, engine: Engine, max_tokens_default: int) -> ApiRequest:
        options = options_from(body, max_tokens_default)
        calling = tool_request_from(body, chat)
        images: list[Image] = []
        if chat:
            messages, images = messages_from(body, engine.vision)
            prompt = engine.format_prompt(messages, calling.tools if calling else ())
            if calling is not None:
                options = dataclasses.replace(options, grammar=tools.grammar(calling, engine.tool_format[0]))
        else:
            raw = body.get("prompt")
            if not isinstance(raw, str) or not raw:
                raise ApiError(400, "'prompt' must be a non-empty string", code="invalid_value")
            prompt = raw
        stream_options = body.get("stream_options")
        return cls(
            chat=chat,
            prompt=prompt,
            options=options,
            images=tuple(images),
            calling=calling,
            stream=bool(body.get("stream")),
            usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        )

    def envelope(self, rid: str, model: str) -> dict[str, Any]:
        return {
            "id": rid,
            "object": ("chat.completion" if self.chat else "text_completion"),
            "created": int(time.time()),
            "model": model,
        }


def usage(stats: Stats | None) -> dict[str, Any]:
    """OpenAI's ``usage``, with the prompt tokens the cache gave."""
    p, c, cached = (stats.prompt_tokens, stats.generated_tokens, stats.cached_tokens) if stats else (0, 0, 0)
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def finish_reason(stats: Stats | None, calls: list[tools.ToolCall] | None = None) -> str:
    if calls:
        return "tool_calls"
    return "length" if stats and stats.finish_reason in ("length", "context") else "stop"
