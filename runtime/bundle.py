"""The .phi container: the one place that knows how a bundle is laid out on disk.

A bundle is a ZIP archive (readable with any language's standard library). Members, in
this order and nothing else:

1. ``manifest.json`` — the canonical manifest bytes (``edgephi.runtime.manifest``), stored;
2. ``manifest.sig``  — optional, the signatures over those bytes (``edgephi.runtime.signing``);
3. ``model/<path>``  — one member per manifest file entry, in manifest order; stored or
   deflated.

The reader checks, before one byte of model data is written: the member list equals
the manifest's file list exactly (no extra, missing, duplicate or case-colliding names),
every member is a regular, unencrypted file with a safe name, its uncompressed size
equals the manifest's, the compression ratio and the totals stay under the limits
below, and the signature policy holds. While extracting it hashes every file against
the manifest. The writer (``edgephi.packager.writer``) checks its output with the same
reader before the bundle replaces anything. ``docs/bundle-format.md`` is the spec.

Format versions: a reader accepts its own major version and any minor version of it
(minor versions only add optional keys); another major version is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgephi.core.errors import (
    BundleFormatError,
    BundleNotFound,
    EdgeError,
    IntegrityError,
    SignatureError,
)
from edgephi.runtime import signing
from edgephi.runtime.manifest import MAX_FILES, Manifest, check_member_path, is_canonical

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
MODEL_PREFIX = "model/"
SUFFIX = ".phi"

# The oldest runtime that reads what this writer writes (the manifest's requires.runtime).
MIN_RUNTIME = "0.1.0"

MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 64 << 10
MAX_TOTAL_BYTES = 256 << 30
MAX_COMPRESSION_RATIO = 200
_CHUNK = 1 << 20


def member_name(path: str) -> str:
    return MODEL_PREFIX + check_member_path(path)


@dataclass(frozen=True)
class Verification:
    """What is known about who made a bundle."""

    status: str  # "trusted", "untrusted-unchecked", "unsigned" or "skipped"
    key_id: str | None = None

    def describe(self) -> str:
        return {
            "trusted": f"signed by trusted key {self.key_id}",
            "untrusted-unchecked": f"signed by key {self.key_id}, not checked (no trust store here)",
            "unsigned": "unsigned",
            "skipped": "signature check SKIPPED (--insecure-skip-verify)",
        }[self.status]

    @property
    def warning(self) -> str | None:
        if self.status == "unsigned":
            return "warning: this bundle is unsigned and no trust store is set up; its origin is not verified"
        if self.status == "untrusted-unchecked":
            return f"warning: no trust store is set up, so the signature by {self.key_id} was not checked"
        if self.status == "skipped":
            return (
                "WARNING: signature verification is DISABLED (--insecure-skip-verify); "
                "file hashes are still checked"
            )
        return None


@dataclass(frozen=True)
class TrustPolicy:
    """How ``open_bundle`` treats signatures: trust these keys, or skip the check loudly."""

    trusted: dict[str, signing.PublicKey]
    skip: bool = False
    enforce: bool = False  # signatures are required even if no trusted key loads
    threshold: int = 1  # distinct trusted keys that must sign

    @classmethod
    def from_store(cls, store: signing.TrustStore, skip: bool = False) -> TrustPolicy:
        threshold = 1 if skip or not store.active else store.threshold
        return cls(trusted=store.keys(), skip=skip, enforce=store.active, threshold=threshold)


@dataclass(frozen=True)
class BundleInfo:
    """A bundle whose container, manifest and signature have been checked (content not yet hashed)."""

    path: Path
    manifest: Manifest
    verification: Verification
    signatures: tuple[tuple[str, bytes], ...] = ()

    @property
    def digest(self) -> str:
        return self.manifest.digest


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Whatever a hostile archive makes zipfile/zlib raise becomes one ``BundleFormatError``."""
    try:
        yield
    except EdgeError:
        raise
    except Exception as exc:  # zipfile, zlib, struct and friends raise a wide variety
        raise BundleFormatError(f"{what}: {type(exc).__name__}: {exc}") from None


