"""Step 1 of a build: turn what the user typed after ``edge-pack build`` into a model source.

Three kinds of source are accepted:

* ``hf-folder`` — a local Hugging Face checkpoint folder (``config.json`` + weights);
* ``gguf``      — a ``.gguf`` file of any quantisation type; it is dequantised to F32 and
  written as a Hugging Face folder first (``edgephi.packager.gguf``), because the builder
  reads only F16/F32 GGUF and still wants a config folder;
* ``hf-id``     — a hub model id such as ``microsoft/Phi-3.5-mini-instruct``, passed to the
  builder, which downloads it (needs a network).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgephi.packager.builder import SUPPORTED_ARCHITECTURES
from edgephi.runtime.errors import NotAModel, SourceNotFound, UnsupportedArchitecture

GGUF_MAGIC = b"GGUF"
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


@dataclass(frozen=True)
class Source:
    kind: str  # "hf-folder", "gguf" or "hf-id"
    ref: str  # what the user gave
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def default_name(self) -> str:
        stem = Path(self.ref).name if self.kind != "hf-id" else self.ref.split("/")[-1]
        if self.kind == "gguf":
            stem = Path(stem).stem
            # Drop a trailing quantisation tag such as .Q4_1, -q8_0 or .F16.
            stem = re.sub(r"[.-](?:[QqFf]\d+(?:_[A-Za-z0-9]+)*|I?Q\d\w*|BF16|bf16)$", "", stem)
        return sanitize_name(stem)


def sanitize_name(raw: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-._")
    return (name or "model")[:64]


def resolve(ref: str) -> Source:
    """Classify and check a source; raise a clear error for anything unusable."""
    path = Path(ref).expanduser()
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == GGUF_MAGIC:
            return Source("gguf", str(path), path)
        if path.name == "config.json":
            return resolve(str(path.parent))
        raise NotAModel(f"{path} is not a GGUF file (no GGUF header)")
    if path.is_dir():
        return _hf_folder(path)
    if path.exists():
        raise NotAModel(f"{path} is neither a file nor a folder")
    if _HF_ID_RE.match(ref) and not ref.startswith((".", "/", "~")):
        return Source("hf-id", ref)
    raise SourceNotFound(f"{ref} does not exist and is not a Hugging Face model id")


def _hf_folder(path: Path) -> Source:
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve(str(ggufs[0]))
        raise NotAModel(f"{path} has no config.json, so it is not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise NotAModel(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise NotAModel(f"{config_file} does not hold a JSON object")
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise NotAModel(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    check_architecture(config, str(path))
    return Source("hf-folder", str(path), path, config)


def check_architecture(config: dict[str, Any], where: str) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{where}: architecture {arch or '(none in config.json)'} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return str(arch)
