"""The ``validate`` step of a build (``edgephi.packager.pipeline``): prove the exported
model loads and generates before it is shipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgephi.core.errors import BuildError, EdgeError
from edgephi.runtime import images
from edgephi.runtime.engine import Engine
from edgephi.runtime.options import GenerationOptions

HEALTH_PROMPT = "Hello"
HEALTH_TOKENS = 4


def smoke_test(model_dir: Path, chat_template: bool) -> dict[str, Any]:
    """Load with onnxruntime-genai and greedily generate a few tokens.

    Returns the manifest's ``health`` record: the golden answer a device's update health
    check compares with (``edgephi.runtime.updater``).
    """
    try:
        engine = Engine(model_dir, context=256, chat_template=chat_template)
        done = engine.generate(
            [{"role": "user", "content": HEALTH_PROMPT}],
            GenerationOptions(max_tokens=HEALTH_TOKENS, temperature=0.0),
        )
    except EdgeError as exc:
        raise BuildError(f"the exported model does not run in onnxruntime-genai: {exc}") from None
    text = done.text
    if done.stats.generated_tokens == 0:
        raise BuildError("the exported model loads but generates nothing")
    if engine.vision:
        _look(model_dir, chat_template)
    return {"prompt": HEALTH_PROMPT, "max_tokens": HEALTH_TOKENS, "text": text}


def _look(model_dir: Path, chat_template: bool) -> None:
    """Run a picture through all three sessions: og's processor, the encoder, the embedding."""
    width, height = 400, 300
    rgb = bytes(
        (x * 255 // width) if c == 0 else (y * 255 // height) if c == 1 else 128
        for y in range(height)
        for x in range(width)
        for c in range(3)
    )
    picture = images.Image(images.png(width, height, rgb), "png", width, height, "a test picture")
    try:
        engine = Engine(model_dir, context=picture.tokens + 64, chat_template=chat_template)
        stats = engine.generate(
            [{"role": "user", "content": "What is in this picture?"}],
            GenerationOptions(max_tokens=HEALTH_TOKENS, temperature=0.0),
            images=[picture],
        ).stats
    except EdgeError as exc:
        raise BuildError(f"the exported vision model cannot look at a picture: {exc}") from None
    if stats.generated_tokens == 0 or stats.prompt_tokens < picture.tokens:
        raise BuildError("the exported vision model does not answer about a picture")
