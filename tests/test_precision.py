"""``--precision auto``, the default: what it chooses for real model shapes on each target,
that its size estimate is the built files' size, and that a build says what it chose."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import tiny
from conftest import build_bundle
from edgephi import targets
from edgephi.core.errors import BuildError, ConfigError
from edgephi.packager import precision
from edgephi.packager.cli import app as pack_app
from edgephi.packager.config import BuildConfig
from edgephi.targets import Precision, Target
from typer.testing import CliRunner

CPU_TARGETS = ("cpu", "rpi4", "rpi5", "android-arm64", "arm64-laptop", "x86-64")


def real(family: str, **shape: Any) -> dict[str, Any]:
    """A tiny spec's config (rope, tying, vocab as published) at the real checkpoint's shape."""
    return {**tiny.SPECS[family]["config"], **shape}


# The published checkpoints' shapes.
SMOLLM2_135M = real(
    "llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
PHI35_MINI = real(
    "phi3.5-mini",
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)
QWEN25_1_5B = real(
    "qwen2",
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
)


def choose(config: dict[str, Any], target: str | Target, **kw: Any) -> precision.Choice:
    t = targets.get(target) if isinstance(target, str) else target
    return precision.choose(config, t, t.context, **kw)


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_a_135m_model_packs_at_int8_on_every_cpu_target(target: str) -> None:
    choice = choose(SMOLLM2_135M, target)
    assert (choice.precision, choice.quant) == (Precision.INT8, None)
    assert choice.reason.startswith("int8 (+0.6% perplexity on SmolLM2), the best that fits")


@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_phi35_mini_packs_at_calibrated_int4_for_a_pi(target: str) -> None:
    choice = choose(PHI35_MINI, target)
    assert (choice.precision, choice.quant) == (Precision.INT4, "imatrix-b32")
    need = {"rpi4": "6.7 GiB of 3.0 GiB", "rpi5": "8.3 GiB of 6.0 GiB"}[target]
    assert f"int8 would need {need}" in choice.reason


def test_where_even_int4_does_not_fit_the_build_says_so() -> None:
    # A 4 GB Pi 4 keeps 3 GiB for the model; Phi-3.5-mini at calibrated INT4 needs 4.1 GiB.
    choice = choose(PHI35_MINI, "rpi4")
    assert "needs 4.1 GiB of 3.0 GiB" in choice.reason
    assert choice.reason.endswith("it does not fit either, even with 128 tokens: choose a smaller model")
    # An 8 GB Pi 5 holds it with the profile's whole 2048-token context, now that the untied
    # embedding is INT4 too (2.3 GiB of weights; with it in FP32, 2.6 GiB left room for ~1860).
    five = choose(PHI35_MINI, "rpi5")
    assert "2.3 GiB of weights, needs 5.7 GiB of 6.0 GiB" in five.reason and "will plan" not in five.reason


def test_speed_not_memory_can_rule_out_int8() -> None:
    # 16 GB holds Phi-3.5-mini's INT8 weights; 60 GB/s reads them ~7 times a second.
    choice = choose(PHI35_MINI, "arm64-laptop")
    assert (choice.precision, choice.quant) == (Precision.INT4, "imatrix-b32")
    assert "int8 would decode ~7 tok/s, below 10" in choice.reason
    # A 1.5B model at INT8 is below the floor on a Pi 5, above it on the laptop.
    assert choose(QWEN25_1_5B, "rpi5").precision is Precision.INT4
    assert choose(QWEN25_1_5B, "arm64-laptop").precision is Precision.INT8


def test_a_roomy_fast_device_takes_int8_for_phi35_mini() -> None:
    server = dataclasses.replace(targets.get("x86-64"), name="server", ram_gb=64, bandwidth_gbs=200)
    assert choose(PHI35_MINI, server).precision is Precision.INT8


def test_without_calibration_the_last_rung_is_the_targets_int4() -> None:
    # Switchable adapters and vision models cannot be calibrated (packager.pipeline).
    choice = choose(PHI35_MINI, "rpi5", calibrate=False)
    assert (choice.precision, choice.quant) == (Precision.INT4, None)
    assert choose(SMOLLM2_135M, "rpi5", calibrate=False).precision is Precision.INT8


def test_a_profile_without_memory_figures_gets_the_smallest_recipe() -> None:
    bare = dataclasses.replace(targets.get("cpu"), name="bare", ram_gb=0.0, bandwidth_gbs=0.0)
    choice = choose(SMOLLM2_135M, bare)
    assert (choice.precision, choice.quant) == (Precision.INT4, "imatrix-b32")
    assert "gives no ram_gb and bandwidth_gbs" in choice.reason


def test_a_gpu_target_keeps_its_int4() -> None:
    gpu = Target.from_dict({**targets.get("cuda").to_dict(), "name": "gpu-auto", "precision": "auto"})
    assert gpu.precision is None
    choice = choose(SMOLLM2_135M, gpu)
    assert (choice.precision, choice.quant) == (Precision.INT4, None)


def test_a_config_without_shapes_is_one_clear_error() -> None:
    broken = {k: v for k, v in SMOLLM2_135M.items() if k != "intermediate_size"}
    with pytest.raises(BuildError, match="config lacks 'intermediate_size'") as info:
        choose(broken, "rpi5")
    assert "--precision int4 or int8" in (info.value.hint or "")


def test_what_pins_a_precision(tmp_path: Path) -> None:
    out = tmp_path / "m.phi"
    cpu = targets.get("cpu")
    assert cpu.precision is None and cpu.precision_name == "auto"
    assert BuildConfig(source="x", output=out, target=cpu).chooses_precision
    # --precision, a --quant recipe (INT4 ones) or a profile that names a precision.
    assert BuildConfig(source="x", output=out, target=cpu, precision=Precision.INT8).effective_precision is (
        Precision.INT8
    )
    assert BuildConfig(source="x", output=out, target=cpu, quant="rtn-b32").effective_precision is (
        Precision.INT4
    )
    pinned = Target.from_dict({**cpu.to_dict(), "name": "pinned", "precision": "int4"})
    assert not BuildConfig(source="x", output=out, target=pinned).chooses_precision
    assert Target.from_dict(cpu.to_dict()) == cpu  # "auto" round-trips
    with pytest.raises(ConfigError, match="bandwidth_gbs must be >= 0"):
        Target.from_dict({**cpu.to_dict(), "bandwidth_gbs": -1})


def _weights(bundle: Path) -> int:
    files = json.loads(zipfile.ZipFile(bundle).read("manifest.json"))["files"]
    return sum(f["size"] for f in files if f["path"].endswith(".onnx.data"))


def test_the_size_estimate_is_the_built_size(phi3_bundle: Path, tmp_path: Path) -> None:
    # Untied (Phi-3.5, longrope: two rotary tables; the embedding in blocks of its own) at
    # INT4 and INT8, and tied (Qwen2: the embedding reads the lm_head's blocks) at INT8.
    phi_dir = tiny.tiny_model("phi3.5-mini")
    phi = json.loads((phi_dir / "config.json").read_text())
    assert json.loads(zipfile.ZipFile(phi3_bundle).read("manifest.json"))["precision"] == "int4"
    estimate = precision.Shapes.from_config(phi).weight_bytes(precision.INT4)
    assert abs(estimate / _weights(phi3_bundle) - 1) < 0.01
    phi8 = build_bundle(phi_dir, tmp_path / "phi8.phi", precision=Precision.INT8)
    assert abs(precision.Shapes.from_config(phi).weight_bytes(precision.INT8) / _weights(phi8) - 1) < 0.01
    qwen_dir = tiny.tiny_model("qwen2")
    qwen = build_bundle(qwen_dir, tmp_path / "qwen.phi", precision=Precision.INT8)
    estimate = precision.Shapes.from_config(json.loads((qwen_dir / "config.json").read_text())).weight_bytes(
        precision.INT8
    )
    assert abs(estimate / _weights(qwen) - 1) < 0.01


def test_a_build_says_what_auto_chose(tmp_path: Path) -> None:
    out = tmp_path / "auto.phi"
    result = CliRunner().invoke(
        pack_app, ["build", str(tiny.tiny_model("llama")), "-o", str(out), "--target", "rpi5"]
    )
    assert result.exit_code == 0, result.output
    assert "precision       auto: chosen for the target once the model is read" in result.output
    assert "precision auto: int8 (+0.6% perplexity on SmolLM2), the best that fits rpi5" in result.output
    assert "[2/5] exporting int8 for cpu" in result.output
    manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    # The manifest records what was built, not "auto".
    assert (manifest["precision"], manifest["target"]["precision"]) == ("int8", "int8")
    assert manifest["target"]["bandwidth_gbs"] == 10
