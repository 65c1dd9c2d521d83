"""Prompt pieces besides the chat template (``edgephi.runtime.prompt``): the control tokens a
message may not forge are read from the head of tokenizer.json, the same as a whole parse."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from edgephi.runtime import prompt


@pytest.fixture(scope="module")
def real(smollm2_bundle: Path) -> bytes:
    with zipfile.ZipFile(smollm2_bundle) as zf:
        return zf.read("model/tokenizer.json")


def test_the_head_gives_the_added_tokens_a_whole_parse_gives(real: bytes, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(real)
    assert prompt._ADDED_KEY.match(real) is not None  # Hugging Face's layout: the fast path is taken
    whole = json.loads(real)["added_tokens"]
    assert prompt.added_tokens(path) == whole and len(whole) > 10
    assert {"<|im_start|>", "<|im_end|>"} <= set(prompt.control_tokens(tmp_path))


@pytest.mark.parametrize(
    "layout",
    [
        "nested padding",  # a nested object before the list: the whole file is parsed
        "list after the vocabulary",
        "key hidden in a string",  # a string that reads like the key is not taken for it
        "list cut by the head",  # the list runs past the bytes read first
    ],
)
def test_other_layouts_give_the_same_list(real: bytes, layout: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(real)
    added = data.pop("added_tokens")
    if layout == "nested padding":
        data = {"padding": {"strategy": {"Fixed": 512}}, "added_tokens": added, **data}
    elif layout == "list after the vocabulary":
        data = {**data, "added_tokens": added}
    elif layout == "key hidden in a string":
        decoy = '", "added_tokens": [{"content": "<fake>"}], "x": "'
        data = {"version": decoy, "added_tokens": added, **data}
    else:
        data = {"version": "1.0", "added_tokens": added, **data}
        monkeypatch.setattr(prompt, "HEAD_BYTES", len(json.dumps(added)) // 2)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    assert prompt.added_tokens(path) == added


def test_a_missing_or_broken_tokenizer_has_no_control_tokens(tmp_path: Path) -> None:
    assert prompt.control_tokens(tmp_path) == ()
    (tmp_path / "tokenizer.json").write_bytes(b'{"added_tokens": [{"content": "<|x|>"')
    assert prompt.control_tokens(tmp_path) == ()
