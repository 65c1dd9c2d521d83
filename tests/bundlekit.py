"""Helpers that craft bundles byte by byte, for the signing and hostile-input tests.

``craft()`` writes a ZIP from a manifest dict and a list of members with no checks at
all — the point is to make exactly the files a well-behaved writer never would.
"""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgephi.runtime.signing import SigningKey, encode_signatures

GENAI: dict[str, Any] = {
    "model": {
        "type": "llama",
        "context_length": 128,
        "decoder": {
            "filename": "model.onnx",
            "session_options": {"log_id": "x", "provider_options": []},
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_size": 4,
            "hidden_size": 4,
        },
    },
    "search": {"max_length": 64},
}


def external_tensor(name: str, location: str) -> Any:
    """A 4-float ``TensorProto`` whose data lives in external data at ``location``."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def onnx_with_external_data(location: str) -> bytes:
    """A small real ONNX model whose one initializer lives in external data at ``location``."""
    import onnx
    from onnx import TensorProto, helper

    weight = external_tensor("w", location)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[weight],
    )
    return bytes(onnx.helper.make_model(graph).SerializeToString())


def default_files(genai: dict[str, Any] | None = None, location: str = "model.onnx.data") -> dict[str, bytes]:
    return {
        "genai_config.json": json.dumps(genai or GENAI).encode(),
        "model.onnx": onnx_with_external_data(location),
        "model.onnx.data": bytes(range(256)) * 64,
        "tokenizer.json": json.dumps({"model": {"vocab": {"a": 0}}}).encode(),
    }


def canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_for(files: dict[str, bytes], **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": "edgephi-bundle",
        "format_version": "1.0",
        "name": "tiny",
        "version": "1.0.0",
        "created_at": "",
        "created_by": {},
        "source": {},
        # True to the tiny model above, as the store checks (edgephi.runtime.memory.check_facts).
        "model": {
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_size": 4,
            "hidden_size": 4,
        },
        "precision": "int4",
        "target": {"name": "cpu", "execution_provider": "cpu", "arch": "any"},
        "memory": {
            "weights_bytes": sum(len(b) for p, b in files.items() if p.startswith("model.")),
            "kv_bytes_per_token": 32,
        },
        "requires": {"runtime": "0.1.0"},
        "chat_template": False,
        "signed_by": [],
        "health": {},
        "quality": {},
        "files": [
            {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in files.items()
        ],
    }
    data.update(over)
    return data


@dataclass
class Member:
    name: str
    data: bytes
    compress: int = zipfile.ZIP_STORED
    mode: int = stat.S_IFREG | 0o644
    flag_bits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def craft(
    out: Path,
    manifest: dict[str, Any] | bytes,
    members: Sequence[Member],
    keys: Sequence[SigningKey] = (),
    signatures: bytes | None = None,
) -> Path:
    """Write a bundle exactly as told: manifest first, signature (if any), then ``members``."""
    if isinstance(manifest, dict):
        if keys:
            manifest = {**manifest, "signed_by": [k.key_id for k in keys]}
        raw = canonical(manifest)
    else:
        raw = manifest
    if signatures is None and keys:
        signatures = encode_signatures([k.sign(raw) for k in keys])
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(zipfile.ZipInfo("manifest.json", (1980, 1, 1, 0, 0, 0)), raw)
        if signatures is not None:
            zf.writestr(zipfile.ZipInfo("manifest.sig", (1980, 1, 1, 0, 0, 0)), signatures)
        for m in members:
            info = zipfile.ZipInfo(m.name, (1980, 1, 1, 0, 0, 0))
            info.external_attr = m.mode << 16
            info.compress_type = m.compress
            zf.writestr(info, m.data)
    for m in members:
        if m.flag_bits:
            set_central_flags(out, m.name, m.flag_bits)
    return out


def set_central_flags(path: Path, name: str, bits: int) -> None:
    """OR ``bits`` into the general-purpose flags of ``name``'s central-directory record."""
    data = bytearray(path.read_bytes())
    needle = name.encode()
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        name_len = int.from_bytes(data[pos + 28 : pos + 30], "little")
        if data[pos + 46 : pos + 46 + name_len] == needle:
            flags = int.from_bytes(data[pos + 8 : pos + 10], "little") | bits
            data[pos + 8 : pos + 10] = flags.to_bytes(2, "little")
            path.write_bytes(bytes(data))
            return
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise KeyError(name)


def members_for(files: dict[str, bytes]) -> list[Member]:
    return [Member(f"model/{p}", b) for p, b in files.items()]


def good_bundle(out: Path, key: SigningKey | None = None, **over: Any) -> Path:
    files = default_files()
    return craft(out, manifest_for(files, **over), members_for(files), keys=[key] if key else [])
