"""The .phi container: the one place that knows how a bundle is laid out on disk.

A bundle is a ZIP archive (readable with any language's standard library):

1. ``manifest.json`` — the first member, stored uncompressed (``edgephi.runtime.manifest``).
2. ``model/<path>`` — one member per manifest file entry, in manifest order. Large
   binaries are stored, small text files may be deflated.

Nothing else may be in the archive. The reader checks, before a single byte of model
data is written: the member list equals the manifest's file list exactly (no extra,
missing, duplicate or case-colliding names), every member is a regular file with a safe
name, its uncompressed size equals the manifest's, compression ratios and totals stay
under the limits below. While extracting it hashes every file and compares size and
sha256 with the manifest. The writer (``edgephi.packager.writer``) follows the same rules
by calling the same checks.

Format versions: a reader accepts its own major version and any minor version of it
(minor versions only add optional keys); a different major version is refused with a
request to upgrade.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgephi.runtime.errors import BundleFormatError, BundleNotFound, IntegrityError
from edgephi.runtime.manifest import Manifest, check_member_path

MANIFEST_MEMBER = "manifest.json"
MODEL_PREFIX = "model/"
SUFFIX = ".phi"

MAX_MANIFEST_BYTES = 1 << 20
MAX_TOTAL_BYTES = 256 << 30
MAX_COMPRESSION_RATIO = 200
_CHUNK = 1 << 20


def member_name(path: str) -> str:
    return MODEL_PREFIX + check_member_path(path)


@dataclass(frozen=True)
class BundleInfo:
    """A bundle whose container and manifest have been checked (content not yet hashed)."""

    path: Path
    manifest: Manifest

    @property
    def digest(self) -> str:
        return self.manifest.digest


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise BundleNotFound(f"bundle {path} does not exist")
    if not path.is_file():
        raise BundleFormatError(f"{path} is not a file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise BundleFormatError(f"{path} is not a .phi bundle (not a ZIP archive, or truncated)") from None
    except OSError as exc:
        raise BundleFormatError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_member_kind(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise BundleFormatError(f"member {info.filename!r} is not a regular file (link or device)")
    if info.flag_bits & 0x1:
        raise BundleFormatError(f"member {info.filename!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BundleFormatError(f"member {info.filename!r} uses an unsupported compression method")


def _read_manifest(zf: zipfile.ZipFile) -> Manifest:
    infos = zf.infolist()
    if not infos or infos[0].filename != MANIFEST_MEMBER:
        raise BundleFormatError(f"the first member of a bundle must be {MANIFEST_MEMBER}")
    first = infos[0]
    _check_member_kind(first)
    if first.file_size > MAX_MANIFEST_BYTES:
        raise BundleFormatError(f"{MANIFEST_MEMBER} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        with zf.open(first) as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BundleFormatError(f"{MANIFEST_MEMBER} is unreadable: {exc}") from None
    return Manifest.from_bytes(raw)


def check_members(zf: zipfile.ZipFile, manifest: Manifest) -> dict[str, zipfile.ZipInfo]:
    """Check that the archive holds exactly the manifest's files; map path → member."""
    expected = {member_name(f.path): f for f in manifest.files}
    members: dict[str, zipfile.ZipInfo] = {}
    folded: set[str] = set()
    for info in zf.infolist()[1:]:
        name = info.filename
        if name.casefold() in folded or name == MANIFEST_MEMBER:
            raise BundleFormatError(f"member {name!r} appears twice in the bundle")
        folded.add(name.casefold())
        if name not in expected:
            raise BundleFormatError(f"member {name!r} is not listed in the manifest")
        _check_member_kind(info)
        entry = expected[name]
        if info.file_size != entry.size:
            raise IntegrityError(
                f"{entry.path}: archive says {info.file_size} bytes, manifest says {entry.size}"
            )
        if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
            raise BundleFormatError(f"member {name!r} has a compression ratio above {MAX_COMPRESSION_RATIO}")
        members[entry.path] = info
    missing = [f.path for f in manifest.files if f.path not in members]
    if missing:
        raise BundleFormatError(f"the manifest lists {', '.join(missing)} but the bundle does not contain it")
    if manifest.total_size > MAX_TOTAL_BYTES:
        raise BundleFormatError(f"the bundle unpacks to {manifest.total_size} bytes, over the limit")
    return members


def open_bundle(path: Path) -> BundleInfo:
    """Read and check a bundle's container and manifest without unpacking the model."""
    path = Path(path)
    with _open_zip(path) as zf:
        manifest = _read_manifest(zf)
        check_members(zf, manifest)
    return BundleInfo(path=path, manifest=manifest)


def extract(path: Path, dest: Path) -> Manifest:
    """Unpack a bundle into the empty directory ``dest``, hashing every file on the way.

    ``dest`` must be a fresh directory the caller created (the store's staging directory);
    files are created with O_EXCL and O_NOFOLLOW so nothing pre-existing is overwritten
    or followed. On any error the caller discards ``dest`` whole.
    """
    path, dest = Path(path), Path(dest)
    with _open_zip(path) as zf:
        manifest = _read_manifest(zf)
        members = check_members(zf, manifest)
        for entry in manifest.files:
            target = dest.joinpath(*entry.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract_member(zf, members[entry.path], target, entry.path, entry.size, entry.sha256)
    return manifest


def _extract_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, rel: str, size: int, sha256: str
) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    digest = hashlib.sha256()
    written = 0
    fd = os.open(target, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > size:
                    raise IntegrityError(f"{rel}: more data than the {size} bytes the manifest lists")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"{rel}: content is corrupt ({exc})") from None
    except (EOFError, zipfile.LargeZipFile) as exc:
        raise IntegrityError(f"{rel}: content is truncated ({exc})") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, IntegrityError):
            raise
        raise IntegrityError(f"{rel}: cannot be read from the bundle ({exc})") from None
    if written != size:
        raise IntegrityError(f"{rel}: {written} bytes in the bundle, the manifest lists {size}")
    actual = digest.hexdigest()
    if actual != sha256:
        raise IntegrityError(f"{rel}: sha256 mismatch (manifest {sha256[:12]}…, content {actual[:12]}…)")
