"""Step 4 of a build: prove the exported model loads and generates before it is shipped."""

from __future__ import annotations

from pathlib import Path

from edgephi.runtime.engine import Engine
from edgephi.runtime.errors import BuildError, EdgeError
from edgephi.runtime.options import GenerationOptions


def smoke_test(model_dir: Path, chat_template: bool) -> str:
    """Load with onnxruntime-genai and greedily generate a few tokens; return them."""
    try:
        engine = Engine(model_dir, context=256, chat_template=chat_template)
        return engine.generate(
            [{"role": "user", "content": "Hello"}], GenerationOptions(max_tokens=4, temperature=0.0)
        )
    except EdgeError as exc:
        raise BuildError(f"the exported model does not run in onnxruntime-genai: {exc}") from None
