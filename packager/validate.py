"""Step 4 of a build: prove the exported model loads and generates before it is shipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgephi.runtime.engine import Engine
from edgephi.runtime.errors import BuildError, EdgeError
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
        text = engine.generate(
            [{"role": "user", "content": HEALTH_PROMPT}],
            GenerationOptions(max_tokens=HEALTH_TOKENS, temperature=0.0),
        ).text
    except EdgeError as exc:
        raise BuildError(f"the exported model does not run in onnxruntime-genai: {exc}") from None
    if engine.last_stats is None or engine.last_stats.generated_tokens == 0:
        raise BuildError("the exported model loads but generates nothing")
    return {"prompt": HEALTH_PROMPT, "max_tokens": HEALTH_TOKENS, "text": text}
