"""Ed25519 signatures over the canonical manifest bytes, and the device's trust store.

A bundle's ``manifest.sig`` member (JSON) holds one or more detached signatures::

    {"signatures": [{"keyid": "<16 hex>", "algorithm": "ed25519", "signature": "<base64>"}]}

Each signs ``Manifest.canonical_bytes()``; since the manifest lists every file's size and
sha256, one signature covers the whole bundle. The key id is the first 16 hex digits of
the sha256 of the raw 32-byte public key, and the manifest names the key ids that signed
it (``signed_by``), so a signature cannot be swapped for one by another key unnoticed.

Key files: a private key is PKCS#8 PEM (mode 0600); a public key is one line,
``edgephi-ed25519 <base64 of the raw 32 bytes> [comment]``, or PEM.

The trust store is a folder of public keys: ``$EDGEPHI_TRUST``, else ``trusted-keys/`` in
the model store. Once it holds a key, bundles must carry a valid signature by one of its
keys — or by ``threshold`` of them, when its ``policy.json`` says ``{"threshold": N}``;
with no trust store, unsigned bundles run with a warning.

Keys rotate by a statement the old key signs (``make_rotation``)::

    {"rotation": {"format": "edgephi-key-rotation", "from": "<old key id>",
                  "to": "edgephi-ed25519 <new key>", "issued_at": "…"},
     "signatures": [<by the old key>, <by the new key>, <by other trusted keys, for a threshold>]}

A device that trusts the old key and checks the statement (``TrustStore.rotate``) trusts the
new key instead; the old one moves to ``retired/``. The new key's own signature proves its
holder made the statement; a threshold policy needs that many trusted signatures on it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BundleFormatError, KeyFileError, SignatureError
from edgephi.core.fsutil import atomic_write_bytes
from edgephi.runtime.manifest import canonical_json

ALGORITHM = "ed25519"
PUBLIC_PREFIX = "edgephi-ed25519"
MAX_SIGNATURES = 16


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    raw: bytes
    comment: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def to_text(self) -> str:
        return f"{PUBLIC_PREFIX} {base64.b64encode(self.raw).decode()} {self.comment}".rstrip() + "\n"

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
            return True
        except (InvalidSignature, ValueError):
            return False


def load_public_key(path: Path) -> PublicKey:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc}") from None
    if text.startswith(PUBLIC_PREFIX):
        parts = text.split(maxsplit=2)
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except (IndexError, binascii.Error):
            raw = b""
        if len(raw) != 32:
            raise KeyFileError(f"{path} is not an edgephi public key (bad key data)")
        return PublicKey(raw, parts[2] if len(parts) > 2 else "")
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path} is not an Ed25519 public key")
        return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    raise KeyFileError(f"{path} is not a public key file ({PUBLIC_PREFIX} … or PEM)")


class SigningKey:
    """A private Ed25519 key (build host only)."""

    def __init__(self, private: Any) -> None:
        from cryptography.hazmat.primitives import serialization

        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = PublicKey(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except OSError as exc:
            raise KeyFileError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} is not an Ed25519 private key")
        return cls(key)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> dict[str, str]:
        sig = self._private.sign(message)
        return {"keyid": self.key_id, "algorithm": ALGORITHM, "signature": base64.b64encode(sig).decode()}

    def save(self, private_path: Path, comment: str = "") -> Path:
        """Write the private key (0600) and ``<private_path>.pub``; refuse to overwrite either."""
        from cryptography.hazmat.primitives import serialization

        public_path = private_path.with_name(private_path.name + ".pub")
        for p in (private_path, public_path):
            if p.exists():
                raise KeyFileError(f"{p} already exists; not overwriting a key", hint="choose another path")
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        atomic_write_bytes(public_path, PublicKey(self.public.raw, comment).to_text().encode())
        return public_path


def encode_signatures(entries: list[dict[str, str]]) -> bytes:
    return json.dumps({"signatures": entries}, sort_keys=True, separators=(",", ":")).encode()


def parse_signatures(raw: bytes) -> list[tuple[str, bytes]]:
    """(key id, signature bytes) pairs from a ``manifest.sig`` member."""
    try:
        return _signature_entries(json.loads(raw.decode("utf-8"))["signatures"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BundleFormatError(f"manifest.sig is malformed: {exc}") from None


def _signature_entries(entries: Any) -> list[tuple[str, bytes]]:
    """(key id, signature bytes) pairs from a ``signatures`` list; raises ``ValueError``,
    ``KeyError``, ``TypeError`` or ``binascii.Error`` on a malformed one."""
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_SIGNATURES:
        raise ValueError("signatures must be a list of 1 to 16 entries")
    out = []
    for entry in entries:
        if entry["algorithm"] != ALGORITHM:
            raise ValueError(f"unsupported algorithm {entry['algorithm']!r}")
        sig = base64.b64decode(entry["signature"], validate=True)
        if len(sig) != 64 or not isinstance(entry["keyid"], str):
            raise ValueError("malformed signature entry")
        out.append((entry["keyid"], sig))
    return out


ROTATION_FORMAT = "edgephi-key-rotation"
MAX_ROTATION_BYTES = 64 << 10


@dataclass(frozen=True)
class Rotation:
    """A checked rotation statement: ``old`` (a key id) hands over to ``new``."""

    old: str
    new: PublicKey
    issued_at: str


def make_rotation(old: SigningKey, new: SigningKey, others: tuple[SigningKey, ...] = ()) -> bytes:
    """A statement that ``old`` hands over to ``new``, signed by both (and ``others``)."""
    body = {
        "format": ROTATION_FORMAT,
        "from": old.key_id,
        "to": new.public.to_text().strip(),
        "issued_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    message = canonical_json(body)
    signatures = [k.sign(message) for k in (old, new, *others)]
    return json.dumps({"rotation": body, "signatures": signatures}, sort_keys=True, indent=1).encode()


def parse_rotation(raw: bytes) -> tuple[dict[str, Any], list[tuple[str, bytes]], PublicKey]:
    """The statement's body, signatures and new key, checked for form only."""
    try:
        data = json.loads(raw.decode("utf-8"))
        body, signatures = data["rotation"], _signature_entries(data["signatures"])
        if body["format"] != ROTATION_FORMAT or not isinstance(body["from"], str):
            raise ValueError(f"not an {ROTATION_FORMAT} statement")
        parts = str(body["to"]).split(maxsplit=2)
        raw_key = base64.b64decode(parts[1], validate=True) if parts[:1] == [PUBLIC_PREFIX] else b""
        if len(raw_key) != 32:
            raise ValueError("its new key is not an edgephi public key")
        return body, signatures, PublicKey(raw_key, parts[2] if len(parts) > 2 else "")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, binascii.Error) as exc:
        raise SignatureError(f"the key rotation statement is malformed: {exc}") from None