GGUF_MAGIC = b"GGUF"


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise BundleNotFound(f"{path} does not exist")
    if not path.is_file():
        raise BundleFormatError(f"{path} is not a file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        if _starts_with(path, GGUF_MAGIC):
            raise BundleFormatError(
                f"{path} is a GGUF model file, not a .phi bundle",
                hint=f"pack it on a build host first: edge-pack build {path} -o {path.stem}.phi",
            ) from None
        raise BundleFormatError(f"{path} is not a .phi bundle (not a ZIP archive, or truncated)") from None
    except OSError as exc:
        raise BundleFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise BundleFormatError(
            f"{path} is not a readable .phi bundle: {type(exc).__name__}: {exc}"
        ) from None


def _check_member_kind(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise BundleFormatError(f"member {info.filename!r} is not a regular file (link or device)")
    if info.filename.endswith("/"):
        raise BundleFormatError(f"member {info.filename!r} is a directory entry")
    if info.flag_bits & 0x1:
        raise BundleFormatError(f"member {info.filename!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BundleFormatError(f"member {info.filename!r} uses an unsupported compression method")
    if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
        raise BundleFormatError(
            f"member {info.filename!r} has a compression ratio above {MAX_COMPRESSION_RATIO}"
        )


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    _check_member_kind(info)
    if info.file_size > limit:
        raise BundleFormatError(f"{info.filename} is larger than {limit} bytes")
    with _reading(f"{info.filename} is unreadable"), zf.open(info) as fh:
        return bytes(fh.read(limit + 1))


def claimed_signers(raw: bytes) -> tuple[str, ...]:
    """``signed_by`` read leniently from unvalidated manifest bytes (validation comes after)."""
    try:
        claimed = json.loads(raw.decode("utf-8")).get("signed_by", [])
    except (UnicodeDecodeError, ValueError, AttributeError):
        return ()
    return tuple(k for k in claimed if isinstance(k, str)) if isinstance(claimed, list) else ()


def _read_header(
    zf: zipfile.ZipFile, policy: TrustPolicy
) -> tuple[Manifest, Verification, list[tuple[str, bytes]], int]:
    """Manifest, how its origin checked out, the signatures, and how many members they took.

    The signature is checked on the raw bytes before the manifest is interpreted, so an
    edited manifest is reported as tampering rather than as whatever rule the edit broke.
    """
    infos = zf.infolist()
    if len(infos) > MAX_FILES + 2:
        raise BundleFormatError(f"the bundle has {len(infos)} members; the limit is {MAX_FILES + 2}")
    if not infos or infos[0].filename != MANIFEST_MEMBER:
        raise BundleFormatError(f"the first member of a bundle must be {MANIFEST_MEMBER}")
    raw = _read_small(zf, infos[0], MAX_MANIFEST_BYTES)
    sig_raw = None
    header = 1
    if len(infos) > 1 and infos[1].filename == SIGNATURE_MEMBER:
        sig_raw = _read_small(zf, infos[1], MAX_SIGNATURE_BYTES)
        header = 2
    manifest, verification, signatures = read_signed_manifest(raw, sig_raw, policy)
    return manifest, verification, signatures, header


def read_signed_manifest(
    raw: bytes, sig_raw: bytes | None, policy: TrustPolicy
) -> tuple[Manifest, Verification, list[tuple[str, bytes]]]:
    """Check a manifest's signature on its raw bytes, then parse and validate it.

    Also used for the manifests an update channel serves beside its bundles.
    """
    signatures = signing.parse_signatures(sig_raw) if sig_raw is not None else []
    signed_by = claimed_signers(raw)
    if signed_by and not signatures:
        raise SignatureError(
            f"the manifest says it is signed by {', '.join(signed_by)}, but it carries no signature"
        )
    verification = _verify(raw, signed_by, signatures, policy)
    manifest = Manifest.from_bytes(raw)
    if not is_canonical(raw):
        raise BundleFormatError(f"{MANIFEST_MEMBER} is not in canonical form (sorted keys, no whitespace)")
    return manifest, verification, signatures


def _verify(
    raw: bytes, signed_by: tuple[str, ...], signatures: list[tuple[str, bytes]], policy: TrustPolicy
) -> Verification:
    claimed = [kid for kid, _ in signatures if kid in signed_by]
    if policy.skip:
        return Verification("skipped", claimed[0] if claimed else None)
    if policy.trusted or policy.enforce:
        if not signatures:
            raise SignatureError(
                "the bundle is unsigned, and this device accepts only signed bundles",
                hint="ask its publisher for a signed build (edge-pack build --sign-key, or edge-pack sign)",
            )
        kid = signing.verify_manifest(raw, signed_by, signatures, policy.trusted, policy.threshold)
        return Verification("trusted", kid)
    if claimed:
        return Verification("untrusted-unchecked", claimed[0])
    return Verification("unsigned")


def check_members(zf: zipfile.ZipFile, manifest: Manifest, header: int) -> dict[str, zipfile.ZipInfo]:
    """Check that the archive holds exactly the manifest's files; map path → member."""
    expected = {member_name(f.path): f for f in manifest.files}
    members: dict[str, zipfile.ZipInfo] = {}
    folded = {MANIFEST_MEMBER, SIGNATURE_MEMBER}
    for info in zf.infolist()[header:]:
        name = info.filename
        if name.casefold() in folded:
            raise BundleFormatError(
                f"member {name!r} appears twice in the bundle (names compare case-insensitively)"
            )
        folded.add(name.casefold())
        if name not in expected:
            raise BundleFormatError(f"member {name!r} is not listed in the manifest")
        _check_member_kind(info)
        entry = expected[name]
        if info.file_size != entry.size:
            raise IntegrityError(
                f"{entry.path}: the archive says {info.file_size} bytes, the manifest {entry.size}"
            )
        members[entry.path] = info
    missing = [f.path for f in manifest.files if f.path not in members]
    if missing:
        raise BundleFormatError(f"the manifest lists {', '.join(missing)}, which the bundle does not contain")
    order = [i.filename for i in zf.infolist()[header:]]
    if order != list(expected):
        raise BundleFormatError("model members are not in manifest order")
    _check_no_overlap(zf)
    if manifest.total_size > MAX_TOTAL_BYTES:
        raise BundleFormatError(
            f"the bundle unpacks to {manifest.total_size} bytes, over the {MAX_TOTAL_BYTES} limit"
        )
    return members


def _check_no_overlap(zf: zipfile.ZipFile) -> None:
    """Each member's bytes lie apart from every other's and before the central directory.

    Members that share bytes (one deflate stream read as many files) make a small archive
    expand without bound while each member's own ratio looks harmless; this zipfile does
    not check it. A member's local header is at least 30 bytes plus its name.
    """
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    limit = getattr(zf, "start_dir", None)
    for info, following in zip(infos, [*infos[1:], None], strict=True):
        end = info.header_offset + 30 + len(info.orig_filename.encode()) + info.compress_size
        bound = following.header_offset if following is not None else limit
        if bound is not None and end > bound:
            raise BundleFormatError(
                f"member {info.filename!r} overlaps "
                f"{repr(following.filename) if following is not None else 'the central directory'}: "
                "members may not share bytes"
            )


def _inspect(
    zf: zipfile.ZipFile, path: Path, policy: TrustPolicy
) -> tuple[BundleInfo, dict[str, zipfile.ZipInfo]]:
    manifest, verification, signatures, header = _read_header(zf, policy)
    members = check_members(zf, manifest, header)
    return BundleInfo(path, manifest, verification, tuple(signatures)), members


def open_bundle(path: Path, policy: TrustPolicy | None = None) -> BundleInfo:
    """Check a bundle's container, manifest and signature without unpacking the model."""
    path = Path(path)
    with _open_zip(path) as zf, _reading(f"{path} is damaged"):
        info, _ = _inspect(zf, path, policy or TrustPolicy({}))
    return info


def extract(path: Path, dest: Path, policy: TrustPolicy | None = None) -> BundleInfo:
    """Unpack a bundle into the empty directory ``dest``, hashing every file on the way.

    ``dest`` must be a fresh directory the caller created (the store's staging directory);
    files are created with O_EXCL and O_NOFOLLOW, so nothing pre-existing is overwritten
    or followed. On any error the caller discards ``dest`` whole.
    """
    path, dest = Path(path), Path(dest)
    with _open_zip(path) as zf, _reading(f"{path} is damaged"):
        info, members = _inspect(zf, path, policy or TrustPolicy({}))
        for entry in info.manifest.files:
            target = dest.joinpath(*entry.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with _member(zf, members[entry.path], entry.path) as src:
                _copy_checked(src, target, entry.path, entry.size, entry.sha256)
    return info


def verify_content(path: Path, policy: TrustPolicy | None = None) -> BundleInfo:
    """Check everything ``extract`` checks, hashing every member, without writing anything."""
    path = Path(path)
    with _open_zip(path) as zf, _reading(f"{path} is damaged"):
        info, members = _inspect(zf, path, policy or TrustPolicy({}))
        for entry in info.manifest.files:
            with _member(zf, members[entry.path], entry.path) as src:
                _copy_checked(src, None, entry.path, entry.size, entry.sha256)
    return info


@contextlib.contextmanager
def _member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: str) -> Iterator[IO[bytes]]:
    try:
        with zf.open(info) as src:
            yield src
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"{rel}: content is corrupt ({exc})") from None


def _copy_checked(src: IO[bytes], target: Path | None, rel: str, size: int, sha256: str) -> None:
    digest = hashlib.sha256()
    written = 0
    out = None
    if target is not None:
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        )
        out = os.fdopen(os.open(target, flags, 0o644), "wb")
    try:
        while True:
            try:
                chunk = src.read(_CHUNK)
            except zipfile.BadZipFile as exc:
                raise IntegrityError(f"{rel}: content is corrupt ({exc})") from None
            except EOFError as exc:
                raise IntegrityError(f"{rel}: content is truncated ({exc})") from None
            if not chunk:
                break
            written += len(chunk)
            if written > size:
                raise IntegrityError(f"{rel}: more data than the {size} bytes the manifest lists")
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    if written != size:
        raise IntegrityError(f"{rel}: {written} bytes in the bundle, the manifest lists {size}")
    actual = digest.hexdigest()
    if actual != sha256:
        raise IntegrityError(f"{rel}: sha256 mismatch (manifest {sha256[:12]}…, content {actual[:12]}…)")
