"""Tool calling for the OpenAI-compatible server: the model's own call format, a grammar
that holds the answer to it, and the parser that turns the answer into ``tool_calls``.

Where it sits: ``edgephi.runtime.server`` parses a request's ``tools`` / ``tool_choice``
into ``ToolRequest``; this module renders the prompt (through the model's chat template
when the template takes ``tools``, else with a system note of ours), gives the session a
Lark grammar (llguidance, through og's ``lark_grammar`` guidance) and reads the answer.

Formats, chosen from the chat template's own markers (what each family was trained on):

- ``hermes`` — ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``: Qwen 2.5/3,
  SmolLM3, Hermes; also ours for a template that knows no tools (SmolLM2, Phi-3.5).
- ``llama3`` — a bare ``{"name": …, "parameters": {…}}``: Llama 3.1–3.3.
- ``phi4`` — ``<|tool_call|>[{"name": …, "arguments": {…}}]<|/tool_call|>``, the tools given
  in the system message's ``tools`` field: Phi-4-mini.
- ``mistral`` — ``[TOOL_CALLS][{"name": …, "arguments": {…}}]``.

The grammar is what makes a small model's call usable: ``required`` and a named function
force one call whose arguments match the function's JSON schema (compact separators, so
whitespace cannot run on); ``auto`` lets the answer be text or a call, decided by its first
character, as onnxruntime-genai's own tool examples do.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import ConfigError

MAX_TOOLS = 64
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class CallFormat:
    name: str
    start: str  # what opens a call ("" for a bare JSON object)
    end: str
    args_key: str  # "arguments", or "parameters" (Llama 3)
    listed: bool  # the calls are one JSON list (Phi-4-mini, Mistral)


HERMES = CallFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", listed=False)
LLAMA3 = CallFormat("llama3", "", "", "parameters", listed=False)
PHI4 = CallFormat("phi4", "<|tool_call|>", "<|/tool_call|>", "arguments", listed=True)
MISTRAL = CallFormat("mistral", "[TOOL_CALLS]", "", "arguments", listed=True)


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools and what it allows: ``choice`` is auto, required or a function name."""

    tools: tuple[Tool, ...]
    choice: str

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def offered(self) -> tuple[Tool, ...]:
        """The tools the answer may call."""
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)


def parse_request(tools: Any, choice: Any) -> ToolRequest | None:
    """OpenAI ``tools`` and ``tool_choice`` → a ``ToolRequest``, or ``None`` when no tool may
    be called (no tools, or ``tool_choice: "none"``). Raises ``ConfigError`` saying which field."""
    if tools is None:
        if choice not in (None, "none"):
            raise ConfigError("'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise ConfigError(f"'tools' must be a list of 1 to {MAX_TOOLS} functions")
    parsed: list[Tool] = []
    for i, entry in enumerate(tools):
        fn = entry.get("function") if isinstance(entry, dict) and entry.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ConfigError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': …}}}}, "
                "the name 1 to 64 letters, digits, '_' or '-'"
            )
        params = fn.get("parameters") or {"type": "object", "properties": {}}  # type: ignore[union-attr]
        description = fn.get("description") or ""  # type: ignore[union-attr]
        if not isinstance(params, dict) or not isinstance(description, str):
            raise ConfigError(f"tools[{i}] ({name}): parameters must be a JSON schema object")
        parsed.append(Tool(name, description, params))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ConfigError("'tools' names a function twice")
    if choice in (None, "auto"):
        return ToolRequest(tuple(parsed), "auto")
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(tuple(parsed), "required")
    wanted = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(wanted, str):
        raise ConfigError(
            "'tool_choice' must be auto, none, required or {'type': 'function', 'function': {'name': …}}"
        )
    if wanted not in names:
        raise ConfigError(f"'tool_choice' names {wanted!r}, which is not in 'tools'")
    return ToolRequest(tuple(parsed), wanted)


# --- the chat template's side -------------------------------------------------------------


