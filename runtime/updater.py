"""Over-the-air updates on the device: ``edge-run update`` and ``edge-run rollback``.

One update of one model, step by step (each survives a kill -9 at any point):

1. lock      — one updater per store (``updates.lock``, an OS file lock);
2. index     — fetch ``index.json`` + ``index.sig``; accept it only if a trusted key signed
   it and it has not expired (``edgephi.runtime.channel``);
3. decide    — refuse a release below the highest version this device ever accepted
   (anti-downgrade), for another CPU/provider, or needing a newer runtime;
4. manifest  — fetch the release's signed manifest and check it is the one the index names;
5. plan      — the files the device does not already have (by sha256, in any installed
   version); refuse unless the disk has room for them plus a margin;
6. fetch     — download each missing blob (or the whole bundle from a channel without
   blobs) with resume into ``downloads/``, which survives restarts;
7. stage     — hard-link (or copy) the files already here and move the downloads into a
   fresh staging directory; ``Store.commit`` checks and renames it into place;
8. health    — load the new version and generate; compare with the golden answer the
   packager recorded; a failure removes the new version and leaves the old one current;
9. switch    — the ``current`` pointer moves in one atomic rename (``previous`` keeps the
   old version), then the version is recorded as accepted and old versions are pruned.

Before step 9 the device runs the old model; after it, the new one — never a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgephi.core.errors import (
    ChannelError,
    DowngradeRefused,
    EdgeError,
    HealthCheckFailed,
    IntegrityError,
    StoreError,
    UpdateError,
    UpdateLocked,
)
from edgephi.core.fsutil import remove_tree
from edgephi.runtime import bundle, channel, download
from edgephi.runtime.engine import Engine
from edgephi.runtime.manifest import Manifest, version_key
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import InstalledModel, Store

Say = Callable[[str], None]


@dataclass(frozen=True)
class UpdateResult:
    name: str
    status: str  # "updated", "up-to-date", "available", "held" or "rejected"
    old_version: str | None
    new_version: str
    downloaded_bytes: int = 0

    def line(self) -> str:
        old = self.old_version or "nothing"
        if self.status == "updated":
            return (
                f"{self.name}: updated {old} → {self.new_version} ({self.downloaded_bytes} bytes downloaded)"
            )
        if self.status == "available":
            return f"{self.name}: update available {old} → {self.new_version}"
        if self.status == "held":
            return (
                f"{self.name}: held at {old} (the channel offers {self.new_version}; "
                f"`edge-run hold {self.name} --off` releases it)"
            )
        if self.status == "rejected":
            return (
                f"{self.name}: stays at {old}; {self.new_version} was rolled back on this device "
                f"(a newer version will be taken; `edge-run update … {self.name} --retry` takes it again)"
            )
        return f"{self.name}: up to date ({self.new_version})"


def _fault(step: str) -> None:
    """Test hook: ``EDGEPHI_FAULT_INJECT=<step>`` kills this process with SIGKILL at ``step``.

    The crash-safety tests use it to kill -9 the updater at exact points of an update.
    """
    if os.environ.get("EDGEPHI_FAULT_INJECT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def update_lock(store: Store) -> Iterator[None]:
    store.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.root / "updates.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: an exclusive lock of the first byte instead
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except BlockingIOError:
            raise UpdateLocked(f"another update is running on {store.root}") from None
        yield  # the OS drops the lock when the process ends, however it ends
    finally:
        os.close(fd)


def fetch_index(
    channel_url: str,
    store: Store,
    pace: download.Pace = download.DEFAULT_PACE,
    until: float | None = None,
    say: Say = lambda _m: None,
) -> channel.ChannelIndex:
    """The channel's index, signed by a trusted key, unexpired, and not older than the newest
    index this device accepted from that channel: a replayed old index (validly signed and
    not yet expired) would otherwise freeze the device at old versions until it expires.

    Key rotations the channel carries are taken first, so an index signed by the
    publisher's new key is accepted by a device that trusted the old one."""
    until = pace.clock() if until is None else until
    take_rotations(channel_url, store, pace, until, say)
    raw = download.fetch_bytes(
        download.join(channel_url, channel.INDEX), channel.MAX_INDEX_BYTES, pace, until
    )
    sig = download.fetch_optional(download.join(channel_url, channel.INDEX_SIG), 64 << 10, pace, until)
    trust = store.trust
    index = channel.verify_index(raw, sig, trust.keys(), threshold=trust.threshold)
    seen = store.channel_seen(channel_url)
    if seen is not None and channel.parse_time(index.issued_at) < channel.parse_time(seen):
        raise ChannelError(
            f"the channel served an index issued at {index.issued_at}, older than the one this "
            f"device accepted ({seen}): a replay, or a mirror that is behind",
            hint="nothing was changed; try again later, or ask the publisher to re-publish",
        )
    if seen != index.issued_at:
        store.see_channel(channel_url, index.issued_at)
    return index


