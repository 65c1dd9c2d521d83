"""``edge-pack build`` refuses unusable sources with one clear line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgephi.packager import sources
from edgephi.packager.cli import main as edge_pack
from edgephi.runtime.errors import NotAModel, SourceNotFound, UnsupportedArchitecture


def test_missing_path() -> None:
    with pytest.raises(SourceNotFound):
        sources.resolve("/no/such/model")


def test_hub_id_is_passed_through() -> None:
    s = sources.resolve("microsoft/Phi-3.5-mini-instruct")
    assert s.kind == "hf-id" and s.default_name == "phi-3.5-mini-instruct"


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(NotAModel, match=r"no\ config\.json"):
        sources.resolve(str(tmp_path))


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(NotAModel, match="no weights"):
        sources.resolve(str(tmp_path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UnsupportedArchitecture, match="BertModel"):
        sources.resolve(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(NotAModel, match="GGUF"):
        sources.resolve(str(p))


def test_gguf_names_drop_the_quant_tag(tmp_path: Path) -> None:
    p = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 100)
    assert sources.resolve(str(p)).default_name == "smollm2-135m-instruct"


@pytest.mark.parametrize("case", ["missing", "not-a-model", "unsupported"])
def test_cli_errors_are_one_line_and_leave_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
        (src / "x.txt").write_text("x")
    if case == "unsupported":
        (src / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
        (src / "model.safetensors").write_bytes(b"\0" * 16)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        edge_pack(["build", str(src), "-o", str(out_dir / "m.phi")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if "error:" in ln]) == 1
    line = next(ln for ln in err if "error:" in ln)
    assert line.startswith("edge-pack: error: ") and " — " in line
    assert list(out_dir.iterdir()) == []
