"""For the ``source`` step of a build (``edgephi.packager.pipeline``): turn what the user
typed after ``edge-pack build`` into a model source.

Three kinds of source are accepted:

* ``hf-folder`` — a local Hugging Face checkpoint folder (``config.json`` + weights);
* ``gguf``      — a ``.gguf`` file of any quantisation type; it is dequantised to F32 and
  written as a Hugging Face folder first (``edgephi.packager.gguf``), because the builder
  reads only F16/F32 GGUF and still wants a config folder;
* ``hf-id``     — a hub model id such as ``microsoft/Phi-3.5-mini-instruct``: its config.json
  is fetched first (``hub_config``: the architecture is checked, and a gated, missing or
  unreachable model refused, before gigabytes move), then the builder downloads the rest.
  No token is asked for unless one is set or stored: public models need no login.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgephi.core.errors import (
    DependencyMissing,
    NotAModel,
    SourceError,
    SourceNotFound,
    UnsupportedArchitecture,
)
from edgephi.packager.builder import SUPPORTED_ARCHITECTURES
from edgephi.runtime.bundle import GGUF_MAGIC

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


def hub_config(ref: str, cache_dir: Path) -> dict[str, Any]:
    """A hub model's config.json, fetched into the builder's cache; its architecture checked.

    The stored or ``HF_TOKEN`` token is used when there is one, none otherwise.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise DependencyMissing(
            "downloading from the hub needs huggingface_hub, which is not installed"
        ) from None
    login = "run `hf auth login` (or set HF_TOKEN)"
    try:
        path = hf_hub_download(ref, "config.json", cache_dir=str(cache_dir))
    except GatedRepoError:
        raise SourceError(
            f"{ref} is a gated model: the hub serves it only to accounts that accepted its licence",
            hint=f"accept it on huggingface.co/{ref}, then {login} and build again",
        ) from None
    except RepositoryNotFoundError:
        raise SourceNotFound(
            f"{ref} is not a model on the Hugging Face hub, or it is private",
            hint=f"check the id; for a private model {login}",
        ) from None
    except LocalEntryNotFoundError as exc:  # (an EntryNotFoundError: offline, nothing cached)
        raise SourceError(
            f"cannot fetch {ref} from the Hugging Face hub: {type(exc).__name__}",
            hint="check the network (and HF_HUB_OFFLINE), or download the model and give its folder",
        ) from None
    except EntryNotFoundError:
        raise NotAModel(f"{ref} on the hub has no config.json, so it is not a transformers model") from None
    except OSError as exc:  # requests' connection errors are OSErrors
        raise SourceError(
            f"cannot fetch {ref} from the Hugging Face hub: {type(exc).__name__}",
            hint="check the network (and HF_HUB_OFFLINE), or download the model and give its folder",
        ) from None
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise NotAModel(f"{ref}'s config.json does not hold a JSON object")
    check_architecture(config, ref)
    return config
