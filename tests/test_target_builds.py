"""Every shipped device profile builds a bundle; this host runs the ones meant for it."""

from __future__ import annotations

import json
import zipfile

import pytest
from edgephi import targets
from edgephi.core.errors import IncompatibleBundle
from edgephi.runtime import load
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
    assert manifest["target"] == profile.to_dict()
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
