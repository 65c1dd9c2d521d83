"""The per-user model store on the device: where verified bundles are unpacked.

Layout under the store root (``EDGEPHI_HOME``, else ``$XDG_DATA_HOME/edgephi``, else
``~/.local/share/edgephi``)::

    models/<name>/<version>-<manifest digest[:16]>/   one installed, verified copy
        manifest.json                                 the manifest it was verified against
        <model files>
    models/<name>/current, previous                   which version runs, and the one before
    models/<name>/state.json                          the highest version ever accepted,
                                                      versions rolled back from, a hold
    downloads/                                        update downloads, kept across restarts
    staging/<random>/                                 an install in progress
    trusted-keys/*.pub                                the trust store (unless EDGEPHI_TRUST is set)
    channels.json                                     per channel, the newest index accepted

An install checks the signature policy, unpacks and hashes into a fresh staging
directory on the same file system, checks what the model files ask of the runtime
(``edgephi.runtime.modelcheck``), then renames it into place in one step: a crash
leaves a stale staging directory (swept on the next install) but never a half-installed
model. Installed copies are keyed by the manifest digest, so running the same bundle
again reuses its copy without re-hashing. A different build of a version already
installed replaces it, as a tag does: the pointers move to the new copy and the old one
goes (unless a running process still reads it; ``prune`` takes it later).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BundleFormatError, EdgeError, StoreError
from edgephi.core.fsutil import atomic_write_bytes, fsync_dir, remove_tree, sha256_file
from edgephi.runtime import bundle, memory, modelcheck
from edgephi.runtime.manifest import Manifest, is_valid_version, version_key
from edgephi.runtime.signing import TrustStore

_STALE_STAGING_S = 24 * 3600
DISK_MARGIN = 64 << 20  # left free after an install or update
IN_USE = ".in-use"


class InUse:
    """A shared lock held on an installed model while a process may read its files.

    ``Store.remove`` and ``Store.prune`` leave a locked model alone. The lock goes with the
    process (or this object). ``flock`` where the OS has it (Linux, Android, macOS);
    elsewhere nothing is locked.
    """

    def __init__(self, folder: Path) -> None:
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        try:
            fd = os.open(folder / IN_USE, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            return  # a read-only store: nothing can remove the model either
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def in_use(folder: Path) -> bool:
    """Whether some process holds ``InUse`` on ``folder`` (this one included)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(folder / IN_USE, os.O_RDONLY)
    except OSError:
        return False  # never run since it was installed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's own lock
    return False


