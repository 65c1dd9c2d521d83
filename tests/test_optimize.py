"""Strip and fuse, HQQ weights and ORT format: each checked on real builder output.

The builder's graph is exported once per model (module-scoped), then each test works on
its own copy of the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import assets
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from conftest import build_bundle
from edgephi.packager import builder, hqq, optimize
from edgephi.runtime import bundle, load
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store
from edgephi.targets import ExecutionProvider, ModelFormat, Precision


def export(source: Path, out: Path, precision: Precision, tied: bool = False) -> Path:
    builder.export(
        builder.ExportRequest(
            source=str(source),
            source_is_local=True,
            output_dir=out,
            cache_dir=out.parent / (out.name + "-cache"),
            log_path=out.parent / (out.name + ".log"),
            precision=precision,
            execution_provider=ExecutionProvider.CPU,
            tied_embeddings=tied,
        )
    )
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``exported(model, precision)``: the builder's folder for a tiny model or ``smollm2``."""
    root = tmp_path_factory.mktemp("exported")
    done: dict[tuple[str, Precision], Path] = {}

    def get(name: str, precision: Precision) -> Path:
        if (name, precision) not in done:
            if name == "smollm2":
                from edgephi.packager import gguf

                hf = root / "smollm2-hf"
                if not hf.exists():
                    gguf.to_hf_folder(assets.smollm2_gguf(), hf)
                source, tied = hf, True
            else:
                source = tiny.tiny_model(name)
                tied = bool(tiny.SPECS[name]["config"].get("tie_word_embeddings", False))
            done[name, precision] = export(source, root / f"{name}-{precision.value}", precision, tied)
        return done[name, precision]

    return get


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def greedy(folder: Path) -> list[int]:
    return optimize.greedy_tokens(folder, "Once upon a time, in a small village,", 24)


@pytest.mark.parametrize("name", ["phi3.5-mini", "smollm2"])
def test_the_optimised_graph_generates_the_same_greedy_tokens(name: str, exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    original = exported(name, Precision.INT4)
    folder = copy(original, tmp_path / "m")
    report = optimize.strip_and_fuse(folder, ModelFormat.ONNX, tmp_path / "work")
    assert report.nodes_after < report.nodes_before  # something was fused
    # The tied embedding (SmolLM2) stays shared with the lm_head: no second copy of it.
    assert report.bytes_after <= report.bytes_before * 1.01
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert all(not n.doc_string for n in graph.graph.node)
    assert greedy(folder) == greedy(original)


def test_ort_format_keeps_the_shared_embedding_and_lists_its_operators(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    original = exported("smollm2", Precision.INT4)
    folder = copy(original, tmp_path / "m")
    report = optimize.strip_and_fuse(folder, ModelFormat.ORT, tmp_path / "work")
    assert report.format == "ort" and not (folder / "model.onnx").exists()
    assert (
        json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.ort"
    )
    # A plain ORT conversion folds the embedding's Reshape into a second copy of the weights.
    assert report.bytes_after <= report.bytes_before * 1.01
    ops = (folder / optimize.OPS_CONFIG).read_text()
    assert "com.microsoft;1;" in ops and "MatMulNBits" in ops and "GroupQueryAttention" in ops
    assert str(tmp_path) not in ops  # no build-host paths shipped
    assert greedy(folder) == greedy(original)


def test_an_ort_bundle_loads_and_generates(tmp_path: Path, store: Store) -> None:
    path = build_bundle(tiny.tiny_model("llama"), tmp_path / "ort.phi", model_format=ModelFormat.ORT)
    manifest = bundle.open_bundle(path).manifest
    assert {f.path for f in manifest.files} >= {"model.ort", optimize.OPS_CONFIG}
    assert manifest.model["graph"]["format"] == "ort"
    assert manifest.memory["weights_bytes"] >= next(f.size for f in manifest.files if f.path == "model.ort")
    engine = load(path, store=store)
    text = engine.generate(
        [{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=5, temperature=0)
    )
    assert engine.last_stats is not None and engine.last_stats.generated_tokens == 5 and text.text


def embedding_output(folder: Path) -> str:
    """The tensor the builder's embedding lookup writes (HQQ's subgraph writes the same one)."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return next(n.output[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")


def embedding_rows(folder: Path, output: str, ids: np.ndarray) -> np.ndarray:
    """The decoder's embedding for ``ids``, cut out of the graph and run in onnxruntime."""
    sub = onnx.utils.Extractor(onnx.load(str(folder / "model.onnx"))).extract_model(["input_ids"], [output])
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input_ids": ids})[0])


def weight_names(folder: Path) -> set[str]:
    """FP32 weight matrices: MatMul inputs and the embedding's table (or the tied one it transposes)."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    used = {i for n in graph.node if n.op_type in ("MatMul", "Gather", "Transpose") for i in n.input}
    return used & inits


@pytest.mark.parametrize("name", ["phi3.5-mini", "qwen2"])  # an untied and a tied embedding
def test_hqq_quantises_every_matmul_and_the_embedding(name: str, exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fp32 = exported(name, Precision.FP32)
    folder = copy(fp32, tmp_path / "m")
    count = hqq.quantize(folder, 32, 4, tmp_path / "work")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert count == sum(n.op_type == "MatMulNBits" for n in graph.node) > 0
    assert not any(n.op_type == "MatMul" for n in graph.node)
    weights = weight_names(fp32)
    assert weights and not weights & {i.name for i in graph.initializer}  # no FP32 copy left

    output = embedding_output(fp32)
    ids = np.array([[0, 1, 2, 77, 500, 1000]], dtype=np.int64)
    reference, quantised = embedding_rows(fp32, output, ids), embedding_rows(folder, output, ids)
    assert quantised.shape == reference.shape
    # 4-bit blocks of 32 keep the rows within ~7% (a swapped nibble order gives ~137%).
    error = np.linalg.norm(quantised - reference) / np.linalg.norm(reference)
    assert error < 0.15, error
    assert len(greedy(folder)) == 24
