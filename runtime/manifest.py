"""The bundle manifest: what a .phi file promises about itself.

``Manifest`` is the parsed, validated form of ``manifest.json``. Both the packager
(before it writes) and the runtime (after it reads) call ``Manifest.from_dict``, so a
manifest the writer accepts is exactly one the reader accepts. The canonical bytes
(sorted keys, no whitespace, UTF-8) are what gets hashed into the install id and,
with the bundle-format issue, signed.

Keys, in ``manifest.json``:

========================  ==================================================================
``format``                always ``"edgephi-bundle"``
``format_version``        ``"MAJOR.MINOR"``; see ``edgephi.runtime.bundle`` for the rules
``name``                  model name, ``[a-z0-9][a-z0-9._-]*``, at most 64 characters
``version``               semantic version of this build of the model, e.g. ``1.2.0``
``created_at``            UTC time of the build, ISO 8601
``created_by``            tool name → version (edgephi, onnxruntime-genai, transformers, …)
``source``                where the weights came from: ``kind`` (hf-folder/hf-id/gguf), ``ref``
``model``                 ``architecture``, ``model_type``, ``context_length``, ``vocab_size``, the
                          decoder's shapes; a vision model adds ``modalities``, ``sessions``
                          and ``vision`` (typed in ``edgephi.runtime.sections``, like
                          ``target``, ``source`` and ``memory``)
``precision``             int4 / int8 / fp16 / fp32
``target``                the device profile the bundle was built for (``name``, ``execution_provider``, …)
``memory``                ``weights_bytes``, ``kv_bytes_per_token`` (fp32 KV cache, CPU),
                          ``kv_bytes_per_token_fp16`` (and ``vision_scratch_bytes``)
``requires``              ``runtime``: the oldest edgephi runtime version that can run it
``chat_template``         true when the bundle carries a chat template
``signed_by``             key ids (16 hex digits) whose signatures ``manifest.sig`` carries
``quality``               the quality card: perplexity of the packed model and of its FP32
                          reference on a named text, mean KL, top-1 agreement, the recipe
``health``                ``prompt``, ``max_tokens`` and the greedy ``text`` the packager got: the
                          golden answer an update's health check compares with
``files``                 list of ``{path, size, sha256}``, one per model file, sorted by path
========================  ==================================================================
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from edgephi.core.errors import BundleFormatError, UnsupportedFormatVersion
from edgephi.runtime.sections import MemoryFacts, ModelFacts, SourceFacts, TargetFacts
from edgephi.targets.profile import Precision

FORMAT = "edgephi-bundle"
FORMAT_VERSION = (1, 0)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+([0-9A-Za-z.-]+))?$"
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_PRECISIONS = tuple(p.value for p in Precision)  # the targets' list, not a copy
_REQUIRED = ("format", "format_version", "name", "version", "precision", "target", "files")
_OMIT_WHEN_EMPTY = ("health", "quality")
MAX_FILES = 256
MAX_PATH_LENGTH = 200


def canonical_json(data: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8: the one serialisation that is signed."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def is_canonical(raw: bytes) -> bool:
    try:
        return raw == canonical_json(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, ValueError):
        return False


def is_valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


def is_valid_version(version: str) -> bool:
    return bool(_SEMVER_RE.match(version))


def version_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """A sort key that orders semantic versions by precedence (1.0.0-rc.1 < 1.0.0 < 1.0.1)."""
    m = _SEMVER_RE.match(version)
    if not m:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (major, minor, patch, 0, parts)


def check_member_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a bundle, else raise.

    Only plain names joined by ``/`` are allowed: no absolute paths, no ``..`` or ``.``,
    no backslashes or drive letters, no empty parts, no hidden files.
    """
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_LENGTH:
        raise BundleFormatError(f"file path {path!r} is empty or longer than {MAX_PATH_LENGTH} characters")
    parts = path.split("/")
    if any(not _PATH_PART_RE.match(part) for part in parts):
        raise BundleFormatError(
            f"file path {path!r} is not a plain relative path (allowed: letters, digits, '._-' joined by '/')"
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    precision: str
    target: TargetFacts
    files: tuple[FileEntry, ...]
    format_version: str = "{}.{}".format(*FORMAT_VERSION)
    created_at: str = ""
    created_by: dict[str, str] = field(default_factory=dict)
    source: SourceFacts = field(default_factory=SourceFacts)
    model: ModelFacts = field(default_factory=ModelFacts)
    memory: MemoryFacts = field(default_factory=MemoryFacts)
    requires: dict[str, str] = field(default_factory=dict)
    chat_template: bool = False
    signed_by: tuple[str, ...] = ()
    health: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    # --- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "created_by": dict(self.created_by),
            "source": self.source.to_dict(),
            "model": self.model.to_dict(),
            "precision": self.precision,
            "target": self.target.to_dict(),
            "memory": self.memory.to_dict(),
            "requires": dict(self.requires),
            "chat_template": self.chat_template,
            "signed_by": list(self.signed_by),
            "health": dict(self.health),
            "quality": dict(self.quality),
            "files": [f.to_dict() for f in self.files],
        }

    def canonical_bytes(self) -> bytes:
        """The exact bytes this writer stores, hashes and signs.

        Optional keys added by later minor versions are left out while empty, so a
        manifest written before they existed reads back to the same bytes.
        """
        data = {k: v for k, v in self.to_dict().items() if not (k in _OMIT_WHEN_EMPTY and not v)}
        return canonical_json(data)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    # --- parsing ------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleFormatError(f"manifest.json is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BundleFormatError("manifest.json must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate every rule of the manifest and return it; raise on the first broken rule."""
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise BundleFormatError(f"manifest is missing {', '.join(missing)}")
        if data["format"] != FORMAT:
            raise BundleFormatError(f"manifest format is {data['format']!r}, expected {FORMAT!r}")
        check_format_version(data["format_version"])
        name, version, precision = data["name"], data["version"], data["precision"]
        if not isinstance(name, str) or not is_valid_name(name):
            raise BundleFormatError(f"manifest name {name!r} is not a valid model name")
        if not isinstance(version, str) or not is_valid_version(version):
            raise BundleFormatError(f"manifest version {version!r} is not a semantic version like 1.0.0")
        if precision not in _PRECISIONS:
            raise BundleFormatError(f"manifest precision {precision!r} is not one of {_PRECISIONS}")
        for key in ("created_by", "requires"):
            if not isinstance(data.get(key, {}), dict):
                raise BundleFormatError(f"manifest {key} must be an object")
        if not isinstance(data.get("chat_template", False), bool):
            raise BundleFormatError("manifest chat_template must be true or false")
        if not isinstance(data.get("created_at", ""), str):
            raise BundleFormatError("manifest created_at must be a string")
        created_by = data.get("created_by", {})
        if any(not isinstance(v, str) for v in created_by.values()):
            raise BundleFormatError("manifest created_by values must be strings")
        requires = data.get("requires", {})
        if any(not isinstance(v, str) for v in requires.values()):
            raise BundleFormatError("manifest requires values must be strings")
        if "runtime" in requires and not is_valid_version(requires["runtime"]):
            raise BundleFormatError(f"manifest requires.runtime {requires['runtime']!r} is not a version")
        signed_by = data.get("signed_by", [])
        if not isinstance(signed_by, list) or any(
            not isinstance(k, str) or not _KEY_ID_RE.match(k) for k in signed_by
        ):
            raise BundleFormatError("manifest signed_by must be a list of 16-hex-digit key ids")
        if len(set(signed_by)) != len(signed_by):
            raise BundleFormatError("manifest signed_by lists a key twice")
        health = data.get("health", {})
        if not isinstance(health, dict) or (
            health
            and not (
                isinstance(health.get("prompt"), str)
                and isinstance(health.get("text"), str)
                and isinstance(health.get("max_tokens"), int)
                and 0 < health["max_tokens"] <= 64
            )
        ):
            raise BundleFormatError("manifest health must hold prompt, text and max_tokens (1-64)")
        quality = data.get("quality", {})
        if not isinstance(quality, dict) or any(isinstance(v, (dict, list)) for v in quality.values()):
            raise BundleFormatError("manifest quality must be an object of numbers and strings")
        files = _parse_files(data["files"])
        return cls(
            name=name,
            version=version,
            precision=precision,
            target=TargetFacts.from_dict(data["target"]),
            files=files,
            format_version=data["format_version"],
            created_at=data.get("created_at", ""),
            created_by=created_by,
            source=SourceFacts.from_dict(data.get("source", {})),
            model=ModelFacts.from_dict(data.get("model", {})),
            memory=MemoryFacts.from_dict(data.get("memory", {})),
            requires=requires,
            chat_template=data.get("chat_template", False),
            signed_by=tuple(signed_by),
            health=health,
            quality=quality,
        )


