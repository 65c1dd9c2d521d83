"""The device side must not need the build host's heavy packages, and the packages import
one way only: core ← targets ← runtime ← packager."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

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


# Which edgephi packages each may import: one way only, down to the bottom layer.
LAYERS = {
    "core": set(),
    "targets": {"core"},
    "runtime": {"core", "targets"},
    "packager": {"core", "targets", "runtime"},
}


def test_the_packages_import_only_downwards() -> None:
    root = Path(__file__).resolve().parent.parent
    wrong = []
    for package, allowed in LAYERS.items():
        files = sorted((root / package).rglob("*.py"))
        assert files, package
        for path in files:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "edgephi" and len(parts) > 1 and parts[1] not in allowed | {package}:
                        wrong.append(f"{path.relative_to(root)} imports {name}")
    assert wrong == []


def test_the_bottom_layer_needs_only_the_standard_library() -> None:
    loaded = _modules_after("import edgephi.core.errors, edgephi.core.fsutil")
    edgephi = sorted(m for m in loaded if m.startswith("edgephi.") and not m.startswith("edgephi.core"))
    assert "edgephi.core.fsutil" in loaded and edgephi == []
    assert not {"numpy", "typer", "cryptography", "onnxruntime_genai"} & loaded