def template_text(model_dir: Path) -> str:
    """The model's chat template source, as the builder shipped it ('' when it has none)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get(
            "chat_template"
        )
    except (OSError, ValueError):
        return ""
    return template if isinstance(template, str) else ""


def call_format(template: str) -> tuple[CallFormat, bool]:
    """The call format the template's model was trained on, and whether the template itself
    renders tools (``False``: the tools go into a system note of ours)."""
    if "<|tool_call|>" in template or "<|tool|>" in template:
        return PHI4, True
    if "[TOOL_CALLS]" in template:
        return MISTRAL, "tools" in template
    if "<tool_call>" in template:
        return HERMES, "tools" in template
    if "<|python_tag|>" in template or "Environment: ipython" in template:
        return LLAMA3, "tools" in template
    return HERMES, False


def system_note(tools: Sequence[Tool], fmt: CallFormat) -> str:
    """How to call ``tools``, for a model whose template does not render them."""
    example = f'{{"name": <function-name>, "{fmt.args_key}": <args-json-object>}}'  # Qwen's own words
    listing = "\n".join(json.dumps(t.to_openai()) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n"
        f"To call a function, answer with its name and arguments as JSON, exactly so:\n"
        f"{fmt.start}{example}{fmt.end}"
    )


def prompt_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[Tool], fmt: CallFormat, native: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """The messages to render with ``tools`` offered, and the ``tools`` JSON the template
    takes (``None`` when they travel inside the messages)."""
    out = chat_messages(messages, fmt, native)
    if not tools:  # earlier calls and their results, and nothing to call now
        return out, None
    listing = [t.to_openai() for t in tools]
    if native and fmt is not PHI4:
        return out, json.dumps(listing)
    if native:  # Phi-4-mini: a JSON list of functions in the system message's own field
        field = json.dumps([t.to_openai()["function"] for t in tools])
        if out and out[0]["role"] == "system":
            return [{**out[0], "tools": field}, *out[1:]], None
        return [{"role": "system", "content": "", "tools": field}, *out], None
    note = system_note(tools, fmt)
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{note}"}, *out[1:]], None
    return [{"role": "system", "content": note}, *out], None


def chat_messages(raw: Sequence[dict[str, Any]], fmt: CallFormat, native: bool) -> list[dict[str, Any]]:
    """Messages carrying ``tool_calls`` and ``tool`` results in the form the template reads:
    as they are (arguments as objects, as Hugging Face templates expect) where it renders
    tools, else as plain text turns in the model's call format."""
    out: list[dict[str, Any]] = []
    for m in raw:
        calls = m.get("tool_calls") or []
        if m["role"] == "assistant" and calls:
            if native:
                out.append({**m, "tool_calls": [_with_object_arguments(c) for c in calls]})
            else:
                text = format_calls([(c["function"]["name"], c["function"]["arguments"]) for c in calls], fmt)
                out.append({"role": "assistant", "content": (m.get("content") or "") + text})
        elif m["role"] == "tool" and not native:
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append(m)
    return out


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    try:
        arguments = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
    except ValueError:
        arguments = fn["arguments"]
    return {**call, "function": {**fn, "arguments": arguments}}


def format_calls(calls: Sequence[tuple[str, str]], fmt: CallFormat) -> str:
    """``(name, arguments JSON)`` pairs as the model writes them."""
    objects = [f'{{"name": {json.dumps(name)}, "{fmt.args_key}": {args}}}' for name, args in calls]
    if fmt.listed:
        return f"{fmt.start}[{', '.join(objects)}]{fmt.end}"
    return "".join(f"{fmt.start}{o}{fmt.end}" for o in objects)


# --- the answer's side ----------------------------------------------------------------------


def grammar(request: ToolRequest, fmt: CallFormat) -> str:
    """A Lark grammar (llguidance) for the answer: one call, or text or a call for ``auto``."""
    offered = request.offered()
    one = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, fmt.args_key: _arguments_schema(t.parameters)},
                "required": ["name", fmt.args_key],
                "additionalProperties": False,
            }
            for t in offered
        ],
    }
    schema: dict[str, Any] = {"type": "array", "items": one, "minItems": 1} if fmt.listed else one
    schema["x-guidance"] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    call = [json.dumps(fmt.start)] if fmt.start else []
    call += ["body", json.dumps(fmt.end)] if fmt.end else ["body"]
    rows = [f"call: {' '.join(call)}", f"body: %json {json.dumps(schema)}"]
    if request.forced:
        return "\n".join(["start: call", *rows])
    # Text may not begin like a call: the first character decides which one the answer is.
    return "\n".join(["start: TEXT | call", r"TEXT: /[^{<\[](.|\n)*/", *rows])


def _arguments_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """The function's parameters as the arguments must match them: an object, and no keys
    it does not name unless it says otherwise (a small model invents extra ones and runs on)."""
    schema = dict(parameters)
    schema.setdefault("type", "object")
    schema.setdefault("additionalProperties", False)
    return schema


def parse_answer(text: str, request: ToolRequest, fmt: CallFormat) -> list[ToolCall] | None:
    """The calls in an answer, or ``None`` when it is text. A call the grammar let through
    always parses; one that does not is left as text (an answer cut at ``max_tokens``)."""
    if not text or not may_be_call(text):
        return None
    body = text.strip()
    for marker in (fmt.start.strip(), fmt.end.strip()):
        if marker:
            body = body.replace(marker, "\n" if fmt.listed else "\x00")
    pieces = [body.strip()] if fmt.listed else [p.strip() for p in body.split("\x00") if p.strip()]
    names = {t.name for t in request.offered()}
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    for piece in pieces:
        try:
            value, _ = decoder.raw_decode(piece)
        except ValueError:
            return None
        for obj in value if isinstance(value, list) else [value]:
            if not isinstance(obj, dict) or obj.get("name") not in names:
                return None
            arguments = obj.get(fmt.args_key, {})
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], json.dumps(arguments)))
    return calls or None


def may_be_call(text: str) -> bool:
    """Whether an answer that begins with ``text`` is (or may yet be) a call: every format
    opens with ``{``, ``[`` or ``<``, and the grammar's text may not; a stream holds a call
    back until it is whole."""
    return not text or text[0] in "{[<"