def take_rotations(channel_url: str, store: Store, pace: download.Pace, until: float, say: Say) -> None:
    """Take the channel's key rotations that hand over a key this device trusts, in chain
    order. A statement about a key trusted here must be signed properly, or nothing is taken."""
    raw = download.fetch_optional(
        download.join(channel_url, channel.ROTATIONS), channel.MAX_ROTATIONS_BYTES, pace, until
    )
    if raw is None:
        return
    try:
        statements = json.loads(raw.decode("utf-8"))["rotations"]
        if not isinstance(statements, list):
            raise TypeError("rotations is not a list")
        encoded = [json.dumps(st).encode() for st in statements]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ChannelError(f"the channel's {channel.ROTATIONS} is malformed: {exc}") from None
    trust = store.trust
    for _ in range(len(encoded)):  # each pass takes one, or stops
        # One at a time: the next statement may hand over the key this one brings.
        rotation = next((r for r in map(trust.check_rotation, encoded) if r is not None), None)
        if rotation is None:
            return
        trust.rotate(rotation)
        say(f"trusting the publisher's new key {rotation.new.key_id} in place of {rotation.old}")


def update(
    channel_url: str,
    name: str | None = None,
    *,
    store: Store | None = None,
    check_only: bool = False,
    say: Say = lambda _m: None,
    health_check: bool = True,
    pace: download.Pace = download.DEFAULT_PACE,
) -> list[UpdateResult]:
    """Update ``name`` (default: every installed model the channel offers) from the channel.

    All downloads of the call share ``pace.deadline``; a stalled or dribbling link ends the
    update with ``DownloadError`` and keeps what arrived for the next call."""
    store = store or Store()
    with update_lock(store):
        until = pace.clock()
        index = fetch_index(channel_url, store, pace, until, say)
        names = [name] if name else sorted(n for n in index.releases if store.current(n) is not None)
        if not names:
            raise UpdateError(
                "no installed model is offered by this channel",
                hint=f"name one to install: {', '.join(sorted(index.releases)) or '(the channel is empty)'}",
            )
        results = []
        for model in names:
            if model not in index.releases:
                raise ChannelError(
                    f"the channel does not offer {model}; it offers {', '.join(index.releases)}"
                )
            try:
                result = _update_one(
                    channel_url, index.releases[model], store, check_only, say, health_check, pace, until
                )
            except OSError as exc:
                if isinstance(exc, EdgeError):
                    raise
                # A full disk or a write error part-way: nothing was switched, the old model stays.
                raise StoreError(
                    f"the update of {model} could not write to {store.root}: {exc.strerror or exc}"
                ) from None
            results.append(result)
        return results