class TrustStore:
    """The public keys this device trusts, from one folder of ``*.pub`` files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def default(cls, store_root: Path) -> TrustStore:
        env = os.environ.get("EDGEPHI_TRUST")
        return cls(Path(env).expanduser() if env else Path(store_root) / "trusted-keys")

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.pub")) if self.folder.is_dir() else []

    def _load(self) -> list[tuple[Path, PublicKey | KeyFileError]]:
        """Each key file, and its key or why it does not load."""
        out: list[tuple[Path, PublicKey | KeyFileError]] = []
        for path in self.files():
            try:
                out.append((path, load_public_key(path)))
            except KeyFileError as exc:
                out.append((path, exc))
        return out

    def keys(self) -> dict[str, PublicKey]:
        """The keys that load; a file that does not is left out (``unreadable`` names it)."""
        return {key.key_id: key for _, key in self._load() if isinstance(key, PublicKey)}

    def unreadable(self) -> list[str]:
        """``path: why`` for each key file that does not load."""
        return [str(key) for _, key in self._load() if isinstance(key, KeyFileError)]

    @property
    def active(self) -> bool:
        """Whether signatures are enforced: any key file at all, even one that does not load —
        a damaged trust store must not turn into no trust store."""
        return bool(self.files())

    def remove(self, which: str) -> list[Path]:
        """Stop trusting a key: by key id, or by its file's name (a damaged file has no id)."""
        doomed = [
            path
            for path, key in self._load()
            if path.name in (which, f"{which}.pub") or (isinstance(key, PublicKey) and key.key_id == which)
        ]
        if not doomed:
            raise KeyFileError(
                f"no trusted key {which!r} in {self.folder}", hint="`edge-run trust list` shows the key ids"
            )
        for path in doomed:
            path.unlink()
        return doomed

    def add(self, public_key_file: Path) -> PublicKey:
        return self._add(load_public_key(public_key_file))

    def _add(self, key: PublicKey) -> PublicKey:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / f"{key.key_id}.pub", key.to_text().encode())
        return key

    # --- the policy: how many trusted keys must sign ---------------------------------

    @property
    def policy_file(self) -> Path:
        return self.folder / "policy.json"

    @property
    def threshold(self) -> int:
        """How many distinct trusted keys must sign a bundle or an index (default 1)."""
        try:
            raw = self.policy_file.read_bytes()
        except FileNotFoundError:
            return 1
        except OSError as exc:
            raise KeyFileError(f"cannot read the trust policy {self.policy_file}: {exc.strerror}") from None
        try:
            value = json.loads(raw)["threshold"]
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIGNATURES:
                return value
        except (ValueError, KeyError, TypeError):
            pass
        # Damaged: refuse everything rather than fall back to one signature.
        raise KeyFileError(
            f"the trust policy {self.policy_file} is damaged",
            hint="set it again: edge-run trust threshold N",
        )

    def set_threshold(self, count: int) -> None:
        have = len(self.keys())
        if not 1 <= count <= have:
            raise KeyFileError(
                f"a threshold of {count} needs {count} trusted keys; this device trusts {have}",
                hint=f"add the keys first (edge-run trust add KEY.pub), or choose 1 to {max(have, 1)}",
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.policy_file, json.dumps({"threshold": count}).encode() + b"\n")

    # --- rotation ------------------------------------------------------------------

    @property
    def retired_folder(self) -> Path:
        return self.folder / "retired"

    def retired(self) -> dict[str, PublicKey]:
        """Keys rotated out: no longer trusted for a bundle given by hand or an index, but
        still for a release a trusted index pins by sha256 (``edgephi.runtime.updater``)."""
        out = {}
        for path in sorted(self.retired_folder.glob("*.pub")) if self.retired_folder.is_dir() else []:
            try:
                key = load_public_key(path)
            except KeyFileError:
                continue
            out[key.key_id] = key
        return out

    def check_rotation(self, raw: bytes) -> Rotation | None:
        """The rotation ``raw`` states, if this device should take it: ``None`` when it is
        not about a key trusted here (already taken, or another publisher's); raises when it
        is, but is not properly signed."""
        body, signatures, new = parse_rotation(raw)
        trusted = self.keys()
        old = body["from"]
        if old not in trusted or new.key_id in trusted:
            return None
        message = canonical_json(body)
        claimed = tuple(kid for kid, _ in signatures)
        signers = valid_signers(message, claimed, signatures, trusted)
        if old not in signers:
            raise SignatureError(f"the rotation of key {old} is not validly signed by that key")
        if not valid_signers(message, claimed, signatures, {new.key_id: new}):
            raise SignatureError(f"the rotation to key {new.key_id} is not signed by the new key itself")
        if len(signers) < self.threshold:
            raise SignatureError(
                f"the rotation of key {old} is signed by {len(signers)} trusted key(s); "
                f"this device's trust policy asks for {self.threshold}"
            )
        return Rotation(old, new, str(body["issued_at"]))

    def rotate(self, rotation: Rotation) -> None:
        """Trust ``rotation.new`` in place of ``rotation.old`` (new key written first)."""
        self._add(rotation.new)
        self.retired_folder.mkdir(parents=True, exist_ok=True)
        for path, key in self._load():
            if isinstance(key, PublicKey) and key.key_id == rotation.old:
                os.replace(path, self.retired_folder / f"{rotation.old}.pub")


