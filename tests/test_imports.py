"""The device side must not need the build host's heavy packages."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "onnx", "onnx_ir", "onnxruntime_genai.models", "edgephi.packager", "gguf")


def _modules_after(code: str) -> set[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_runtime_imports_nothing_heavy() -> None:
    loaded = _modules_after(
        "import edgephi.runtime, edgephi.runtime.cli, edgephi.runtime.engine, edgephi.targets\n"
        "edgephi.targets.names()"
    )
    assert "edgephi.runtime.cli" in loaded  # the probe did import what it claims
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []


def test_loading_a_model_imports_nothing_heavy(phi3_bundle) -> None:  # type: ignore[no-untyped-def]
    loaded = _modules_after(
        f"from edgephi.runtime import load\nm = load({str(phi3_bundle)!r})\n"
        "''.join(m.stream([{'role': 'user', 'content': 'hi'}]))"
    )
    assert "onnxruntime_genai" in loaded
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []
