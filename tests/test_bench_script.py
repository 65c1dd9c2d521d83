"""The parts of scripts/bench_vs_llamacpp that compute: limits, ratios, medians, the report, F32 GGUF."""

from __future__ import annotations

import math
from pathlib import Path

import bench_vs_llamacpp as bench
import gguf
import numpy as np
import pytest


def test_bandwidth_limit_is_bytes_per_second_over_bytes_per_token() -> None:
    # The numbers: 86 MB of weights at ~30 GB/s is ~350 tok/s.
    assert bench.bandwidth_limit(30e9, 86_000_000) == pytest.approx(348.8, rel=1e-3)
    with pytest.raises(ValueError):
        bench.bandwidth_limit(30e9, 0)


def test_median_ratio_and_perplexity() -> None:
    assert bench.median([3.0, 1.0, 2.0, 100.0]) == 2.5
    with pytest.raises(ValueError):
        bench.median([])
    assert bench.ratio(150, 100) == 1.5 and math.isnan(bench.ratio(1, 0))
    assert bench.perplexity(5 * math.log(20), 5) == pytest.approx(20)
    lp = bench.log_softmax([1000.0, 1000.0, 1000.0 - math.log(2)])  # large logits: no overflow
    assert np.exp(lp).sum() == pytest.approx(1) and lp[0] == pytest.approx(math.log(0.4))


def rows() -> list[bench.Row]:
    return [
        bench.Row(
            "edgephi default-b32", 80 * 2**20, 31.8, [0.05, 0.07, 0.06], [150, 170, 160], [200 << 20] * 3
        ),
        bench.Row(
            "raw onnxruntime-genai loop", 80 * 2**20, 31.8, [0.05] * 3, [165, 160, 170], [190 << 20] * 3
        ),
        bench.Row("llama.cpp Q4_K_M", 100 * 2**20, 27.0, [0.04] * 3, [100, 90, 110], [150 << 20] * 3),
    ]


def test_the_report_shows_what_was_measured_and_the_ratios() -> None:
    table = rows()
    limits = {r.name: bench.bandwidth_limit(32e9, r.file_bytes) for r in table}
    meta = {
        "date": "2026-11-25",
        "machine": "x86_64, 2 cores",
        "rounds": 3,
        "tokens": 64,
        "prompt_tokens": 128,
        "threads": 2,
        "text": "GPL-3:abc",
        "window": 512,
        "ppl_tokens": 2044,
        "bandwidth": 32e9,
        "llama": "llama-cpp-python 0.3.36, built here",
    }
    report = bench.write_report(table, limits, meta)
    assert "llama.cpp: llama-cpp-python 0.3.36, built here." in report
    ours = next(line for line in report.splitlines() if line.startswith("| edgephi default-b32"))
    # median 160 tok/s, 1.60x llama.cpp's median 100, 160 / (32e9 / 80 MiB) = 42% of the limit
    assert "160 (150–170)" in ours and "1.60×" in ours and "42%" in ours and "60 ms" in ours
    assert "raw onnxruntime-genai loop on the same files: 0.970" in report  # 160 / 165
    assert "our default bundle / llama.cpp Q4_K_M: 1.60×" in report
    # 31.8 is nearer 27.0 than anything else here: 160 / 100
    assert "edgephi default-b32 (PPL 31.80) / llama.cpp Q4_K_M (PPL 27.00): 1.60×" in report
    # 80 MiB but worse than Q4_K_M: the pairing is missed by 31.8 / 27.0 - 1
    assert (
        "the nearest, edgephi default-b32 (80.0 MiB, PPL 31.80 / nan), misses its perplexity by 17.8%"
        in report
    )


def test_the_nearest_in_quality_is_by_ratio_of_perplexities() -> None:
    def row(name: str, ppl: float) -> bench.Row:
        return bench.Row(name, 1, ppl, [0.1], [100], [1])

    ours = row("ours", 30.0)
    # 30 -> 20 is a ratio of 1.5, 30 -> 44 only 1.47: the larger difference is nearer.
    assert bench.nearest_in_quality(ours, [row("a", 20.0), row("b", 44.0)]).name == "b"
    assert bench.nearest_in_quality(ours, [row("a", 29.0), row("b", 44.0)]).name == "a"


def test_a_pareto_pairing_needs_no_larger_and_no_worse_on_both_texts() -> None:
    def row(name: str, mib: int, ppl: float, ppl2: float, decode: float) -> bench.Row:
        return bench.Row(name, mib * 2**20, ppl, [0.1], [decode], [1], ppl2)

    q4_0 = row("llama.cpp Q4_0", 87, 29.5, 15.0, 100)
    q4_k_m = row("llama.cpp Q4_K_M", 100, 25.0, 12.4, 80)
    small = row("edgephi small", 87, 27.0, 13.8, 110)  # beats Q4_0 on both texts at its size
    faster = row("edgephi faster", 84, 29.4, 15.1, 150)  # worse on the second text: no pairing
    big = row("edgephi big", 100, 25.5, 12.7, 90)  # 2.4% worse than Q4_K_M on the second text
    table = [small, faster, big, q4_0, q4_k_m]
    assert bench.pareto(table, q4_0) == (small, small)  # faster, 0.7% worse on one text, is out
    assert bench.pareto(table, q4_k_m) == (None, big)
    assert bench.miss(big, q4_k_m) == pytest.approx(12.7 / 12.4 - 1)
    lines = bench.pareto_lines(table)
    assert "edgephi small (87.0 MiB, PPL 27.00 / 13.80) is no larger and no worse" in lines[0]
    assert "1.10× as fast (short of the 1.2× floor)" in lines[0]
    assert "the nearest, edgephi big" in lines[1] and "by 2.4%" in lines[1] and "1.12× as fast" in lines[1]
    # A machine with one evaluation text judges on that one.
    one, q4_0_one = (
        row("edgephi one", 80, 29.0, math.nan, 120),
        row("llama.cpp Q4_0", 87, 29.5, math.nan, 100),
    )
    assert bench.pareto([one, q4_0_one], q4_0_one) == (one, one)
    assert bench.pareto_lines([big, q4_0, q4_k_m])[0].endswith("none of ours is no larger.")


def profile_events() -> list[dict]:
    """Two model runs of a fake profile: a 1000 µs prompt run, then a 300 µs decode step."""

    def node(name: str, op: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    return [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},
        node("/model/layers.0/mlp/down_proj/MatMul_Q4", "MatMulNBits", 10, 900),
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 300},
        node("/model/layers.0/attn/qkv_proj/MatMul_Q4", "MatMulNBits", 2010, 100),
        node("/model/layers.0/mlp/down_proj/MatMul_Q4", "MatMulNBits", 2110, 50),
        node("/lm_head/MatMul_Q4", "MatMulNBits", 2160, 80),
        node("/model/layers.0/attn/GroupQueryAttention", "GroupQueryAttention", 2240, 30),
        {"cat": "Node", "name": "/lm_head/MatMul_Q4_fence_before", "ts": 2160, "dur": 0, "args": {}},
    ]


def test_the_profile_splits_the_decode_steps_by_operator() -> None:
    out = bench.op_breakdown(profile_events(), steps=1)
    # Only the last run counts, the prompt run's kernel is left out; the lm_head is apart.
    assert out["run"] == 300 and out["kernels"] == 260
    assert out["ops"] == {"MatMulNBits": 150, "MatMulNBits (lm_head)": 80, "GroupQueryAttention": 30}
    assert bench.op_breakdown(profile_events(), steps=2)["kernels"] == (900 + 260) / 2
    with pytest.raises(ValueError, match="fewer"):
        bench.op_breakdown(profile_events(), steps=3)


def test_the_profile_table_accounts_for_the_whole_step() -> None:
    profile = {**bench.op_breakdown(profile_events(), steps=1), "wall": 400.0}
    table = bench.profile_lines(profile, shown=2)
    assert "| MatMulNBits | 150 | 37.5% |" in table
    assert "| other operators | 30 | 7.5% |" in table
    assert "| between kernels (onnxruntime's executor) | 40 | 10.0% |" in table
    assert "| outside the model run (onnxruntime-genai's search, Python) | 100 | 25.0% |" in table
    assert table[-1] == "| whole step | 400 | 100% |"


def test_f32_gguf_dequantises_every_tensor_and_keeps_the_metadata(tmp_path: Path) -> None:
    source = tmp_path / "q8.gguf"
    weights = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_block_count(1)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    quantised = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("w", quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = bench.f32_gguf(source, tmp_path / "f32.gguf")
    reader = gguf.GGUFReader(out)
    tensor = reader.tensors[0]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    expected = gguf.quants.dequantize(quantised, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape), expected)
    assert np.abs(expected - weights).max() < 0.05  # and it is the model's weights, not noise
    assert reader.fields["general.file_type"].contents() == 0
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    assert reader.fields["llama.block_count"].contents() == 1
    assert not (tmp_path / "f32.gguf.part").exists()