def valid_signers(
    message: bytes,
    signed_by: tuple[str, ...],
    signatures: list[tuple[str, bytes]],
    trusted: dict[str, PublicKey],
) -> list[str]:
    """The distinct trusted keys with a valid signature over ``message`` that it claims."""
    listed, found = set(signed_by), []
    for kid, sig in signatures:
        if kid not in listed or kid in found:
            continue  # a signature the manifest does not claim is not evidence
        key = trusted.get(kid)
        if key is not None and key.verify(sig, message):
            found.append(kid)
    return found


def verify_manifest(
    manifest_bytes: bytes,
    signed_by: tuple[str, ...],
    signatures: list[tuple[str, bytes]],
    trusted: dict[str, PublicKey],
    threshold: int = 1,
) -> str:
    """Return the key id of a valid trusted signature over ``manifest_bytes`` — with
    ``threshold`` such signatures by distinct keys — else raise."""
    found = valid_signers(manifest_bytes, signed_by, signatures, trusted)
    if found and len(found) >= threshold:
        return found[0]
    if found:
        raise SignatureError(
            f"signed by {len(found)} trusted key(s) ({', '.join(found)}); "
            f"this device's trust policy asks for {threshold}",
            hint="have more of the trusted keys sign it (edge-pack sign --key A --key B)",
        )
    if not any(kid in trusted for kid, _ in signatures):
        raise SignatureError(
            f"the bundle is signed by key(s) {', '.join(k for k, _ in signatures)}; "
            "this device trusts none of them"
        )
    raise SignatureError("the manifest's signature does not verify: the manifest was changed after signing")
