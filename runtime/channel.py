"""An update channel: a static folder (or any HTTP server, object store or CDN serving one).

Layout, all paths relative to the channel root::

    index.json                       the signed index (canonical JSON, like a manifest)
    index.sig                        its signatures (the format of a bundle's manifest.sig)
    keys/rotations.json              key rotations: {"rotations": [statement, …]} (signing.py)
    manifests/<name>-<version>.json  each bundle's manifest, with .json.sig beside it
    blobs/<sha256>                   every model file once, named by its content hash
    bundles/<name>-<version>.phi     or instead whole bundles (a channel without blobs)

``index.json``::

    {"format": "edgephi-channel", "format_version": "1.0",
     "issued_at": "…", "expires_at": "…", "signed_by": ["<key id>"],
     "models": {"<name>": {"version", "bundle", "size", "sha256",
                           "manifest", "manifest_sha256", "blobs", "requires_runtime", "target"}}}

A device needs only the index, the manifest and the blobs it does not already have (a
delta: a tokenizer-only release downloads kilobytes). A release offers ``blobs`` or a
whole ``bundle`` (the other is ``""``); ``size`` and ``sha256`` are the published
bundle's either way, so whoever holds a ``.phi`` can tell whether it is the one released.
The index is only accepted with a valid signature by a trusted key and before ``expires_at``.
When the publisher rotates its key, the statement the old key signed goes into
``keys/rotations.json``; a device reads it before the index and, trusting the old key,
takes the new one (``edgephi.runtime.updater.fetch_index``). Manifests and bundles signed
by the retired key stay acceptable where a trusted index pins them by sha256.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

from edgephi.core.errors import ChannelError, EdgeError
from edgephi.runtime import signing
from edgephi.runtime.bundle import claimed_signers
from edgephi.runtime.manifest import canonical_json, check_member_path, is_valid_name, is_valid_version

INDEX = "index.json"
INDEX_SIG = "index.sig"
ROTATIONS = "keys/rotations.json"
MAX_ROTATIONS_BYTES = 1 << 20
FORMAT = "edgephi-channel"
FORMAT_VERSION = "1.0"
MAX_INDEX_BYTES = 4 << 20


def parse_time(value: str) -> _dt.datetime:
    when = _dt.datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    bundle: str
    size: int
    sha256: str
    manifest: str
    manifest_sha256: str
    blobs: str
    requires_runtime: str
    target: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "bundle": self.bundle,
            "size": self.size,
            "sha256": self.sha256,
            "manifest": self.manifest,
            "manifest_sha256": self.manifest_sha256,
            "blobs": self.blobs,
            "requires_runtime": self.requires_runtime,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, name: str, data: Any) -> Release:
        if not is_valid_name(name) or not isinstance(data, dict):
            raise ChannelError(f"channel index entry {name!r} is malformed")
        try:
            release = cls(name=name, **{k: data[k] for k in _RELEASE_KEYS})
        except (KeyError, TypeError) as exc:
            raise ChannelError(f"channel index entry {name!r} lacks {exc}") from None
        if not is_valid_version(release.version) or not is_valid_version(release.requires_runtime):
            raise ChannelError(f"channel index entry {name!r} has an invalid version")
        if not isinstance(release.bundle, str) or not isinstance(release.blobs, str):
            raise ChannelError(f"channel index entry {name!r} is malformed")
        if not (release.bundle or release.blobs):
            raise ChannelError(f"channel index entry {name!r} offers neither blobs nor a bundle")
        try:
            for path in (release.manifest, *(p for p in (release.bundle, release.blobs) if p)):
                check_member_path(path)
        except EdgeError:
            raise ChannelError(f"channel index entry {name!r} has a path that leaves the channel") from None
        if not all(_is_sha256(h) for h in (release.sha256, release.manifest_sha256)):
            # Both name files on the device (downloads/<sha256>.phi): hex only, nothing else.
            raise ChannelError(f"channel index entry {name!r} has a sha256 that is not 64 hex digits")
        if not isinstance(release.size, int) or release.size < 0 or not isinstance(release.target, dict):
            raise ChannelError(f"channel index entry {name!r} has an invalid size or target")
        return release


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


_RELEASE_KEYS = (
    "version",
    "bundle",
    "size",
    "sha256",
    "manifest",
    "manifest_sha256",
    "blobs",
    "requires_runtime",
    "target",
)


@dataclass(frozen=True)
class ChannelIndex:
    issued_at: str
    expires_at: str
    releases: dict[str, Release]
    signed_by: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "signed_by": list(self.signed_by),
            "models": {name: r.to_dict() for name, r in sorted(self.releases.items())},
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def expired(self) -> bool:
        return parse_time(self.expires_at) <= _dt.datetime.now(_dt.timezone.utc)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChannelIndex:
        try:
            data = json.loads(raw.decode("utf-8"))
            if data["format"] != FORMAT or str(data["format_version"]).split(".")[0] != "1":
                raise ChannelError(f"unsupported channel format {data['format']} {data['format_version']}")
            parse_time(data["issued_at"])
            parse_time(data["expires_at"])
            releases = {name: Release.from_dict(name, entry) for name, entry in data["models"].items()}
            return cls(data["issued_at"], data["expires_at"], releases, tuple(data.get("signed_by", [])))
        except EdgeError:
            raise
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ChannelError(f"the channel index is malformed: {exc}") from None


def verify_index(
    raw: bytes,
    sig_raw: bytes | None,
    trusted: dict[str, signing.PublicKey],
    *,
    threshold: int = 1,
    allow_expired: bool = False,
) -> ChannelIndex:
    """Accept an index only when ``threshold`` trusted keys signed exactly these bytes and
    it has not expired."""
    if not trusted:
        raise ChannelError(
            "updates need a trusted publisher key and this device has none",
            hint="add the publisher's key with `edge-run trust add KEY.pub`",
        )
    if sig_raw is None:
        raise ChannelError("the channel index is not signed")
    try:
        signatures = signing.parse_signatures(sig_raw)
        signing.verify_manifest(raw, claimed_signers(raw), signatures, trusted, threshold)
    except EdgeError as exc:
        raise ChannelError(f"the channel index signature is not acceptable: {exc}") from None
    index = ChannelIndex.from_bytes(raw)
    if raw != index.canonical_bytes():
        raise ChannelError("the channel index is not in canonical form")
    if index.expired and not allow_expired:
        raise ChannelError(
            f"the channel index expired at {index.expires_at}",
            hint="the publisher must re-publish the channel; nothing was changed",
        )
    return index
