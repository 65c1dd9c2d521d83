"""``edge-pack build`` refuses unusable sources with one clear line and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny
from edgephi.core.errors import NotAModel, SourceNotFound, UnsupportedArchitecture
from edgephi.packager import sources
from edgephi.packager.builder import ExportRequest
from edgephi.packager.cli import main as edge_pack
from edgephi.targets import ExecutionProvider, Precision


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


def test_a_failed_builder_run_keeps_its_log_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "broken-llama"
    shutil.copytree(tiny.tiny_model("llama"), src)
    (src / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}garbage")  # truncated weights
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        edge_pack(["build", str(src), "-o", str(out_dir / "m.phi")])
    assert exit_info.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    log = out_dir / "m.phi.build.log"
    assert len(err) == 1 and err[0].startswith("edge-pack: error: the model builder failed: ")
    assert err[0].endswith(f"its full log is {log}; nothing else was written")
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.phi.build.log"]
    assert "Traceback" in log.read_text()
    # A later successful build of the same output drops the stale log.
    with pytest.raises(SystemExit) as exit_info:
        edge_pack(["build", str(tiny.tiny_model("llama")), "-o", str(out_dir / "m.phi")])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.phi"]


def test_a_public_hub_id_asks_for_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    request = ExportRequest(
        source="HuggingFaceTB/SmolLM2-135M-Instruct",
        source_is_local=False,
        output_dir=tmp_path / "o",
        cache_dir=tmp_path / "c",
        log_path=tmp_path / "log",
        precision=Precision.INT4,
        execution_provider=ExecutionProvider.CPU,
    )
    assert request.extra_options()["hf_token"] == "false"
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a token the user set: the builder may use it
    assert "hf_token" not in request.extra_options()


def test_a_hub_id_without_network_fails_at_the_download_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Up to the network call: no token is demanded, and the failure says what to do."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no network; make it certain
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SystemExit):
        edge_pack(["build", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", str(out_dir / "m.phi")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1
    assert "oken" not in err[0]  # neither Token nor token: none was asked for
    assert err[0].startswith(
        "edge-pack: error: cannot fetch HuggingFaceTB/SmolLM2-135M-Instruct from the Hugging Face hub"
    )
    assert "check the network" in err[0]
    assert list(out_dir.iterdir()) == []  # refused before the builder ran: not even a log


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("OSError: You are trying to access a gated repo.", "hf auth login"),
        ("huggingface_hub.errors.GatedRepoError: 401 Client Error.", "hf auth login"),
        ("OSError: We couldn't connect to 'https://huggingface.co' to load the files", "check the network"),
    ],
)
def test_builder_failures_from_the_hub_get_a_hint(line: str, says: str, tmp_path: Path) -> None:
    """A download the builder itself makes (weights after the config) is explained too."""
    log = tmp_path / "builder.log"
    log.write_text(f"Traceback (most recent call last):\n  File x\n{line}\n")
    from edgephi.packager import builder

    hint = builder._hint(builder.last_error_line(log))
    assert hint is not None and says in hint
