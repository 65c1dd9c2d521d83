"""The per-user model store on the device: where verified bundles are unpacked.

Layout under the store root (``EDGEPHI_HOME``, else ``$XDG_DATA_HOME/edgephi``, else
``~/.local/share/edgephi``)::

    models/<name>/<version>-<manifest digest[:16]>/   one installed, verified copy
        manifest.json                                 the manifest it was verified against
        <model files>
    staging/<random>/                                 an install in progress
    trusted-keys/*.pub                                the trust store (unless EDGEPHI_TRUST is set)

An install checks the signature policy, unpacks and hashes into a fresh staging
directory on the same file system, checks what the model files ask of the runtime
(``edgephi.runtime.modelcheck``), then renames it into place in one step: a crash
leaves a stale staging directory (swept on the next install) but never a half-installed
model. Installed copies are keyed by the manifest digest, so running the same bundle
again reuses its copy without re-hashing, and a different build of the same version
gets its own directory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgephi.runtime import bundle, modelcheck
from edgephi.runtime.errors import BundleFormatError, EdgeError, StoreError
from edgephi.runtime.fsutil import atomic_write_bytes, fsync_dir, remove_tree
from edgephi.runtime.manifest import Manifest
from edgephi.runtime.signing import TrustStore

_STALE_STAGING_S = 24 * 3600


def default_root() -> Path:
    env = os.environ.get("EDGEPHI_HOME")
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edgephi"


@dataclass(frozen=True)
class InstalledModel:
    path: Path
    manifest: Manifest
    reused: bool
    verification: bundle.Verification | None = None


class Store:
    """Install bundles and find installed models under one root directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    def install_dir(self, manifest: Manifest) -> Path:
        return self.models_dir / manifest.name / f"{manifest.version}-{manifest.digest[:16]}"

    @property
    def trust(self) -> TrustStore:
        return TrustStore.default(self.root)

    def install(self, bundle_path: Path, policy: bundle.TrustPolicy | None = None) -> InstalledModel:
        """Verify and unpack ``bundle_path``, or reuse the copy installed from the same manifest.

        The signature policy is checked on every call, also when an installed copy is
        reused, so adding a trust store takes effect for models installed before it.
        """
        policy = policy or bundle.TrustPolicy.from_store(self.trust)
        info = bundle.open_bundle(Path(bundle_path), policy)
        final = self.install_dir(info.manifest)
        if self._is_installed(final, info.manifest):
            return InstalledModel(final, info.manifest, reused=True, verification=info.verification)
        staging = self._new_staging()
        try:
            extracted = bundle.extract(info.path, staging, policy)
            manifest = extracted.manifest
            if manifest.digest != info.manifest.digest:
                raise BundleFormatError("the bundle changed while it was being installed")
            modelcheck.check_model_dir(staging, {f.path for f in manifest.files})
            atomic_write_bytes(staging / bundle.MANIFEST_MEMBER, manifest.canonical_bytes())
            fsync_dir(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError:
                # Another process installed the same manifest first; theirs is as good as ours.
                if self._is_installed(final, manifest):
                    return InstalledModel(final, manifest, reused=True, verification=info.verification)
                raise
            fsync_dir(final.parent)
            return InstalledModel(final, manifest, reused=False, verification=info.verification)
        except OSError as exc:
            if isinstance(exc, EdgeError):
                raise
            raise StoreError(f"cannot install into {self.root}: {exc.strerror or exc}") from None
        finally:
            remove_tree(staging)

    def installed(self) -> list[InstalledModel]:
        out: list[InstalledModel] = []
        if not self.models_dir.is_dir():
            return out
        for path in sorted(self.models_dir.glob("*/*")):
            with contextlib.suppress(OSError, BundleFormatError):
                manifest = Manifest.from_bytes((path / bundle.MANIFEST_MEMBER).read_bytes())
                out.append(InstalledModel(path, manifest, reused=True))
        return out

    def _is_installed(self, final: Path, manifest: Manifest) -> bool:
        try:
            return (final / bundle.MANIFEST_MEMBER).read_bytes() == manifest.canonical_bytes()
        except OSError:
            return False

    def _new_staging(self) -> Path:
        try:
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            self._sweep_stale_staging()
            return Path(tempfile.mkdtemp(prefix="install-", dir=self.staging_dir))
        except OSError as exc:
            raise StoreError(
                f"cannot create a staging directory in {self.root}: {exc.strerror or exc}"
            ) from None

    def _sweep_stale_staging(self) -> None:
        # A crashed install leaves its staging directory behind; clear old ones only, since a
        # recent one may belong to an install running right now in another process.
        cutoff = time.time() - _STALE_STAGING_S
        for entry in self.staging_dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    remove_tree(entry)
