"""Step 5 of a build: write the .phi archive (the layout is owned by ``edgephi.runtime.bundle``).

The manifest goes first, then the model files in manifest order. ONNX weights are stored
uncompressed (INT4 data barely compresses and a device should not spend time inflating
it); text files are deflated. Timestamps are fixed so two builds of the same inputs give
the same bytes. The archive is written to a temporary file beside the output and renamed
over it only when complete, so an interrupted build never leaves a partial bundle and
never damages an older one.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path

from edgephi.runtime import bundle
from edgephi.runtime.fsutil import atomic_output
from edgephi.runtime.manifest import Manifest

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_DEFLATE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def _info(name: str, size: int, compress: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.file_size = size
    return info


def write_bundle(output: Path, manifest: Manifest, model_dir: Path) -> Path:
    """Write ``manifest`` and the files it lists (read from ``model_dir``) to ``output``."""
    manifest = Manifest.from_dict(manifest.to_dict())  # the reader's rules, applied before writing
    raw = manifest.canonical_bytes()
    with atomic_output(output) as tmp:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            zf.writestr(_info(bundle.MANIFEST_MEMBER, len(raw), compress=False), raw)
            for entry in manifest.files:
                src = model_dir.joinpath(*entry.path.split("/"))
                info = _info(
                    bundle.member_name(entry.path), entry.size, entry.path.endswith(_DEFLATE_SUFFIXES)
                )
                with open(src, "rb") as fin, zf.open(info, "w", force_zip64=entry.size > 2**31) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
        # Read the archive back with the device's own checks before it replaces anything.
        bundle.open_bundle(tmp)
    return output
