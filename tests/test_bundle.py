"""The .phi container and the store, on small synthetic model folders (no model needed)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from bundlekit import (
    GENAI,
    canonical,
    onnx_with_external_data,
)
from edgephi.core.errors import (
    BundleFormatError,
    BundleNotFound,
    IntegrityError,
    TamperError,
    UnsupportedFormatVersion,
)
from edgephi.packager import finalize, writer
from edgephi.runtime import bundle
from edgephi.runtime.manifest import Manifest
from edgephi.runtime.sections import MemoryFacts, ModelFacts, TargetFacts
from edgephi.runtime.store import Store


def make_model_dir(root: Path) -> Path:
    d = root / "model"
    d.mkdir()
    (d / "genai_config.json").write_text(json.dumps(GENAI))
    (d / "model.onnx").write_bytes(onnx_with_external_data("model.onnx.data"))
    (d / "model.onnx.data").write_bytes(bytes(range(256)) * 400)
    (d / "tokenizer.json").write_text(json.dumps({"vocab": ["a", "b"]}))
    return d


def make_manifest(model_dir: Path, **over: object) -> Manifest:
    fields: dict = {
        "name": "tiny",
        "version": "1.0.0",
        "precision": "int4",
        "target": TargetFacts.from_dict({"name": "cpu", "execution_provider": "cpu"}),
        "files": tuple(finalize.file_entries(model_dir)),
        "model": ModelFacts(hidden_size=4, num_key_value_heads=1, head_size=4, num_hidden_layers=1),
        "memory": MemoryFacts(weights_bytes=102400, kv_bytes_per_token=32),
    }
    fields.update(over)
    return Manifest(**fields)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path)


@pytest.fixture
def good(tmp_path: Path, model_dir: Path) -> Path:
    out = tmp_path / "tiny.phi"
    writer.write_bundle(out, make_manifest(model_dir), model_dir)
    return out


def rezip(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """Copy a bundle member by member, letting ``edit`` change the list of (info, bytes)."""
    with zipfile.ZipFile(src) as zf:
        members = [(i, zf.read(i)) for i in zf.infolist()]
    members = edit(members)
    with zipfile.ZipFile(dst, "w") as out:
        for info, data in members:
            out.writestr(info, data)
    return dst


def test_round_trip(good: Path, store: Store, model_dir: Path) -> None:
    info = bundle.open_bundle(good)
    assert info.manifest.name == "tiny"
    with zipfile.ZipFile(good) as zf:
        assert zf.namelist()[0] == "manifest.json"
    installed = store.install(good)
    assert not installed.reused
    for f in info.manifest.files:
        assert (installed.path / f.path).read_bytes() == (model_dir / f.path).read_bytes()
    assert store.install(good).reused
    assert not any(store.staging_dir.iterdir())


def test_writing_is_deterministic(tmp_path: Path, model_dir: Path) -> None:
    m = make_manifest(model_dir)
    writer.write_bundle(tmp_path / "a.phi", m, model_dir)
    writer.write_bundle(tmp_path / "b.phi", m, model_dir)
    assert (tmp_path / "a.phi").read_bytes() == (tmp_path / "b.phi").read_bytes()


def test_flipped_byte_in_weights_is_refused_and_store_untouched(
    good: Path, store: Store, tmp_path: Path
) -> None:
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("model/model.onnx.data")
    # The member's data begins after its local header (30 bytes + name + extra).
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 1000
    data[offset] ^= 0x01
    bad = tmp_path / "bad.phi"
    bad.write_bytes(bytes(data))
    with pytest.raises(TamperError, match=r"model\.onnx\.data"):
        store.install(bad)
    assert not store.models_dir.exists() or not any(store.models_dir.rglob("*"))
    assert not any(store.staging_dir.iterdir())


def test_corrupt_copy_of_installed_bundle_does_not_disturb_the_installed_one(
    good: Path, store: Store, tmp_path: Path
) -> None:
    first = store.install(good)
    before = {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()}
    truncated = tmp_path / "cut.phi"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BundleFormatError):
        store.install(truncated)
    assert {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()} == before


def test_missing_bundle(store: Store, tmp_path: Path) -> None:
    with pytest.raises(BundleNotFound):
        store.install(tmp_path / "nope.phi")


def test_not_a_zip(store: Store, tmp_path: Path) -> None:
    p = tmp_path / "x.phi"
    p.write_text("hello")
    with pytest.raises(BundleFormatError, match=r"not\ a\ \.phi\ bundle"):
        store.install(p)


def test_extra_member_is_refused(good: Path, store: Store, tmp_path: Path) -> None:
    bad = rezip(good, tmp_path / "extra.phi", lambda m: [*m, (zipfile.ZipInfo("model/evil.so"), b"x")])
    with pytest.raises(BundleFormatError, match="not listed in the manifest"):
        store.install(bad)


def test_missing_member_is_refused(good: Path, store: Store, tmp_path: Path) -> None:
    bad = rezip(
        good, tmp_path / "missing.phi", lambda m: [x for x in m if x[0].filename != "model/tokenizer.json"]
    )
    with pytest.raises(BundleFormatError, match=r"tokenizer\.json"):
        store.install(bad)


def test_manifest_not_first_is_refused(good: Path, store: Store, tmp_path: Path) -> None:
    bad = rezip(good, tmp_path / "order.phi", lambda m: m[1:] + m[:1])
    with pytest.raises(BundleFormatError, match="first member"):
        store.install(bad)


def minimal_manifest(files: list[dict]) -> dict:  # type: ignore[type-arg]
    return {
        "format": "edgephi-bundle",
        "format_version": "1.0",
        "name": "x",
        "version": "1.0.0",
        "precision": "int4",
        "target": {},
        "files": files,
    }


@pytest.mark.parametrize(
    "path", ["../evil", "/etc/passwd", "a/../../b", "C:/x", "a\\b", ".hidden", "a//b", ""]
)
def test_unsafe_paths_in_manifest_are_refused(path: str) -> None:
    with pytest.raises(BundleFormatError):
        Manifest.from_dict(minimal_manifest([{"path": path, "size": 1, "sha256": "0" * 64}]))


def test_case_colliding_names_are_refused() -> None:
    entry = {"size": 1, "sha256": "0" * 64}
    with pytest.raises(BundleFormatError, match="twice"):
        Manifest.from_dict(
            minimal_manifest([{"path": "Model.onnx", **entry}, {"path": "model.onnx", **entry}])
        )


def with_format_version(version: str):  # type: ignore[no-untyped-def]
    def bump(members):  # type: ignore[no-untyped-def]
        info, raw = members[0]
        return [(info, canonical({**json.loads(raw), "format_version": version})), *members[1:]]

    return bump


def test_newer_major_format_version_asks_for_an_upgrade(good: Path, store: Store, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatVersion, match=r"2\.0"):
        store.install(rezip(good, tmp_path / "v2.phi", with_format_version("2.0")))


def test_newer_minor_format_version_is_read(good: Path, store: Store, tmp_path: Path) -> None:
    installed = store.install(rezip(good, tmp_path / "v17.phi", with_format_version("1.7")))
    assert installed.manifest.format_version == "1.7"


def test_manifest_hash_edit_is_detected(good: Path, store: Store, tmp_path: Path) -> None:
    def edit(members):  # type: ignore[no-untyped-def]
        info, raw = members[0]
        data = json.loads(raw)
        data["files"][0]["sha256"] = "f" * 64
        return [(info, canonical(data)), *members[1:]]

    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.install(rezip(good, tmp_path / "edit.phi", edit))


def test_symlink_member_is_refused(good: Path, store: Store, tmp_path: Path) -> None:
    def link(members):  # type: ignore[no-untyped-def]
        out = []
        for info, data in members:
            if info.filename == "model/tokenizer.json":
                info.external_attr = (0o120777) << 16
            out.append((info, data))
        return out

    with pytest.raises(BundleFormatError, match="not a regular file"):
        store.install(rezip(good, tmp_path / "link.phi", link))


def test_failed_write_keeps_the_previous_bundle(model_dir: Path, good: Path) -> None:
    before = good.read_bytes()
    manifest = bundle.open_bundle(good).manifest
    (model_dir / "tokenizer.json").unlink()  # the manifest now names a file that is gone
    with pytest.raises(FileNotFoundError):
        writer.write_bundle(good, manifest, model_dir)
    assert good.read_bytes() == before
    assert sorted(p.name for p in good.parent.iterdir() if p.suffix == ".tmp") == []


def test_a_manifest_from_before_the_optional_keys_still_reads(store: Store, tmp_path: Path) -> None:
    from bundlekit import craft, default_files, manifest_for, members_for

    files = default_files()
    data = manifest_for(files)
    del data["health"], data["quality"]  # written before these keys existed
    path = craft(tmp_path / "old.phi", data, members_for(files))
    installed = store.install(path)
    assert installed.manifest.canonical_bytes() == canonical(data)  # same bytes, same digest
    assert store.install(path).reused
