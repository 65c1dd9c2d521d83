"""The manifest's typed sections (``edgephi.runtime.sections``) read what builds write and
write back the same bytes, keep what a newer minor version adds, and are documented."""

from __future__ import annotations

import re
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest
from bundlekit import default_files, manifest_for
from edgephi.core.errors import BundleFormatError
from edgephi.runtime.manifest import Manifest, canonical_json
from edgephi.runtime.sections import (
    EncoderFacts,
    GenerationDefaults,
    GraphFacts,
    MemoryFacts,
    ModelFacts,
    Section,
    SessionFacts,
    TargetFacts,
    VisionFacts,
)
from edgephi.targets import ExecutionProvider, KVCache, Precision

SPEC = (Path(__file__).parent.parent / "docs" / "bundle-format.md").read_text(encoding="utf-8")


def test_a_built_bundles_manifest_reads_typed_and_writes_back_its_bytes(smollm2_bundle: Path) -> None:
    with zipfile.ZipFile(smollm2_bundle) as zf:
        raw = zf.read("manifest.json")
    manifest = Manifest.from_bytes(raw)
    assert manifest.canonical_bytes() == raw
    assert manifest.target.execution_provider is ExecutionProvider.CPU
    assert manifest.model.kv_cache is KVCache.FP32 and manifest.model.lm_head_pruned is True
    assert isinstance(manifest.model.generation, GenerationDefaults)
    assert manifest.model.generation.origin in ("edgephi", "generation_config")
    assert manifest.memory.weights_bytes and manifest.memory.kv_bytes_per_token
    assert not manifest.model.extra and not manifest.memory.extra and not manifest.target.extra


def test_keys_of_a_newer_minor_version_are_kept_and_values_stay_as_written() -> None:
    data = {
        k: v for k, v in manifest_for(default_files()).items() if v != {} or k not in ("health", "quality")
    }
    data["target"] = {**data["target"], "npu_cores": 2, "ram_gb": 4}  # an int in a float field
    data["memory"] = {**data["memory"], "npu_bytes": 5}
    data["model"] = {
        **data["model"],
        "rope": {"kind": "longrope"},
        "generation": {"temperature": 1, "from": "edgephi", "min_p": 0.05},
        "vision": {"max_image_tokens": 9, "encoder": {"heads": 2, "precision": "int8", "pooling": "mean"}},
        "sessions": {"decoder": {"file": "model.onnx", "inputs": ["input_ids"], "lora": True}},
    }
    raw = canonical_json(data)
    manifest = Manifest.from_bytes(raw)
    assert manifest.canonical_bytes() == raw
    model = manifest.model
    assert model.extra == {"rope": {"kind": "longrope"}}
    assert model.generation == GenerationDefaults(temperature=1, origin="edgephi", extra={"min_p": 0.05})
    assert model.vision == VisionFacts(
        max_image_tokens=9, encoder=EncoderFacts(heads=2, precision=Precision.INT8, extra={"pooling": "mean"})
    )
    assert model.sessions == {
        "decoder": SessionFacts(file="model.onnx", inputs=("input_ids",), extra={"lora": True})
    }
    assert manifest.target.extra == {"npu_cores": 2} and manifest.memory.extra == {"npu_bytes": 5}


def test_an_unknown_memory_figure_must_still_be_a_byte_count() -> None:
    with pytest.raises(BundleFormatError, match=r"memory\.npu_bytes must be a non-negative integer"):
        MemoryFacts.from_dict({"weights_bytes": 1, "npu_bytes": -5})


def test_a_missing_key_is_none_and_the_planner_names_it() -> None:
    from edgephi.runtime.memory import ModelShape

    data = manifest_for(default_files())
    del data["memory"]["kv_bytes_per_token"]
    manifest = Manifest.from_bytes(canonical_json(data))
    assert manifest.memory.kv_bytes_per_token is None
    with pytest.raises(
        Exception, match=r"lacks the memory figures memory\.kv_bytes_per_token, model\.vocab_size"
    ):
        ModelShape.from_manifest(manifest)


@pytest.mark.parametrize(
    ("row", "section"),
    [("target", TargetFacts), ("model", ModelFacts), ("memory", MemoryFacts)],
)
def test_every_key_of_a_section_is_in_the_format_spec(row: str, section: type[Section]) -> None:
    [line] = [x for x in SPEC.splitlines() if x.startswith(f"| `{row}` |")]
    documented = set(re.findall(r"`([a-z_0-9]+)`", line))

    def keys(cls: type[Section]) -> set[str]:
        out = set()
        for f in fields(cls):
            if f.name != "extra":
                out.add(f.metadata.get("key", f.name))
        return out

    expected = keys(section)
    if section is ModelFacts:
        expected |= keys(GenerationDefaults) | keys(GraphFacts) | keys(VisionFacts) | keys(EncoderFacts)
        expected |= keys(SessionFacts)
    assert expected - documented == set()
