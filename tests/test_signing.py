"""Signing round trips: build/sign/verify, the trust-store policy, re-signing, and tampering."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from bundlekit import canonical, craft, default_files, good_bundle, manifest_for, members_for
from edgephi.core.errors import (
    BundleFormatError,
    IntegrityError,
    KeyFileError,
    SignatureError,
    TamperError,
)
from edgephi.packager import writer
from edgephi.packager.cli import app as pack_app
from edgephi.runtime import bundle
from edgephi.runtime.cli import app as run_app
from edgephi.runtime.signing import SigningKey, TrustStore, encode_signatures, load_public_key
from edgephi.runtime.store import Store
from typer.testing import CliRunner


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    k = SigningKey.generate()
    k.save(tmp_path / "publisher.key", comment="tests")
    return k


def trust(store: Store, key: SigningKey, tmp_path: Path) -> None:
    pub = tmp_path / "trusted.pub"
    pub.write_text(key.public.to_text())
    store.trust.add(pub)


def test_key_files_round_trip(tmp_path: Path, key: SigningKey) -> None:
    assert (tmp_path / "publisher.key").stat().st_mode & 0o777 == 0o600
    loaded = SigningKey.load(tmp_path / "publisher.key")
    assert loaded.key_id == key.key_id
    pub = load_public_key(tmp_path / "publisher.key.pub")
    assert pub.key_id == key.key_id and pub.comment == "tests"
    with pytest.raises(KeyFileError, match="already exists"):
        key.save(tmp_path / "publisher.key")


def test_signed_bundle_verifies_with_the_publisher_key_only(tmp_path: Path, key: SigningKey) -> None:
    path = good_bundle(tmp_path / "b.phi", key)
    info = bundle.verify_content(path, bundle.TrustPolicy({key.key_id: key.public}))
    assert info.verification.status == "trusted" and info.manifest.signed_by == (key.key_id,)
    stranger = SigningKey.generate()
    with pytest.raises(SignatureError, match="trusts none"):
        bundle.verify_content(path, bundle.TrustPolicy({stranger.key_id: stranger.public}))


def test_no_trust_store_runs_unsigned_with_a_warning(store: Store, tmp_path: Path) -> None:
    installed = store.install(good_bundle(tmp_path / "u.phi"))
    assert installed.verification is not None and installed.verification.status == "unsigned"
    assert "unsigned" in (installed.verification.warning or "")


def test_a_trust_store_requires_signatures_even_for_installed_models(
    store: Store, tmp_path: Path, key: SigningKey
) -> None:
    unsigned = good_bundle(tmp_path / "u.phi")
    store.install(unsigned)
    trust(store, key, tmp_path)
    with pytest.raises(SignatureError, match="unsigned"):
        store.install(unsigned)  # the installed copy is not reused past the new policy
    assert store.install(good_bundle(tmp_path / "s.phi", key)).verification.status == "trusted"  # type: ignore[union-attr]


def test_a_damaged_key_file_is_ignored_but_never_turns_the_trust_store_off(
    store: Store, tmp_path: Path, key: SigningKey
) -> None:
    store.trust.folder.mkdir(parents=True)
    (store.trust.folder / "broken.pub").write_text("edgephi-ed25519 not-base64!")
    # Only a damaged key: signatures are still required, so an unsigned bundle does not run.
    with pytest.raises(SignatureError, match="unsigned"):
        store.install(good_bundle(tmp_path / "u.phi"))
    # A good key beside it: its bundles verify as before.
    trust(store, key, tmp_path)
    assert store.install(good_bundle(tmp_path / "s.phi", key)).verification.status == "trusted"  # type: ignore[union-attr]
    listed = CliRunner().invoke(run_app, ["trust", "list", "--store", str(store.root)])
    assert listed.exit_code == 0 and key.key_id in listed.stdout
    assert "broken.pub is not an edgephi public key (bad key data); that key is not trusted" in listed.stderr


def test_insecure_skip_verify_is_explicit_and_still_checks_hashes(
    store: Store, tmp_path: Path, key: SigningKey
) -> None:
    trust(store, key, tmp_path)
    stranger = SigningKey.generate()
    path = good_bundle(tmp_path / "x.phi", stranger)
    policy = bundle.TrustPolicy.from_store(store.trust, skip=True)
    installed = store.install(path, policy)
    assert installed.verification is not None and "DISABLED" in (installed.verification.warning or "")
    files = default_files()
    tampered = {**files, "tokenizer.json": b"{}"}
    bad = craft(tmp_path / "t.phi", manifest_for(files), members_for(tampered), keys=[stranger])
    with pytest.raises(IntegrityError):
        store.install(bad, policy)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "other"),
        ("version", "9.0.0"),
        ("precision", "fp32"),
        ("target", {"name": "rpi4", "execution_provider": "cpu", "arch": "aarch64"}),
        ("model", {"architecture": "X"}),
        ("memory", {"weights_bytes": 1}),
        ("requires", {"runtime": "0.0.1"}),
        ("source", {"kind": "gguf"}),
        ("created_by", {"edgephi": "0"}),
        ("created_at", "2000-01-01T00:00:00+00:00"),
        ("chat_template", True),
        ("format_version", "1.9"),
    ],
)
def test_every_manifest_field_is_covered_by_the_signature(
    field: str, value: object, tmp_path: Path, key: SigningKey
) -> None:
    files = default_files()
    original = {**manifest_for(files), "signed_by": [key.key_id]}
    sig = encode_signatures([key.sign(canonical(original))])
    edited = {**original, field: value}
    path = craft(tmp_path / "e.phi", canonical(edited), members_for(files), signatures=sig)
    with pytest.raises(SignatureError, match="changed after signing"):
        bundle.open_bundle(path, bundle.TrustPolicy({key.key_id: key.public}))


def test_every_file_entry_edit_is_detected(tmp_path: Path, key: SigningKey) -> None:
    files = default_files()
    for i in range(len(files)):
        for attr in ("sha256", "size", "path"):
            manifest = manifest_for(files)
            entry = manifest["files"][i]
            # Each edit keeps the manifest well formed (sorted paths), so only the signature can object.
            entry[attr] = {"sha256": "0" * 64, "size": entry["size"] + 1, "path": entry["path"] + "x"}[attr]
            original = {**manifest_for(files), "signed_by": [key.key_id]}
            sig = encode_signatures([key.sign(canonical(original))])
            path = craft(
                tmp_path / "f.phi",
                canonical({**manifest, "signed_by": [key.key_id]}),
                members_for(files),
                signatures=sig,
            )
            with pytest.raises(TamperError):
                bundle.verify_content(path, bundle.TrustPolicy({key.key_id: key.public}))


def test_every_file_content_edit_is_detected(tmp_path: Path, key: SigningKey) -> None:
    files = default_files()
    for name in files:
        changed = {**files, name: files[name] + b" "}
        path = craft(tmp_path / "c.phi", manifest_for(files), members_for(changed), keys=[key])
        with pytest.raises(TamperError):
            bundle.verify_content(path, bundle.TrustPolicy({key.key_id: key.public}))


def test_resign_replaces_the_signature_and_refuses_damaged_bundles(tmp_path: Path, key: SigningKey) -> None:
    path = good_bundle(tmp_path / "b.phi")
    manifest = writer.resign(path, path, [key])
    assert manifest.signed_by == (key.key_id,)
    assert (
        bundle.verify_content(path, bundle.TrustPolicy({key.key_id: key.public})).verification.status
        == "trusted"
    )
    files = default_files()
    damaged = craft(tmp_path / "d.phi", manifest_for(files), members_for({**files, "tokenizer.json": b"[]"}))
    before = damaged.read_bytes()
    with pytest.raises(IntegrityError):
        writer.resign(damaged, damaged, [key])
    assert damaged.read_bytes() == before


def test_cli_keygen_build_sign_verify_trust(phi3_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    keyfile = tmp_path / "keys" / "pub.key"
    result = runner.invoke(pack_app, ["keygen", str(keyfile), "--comment", "ci"])
    assert result.exit_code == 0, result.output
    signed = tmp_path / "signed.phi"
    result = runner.invoke(pack_app, ["sign", str(phi3_bundle), "--key", str(keyfile), "-o", str(signed)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(pack_app, ["verify", str(signed), "--key", f"{keyfile}.pub"])
    assert result.exit_code == 0 and "signed by trusted key" in result.stdout
    other = tmp_path / "other.key"
    runner.invoke(pack_app, ["keygen", str(other)])
    result = runner.invoke(pack_app, ["verify", str(signed), "--key", f"{other}.pub"])
    assert result.exit_code == 1
    assert "signed by" in runner.invoke(pack_app, ["inspect", str(signed)]).stdout
    # The device: trust the publisher, then only signed bundles run.
    assert runner.invoke(run_app, ["trust", "add", f"{keyfile}.pub"]).exit_code == 0
    assert runner.invoke(run_app, ["trust", "list"]).stdout.strip().endswith("ci")
    ok = runner.invoke(run_app, ["run", str(signed), "-p", "hi", "-n", "4", "-t", "0"])
    assert ok.exit_code == 0, ok.output
    refused = runner.invoke(run_app, ["run", str(phi3_bundle), "-p", "hi", "-n", "4"])
    assert refused.exit_code == 1
    loud = runner.invoke(run_app, ["run", str(phi3_bundle), "-p", "hi", "-n", "4", "--insecure-skip-verify"])
    assert loud.exit_code == 0 and "DISABLED" in loud.output


def test_signature_member_must_parse(tmp_path: Path, key: SigningKey) -> None:
    files = default_files()
    for sig in (
        b"not json",
        json.dumps({"signatures": []}).encode(),
        json.dumps({"signatures": [{"keyid": key.key_id, "algorithm": "rsa", "signature": ""}]}).encode(),
    ):
        path = craft(
            tmp_path / "s.phi",
            {**manifest_for(files), "signed_by": [key.key_id]},
            members_for(files),
            signatures=sig,
        )
        with pytest.raises(BundleFormatError, match=r"manifest\.sig is malformed"):
            bundle.open_bundle(path)


def test_trust_store_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: SigningKey
) -> None:
    folder = tmp_path / "trust"
    monkeypatch.setenv("EDGEPHI_TRUST", str(folder))
    store = Store(tmp_path / "s")
    assert store.trust.folder == folder and not store.trust.active
    trust(store, key, tmp_path)
    assert TrustStore(folder).active
    with zipfile.ZipFile(good_bundle(tmp_path / "g.phi", key)) as zf:
        assert zf.namelist()[:2] == ["manifest.json", "manifest.sig"]


def test_trust_remove_revokes_a_key(store: Store, tmp_path: Path, key: SigningKey) -> None:
    trust(store, key, tmp_path)
    other = SigningKey.generate()
    pub = tmp_path / "other.pub"
    pub.write_text(other.public.to_text())
    store.trust.add(pub)
    signed = good_bundle(tmp_path / "s.phi", key)
    assert store.install(signed).verification.status == "trusted"  # type: ignore[union-attr]
    runner = CliRunner()
    out = runner.invoke(run_app, ["trust", "remove", key.key_id, "--store", str(store.root)])
    assert out.exit_code == 0 and f"removed {key.key_id}.pub" in out.stdout
    # Its bundles no longer install, nor does an installed copy run under the new policy.
    with pytest.raises(SignatureError, match="trusts none"):
        store.install(signed)
    missing = runner.invoke(run_app, ["trust", "remove", key.key_id, "--store", str(store.root)])
    assert f"no trusted key '{key.key_id}'" in str(missing.exception)  # the console prints it in one line
    last = runner.invoke(run_app, ["trust", "remove", other.key_id, "--store", str(store.root)])
    assert last.exit_code == 0 and "that was the last trusted key" in last.stderr