def _update_one(
    channel_url: str,
    release: channel.Release,
    store: Store,
    check_only: bool,
    say: Say,
    health_check: bool,
    pace: download.Pace,
    until: float,
) -> UpdateResult:
    from edgephi.runtime.loader import check_runnable

    name = release.name
    current = store.current(name)
    old = current.manifest.version if current else None
    if store.held(name) and release.version != old:
        return UpdateResult(name, "held", old, release.version)
    if release.version in store.rejected(name):
        return UpdateResult(name, "rejected", old, release.version)
    highest = store.highest_accepted(name)
    if highest and version_key(release.version) < version_key(highest):
        raise DowngradeRefused(
            f"the channel offers {name} {release.version}, below {highest}, "
            "the highest version this device has accepted"
        )
    # The trusted index pins the manifest (and a bundle) by sha256, so what a key rotated out
    # since signed is still taken from it; a bundle given by hand is not.
    trust = store.trust
    policy = bundle.TrustPolicy.from_store(trust)
    policy = dataclasses.replace(policy, trusted={**trust.retired(), **policy.trusted})
    manifest = _fetch_manifest(channel_url, release, policy, pace, until)
    if current is not None and current.manifest.digest == manifest.digest:
        # Also finishes an update killed between the switch and the commit.
        _commit(store, name, release.version, manifest)
        return UpdateResult(name, "up-to-date", old, release.version)
    check_runnable(manifest)
    if check_only:
        return UpdateResult(name, "available", old, release.version)

    # An update that failed after unpacking (a disk full at the switch, a kill) left a whole
    # version that is neither current nor previous: such orphans go before space is counted,
    # and a whole copy of this very release is used, not unpacked again.
    store.prune(name, also_keep=store.install_dir(manifest))
    unpacked = store.is_installed(manifest)
    have = _local_files(store, name)
    missing = [f for f in manifest.files if f.sha256 not in have]
    use_blobs = bool(release.blobs)
    downloads = store.root / "downloads"
    if use_blobs:
        to_download = sum(
            f.size - _arrived(downloads / f.sha256) for f in {f.sha256: f for f in missing}.values()
        )
    else:
        to_download = release.size - _arrived(downloads / f"{release.sha256}.phi")
    store.check_space(
        to_download + (0 if unpacked else manifest.total_size),
        "the update",
        "free some space (or `edge-run prune`) and retry",
    )
    say(f"{name}: {old or 'not installed'} → {release.version}, downloading {to_download} bytes")

    downloads.mkdir(parents=True, exist_ok=True)
    fetched = 0
    if use_blobs:
        for entry in {f.sha256: f for f in missing}.values():
            url = download.join(channel_url, f"{release.blobs.rstrip('/')}/{entry.sha256}")
            fetched += download.fetch_file(
                url,
                downloads / entry.sha256,
                entry.size,
                entry.sha256,
                download.terminal_progress(entry.path),
                on_chunk=lambda: _fault("mid-download"),
                pace=pace,
                until=until,
            )
        _fault("after-download")
        installed = _stage_from_blobs(store, manifest, have, downloads)
    else:
        target = downloads / f"{release.sha256}.phi"
        if not target.exists():
            fetched = download.fetch_file(
                download.join(channel_url, release.bundle),
                target,
                release.size,
                release.sha256,
                download.terminal_progress(release.bundle),
                on_chunk=lambda: _fault("mid-download"),
                pace=pace,
                until=until,
            )
        _fault("after-download")
        installed = store.install(target, policy)
        if installed.manifest.digest != manifest.digest:
            raise IntegrityError("the channel's bundle is not the release its manifest describes")
    _fault("before-switch")

    if health_check:
        try:
            check_health(installed)
        except HealthCheckFailed:
            # Remove only what this update unpacked: a reused directory may be `previous`.
            if not installed.reused:
                remove_tree(installed.path)
            raise
    store.switch(installed)
    _fault("after-switch")
    _commit(store, name, release.version, manifest)
    return UpdateResult(name, "updated", old, release.version, fetched)


def _commit(store: Store, name: str, version: str, manifest: Manifest) -> None:
    """Record the version as accepted, prune old versions, drop finished downloads."""
    store.accept(name, version)
    store.prune(name)
    _clean_downloads(store.root / "downloads", manifest)


