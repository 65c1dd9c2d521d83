"""Strip and fuse, HQQ weights and ORT format: each checked on real builder output.

The builder's graph is exported once per model (module-scoped), then each test works on
its own copy of the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import assets
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from conftest import build_bundle
from edgephi.packager import builder, embedding, evaluate, hqq, imatrix, optimize
from edgephi.runtime import bundle, load
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store
from edgephi.targets import ExecutionProvider, ModelFormat, Precision


def export(source: Path, out: Path, precision: Precision, tied: bool = False, fuse: bool = True) -> Path:
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
            fuse_gate_up=fuse,
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


def test_fused_gate_up_is_one_matmul_per_layer_with_the_same_tokens(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fused = exported("phi3.5-mini", Precision.INT4)
    apart = export(tiny.tiny_model("phi3.5-mini"), tmp_path / "apart", Precision.INT4, fuse=False)

    def matmuls(folder: Path) -> list[str]:
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        return [n.name for n in graph.node if n.op_type == "MatMulNBits" and "/mlp/" in n.name]

    layers = tiny.SPECS["phi3.5-mini"]["config"]["num_hidden_layers"]
    assert sum("gate_up_proj" in n for n in matmuls(fused)) == layers
    assert len(matmuls(apart)) == len(matmuls(fused)) + layers
    # Blocks run along the input dimension, so fusing before quantising changes no weight.
    assert greedy(fused) == greedy(apart)


def test_an_int8_tied_embedding_reads_the_lm_heads_blocks(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    original = exported("qwen2", Precision.INT8)
    folder = copy(original, tmp_path / "m")
    saved = embedding.share_int8_embedding(folder, tmp_path / "work")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    table = next(t for t in graph.initializer if t.name == "lm_head.MatMul.weight_Q8")
    assert saved == table.dims[0] * table.dims[1] * table.dims[2] * 4  # the FP32 copy is gone
    data = (folder / "model.onnx.data").stat().st_size
    assert data <= (original / "model.onnx.data").stat().st_size - saved + 4096
    lookups = [
        n for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in n.input
    ]
    assert [n.op_type for n in lookups] == ["GatherBlockQuantized"]
    # The lookup alone, run by onnxruntime: the FP32 rows to within one INT8 step of their block.
    shared = onnx.load(str(folder / "model.onnx"))
    reshape = next(n for n in shared.graph.node if lookups[0].input[0] in n.output)
    needed = set(reshape.input) | set(lookups[0].input)
    lookup = onnx.helper.make_model(
        onnx.helper.make_graph(
            [reshape, lookups[0]],
            "lookup",
            [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
            [onnx.helper.make_tensor_value_info(lookups[0].output[0], onnx.TensorProto.FLOAT, None)],
            [t for t in shared.graph.initializer if t.name in needed],
        ),
        opset_imports=list(shared.opset_import),
    )
    ids = np.array([[0, 1, 17, 4242, table.dims[0] - 1]], dtype=np.int64)
    (rows,) = ort.InferenceSession(lookup.SerializeToString()).run(None, {"input_ids": ids})
    full = onnx.load(str(original / "model.onnx"))
    fp32 = next(
        onnx.numpy_helper.to_array(t) for t in full.graph.initializer if t.dims == [table.dims[0], 128]
    )
    scales = onnx.numpy_helper.to_array(
        next(t for t in full.graph.initializer if t.name == "lm_head.MatMul.weight_scales")
    )
    step = np.repeat(np.abs(scales[ids[0]]), 32, axis=1)
    assert np.all(np.abs(rows[0] - fp32[ids[0]]) <= step + 1e-6)
    # And the model around it: a wrong zero point or layout would cost nats, not hundredths.
    result = evaluate.evaluate(folder, original, window=64, max_windows=2)
    assert result.kl is not None and result.kl < 0.05 and (result.top1_agreement or 0) > 0.8


def test_an_untied_int8_embedding_is_left_as_it_is(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = copy(exported("phi3.5-mini", Precision.INT8), tmp_path / "m")
    before = (folder / "model.onnx.data").read_bytes()
    assert embedding.share_int8_embedding(folder, tmp_path / "work") == 0
    assert (folder / "model.onnx.data").read_bytes() == before


def _lookup_alone(model: onnx.ModelProto, node: onnx.NodeProto) -> ort.InferenceSession:
    """onnxruntime running one embedding lookup of ``model`` by itself."""
    graph = onnx.helper.make_graph(
        [node],
        "lookup",
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
        [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in node.input],
    )
    return ort.InferenceSession(
        onnx.helper.make_model(graph, opset_imports=list(model.opset_import)).SerializeToString()
    )


@pytest.mark.parametrize(("precision", "bits"), [(Precision.INT4, 4), (Precision.INT8, 8)])
def test_an_untied_embedding_is_looked_up_in_blocks_of_the_builds_bits(
    precision: Precision,
    bits: int,
    exported,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    original = exported("phi3.5-mini", precision)
    folder = copy(original, tmp_path / "m")
    fp32 = next(
        onnx.numpy_helper.to_array(t, str(original))
        for t in onnx.load(str(original / "model.onnx"), load_external_data=False).graph.initializer
        if t.name == "model.embed_tokens.weight"
    )
    vocab, hidden = fp32.shape
    saved = embedding.quantize_untied(folder, tmp_path / "work", bits, 32)
    per_weight = {4: 0.5 + 4 / 32 + 0.5 / 32, 8: 1 + 4 / 32}[bits]  # packed, scales, zero points
    assert saved == vocab * hidden * (4 - per_weight)
    data = (folder / "model.onnx.data").stat().st_size
    assert data <= (original / "model.onnx.data").stat().st_size - saved + 4096
    model = onnx.load(str(folder / "model.onnx"))
    (lookup,) = [n for n in model.graph.node if "input_ids" in n.input and "Gather" in n.op_type]
    assert lookup.op_type == "GatherBlockQuantized"
    assert next(a.i for a in lookup.attribute if a.name == "bits") == bits
    assert "model.embed_tokens.weight" not in {t.name for t in model.graph.initializer}
    # What onnxruntime reads back: the FP32 rows to within a few percent of their energy
    # (INT4) or one step of their block (INT8); a wrong layout or zero point is far off.
    ids = np.array([[0, 1, 17, 4242, vocab - 1]], dtype=np.int64)
    (rows,) = _lookup_alone(model, lookup).run(None, {"input_ids": ids})
    error = rows[0] - fp32[ids[0]]
    if bits == 4:
        assert (error**2).mean() < 0.02 * (fp32[ids[0]] ** 2).mean()
    else:
        scales = next(
            onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == lookup.input[2]
        )
        assert np.all(np.abs(error) <= np.repeat(scales[ids[0]], 32, axis=1) + 1e-6)
    assert len(greedy(folder)) == 24
    # A tied table is the lm_head's already: nothing to do.
    tied = copy(exported("qwen2", Precision.INT4), tmp_path / "t")
    assert embedding.quantize_untied(tied, tmp_path / "w", 4, 32) == 0


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
    assert manifest.model.graph.format is ModelFormat.ORT
    assert manifest.memory.weights_bytes >= next(f.size for f in manifest.files if f.path == "model.ort")
    engine = load(path, store=store)
    text = engine.generate(
        [{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=5, temperature=0)
    )
    assert text.stats.generated_tokens == 5 and text.text


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


def contrib_model(node: Any, inputs: list[Any], initializers: dict[str, np.ndarray]) -> ort.InferenceSession:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_imatrix_writes_what_onnxruntime_reads_and_rounds_important_weights_closer() -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    k, n, block = 80, 24, 32  # 80 = two full blocks and a padded one
    weight = rng.normal(size=(k, n)).astype(np.float32)
    weight[:, 0] = np.abs(weight[:, 0])  # an all-positive column: zero must stay on the grid
    importance = rng.uniform(0.01, 1.0, size=k) ** 4  # a few channels matter most, as in real models
    packed, scales, zeros = imatrix.quantize_weight(weight, importance, block)
    assert packed.shape == (n, 3, block // 2) and scales.shape == (n, 3) and zeros.shape == (n, 2)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.float32)
    z = np.stack([zeros & 0x0F, zeros >> 4], axis=-1).reshape(n, -1)[:, :3].astype(np.float32)
    mine = ((q - np.repeat(z, block, axis=1)) * np.repeat(scales, block, axis=1))[:, :k]  # [N, K]
    np.testing.assert_array_equal(imatrix.dequantize(packed, scales, zeros, k), mine.T)  # what KL probes

    # onnxruntime's INT4 MatMul (times the identity) and its block-quantised lookup (the
    # tied embedding's) both read exactly these weights.
    matmul = helper.make_node(
        "MatMulNBits", ["a", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block
    )
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, k])
    session = contrib_model(matmul, [a], {"b": packed, "s": scales.reshape(-1), "z": zeros.reshape(-1)})
    np.testing.assert_allclose(session.run(None, {"a": np.eye(k, dtype=np.float32)})[0], mine.T, atol=1e-6)
    lookup = helper.make_node(
        "GatherBlockQuantized",
        ["d", "i", "s", "z"],
        ["y"],
        domain="com.microsoft",
        bits=4,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    ids = helper.make_tensor_value_info("i", TensorProto.INT64, [1, 3])
    full = k // block  # a lookup table is whole blocks: the two full ones
    table = {"d": packed[:, :full].reshape(n, -1), "s": scales[:, :full], "z": zeros[:, : full // 2]}
    session = contrib_model(lookup, [ids], table)
    picks = np.array([[5, 0, 23]], dtype=np.int64)
    np.testing.assert_allclose(
        session.run(None, {"i": picks})[0][0], mine[picks[0], : full * block], atol=1e-6
    )

    # Against plain asymmetric rounding of each block's [min, max] (zero included): the
    # importance-weighted error is never larger in any block, and smaller overall.
    def rounded(w: np.ndarray) -> np.ndarray:
        out = np.empty_like(w)
        for b in range(-(-k // block)):
            cols = w[:, b * block : (b + 1) * block]
            low, high = np.minimum(cols.min(axis=1), 0), np.maximum(cols.max(axis=1), 0)
            s = (high - low) / 15
            zero = np.clip(np.rint(-low / s), 0, 15)[:, None]
            out[:, b * block : (b + 1) * block] = (
                np.clip(np.rint(cols / s[:, None]) + zero, 0, 15) - zero
            ) * s[:, None]
        return out

    weights = importance + imatrix._FLOOR * importance.mean()
    err_plain = (rounded(weight.T) - weight.T) ** 2 * weights
    err_ours = (mine - weight.T) ** 2 * weights

    def per_block(e: np.ndarray) -> np.ndarray:
        return np.stack([e[:, b * block : (b + 1) * block].sum(axis=1) for b in range(3)], axis=1)

    assert np.all(per_block(err_ours) <= per_block(err_plain) * (1 + 1e-5))
    assert err_ours.sum() < 0.8 * err_plain.sum()


@pytest.mark.parametrize("name", ["phi3.5-mini", "qwen2"])  # an untied and a tied embedding
def test_imatrix_rewrites_every_int4_matmul_and_the_model_still_generates(
    name: str,
    exported,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    folder = copy(exported(name, Precision.INT4), tmp_path / "m")
    calibration = imatrix.quantize(folder, exported(name, Precision.FP32), tmp_path / "work")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert calibration.matmuls == len(matmuls) > 0
    assert all(len(n.input) == 4 and n.input[3].endswith("_zero_points") for n in matmuls)
    lookups = [n for n in graph.node if "Gather" in n.op_type and "input_ids" in n.input]
    if tiny.SPECS[name]["config"].get("tie_word_embeddings", False):
        (lookup,) = lookups
        assert lookup.op_type == "GatherBlockQuantized" and len(lookup.input) == 4  # the zero points too
    else:
        # Its own FP32 table, for packager.embedding to write in blocks after calibration.
        assert [n.op_type for n in lookups] == ["Gather"]
    assert calibration.tokens >= imatrix.WINDOW
    assert len(greedy(folder)) == 24


def test_imatrix_writes_its_most_sensitive_matmuls_in_int8_when_given_room(
    exported,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    name = "qwen2"  # a tied embedding: its lookup must follow the lm_head's blocks to INT8
    fp32 = exported(name, Precision.FP32)
    int4 = copy(exported(name, Precision.INT4), tmp_path / "int4")
    imatrix.quantize(int4, fp32, tmp_path / "w4")
    mixed = copy(exported(name, Precision.INT4), tmp_path / "mixed")
    # INT8 adds ~0.76x an INT4 MatMul's bytes: a budget of 1 has room for every MatMul.
    calibration = imatrix.quantize(mixed, fp32, tmp_path / "w8", int8_budget=1.0)
    graph = onnx.load(str(mixed / "model.onnx"), load_external_data=False).graph
    readers = [n for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert len(calibration.int8) == calibration.matmuls == len(readers) - 1
    assert calibration.card()["int8_matmuls"] == calibration.matmuls
    for node in readers:
        assert len(node.input) == 3 and next(a.i for a in node.attribute if a.name == "bits") == 8
    assert not [t.name for t in graph.initializer if t.name.endswith("_zero_points")]
    assert len(greedy(mixed)) == 24
    # Nearer FP32 than the all-INT4 weights, on the evaluation text (not the calibration one).
    kl4 = evaluate.evaluate(int4, fp32, window=64, max_windows=2).kl
    kl8 = evaluate.evaluate(mixed, fp32, window=64, max_windows=2).kl
    assert kl8 < kl4 / 4


def test_the_int8_budget_goes_to_the_most_kl_per_extra_byte() -> None:
    def pair(node: str, n: int) -> imatrix._Pair:
        return imatrix._Pair(node, "", "", "", "", block_size=32, k=64, n=n)

    # Extra bytes for INT8: 31 per output row here (2 blocks: 64 + 8 against 32 + 8 + 1).
    pairs = [pair("a", 32), pair("b", 64), pair("c", 32)]
    assert [p.bytes(8) - p.bytes(4) for p in pairs] == [992, 1984, 992]
    kl = {"a": 1.0, "b": 1.5, "c": 0.1}  # per byte: a, then b, then c
    # b does not fit beside a; c still does.
    assert [p.node for p in imatrix.choose_int8(pairs, kl, budget=2000)] == ["a", "c"]
    assert [p.node for p in imatrix.choose_int8(pairs, kl, budget=3000)] == ["a", "b"]
    assert imatrix.choose_int8(pairs, kl, budget=900) == []