def test_bytes_per_token_leaves_out_a_table_only_looked_up_by_row(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.zeros((10, 4), np.float32), "embedding"),  # Gather only: 160 B, not read
        numpy_helper.from_array(np.zeros((4, 4), np.float32), "w"),  # 64 B
        numpy_helper.from_array(np.zeros((10, 4), np.uint8), "shared"),  # Gather and MatMul: 40 B
        numpy_helper.from_array(np.zeros(3, np.int64), "index"),  # a 1-D Gather input: 24 B
        # An INT4 embedding and its scales, looked up only: not read.
        numpy_helper.from_array(np.zeros((10, 2), np.uint8), "embedding_q4"),
        numpy_helper.from_array(np.zeros((10, 1), np.float32), "embedding_scales"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["e"]),
        helper.make_node("Gather", ["shared", "ids"], ["s"]),
        helper.make_node("Gather", ["index", "ids"], ["i"]),
        helper.make_node("GatherBlockQuantized", ["embedding_q4", "ids", "embedding_scales"], ["q"]),
        helper.make_node("MatMul", ["e", "w"], ["y"]),
        helper.make_node("MatMul", ["x", "shared"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 10]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "s", "i", "q")],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert bench.bytes_per_token(tmp_path / "m.onnx") == 64 + 40 + 24


def test_the_reading_checks_each_target_with_the_runs_numbers() -> None:
    table = rows()  # ours 160, raw 165, llama.cpp Q4_K_M 100 tok/s
    limits = {r.name: 400.0 for r in table}
    profile = {**bench.op_breakdown(profile_events(), steps=1), "wall": 400.0}
    text = "\n".join(bench.reading(table, limits, profile))
    assert "raw loop: +3.0% of decode speed (outside the 2% target)" in text
    assert "edgephi default-b32 / llama.cpp Q4_K_M, 1.60× (meets the 1.5× target)" in text
    assert "40% of its bandwidth limit (short of the 75% target)" in text
    # 4 kernels; MatMulNBits 230 of 400 µs (57.5%, formatted 57%), the other kernel 30,
    # the executor 300 - 260 = 40
    assert "runs 4 kernels: the MatMulNBits, which read the weights, take 57%" in text
    assert "the other kernels 8% and onnxruntime's executor between kernels 10%" in text


def test_alternating_rotates_the_order_round_by_round() -> None:
    items = ["a", "b", "c"]
    assert [bench.alternating(items, r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


# --- scripts/bench_conversation and the shared benchmarks page ---------------------------------


def test_questions_grow_to_the_asked_size_and_differ_per_turn() -> None:
    import bench_conversation as conv

    def words(text: str) -> int:
        return len(text.split())

    first, second = conv.question(0, 170, words), conv.question(1, 170, words)
    assert 170 <= words(first) < 170 + max(words(s) for s in conv.SENTENCES)
    assert first != second and first.startswith("Question 1.") and second.startswith("Question 2.")
    assert conv.question(0, 170, words) == first  # seeded: the same every run


def test_turn_ratios_and_per_turn_medians() -> None:
    import bench_conversation as conv

    assert conv.turn_ratios([0.2, 0.3, 0.3, 0.4]) == (pytest.approx(2.0), pytest.approx(0.4 / 0.3))
    with pytest.raises(ValueError):
        conv.turn_ratios([0.2])
    assert conv.per_turn_median([[1.0, 5.0], [3.0, 4.0], [2.0, 9.0]]) == [2.0, 5.0]


def test_benchmark_sections_survive_a_rewrite_of_the_page() -> None:
    import docsection

    page = docsection.replace("# Benchmarks\n\nold table\n", "conversations", "## Conversations\nv1\n")
    assert page.endswith("<!-- begin conversations -->\n## Conversations\nv1\n<!-- end conversations -->\n")
    again = docsection.replace(page, "conversations", "## Conversations\nv2")
    assert "v1" not in again and again.count("<!-- begin conversations -->") == 1
    rewritten = docsection.keep(again, "# Benchmarks\n\nnew table\n")
    assert rewritten.startswith("# Benchmarks\n\nnew table\n") and "## Conversations\nv2\n" in rewritten
    assert "old table" not in rewritten
    assert docsection.keep(rewritten, rewritten) == rewritten


def test_the_full_size_stand_in_has_phi35_minis_shape() -> None:
    import bench_fullsize
    from edgephi.packager import precision

    config = bench_fullsize.CONFIG
    shapes = precision.Shapes.from_config(config)
    embedding = config["vocab_size"] * config["hidden_size"]
    # Phi-3.5-mini-instruct: 3.82B parameters (all but the norms are MatMuls or the embedding).
    assert (shapes.matmul_weights + embedding) / 1e9 == pytest.approx(3.82, abs=0.005)
    # A longrope factor per rotary frequency of the 96-wide heads.
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    assert len(config["rope_scaling"]["long_factor"]) == len(config["rope_scaling"]["short_factor"]) == half
