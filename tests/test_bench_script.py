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
    }
    report = bench.write_report(table, limits, meta)
    ours = next(line for line in report.splitlines() if line.startswith("| edgephi default-b32"))
    # median 160 tok/s, 1.60x llama.cpp's median 100, 160 / (32e9 / 80 MiB) = 42% of the limit
    assert "160 (150–170)" in ours and "1.60×" in ours and "42%" in ours and "60 ms" in ours
    assert "raw onnxruntime-genai loop on the same files: 0.970" in report  # 160 / 165
    assert "our default bundle / llama.cpp Q4_K_M: 1.60×" in report


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
