"""docs/bundle-format.md and the code must say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

from edgephi.runtime import bundle, manifest, modelcheck, signing
from edgephi.runtime.sections import TargetFacts

SPEC = (Path(__file__).resolve().parent.parent / "docs" / "bundle-format.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = SPEC.index(title)
    end = SPEC.find("\n## ", start + 1)
    return SPEC[start : end if end != -1 else None]


def test_member_names_and_format_constants() -> None:
    assert f"`{bundle.MANIFEST_MEMBER}`" in SPEC and f"`{bundle.SIGNATURE_MEMBER}`" in SPEC
    assert f"`{bundle.MODEL_PREFIX}<path>`" in SPEC
    assert f'always `"{manifest.FORMAT}"`' in SPEC
    assert "version {}.{}".format(*manifest.FORMAT_VERSION) in SPEC.splitlines()[0]
    assert f'`requires.runtime = "{bundle.MIN_RUNTIME}"`' in SPEC


def test_limits_table() -> None:
    limits = section("## 6. Limits")
    assert f"| members | {manifest.MAX_FILES + 2} " in limits
    assert f"| manifest | {bundle.MAX_MANIFEST_BYTES >> 20} MiB |" in limits
    assert (
        f"| signature member | {bundle.MAX_SIGNATURE_BYTES >> 10} KiB, {signing.MAX_SIGNATURES} signatures |"
        in limits
    )
    assert f"| path length | {manifest.MAX_PATH_LENGTH} characters |" in limits
    assert f"| compression ratio per member | {bundle.MAX_COMPRESSION_RATIO} |" in limits
    assert f"| total unpacked size | {bundle.MAX_TOTAL_BYTES >> 30} GiB |" in limits
    assert f"| nested ONNX graphs | depth {modelcheck.MAX_GRAPH_DEPTH} |" in limits


def test_model_file_rules() -> None:
    rules = section("## 5. What model files may ask for")
    listed = set(
        re.findall(r"`([a-z_]+)`", rules[rules.index("must come from") : rules.index("provider_options` is")])
    )
    assert listed == set(modelcheck.SESSION_OPTIONS_ALLOWED)
    providers = rules[rules.index("must be one of") : rules.index("and no option value")]
    assert set(re.findall(r"`([A-Za-z]+)`", providers)) == set(modelcheck.PROVIDERS_ALLOWED)
    forbidden = rules[rules.index("may contain") : rules.index("(they load code")]
    assert set(re.findall(r"`([a-z_]+)`", forbidden)) == set(modelcheck._FORBIDDEN_KEY_PARTS)


def test_manifest_keys_are_all_documented() -> None:
    table = section("## 2. Manifest")
    example = manifest.Manifest(name="x", version="1.0.0", precision="int4", target=TargetFacts(), files=())
    for key in example.to_dict():
        assert f"| `{key}` |" in table, key
