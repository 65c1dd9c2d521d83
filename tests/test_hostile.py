"""Crafted bundles a device must refuse: each with a one-line reason, writing nothing
outside its staging directory, leaving the installed model able to run.

The device here has a trust store holding ``key``; most crafted bundles are validly
signed by it, so they get past the signature and must be stopped by the reader's other
rules.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from bundlekit import (
    GENAI,
    Member,
    canonical,
    craft,
    default_files,
    external_tensor,
    good_bundle,
    manifest_for,
    members_for,
    onnx_with_external_data,
    set_central_flags,
)
from edgephi.core.errors import BundleError
from edgephi.runtime import load
from edgephi.runtime.manifest import MAX_FILES
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.signing import SigningKey, encode_signatures
from edgephi.runtime.store import Store

KEY = SigningKey.generate()
OTHER = SigningKey.generate()

Craft = Callable[[Path], Path]


def signed(files: dict[str, bytes], members: list[Member] | None = None, **over: object) -> Craft:
    return lambda out: craft(out, manifest_for(files, **over), members or members_for(files), keys=[KEY])


def with_members(edit: Callable[[list[Member]], list[Member]], **over: object) -> Craft:
    files = default_files()
    return lambda out: craft(out, manifest_for(files, **over), edit(members_for(files)), keys=[KEY])


def bad_manifest_path(path: str) -> Craft:
    files = default_files()
    files_with = {**files, path: b"evil"}
    return lambda out: craft(
        out, manifest_for(files_with), [*members_for(files), Member(f"model/{path}", b"evil")], keys=[KEY]
    )


def truncated(fraction: float) -> Craft:
    def make(out: Path) -> Path:
        good_bundle(out, KEY)
        data = out.read_bytes()
        out.write_bytes(data[: max(1, int(len(data) * fraction))])
        return out

    return make


def flipped(part: str) -> Craft:
    def make(out: Path) -> Path:
        good_bundle(out, KEY)
        data = bytearray(out.read_bytes())
        with zipfile.ZipFile(out) as zf:
            infos = {i.filename: i for i in zf.infolist()}
        if part == "central-directory":
            offset = data.rfind(b"model/tokenizer.json")  # the name in the central directory
        else:
            info = infos[part]
            offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
        data[offset] ^= 0x04
        out.write_bytes(bytes(data))
        return out

    return make


def bomb(out: Path) -> Path:
    files = default_files()
    files["tokenizer.json"] = b"\0" * (8 << 20)
    members = members_for(files)
    members[-1].compress = zipfile.ZIP_DEFLATED
    return craft(out, manifest_for(files), members, keys=[KEY])


def overlapping(out: Path) -> Path:
    """Two members sharing bytes: model.onnx.data's data *is* tokenizer.json's whole local
    record, and the central directory points tokenizer.json inside it (the overlapping-member
    ZIP bomb's mechanism: each member's ratio is harmless, their sum is not)."""
    import io

    files = default_files()
    last = "tokenizer.json"
    one = io.BytesIO()
    with zipfile.ZipFile(one, "w") as zf:
        zf.writestr(zipfile.ZipInfo(f"model/{last}", (1980, 1, 1, 0, 0, 0)), files[last])
    record = one.getvalue()[: one.getvalue().index(b"PK\x01\x02")]  # local header + data
    files["model.onnx.data"] = record
    path = craft(out, manifest_for(files), members_for(files), keys=[KEY])
    data = bytearray(path.read_bytes())
    host = data.index(record)  # the copy inside model.onnx.data's data
    needle = f"model/{last}".encode()
    central = data.index(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(needle)] != needle:
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 42 : central + 46] = host.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def many_members(out: Path) -> Path:
    files = default_files()
    extra = {f"x/{i}.bin": b"x" for i in range(MAX_FILES + 5)}
    files.update(extra)
    return craft(out, manifest_for(files), members_for(files), keys=[KEY])


def untrusted_signature(out: Path) -> Path:
    files = default_files()
    return craft(out, manifest_for(files), members_for(files), keys=[OTHER])


def signature_over_another_manifest(out: Path) -> Path:
    files = default_files()
    other = canonical({**manifest_for(files, version="9.9.9"), "signed_by": [KEY.key_id]})
    sig = encode_signatures([KEY.sign(other)])
    manifest = canonical({**manifest_for(files), "signed_by": [KEY.key_id]})
    return craft(out, manifest, members_for(files), signatures=sig)


def mixed_from_two_bundles(out: Path) -> Path:
    a = default_files()
    b = {**a, "model.onnx.data": bytes(reversed(a["model.onnx.data"]))}
    # Both are validly signed by the trusted key; take A's manifest with B's weights.
    return craft(out, manifest_for(a), members_for(b), keys=[KEY])


def stripped_signature(out: Path) -> Path:
    files = default_files()
    manifest = canonical({**manifest_for(files), "signed_by": [KEY.key_id]})
    return craft(out, manifest, members_for(files))


def unsigned(out: Path) -> Path:
    return good_bundle(out)


def non_canonical_manifest(out: Path) -> Path:
    files = default_files()
    data = {**manifest_for(files), "signed_by": [KEY.key_id]}
    raw = json.dumps(data, indent=2).encode()
    return craft(out, raw, members_for(files), signatures=encode_signatures([KEY.sign(raw)]))


def genai(config: dict) -> Craft:  # type: ignore[type-arg]
    return signed(default_files(config))


def external(location: str) -> Craft:
    return signed(default_files(location=location))


def renamed_model(location: str) -> Craft:
    """The decoder file named model.bin (not *.onnx) by genai_config, its data at ``location``."""
    files = default_files(
        {
            **GENAI,
            "model": {**GENAI["model"], "decoder": {**GENAI["model"]["decoder"], "filename": "model.bin"}},
        }
    )
    files["model.bin"] = files.pop("model.onnx")
    files = {k: files[k] for k in sorted(files)}
    files["model.bin"] = onnx_with_external_data(location)
    return signed(files)


def function_constant(location: str) -> Craft:
    """A model whose local function holds a Constant tensor in external data at ``location``."""
    from onnx import TensorProto, helper

    value = external_tensor("c", location)
    fn = helper.make_function(
        "local",
        "AddConst",
        ["x"],
        ["y"],
        [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddConst", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(
        graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    )
    files = default_files()
    files["model.onnx"] = model.SerializeToString()
    return signed(files)


def encrypted(out: Path) -> Path:
    good_bundle(out, KEY)
    set_central_flags(out, "model/tokenizer.json", 0x1)
    return out


def not_a_zip(out: Path) -> Path:
    out.write_bytes(b"\x7fELF" + b"\0" * 1000)
    return out


def empty(out: Path) -> Path:
    out.write_bytes(b"")
    return out


def huge_manifest(out: Path) -> Path:
    files = default_files()
    return craft(out, manifest_for(files, model={"pad": "x" * (1 << 20)}), members_for(files), keys=[KEY])


def wrong_size(out: Path) -> Path:
    files = default_files()
    manifest = manifest_for(files)
    manifest["files"][2]["size"] += 1
    return craft(out, manifest, members_for(files), keys=[KEY])


def wrong_order(out: Path) -> Path:
    files = default_files()
    return craft(out, manifest_for(files), list(reversed(members_for(files))), keys=[KEY])


def session(opts: dict) -> dict:  # type: ignore[type-arg]
    return {
        **GENAI,
        "model": {**GENAI["model"], "decoder": {**GENAI["model"]["decoder"], "session_options": opts}},
    }


CASES: dict[str, Craft] = {
    "member ../evil": with_members(lambda m: [*m, Member("../evil", b"x")]),
    "member /etc/evil": with_members(lambda m: [*m, Member("/etc/evil", b"x")]),
    "member model/../../evil": with_members(lambda m: [*m, Member("model/../../evil", b"x")]),
    "member with backslashes": with_members(lambda m: [*m, Member("model\\..\\..\\evil", b"x")]),
    "member with a drive letter": with_members(lambda m: [*m, Member("C:/evil", b"x")]),
    "manifest path ../evil": bad_manifest_path("../evil"),
    "manifest path /abs": bad_manifest_path("/abs/evil"),
    "manifest path a/../../b": bad_manifest_path("a/../../b"),
    "manifest path C:x": bad_manifest_path("C:\\x"),
    "manifest path .hidden": bad_manifest_path(".bashrc"),
    "symlink member": with_members(lambda m: [*m[:-1], Member(m[-1].name, b"/etc/passwd", mode=0o120777)]),
    "device member": with_members(lambda m: [*m[:-1], Member(m[-1].name, m[-1].data, mode=0o020666)]),
    "directory member": with_members(lambda m: [*m, Member("model/sub/", b"")]),
    "duplicate member (hard-link style)": with_members(lambda m: [*m, m[1]]),
    "case-colliding member": with_members(lambda m: [*m, Member("model/TOKENIZER.json", m[-1].data)]),
    "member not in manifest": with_members(lambda m: [*m, Member("model/extra.so", b"\x7fELF")]),
    "manifest entry with no member": with_members(lambda m: m[:-1]),
    "members out of order": wrong_order,
    "member size differs from manifest": wrong_size,
    "truncated at 5%": truncated(0.05),
    "truncated at 50%": truncated(0.5),
    "truncated at 95%": truncated(0.95),
    "truncated by one byte": truncated(0.9999),
    "bit flip in manifest": flipped("manifest.json"),
    "bit flip in signature": flipped("manifest.sig"),
    "bit flip in genai_config": flipped("model/genai_config.json"),
    "bit flip in model.onnx": flipped("model/model.onnx"),
    "bit flip in weights": flipped("model/model.onnx.data"),
    "bit flip in tokenizer": flipped("model/tokenizer.json"),
    "bit flip in central directory": flipped("central-directory"),
    "decompression bomb": bomb,
    "overlapping members": overlapping,
    "huge member count": many_members,
    "huge manifest": huge_manifest,
    "valid signature from an untrusted key": untrusted_signature,
    "signature over another manifest": signature_over_another_manifest,
    "files mixed from two signed bundles": mixed_from_two_bundles,
    "signature stripped": stripped_signature,
    "unsigned where signatures are required": unsigned,
    "non-canonical manifest": non_canonical_manifest,
    "too-new major format version": signed(default_files(), format_version="2.0"),
    "unknown format": signed(default_files(), format="other-bundle"),
    "encrypted member": encrypted,
    "not a zip": not_a_zip,
    "empty file": empty,
    "external data ../../etc/passwd": external("../../etc/passwd"),
    "external data /etc/passwd": external("/etc/passwd"),
    "external data not in bundle": external("weights.bin"),
    "external data of a model not named *.onnx": renamed_model("/etc/passwd"),
    "external data inside a local function": function_constant("../../etc/passwd"),
    "manifest understates the model's width": signed(
        default_files(),
        model={
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_size": 4,
            "hidden_size": 1,
        },
    ),
    "manifest understates the KV cache": signed(
        default_files(), memory={"weights_bytes": 0, "kv_bytes_per_token": 1}
    ),
    # Malformed sections are refused when the manifest is read (edgephi.runtime.sections),
    # not later by the planner or the loader.
    "manifest memory figure as text": signed(default_files(), memory={"weights_bytes": "1 GiB"}),
    "manifest model shape negative": signed(default_files(), model={"num_hidden_layers": -1}),
    "manifest model is a list": signed(default_files(), model=[1, 4]),
    "manifest target for an unknown provider": signed(
        default_files(), target={"name": "cpu", "execution_provider": "npu", "arch": "any"}
    ),
    "manifest vision encoder not an object": signed(default_files(), model={"vision": {"encoder": [336]}}),
    "manifest generation defaults of the wrong type": signed(
        default_files(), model={"generation": {"do_sample": "yes"}}
    ),
    "genai_config config entry naming a file": genai(
        session({"config_entries": {"ep.context_file_path": "/tmp/x"}})
    ),
    "genai_config loads a custom-op library": genai(session({"custom_ops_library": "libevil.so"})),
    "genai_config enables profiling": genai(session({"enable_profiling": "/tmp/prof"})),
    "genai_config provider library path": genai(
        session({"provider_options": [{"cuda": {"library_path": "/tmp/libevil.so"}}]})
    ),
    "genai_config unknown session option": genai(session({"optimized_model_path": "/tmp/out.onnx"})),
    "genai_config unknown provider": genai(session({"provider_options": [{"evil": {}}]})),
    "genai_config filename outside bundle": genai(
        {**GENAI, "model": {**GENAI["model"], "decoder": {"filename": "../model.onnx"}}}
    ),
    "chat template of 300 KB": signed({"chat_template.jinja": b"{{ 'x' }}" * 40000, **default_files()}),
    "chat template not UTF-8": signed({"chat_template.jinja": b"{{ '\xff' }}", **default_files()}),
    "chat template not a string": signed(
        {**default_files(), "tokenizer_config.json": json.dumps({"chat_template": {"evil": 1}}).encode()}
    ),
}


# Why each case must be refused: the error has to say so, not merely fail for some reason.
REASONS = {
    "member ../evil": "not listed in the manifest",
    "member /etc/evil": "not listed in the manifest",
    "member model/../../evil": "not listed in the manifest",
    "member with backslashes": "not listed in the manifest",
    "member with a drive letter": "not listed in the manifest",
    "manifest path ../evil": "not a plain relative path",
    "manifest path /abs": "not a plain relative path",
    "manifest path a/../../b": "not a plain relative path",
    "manifest path C:x": "not a plain relative path",
    "manifest path .hidden": "not a plain relative path",
    "symlink member": "not a regular file",
    "device member": "not a regular file",
    "directory member": "not listed in the manifest",
    "duplicate member (hard-link style)": "appears twice",
    "case-colliding member": "appears twice",
    "member not in manifest": "not listed in the manifest",
    "manifest entry with no member": "does not contain",
    "members out of order": "not in manifest order",
    "member size differs from manifest": "the archive says",
    "truncated at 5%": "not a .phi bundle",
    "truncated at 50%": "not a .phi bundle",
    "truncated at 95%": "not a .phi bundle",
    "truncated by one byte": "not a .phi bundle",
    "bit flip in manifest": "Bad CRC-32",
    "bit flip in signature": "Bad CRC-32",
    "bit flip in genai_config": "content is corrupt",
    "bit flip in model.onnx": "content is corrupt",
    "bit flip in weights": "content is corrupt",
    "bit flip in tokenizer": "content is corrupt",
    "bit flip in central directory": "not listed in the manifest",
    "decompression bomb": "compression ratio",
    "huge member count": "the limit is",
    "huge manifest": "larger than",
    "valid signature from an untrusted key": "trusts none",
    "signature over another manifest": "changed after signing",
    "files mixed from two signed bundles": "sha256 mismatch",
    "signature stripped": "carries no signature",
    "unsigned where signatures are required": "accepts only signed bundles",
    "non-canonical manifest": "canonical form",
    "too-new major format version": "not readable by this runtime",
    "unknown format": "expected 'edgephi-bundle'",
    "overlapping members": "members may not share bytes",
    "encrypted member": "is encrypted",
    "not a zip": "not a .phi bundle",
    "empty file": "not a .phi bundle",
    "external data ../../etc/passwd": "outside the bundle",
    "external data /etc/passwd": "outside the bundle",
    "external data not in bundle": "does not contain",
    "external data of a model not named *.onnx": "outside the bundle",
    "external data inside a local function": "outside the bundle",
    "genai_config config entry naming a file": "not an allowed onnxruntime config entry",
    "manifest understates the model's width": "hidden_size 1 (genai_config.json: 4)",
    "manifest understates the KV cache": "kv_bytes_per_token 1 (the shapes need 16+)",
    "manifest memory figure as text": "memory.weights_bytes must be a non-negative integer, not '1 GiB'",
    "manifest model shape negative": "model.num_hidden_layers must be a non-negative integer, not -1",
    "manifest model is a list": "manifest model must be an object",
    "manifest target for an unknown provider": "execution_provider is 'npu', not one of cpu, cuda, dml",
    "manifest vision encoder not an object": "model.vision.encoder must be an object",
    "manifest generation defaults of the wrong type": "model.generation.do_sample must be true or false",
    "genai_config loads a custom-op library": "would load code",
    "genai_config enables profiling": "would load code",
    "genai_config provider library path": "is a path",
    "genai_config unknown session option": "not an allowed session option",
    "genai_config unknown provider": "unknown provider",
    "genai_config filename outside bundle": "not a plain path inside the bundle",
    "chat template of 300 KB": "chat_template.jinja is 360000 characters, over the 262144 allowed",
    "chat template not UTF-8": "chat_template.jinja is not UTF-8 text",
    "chat template not a string": "tokenizer_config.json's chat_template is not a template",
}


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, phi3_bundle: Path) -> Store:
    """A device store with a working model installed, then a trust store holding KEY."""
    store = Store(tmp_path_factory.mktemp("device") / "store")
    store.install(phi3_bundle)
    pub = store.root.parent / "publisher.pub"
    pub.write_text(KEY.public.to_text())
    store.trust.add(pub)
    return store


def test_there_are_at_least_30_hostile_cases() -> None:
    assert len(CASES) >= 30 and set(REASONS) == set(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundle_is_refused(
    case: str, device: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEPHI_TRUST", raising=False)
    before = tree(device.root.parent)
    path = CASES[case](tmp_path / "hostile.phi")
    with pytest.raises(BundleError) as info:
        device.install(path)
    message = str(info.value)
    assert message and "\n" not in message
    assert REASONS[case] in message
    assert tree(device.root.parent) == before  # nothing written anywhere, staging cleaned


def test_a_good_signed_bundle_installs(device: Store, tmp_path: Path) -> None:
    installed = device.install(good_bundle(tmp_path / "good.phi", KEY))
    assert installed.verification is not None and installed.verification.status == "trusted"


def test_the_installed_model_still_runs(device: Store) -> None:
    [phi] = [m for m in device.installed() if m.manifest.name == "phi35-tiny"]
    engine = load(phi.path)
    done = engine.generate(
        [{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=4, temperature=0)
    )
    assert done.text
    assert done.stats.generated_tokens == 4