def _fetch_manifest(
    channel_url: str, release: channel.Release, policy: bundle.TrustPolicy, pace: download.Pace, until: float
) -> Manifest:
    import hashlib

    from edgephi.runtime.bundle import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES

    raw = download.fetch_bytes(download.join(channel_url, release.manifest), MAX_MANIFEST_BYTES, pace, until)
    if hashlib.sha256(raw).hexdigest() != release.manifest_sha256:
        raise ChannelError(f"the manifest of {release.name} {release.version} is not the one the index names")
    sig_url = download.join(channel_url, release.manifest + ".sig")
    sig = download.fetch_optional(sig_url, MAX_SIGNATURE_BYTES, pace, until)
    manifest, _, _ = bundle.read_signed_manifest(raw, sig, policy)
    if (manifest.name, manifest.version) != (release.name, release.version):
        raise ChannelError(
            f"the channel's manifest for {release.name} {release.version} describes another model"
        )
    return manifest


def _arrived(dest: Path) -> int:
    """Bytes of ``dest`` already on disk: the whole file, or its ``.part``."""
    for path in (dest, dest.with_name(dest.name + ".part")):
        with contextlib.suppress(OSError):
            return path.stat().st_size
    return 0


def _local_files(store: Store, name: str) -> dict[str, Path]:
    """sha256 → a verified local copy, from every installed version of ``name``."""
    out: dict[str, Path] = {}
    for model in store.installed(name):
        for entry in model.manifest.files:
            path = model.path.joinpath(*entry.path.split("/"))
            if path.is_file() and path.stat().st_size == entry.size:
                out.setdefault(entry.sha256, path)
    return out


def _stage_from_blobs(
    store: Store, manifest: Manifest, have: dict[str, Path], downloads: Path
) -> InstalledModel:
    final = store.install_dir(manifest)
    if (final / bundle.MANIFEST_MEMBER).is_file():
        existing = Manifest.from_bytes((final / bundle.MANIFEST_MEMBER).read_bytes())
        if existing.digest == manifest.digest:
            return InstalledModel(final, manifest, reused=True)
    with store.staging() as staging:
        for i, entry in enumerate(manifest.files):
            dest = staging.joinpath(*entry.path.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if entry.sha256 in have:
                # A copy, not a hard link: onnxruntime refuses external weights with more
                # than one link ("potential hardlink attack") for tensors in subgraphs, such
                # as the longrope caches of Phi-3.5. The disk check counted the full size.
                shutil.copyfile(have[entry.sha256], dest)
            else:
                # Copy rather than move: two paths may share one blob, and a killed run can retry.
                shutil.copyfile(downloads / entry.sha256, dest)
            if i == 0:
                _fault("mid-unpack")
        return store.commit(staging, manifest)


def _clean_downloads(downloads: Path, manifest: Manifest) -> None:
    for entry in manifest.files:
        with contextlib.suppress(OSError):
            (downloads / entry.sha256).unlink()
    for leftover in downloads.glob("*.phi"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def check_health(model: InstalledModel) -> None:
    """Load the model and generate; match the packager's golden answer when it recorded one."""
    golden = model.manifest.health
    prompt = str(golden.get("prompt", "Hello"))
    max_tokens = int(golden.get("max_tokens", 4))
    try:
        engine = Engine(model.path, context=256, chat_template=model.manifest.chat_template)
        done = engine.generate([{"role": "user", "content": prompt}], GenerationOptions(max_tokens, 0.0))
        text = done.text
    except EdgeError as exc:
        raise HealthCheckFailed(
            f"{model.manifest.name} {model.manifest.version} does not run: {exc}"
        ) from None
    if done.stats.generated_tokens == 0:
        raise HealthCheckFailed(f"{model.manifest.name} {model.manifest.version} generates nothing")
    if "text" in golden and text != golden["text"]:
        raise HealthCheckFailed(
            f"{model.manifest.name} {model.manifest.version} answered {text!r} where the packager "
            f"recorded {golden['text']!r}"
        )


def rollback(name: str, store: Store | None = None) -> InstalledModel:
    """Make the previous version current again (the newer one stays installed as previous)."""
    store = store or Store()
    with update_lock(store):
        rolled_from = store.current(name)
        restored = store.rollback(name)
        if rolled_from is not None and rolled_from.manifest.version != restored.manifest.version:
            # Remembered, or the next `edge-run update` (a cron job) would undo the rollback.
            store.reject(name, rolled_from.manifest.version)
        return restored
