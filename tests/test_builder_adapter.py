"""The builder adapter: our option names exist in the installed builder, and its traps are avoided."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from edgephi.core.errors import BuilderFailed, BuildError
from edgephi.packager import builder
from edgephi.targets import ExecutionProvider, Precision


def request(**kw: object) -> builder.ExportRequest:
    base: dict = {
        "source": "/m",
        "source_is_local": True,
        "output_dir": Path("/o"),
        "cache_dir": Path("/c"),
        "log_path": Path("/l"),
        "precision": Precision.INT4,
        "execution_provider": ExecutionProvider.CPU,
    }
    base.update(kw)
    return builder.ExportRequest(**base)


def test_every_option_we_pass_is_documented_by_the_installed_builder() -> None:
    documented = builder.documented_options()
    assert "block_size" in documented and "accuracy_level" in documented
    builder.check_option_names()


def test_an_unknown_or_renamed_option_is_caught() -> None:
    with pytest.raises(BuildError, match="int4_block_size"):
        builder.check_option_names(("int4_block_size",))


def test_asymmetric_int4_with_tied_embeddings_unshares_them() -> None:
    opts = request(symmetric=False, tied_embeddings=True).extra_options()
    assert opts["is_symmetric"] == "false" and opts["shared_embeddings"] == "false"
    assert "shared_embeddings" not in request(symmetric=True, tied_embeddings=True).extra_options()


def test_float_precisions_get_no_quantisation_options() -> None:
    opts = request(precision=Precision.FP32).extra_options()
    assert "block_size" not in opts and "accuracy_level" not in opts


def test_hub_ids_go_to_the_builder_as_model_names() -> None:
    argv = request(source="org/name", source_is_local=False).argv()
    assert argv[argv.index("-m", 3)] == "-m" and "org/name" in argv and "-i" not in argv


def test_last_error_line_finds_the_exception(tmp_path: Path) -> None:
    log = tmp_path / "b.log"
    log.write_text("progress 1\nTraceback (most recent call last):\n  File x\nValueError: bad config\nbye\n")
    assert builder.last_error_line(log) == "ValueError: bad config"


def test_gate_and_up_are_fused_unless_lora_projections_must_stay_apart() -> None:
    assert request().extra_options()["fuse_mlp_gate_up"] == "true"
    assert "fuse_mlp_gate_up" not in request(adapter_path=Path("/a")).extra_options()
    excluded = ("/model/layers.0/mlp/gate_proj/MatMul",)
    assert "fuse_mlp_gate_up" not in request(exclude_nodes=excluded).extra_options()


def test_a_builder_killed_mid_step_is_reported_as_killed(tmp_path: Path) -> None:
    # What the kernel's OOM killer does to a builder holding a 3.8B model in FP32: no
    # exception in the log, only its last progress line.
    kill = "import os, signal; print('Saving ONNX model', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(BuilderFailed) as info:
        builder._run_logged([sys.executable, "-c", kill], tmp_path / "b.log", True, "the model builder")
    assert str(info.value) == "the model builder was killed (SIGKILL) at: Saving ONNX model"
    assert "ran out of memory" in (info.value.hint or "") and info.value.log == str(tmp_path / "b.log")
