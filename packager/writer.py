"""The ``write`` step of a build (``edgephi.packager.pipeline``), and ``edge-pack sign``:
write .phi archives.

The layout is owned by ``edgephi.runtime.bundle``: ``manifest.json`` first, then
``manifest.sig`` when signed, then the model files in manifest order. ONNX weights are
stored uncompressed (INT4 data barely compresses and a device should not spend time
inflating it); text files are deflated. Timestamps are fixed, so the same inputs give
the same bytes. Before writing, the model folder passes the same checks a device applies
(``edgephi.runtime.modelcheck``); after writing, the archive is read back with the
device's reader. It is written to a temporary file beside the output and renamed over it
only when complete, so a failed build never leaves a partial bundle or damages an older one.
"""

from __future__ import annotations

import dataclasses
import shutil
import stat
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from edgephi.core.fsutil import atomic_output
from edgephi.runtime import bundle, modelcheck
from edgephi.runtime.manifest import Manifest
from edgephi.runtime.signing import SigningKey, encode_signatures

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_DEFLATE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def _info(name: str, size: int, compress: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.file_size = size
    return info


def _signed(manifest: Manifest, keys: Sequence[SigningKey]) -> tuple[Manifest, bytes, bytes | None]:
    manifest = dataclasses.replace(manifest, signed_by=tuple(k.key_id for k in keys))
    manifest = Manifest.from_dict(manifest.to_dict())  # the reader's rules, applied before writing
    raw = manifest.canonical_bytes()
    sig = encode_signatures([k.sign(raw) for k in keys]) if keys else None
    return manifest, raw, sig


OpenFile = Callable[[str], IO[bytes]]  # opens a bundle file by its manifest path


def _write(
    output: Path,
    manifest: Manifest,
    raw: bytes,
    sig: bytes | None,
    open_file: OpenFile,
    keys: Sequence[SigningKey],
) -> None:
    with atomic_output(output) as tmp:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            zf.writestr(_info(bundle.MANIFEST_MEMBER, len(raw), compress=False), raw)
            if sig is not None:
                zf.writestr(_info(bundle.SIGNATURE_MEMBER, len(sig), compress=False), sig)
            for entry in manifest.files:
                info = _info(
                    bundle.member_name(entry.path), entry.size, entry.path.endswith(_DEFLATE_SUFFIXES)
                )
                with open_file(entry.path) as fin, zf.open(info, "w", force_zip64=entry.size > 2**31) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
        # Read the archive back with the device's own checks — hashes and signatures
        # included — before it replaces anything.
        bundle.verify_content(tmp, bundle.TrustPolicy({k.key_id: k.public for k in keys}))


def write_bundle(
    output: Path, manifest: Manifest, model_dir: Path, keys: Sequence[SigningKey] = ()
) -> Manifest:
    """Write ``manifest`` and the files it lists (read from ``model_dir``), signed by ``keys``."""
    modelcheck.check_model_dir(model_dir, {f.path for f in manifest.files})
    manifest, raw, sig = _signed(manifest, keys)
    _write(output, manifest, raw, sig, lambda p: model_dir.joinpath(*p.split("/")).open("rb"), keys)
    return manifest


def resign(source: Path, output: Path, keys: Sequence[SigningKey]) -> Manifest:
    """Replace a bundle's signatures (``edge-pack sign``) without rebuilding it.

    The content is verified first: signing a bundle vouches for it, so a damaged or
    tampered one must not get a fresh signature.
    """
    info = bundle.verify_content(source, bundle.TrustPolicy({}, skip=True))
    manifest, raw, sig = _signed(info.manifest, keys)
    with zipfile.ZipFile(source) as zf:
        _write(output, manifest, raw, sig, lambda p: zf.open(bundle.member_name(p)), keys)
    return manifest
