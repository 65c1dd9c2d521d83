"""Every shipped device profile builds a bundle; this host runs the ones meant for it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import tiny
from conftest import build_bundle
from edgephi import targets
from edgephi.core.errors import IncompatibleBundle
from edgephi.runtime import bundle, load
from edgephi.runtime.device import machine_arch
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store

SHIPPED = ["cpu", "x86-64", "rpi4", "rpi5", "android-arm64", "arm64-laptop", "cuda", "dml"]


def test_the_shipped_profiles_are_the_ones_tested() -> None:
    assert sorted(targets.names()) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_target_builds_a_bundle(name: str, target_bundle, store: Store) -> None:  # type: ignore[no-untyped-def]
    path = target_bundle(name)
    profile = targets.get(name)
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        genai = json.loads(zf.read("model/genai_config.json"))
    # A profile that says "auto" is recorded with the precision chosen: INT8 for a tiny model
    # on a CPU target (packager.precision); the GPU profiles pin INT4.
    assert manifest["precision"] == ("int8" if profile.precision is None else profile.precision.value)
    assert manifest["target"] == {**profile.to_dict(), "precision": manifest["precision"]}
    assert manifest["model"]["kv_cache"] == profile.kv_cache.value
    assert genai["search"]["max_length"] == profile.context
    runs_here = profile.execution_provider.value == "cpu" and profile.arch in ("any", machine_arch())
    if runs_here:
        engine = load(path, store=store)
        done = engine.generate(
            [{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=4, temperature=0)
        )
        assert done.stats.generated_tokens == 4
        assert engine.threads == (min(profile.threads, engine.threads) if profile.threads else engine.threads)
    else:
        with pytest.raises(IncompatibleBundle):
            load(path, store=store)
        assert store.installed() == []


@pytest.mark.parametrize("name", ["rpi4", "android-arm64"])
def test_calibrated_int4_builds_for_the_int8_kv_and_ort_profiles(name: str, tmp_path: Path) -> None:
    """What --precision auto packs a large model to on these profiles (imatrix-b32): over the
    two-pass int8-KV export, and converted to ORT format after calibration."""
    source = tiny.tiny_model("phi3.5-mini")  # with a chat template
    path = build_bundle(source, tmp_path / f"{name}.phi", target=name, quant="imatrix-b32")
    manifest = bundle.open_bundle(path).manifest
    profile = targets.get(name)
    assert manifest.precision == "int4" and manifest.quality["calibration"]
    assert manifest.model.kv_cache is profile.kv_cache and manifest.model.graph is not None
    assert manifest.model.graph.format is profile.model_format
    # An aarch64 bundle: unpacked by hand, since the runtime refuses it on another machine.
    folder = tmp_path / "model"
    folder.mkdir()
    bundle.extract(path, folder)
    done = load(folder, store=Store(tmp_path / "home")).generate(
        [{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=4, temperature=0)
    )
    assert done.stats.generated_tokens == 4
