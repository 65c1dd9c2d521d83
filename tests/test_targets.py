from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgephi import targets
from edgephi.core.errors import ConfigError, UnknownTarget
from edgephi.targets import ExecutionProvider, Precision, Target, registry


def test_builtin_profiles_are_registered() -> None:
    names = targets.names()
    for name in ("cpu", "rpi4", "rpi5", "android-arm64", "arm64-laptop", "x86-64", "cuda", "dml"):
        assert name in names
    assert targets.get("rpi4").arch == "aarch64"
    assert targets.get("cuda").execution_provider is ExecutionProvider.CUDA


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(UnknownTarget) as info:
        targets.get("pi-zero")
    assert "rpi5" in str(info.value) and "cpu" in str(info.value)


def test_user_profile_file_adds_a_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "jetson.json").write_text(
        json.dumps(
            {
                "name": "orin-cpu",
                "description": "Jetson Orin CPU",
                "execution_provider": "cpu",
                "arch": "aarch64",
                "threads": 6,
                "context": 4096,
            }
        )
    )
    monkeypatch.setenv("EDGEPHI_TARGETS", str(folder))
    registry.reset()
    t = targets.get("orin-cpu")
    assert t.threads == 6 and t.precision is None  # auto: chosen per model


def test_bad_user_profile_is_reported_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "bad.json").write_text(
        json.dumps({"name": "bad", "description": "x", "execution_provider": "cpu", "blocksize": 32})
    )
    monkeypatch.setenv("EDGEPHI_TARGETS", str(folder))
    registry.reset()
    with pytest.raises(ConfigError, match="unknown keys \\['blocksize'\\]"):
        targets.names()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"block_size": 48}, "block_size 48"),
        ({"accuracy_level": 4, "execution_provider": ExecutionProvider.CUDA}, "accuracy_level 4"),
        ({"precision": Precision.FP16}, "fp16 needs a GPU"),
        ({"context": 10}, "context 10"),
        ({"name": "bad name"}, "target name"),
        ({"vision_precision": Precision.INT4}, "vision_precision int4 is not one of fp32, int8"),
    ],
)
def test_target_rules(fields: dict, message: str) -> None:  # type: ignore[type-arg]
    base = {"name": "t", "description": "d", "execution_provider": ExecutionProvider.CPU}
    with pytest.raises(ConfigError, match=message):
        Target(**{**base, **fields})


def test_profiles_round_trip_through_dicts() -> None:
    for t in targets.all_targets():
        assert Target.from_dict(t.to_dict()) == t


def test_vision_precision_is_read_from_a_profile() -> None:
    base = {"name": "t", "description": "d", "execution_provider": "cpu"}
    assert Target.from_dict(base).vision_precision is Precision.FP32
    assert Target.from_dict({**base, "vision_precision": "int8"}).vision_precision is Precision.INT8
    with pytest.raises(ConfigError, match="'bf16' is not a valid Precision"):
        Target.from_dict({**base, "vision_precision": "bf16"})
