"""``edge-pack publish``: add a bundle to an update channel folder (``edgephi.runtime.channel``).

The bundle is verified first (every hash; its signature with the publisher's key), then
its manifest and signature go under ``manifests/`` and each of its files under
``blobs/<sha256>`` unless already there — which is what lets a device download only what
changed, and stores each file once however many releases share it. A channel without
blobs (``--no-blobs``, for hosts that serve a few big files better) gets the whole bundle
under ``bundles/`` instead: every bundle is stored once, in one form. Last, ``index.json``
is rewritten with the new release and signed; the index is the only file devices trust
directly, so it is replaced atomically and after everything it points to is in place.

Several keys may sign (``--key`` again), for devices whose trust policy asks for more
than one signature. ``rotate_key`` hands the channel over to a new key: the old key signs
a rotation statement (``edgephi.runtime.signing.make_rotation``) that goes into
``keys/rotations.json``, and the index is signed again by the new key alone.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

from edgephi.core.errors import ChannelError, ConfigError
from edgephi.core.fsutil import atomic_output, atomic_write_bytes, sha256_file
from edgephi.runtime import bundle, channel
from edgephi.runtime.manifest import version_key
from edgephi.runtime.signing import SigningKey, encode_signatures, make_rotation

Keys = SigningKey | Sequence[SigningKey]

MAX_EXPIRES_DAYS = 3660  # ten years


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _check_expiry(expires_days: float) -> None:
    if not 0 < expires_days <= MAX_EXPIRES_DAYS:
        # An index that never expires could be replayed for ever (and datetime overflows).
        raise ConfigError(
            f"--expires-days must be above 0 and at most {MAX_EXPIRES_DAYS}, not {expires_days}"
        )


def _keys(keys: Keys) -> list[SigningKey]:
    return [keys] if isinstance(keys, SigningKey) else list(keys)


def publish(
    bundle_path: Path,
    channel_dir: Path,
    key: Keys,
    *,
    expires_days: float = 30.0,
    blobs: bool = True,
) -> channel.Release:
    _check_expiry(expires_days)
    info = bundle.verify_content(bundle_path, bundle.TrustPolicy({k.key_id: k.public for k in _keys(key)}))
    m = info.manifest
    channel_dir.mkdir(parents=True, exist_ok=True)
    index = _load_index(channel_dir, key)
    old = index.releases.get(m.name) if index else None
    if old is not None and version_key(m.version) <= version_key(old.version):
        raise ConfigError(
            f"the channel already offers {m.name} {old.version}; publish a higher version than that",
            hint="rebuild or re-sign with a higher --version",
        )
    stem = f"{m.name}-{m.version}"
    bundle_rel, manifest_rel = ("" if blobs else f"bundles/{stem}.phi"), f"manifests/{stem}.json"
    if bundle_rel:
        with atomic_output(channel_dir / bundle_rel) as tmp:
            shutil.copyfile(bundle_path, tmp)
    raw = m.canonical_bytes()
    with zipfile.ZipFile(bundle_path) as zf:
        names = zf.namelist()
        if bundle.SIGNATURE_MEMBER in names:
            atomic_write_bytes(channel_dir / (manifest_rel + ".sig"), zf.read(bundle.SIGNATURE_MEMBER))
        if blobs:
            for entry in m.files:
                blob = channel_dir / "blobs" / entry.sha256
                if not blob.exists():
                    with (
                        atomic_output(blob) as tmp,
                        zf.open(bundle.member_name(entry.path)) as src,
                        open(tmp, "wb") as out,
                    ):
                        shutil.copyfileobj(src, out, 1 << 20)
    atomic_write_bytes(channel_dir / manifest_rel, raw)
    target = m.target.to_dict()
    release = channel.Release(
        name=m.name,
        version=m.version,
        bundle=bundle_rel,
        size=bundle_path.stat().st_size,
        sha256=sha256_file(bundle_path),
        manifest=manifest_rel,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        blobs="blobs" if blobs else "",
        requires_runtime=m.requires.get("runtime", bundle.MIN_RUNTIME),
        target={k: target.get(k) for k in ("name", "arch", "execution_provider")},
    )
    releases = dict(index.releases) if index else {}
    releases[m.name] = release
    write_index(channel_dir, releases, key, expires_days)
    return release


def write_index(
    channel_dir: Path, releases: dict[str, channel.Release], key: Keys, expires_days: float
) -> channel.ChannelIndex:
    keys = _keys(key)
    now = _now()
    index = channel.ChannelIndex(
        issued_at=now.isoformat(),
        expires_at=(now + _dt.timedelta(days=expires_days)).isoformat(),
        releases=releases,
        signed_by=tuple(k.key_id for k in keys),
    )
    raw = index.canonical_bytes()
    # Signature first, then the index: a device that reads between the two sees the old
    # index with a signature that does not match, and refuses it rather than trusting it.
    atomic_write_bytes(channel_dir / channel.INDEX_SIG, encode_signatures([k.sign(raw) for k in keys]))
    atomic_write_bytes(channel_dir / channel.INDEX, raw)
    return index


def rotate_key(
    channel_dir: Path,
    old: SigningKey,
    new: SigningKey,
    also: Sequence[SigningKey] = (),
    expires_days: float = 30.0,
) -> channel.ChannelIndex:
    """Hand ``channel_dir`` over from ``old`` to ``new`` (``also`` sign both the statement
    and the index, for devices with a threshold). Devices that trust ``old`` take ``new``
    at their next update; later releases are published with ``new``."""
    _check_expiry(expires_days)
    index = _load_index(channel_dir, old)
    if index is None:
        raise ChannelError(f"{channel_dir} is not a channel (it has no {channel.INDEX})")
    path = channel_dir / channel.ROTATIONS
    rotations = json.loads(path.read_text())["rotations"] if path.exists() else []
    rotations.append(json.loads(make_rotation(old, new, tuple(also))))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"rotations": rotations}, indent=1).encode())
    return write_index(channel_dir, dict(index.releases), [new, *also], expires_days)


def _load_index(channel_dir: Path, key: Keys) -> channel.ChannelIndex | None:
    path = channel_dir / channel.INDEX
    if not path.exists():
        return None
    sig = channel_dir / channel.INDEX_SIG
    try:
        # An expired index is still ours to extend, once its signature checks out.
        return channel.verify_index(
            path.read_bytes(),
            sig.read_bytes() if sig.exists() else None,
            {k.key_id: k.public for k in _keys(key)},
            allow_expired=True,
        )
    except ChannelError as exc:
        raise ChannelError(f"{path} exists but is not a channel signed by this key: {exc}") from None