def _gone(owner: Path) -> bool:
    """Whether the process named in a staging folder's owner file has ended (on this host)."""
    try:
        pid = int(owner.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


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

    def install(
        self,
        bundle_path: Path,
        policy: bundle.TrustPolicy | None = None,
        checked: bundle.BundleInfo | None = None,
    ) -> InstalledModel:
        """Verify and unpack ``bundle_path``, or reuse the copy installed from the same manifest.

        The signature policy is checked on every call, also when an installed copy is
        reused, so adding a trust store takes effect for models installed before it.
        ``checked`` is the result of ``bundle.open_bundle`` under the same policy, when the
        caller already has it; the content is hashed during extraction either way.
        """
        policy = policy or bundle.TrustPolicy.from_store(self.trust)
        info = checked if checked is not None else bundle.open_bundle(Path(bundle_path), policy)
        final = self.install_dir(info.manifest)
        if self.is_installed(info.manifest):
            return InstalledModel(final, info.manifest, reused=True, verification=info.verification)
        self.check_space(info.manifest.total_size, f"installing {info.manifest.name}")
        with self.staging() as staging:
            extracted = bundle.extract(info.path, staging, policy)
            if extracted.manifest.digest != info.manifest.digest:
                raise BundleFormatError("the bundle changed while it was being installed")
            return self.commit(staging, extracted.manifest, info.verification)

    def check_space(self, needed: int, what: str, hint: str = "free some space, or `edge-run prune`") -> None:
        """Refuse, before writing anything, what would not fit on the store's file system
        (with a margin, so the device is not left with a full disk)."""
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < needed + DISK_MARGIN:
            raise StoreError(
                f"{what} needs {(needed + DISK_MARGIN) / 1e6:.0f} MB free on {self.root}, "
                f"there is {free / 1e6:.0f} MB",
                hint=hint,
            )

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging directory on the store's file system, removed afterwards whatever happens."""
        staging = self._new_staging()
        try:
            yield staging
        except OSError as exc:
            if isinstance(exc, EdgeError):
                raise
            raise StoreError(f"cannot install into {self.root}: {exc.strerror or exc}") from None
        finally:
            remove_tree(staging)
            with contextlib.suppress(OSError):
                (self.staging_dir / f"{staging.name}.owner").unlink()

    def commit(
        self, staging: Path, manifest: Manifest, verification: bundle.Verification | None = None
    ) -> InstalledModel:
        """Make a staging directory holding exactly ``manifest``'s verified files an installed version.

        The model files are checked (``modelcheck``), the manifest is written beside them,
        and the directory is renamed into place in one step.
        """
        modelcheck.check_model_dir(staging, {f.path for f in manifest.files})
        memory.check_facts(manifest, staging)  # the plan reads these facts: they must be true
        atomic_write_bytes(staging / bundle.MANIFEST_MEMBER, manifest.canonical_bytes())
        fsync_dir(staging)
        final = self.install_dir(manifest)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process installed the same manifest first; theirs is as good as ours.
            if self.is_installed(manifest):
                return InstalledModel(final, manifest, reused=True, verification=verification)
            raise
        fsync_dir(final.parent)
        installed = InstalledModel(final, manifest, reused=False, verification=verification)
        self._supersede(installed)
        return installed

    def _supersede(self, model: InstalledModel) -> None:
        """Replace other builds of ``model``'s NAME:VERSION with it: one copy per version."""
        name, folder = model.manifest.name, self.models_dir / model.manifest.name
        older = [
            m
            for m in self.installed(name)
            if m.manifest.version == model.manifest.version and m.path != model.path
        ]
        for which in ("current", "previous"):
            pointed = self._pointer(name, which)
            if pointed is not None and any(m.path == pointed.path for m in older):
                atomic_write_bytes(folder / which, model.path.name.encode())
        for m in older:
            if not in_use(m.path):
                remove_tree(m.path)

    def installed(self, name: str | None = None) -> list[InstalledModel]:
        out: list[InstalledModel] = []
        if not self.models_dir.is_dir():
            return out
        for path in sorted(self.models_dir.glob(f"{name or '*'}/*")):
            if not path.is_dir() or path.name.startswith("."):
                continue
            with contextlib.suppress(OSError, BundleFormatError):
                manifest = Manifest.from_bytes((path / bundle.MANIFEST_MEMBER).read_bytes())
                out.append(InstalledModel(path, manifest, reused=True))
        return out

    # --- versions side by side: the current/previous pointers and the accepted-version state ---
    #
    # models/<name>/current and models/<name>/previous are small files naming a version
    # directory. Files rather than symlinks, so the switch works on Windows and Android
    # storage too; each is replaced by an atomic rename. models/<name>/state.json records the
    # highest version ever accepted, which updates may not go below.

    def _pointer(self, name: str, which: str) -> InstalledModel | None:
        try:
            target = (self.models_dir / name / which).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        path = self.models_dir / name / target
        if "/" in target or target.startswith(".") or not path.is_dir():
            return None
        try:
            manifest = Manifest.from_bytes((path / bundle.MANIFEST_MEMBER).read_bytes())
        except (OSError, BundleFormatError):
            return None
        return InstalledModel(path, manifest, reused=True)

    def current(self, name: str) -> InstalledModel | None:
        return self._pointer(name, "current")

    def previous(self, name: str) -> InstalledModel | None:
        return self._pointer(name, "previous")

    def switch(self, model: InstalledModel) -> None:
        """Make ``model`` current; the model it replaces becomes ``previous``."""
        folder = self.models_dir / model.manifest.name
        old = self.current(model.manifest.name)
        if old is not None and old.path != model.path:
            atomic_write_bytes(folder / "previous", old.path.name.encode())
        atomic_write_bytes(folder / "current", model.path.name.encode())

    def rollback(self, name: str) -> InstalledModel:
        """Swap current and previous."""
        old, prev = self.current(name), self.previous(name)
        if prev is None:
            raise StoreError(f"{name} has no previous version to roll back to", hint="nothing was changed")
        folder = self.models_dir / name
        if old is not None:
            atomic_write_bytes(folder / "previous", old.path.name.encode())
        atomic_write_bytes(folder / "current", prev.path.name.encode())
        return prev

    # models/<name>/state.json: {"highest": the highest version ever accepted, "rejected":
    # versions rolled back from (updates skip them), "held": updates leave the model alone}.

    def _state(self, name: str) -> dict[str, Any]:
        try:
            state = json.loads((self.models_dir / name / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.models_dir / name / "state.json", json.dumps(state, sort_keys=True).encode())

    def highest_accepted(self, name: str) -> str | None:
        value = self._state(name).get("highest")
        return value if isinstance(value, str) and is_valid_version(value) else None

    def accept(self, name: str, version: str) -> None:
        """Record ``version`` as accepted; the highest accepted version never goes down."""
        highest = self.highest_accepted(name)
        if highest is None or version_key(version) > version_key(highest):
            self._write_state(name, {**self._state(name), "highest": version})

    def rejected(self, name: str) -> set[str]:
        """Versions rolled back from on this device: updates do not take them again."""
        values = self._state(name).get("rejected")
        return {v for v in values if isinstance(v, str)} if isinstance(values, list) else set()

    def reject(self, name: str, version: str) -> None:
        state = self._state(name)
        self._write_state(
            name, {**state, "rejected": sorted(self.rejected(name) | {version}, key=version_key)}
        )

    def clear_rejected(self, name: str) -> set[str]:
        cleared = self.rejected(name)
        if cleared:
            self._write_state(name, {k: v for k, v in self._state(name).items() if k != "rejected"})
        return cleared

    def held(self, name: str) -> bool:
        return self._state(name).get("held") is True

    def hold(self, name: str, on: bool = True) -> None:
        """Keep ``name`` at its current version whatever a channel offers (or stop keeping it)."""
        state = {k: v for k, v in self._state(name).items() if k != "held"}
        self._write_state(name, {**state, "held": True} if on else state)

    # channels.json: {channel URL: the issued_at of the newest index accepted from it}.

    def channel_seen(self, url: str) -> str | None:
        value = self._channels().get(url)
        return value if isinstance(value, str) else None

    def see_channel(self, url: str, issued_at: str) -> None:
        atomic_write_bytes(
            self.root / "channels.json",
            json.dumps({**self._channels(), url: issued_at}, sort_keys=True).encode(),
        )

    def _channels(self) -> dict[str, Any]:
        try:
            seen = json.loads((self.root / "channels.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return seen if isinstance(seen, dict) else {}

    def adopt(self, model: InstalledModel) -> None:
        """Make ``model`` current if its name has no current version yet.

        A bundle run or installed by hand is then what ``edge-run NAME`` runs (as Ollama's
        pull); updates switch only after their health check, so they do not adopt.
        """
        if self.current(model.manifest.name) is None:
            self.switch(model)

    def find(self, name: str, version: str | None = None) -> InstalledModel | None:
        """``NAME`` (its current version) or ``NAME:VERSION`` (current if it is that version,
        else the newest install of it)."""
        current = self.current(name)
        if version is None or (current is not None and current.manifest.version == version):
            return current
        builds = [m for m in self.installed(name) if m.manifest.version == version]
        return max(builds, key=lambda m: m.path.stat().st_mtime) if builds else None

    def remove(self, name: str, version: str | None = None) -> list[InstalledModel]:
        """Remove ``name`` entirely, or every install of one ``version`` that is not current."""
        models = self.installed(name)
        if version is None:
            self._refuse_in_use(name, models)
            if models or (self.models_dir / name).is_dir():
                remove_tree(self.models_dir / name)
            return models
        current = self.current(name)
        if current is not None and current.manifest.version == version:
            raise StoreError(
                f"{name}:{version} is the current version of {name}",
                hint=f"`edge-run rollback {name}` first, or `edge-run rm {name}` to remove the model",
            )
        doomed = [m for m in models if m.manifest.version == version]
        self._refuse_in_use(name, doomed)
        previous = self.previous(name)
        if previous is not None and previous.manifest.version == version:
            (self.models_dir / name / "previous").unlink(missing_ok=True)
        for m in doomed:
            remove_tree(m.path)
        return doomed

    @staticmethod
    def _refuse_in_use(name: str, models: list[InstalledModel]) -> None:
        busy = [m.manifest.version for m in models if in_use(m.path)]
        if busy:
            raise StoreError(
                f"{name} {', '.join(busy)} is in use by a running edge-run (a chat or a server)",
                hint="stop it first; nothing was removed",
            )

    def size(self, model: InstalledModel) -> int:
        return sum(f.size for f in model.manifest.files)

    def prune(self, name: str, also_keep: Path | None = None) -> list[Path]:
        """Remove installed versions of ``name`` other than current, previous, ``also_keep``
        and those in use — among them orphans an update left when it failed after unpacking."""
        keep = {m.path for m in (self.current(name), self.previous(name)) if m is not None}
        if not keep:
            return []
        if also_keep is not None:
            keep.add(also_keep)
        removed = [m.path for m in self.installed(name) if m.path not in keep and not in_use(m.path)]
        removed += [p for p in (self.models_dir / name).glob(".damaged-*") if not in_use(p)]
        for path in removed:
            remove_tree(path)
        return removed

    def is_installed(self, manifest: Manifest) -> bool:
        """Whether ``manifest``'s install is there, whole by size. A copy whose files lost or
        changed length is set aside (``quarantine``), so the install redoes it."""
        final = self.install_dir(manifest)
        try:
            if (final / bundle.MANIFEST_MEMBER).read_bytes() != manifest.canonical_bytes():
                return False
        except OSError:
            return False
        model = InstalledModel(final, manifest, reused=True)
        if self.damage(model, full=False):
            self.quarantine(model)
            return False
        return True

    def damage(self, model: InstalledModel, full: bool = True) -> list[str]:
        """What is wrong with an installed copy's files: missing, resized, or (``full``: every
        byte re-hashed) changed. Empty when it is as installed."""
        problems: list[str] = []
        for entry in model.manifest.files:
            path = model.path.joinpath(*entry.path.split("/"))
            try:
                size = path.stat().st_size
            except OSError:
                problems.append(f"{entry.path} is missing")
                continue
            if size != entry.size:
                problems.append(f"{entry.path} is {size} bytes, not {entry.size}")
            elif full and sha256_file(path) != entry.sha256:
                problems.append(f"{entry.path} does not match its sha256")
        return problems

    def quarantine(self, model: InstalledModel) -> Path:
        """Move a damaged copy aside (``.damaged-…``, which ``prune`` and ``rm`` clear): it no
        longer runs, and installing its bundle again makes a fresh copy."""
        aside = model.path.with_name(f".damaged-{model.path.name}-{int(time.time())}")
        os.rename(model.path, aside)
        return aside

    def _new_staging(self) -> Path:
        try:
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            self._sweep_stale_staging()
            staging = Path(tempfile.mkdtemp(prefix="install-", dir=self.staging_dir))
            # Whose it is: a sweep may take it as soon as that process is gone.
            (self.staging_dir / f"{staging.name}.owner").write_text(str(os.getpid()))
            return staging
        except OSError as exc:
            raise StoreError(
                f"cannot create a staging directory in {self.root}: {exc.strerror or exc}"
            ) from None

    def _sweep_stale_staging(self) -> None:
        # A crashed install leaves its staging directory behind. Clear those whose process
        # is gone, and any older than a day (a recent one without an owner may belong to an
        # install running right now in another process).
        cutoff = time.time() - _STALE_STAGING_S
        for entry in self.staging_dir.iterdir():
            if entry.name.endswith(".owner"):
                continue
            owner = self.staging_dir / f"{entry.name}.owner"
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff or _gone(owner):
                    remove_tree(entry)
                    owner.unlink(missing_ok=True)