def check_format_version(value: Any) -> tuple[int, int]:
    """A reader accepts its own major version, any minor (newer minors only add keys)."""
    if not isinstance(value, str) or not re.match(r"^\d{1,4}\.\d{1,4}$", value):
        raise BundleFormatError(f"manifest format_version {value!r} is not MAJOR.MINOR")
    major, minor = (int(p) for p in value.split("."))
    if major != FORMAT_VERSION[0]:
        raise UnsupportedFormatVersion(
            f"bundle format {value} is not readable by this runtime (it reads {FORMAT_VERSION[0]}.x)"
        )
    return major, minor


def _parse_files(raw: Any) -> tuple[FileEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise BundleFormatError("manifest files must be a non-empty list")
    if len(raw) > MAX_FILES:
        raise BundleFormatError(f"manifest lists {len(raw)} files; the limit is {MAX_FILES}")
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
            raise BundleFormatError(f"manifest file entry {item!r} must have exactly path, size and sha256")
        path = check_member_path(item["path"])
        size, digest = item["size"], item["sha256"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BundleFormatError(f"manifest size of {path} must be a non-negative integer")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise BundleFormatError(f"manifest sha256 of {path} must be 64 lowercase hex digits")
        folded = path.casefold()
        if folded in seen:
            raise BundleFormatError(f"manifest lists {path} twice (names are compared case-insensitively)")
        seen.add(folded)
        entries.append(FileEntry(path, size, digest))
    if [e.path for e in entries] != sorted(e.path for e in entries):
        raise BundleFormatError("manifest files must be sorted by path")
    return tuple(entries)
