"""The comparison at the size users run: a Phi-3.5-mini-shaped model, packed by us and by llama.cpp.

    scripts/bench_fullsize [--rounds 3] [--tokens 64] [--prompt-tokens 128] [--calibrated]

Decode speed, time to first token and memory do not depend on weight values, so one random
checkpoint of Phi-3.5-mini-instruct's published shape (3.8B parameters, BF16, its
config.json: 32 layers of 3072, longrope) stands in for the real one, which nothing here can
download. From it:

- our bundle: ``edge-pack build --precision int4`` for the cpu target (the builder's INT4),
  and with ``--calibrated`` also ``--quant imatrix-b32`` (what ``--precision auto`` packs
  Phi-3.5-mini to); each build is timed, with the peak RSS of its largest process;
- llama.cpp's Q4_0 and Q4_K_M: the checkpoint converted to an F16 GGUF by llama.cpp's own
  ``convert_hf_to_gguf.py`` from the llama-cpp-python source distribution — its Phi-3
  vocabulary taken, as its converter's built-in-vocabulary path does, from the Phi-3 vocab
  file in that same source (a random checkpoint has no ``tokenizer.model``) — then its
  quantizer.

Then, as ``scripts/bench_vs_llamacpp.py`` does (its workers run each measurement): rounds of
fresh processes, contestants alternating, each loading the model, warming up and answering
one prompt of ``--prompt-tokens`` with exactly ``--tokens`` greedy tokens; decode tok/s,
TTFT, peak RSS, and each contestant's fraction of its memory-bandwidth limit. No perplexity:
the weights are random. Writes the ``fullsize`` section of ``docs/benchmarks.md``.
Everything is cached under ``.cache/bench/fullsize`` (about 25 GB).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets
import bench_vs_llamacpp as bench

ROOT = bench.ROOT
CACHE = bench.CACHE / "fullsize"
LLAMA_TYPES = ("Q4_0", "Q4_K_M")

# Every third of Phi-3.5-mini-instruct's 48 longrope factors (as tests/tiny.py keeps them),
# each repeated for the full head: rope factors change no kernel's speed.
CONFIG: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {
        "type": "longrope",
        "long_factor": [f for f in assets.PHI35_LONG_FACTORS for _ in range(3)],
        "short_factor": [f for f in assets.PHI35_SHORT_FACTORS for _ in range(3)],
    },
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "sliding_window": 262144,
    "vocab_size": 32064,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
}
GENERATION = {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000}

# Runs llama.cpp's converter with Phi3's vocabulary read from a vocab-only GGUF: argv is the
# llama.cpp source folder, a folder holding models/ggml-vocab-llama-spm.gguf, then the
# converter's own arguments.
CONVERT = """
import runpy, sys
source, staged, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [source, source + "/gguf-py"]
import conversion.phi as phi

def set_vocab(self):
    saved, sys.path[0] = sys.path[0], staged  # _set_vocab_builtin reads sys.path[0]/models
    try:
        self._set_vocab_builtin("llama-spm", self.hparams["vocab_size"])
    finally:
        sys.path[0] = saved

phi.Phi3MiniModel.set_vocab = set_vocab
sys.argv = [source + "/convert_hf_to_gguf.py", *args]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def checkpoint(out: Path) -> Path:
    """The random BF16 checkpoint with Phi-3's real tokenizer (from its vocab-only GGUF)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp), dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size="2GB")
    del model
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))  # the published form
    vocab = assets.vocab_gguf("phi-3")
    AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name).save_pretrained(tmp)
    GenerationConfig(**GENERATION).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def llama_source() -> Path:
    """llama.cpp's converter and gguf-py from the llama-cpp-python sdist, unpacked once."""

    out = CACHE / "llama.cpp"
    if not (out / "convert_hf_to_gguf.py").is_file():
        prefix = "vendor/llama.cpp/"
        with tarfile.open(assets.llama_cpp_sdist()) as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]
                if name.startswith(prefix) and (
                    name == prefix + "convert_hf_to_gguf.py"
                    or name.startswith((prefix + "conversion/", prefix + "gguf-py/"))
                ):
                    member.name = name[len(prefix) :]
                    tar.extract(member, out, filter="data")
    return out


def f16_gguf(folder: Path, out: Path) -> tuple[Path, float]:

    if out.exists():
        return out, 0.0
    staged = CACHE / "vocab"
    (staged / "models").mkdir(parents=True, exist_ok=True)
    vocab = staged / "models" / "ggml-vocab-llama-spm.gguf"
    if not vocab.exists():
        vocab.symlink_to(assets.vocab_gguf("phi-3"))
    start = time.perf_counter()
    part = out.with_name(out.name + ".part")
    args = [str(folder), "--outfile", str(part), "--outtype", "f16"]
    subprocess.run([sys.executable, "-c", CONVERT, str(llama_source()), str(staged), *args], check=True)
    os.replace(part, out)
    return out, time.perf_counter() - start


# Runs a command and writes the peak RSS of its largest process (itself or a descendant) to
# argv[1]: a watcher of its own, so that one build's peak is not another's.
WATCH = """
import pathlib, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
pathlib.Path(sys.argv[1]).write_text(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(code)
"""


def timed_build(folder: Path, out: Path, *args: str) -> dict[str, float]:
    """``edge-pack build`` in a child: wall time, and the peak RSS of its largest process
    (kept beside the bundle, for a later run that reuses it)."""
    record = out.with_suffix(".build.json")
    if out.exists():
        return json.loads(record.read_text()) if record.exists() else {}
    exe = str(Path(sys.executable).with_name("edge-pack"))
    peak = out.with_name(out.name + ".peak")
    start = time.perf_counter()
    build = [exe, "build", str(folder), "-o", str(out), "--target", "cpu", *args]
    subprocess.run([sys.executable, "-c", WATCH, str(peak), *build], check=True)
    result = {"build_s": time.perf_counter() - start, "build_peak_rss": float(peak.read_text())}
    record.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--calibrated", action="store_true", help="also build and time imatrix-b32")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    CACHE.mkdir(parents=True, exist_ok=True)
    threads = len(os.sched_getaffinity(0))
    print("random Phi-3.5-mini-shaped checkpoint …", flush=True)
    folder = checkpoint(CACHE / "phi35-mini-random")
    ours: dict[str, tuple[Path, list[str]]] = {"edgephi int4 (builder)": (CACHE / "int4.phi", ["-p", "int4"])}
    if args.calibrated:
        ours["edgephi int4 imatrix-b32"] = (CACHE / "imatrix.phi", ["--quant", "imatrix-b32"])
    builds: dict[str, dict[str, float]] = {}
    for name, (path, options) in ours.items():
        print(f"edge-pack build {' '.join(options)} …", flush=True)
        builds[name] = timed_build(folder, path, *options)
    print("llama.cpp: convert_hf_to_gguf.py → F16, then quantize …", flush=True)
    f16, convert_s = f16_gguf(folder, CACHE / "phi35-mini-f16.gguf")
    llama = {
        f"llama.cpp {t}": bench.llama_quantize(f16, t, CACHE / f"phi35-mini-{t}.gguf") for t in LLAMA_TYPES
    }

    folders = {name: bench.unpack(path, CACHE / path.stem) for name, (path, _) in ours.items()}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    filler = bench.FILLER * (args.prompt_tokens // 10 + 2)
    prompt_ids = [int(t) for t in tokenizer.encode(filler, add_special_tokens=False)][: args.prompt_tokens]
    contestants = [(name, "edgephi", path, path.stat().st_size) for name, (path, _) in ours.items()]
    contestants += [(name, "llama.cpp", path, path.stat().st_size) for name, path in llama.items()]

    bandwidth = bench.measure_bandwidth(threads)
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    runs: dict[str, list[dict[str, float]]] = {c[0]: [] for c in contestants}
    for round_no in range(args.rounds):
        for name, kind, path, _ in bench.alternating(contestants, round_no):
            runs[name].append(bench.run_worker(kind, path, prompt_ids, args.tokens, threads))
        print(
            f"round {round_no + 1}/{args.rounds}: "
            + ", ".join(f"{n} {runs[n][-1]['decode']:.1f}" for n, *_ in contestants),
            flush=True,
        )
    rows = [
        bench.Row(
            name,
            size,
            float("nan"),
            [r["ttft_s"] for r in runs[name]],
            [r["decode"] for r in runs[name]],
            [int(r["peak_rss"]) for r in runs[name]],
        )
        for name, _, _, size in contestants
    ]
    read = {name: bench.bytes_per_token(f / "model.onnx") for name, f in folders.items()}
    # Untied: llama.cpp reads all but its token-embedding table (one row per token).
    embedding = CONFIG["vocab_size"] * CONFIG["hidden_size"]
    read.update(
        {name: path.stat().st_size - _embedding_bytes(path, embedding) for name, path in llama.items()}
    )
    limit_of = {row.name: bench.bandwidth_limit(bandwidth, read[row.name]) for row in rows}
    meta = {
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {threads} cores, {platform.processor() or platform.platform()}",
        "rounds": args.rounds,
        "tokens": args.tokens,
        "prompt_tokens": len(prompt_ids),
        "bandwidth": bandwidth,
        "convert_s": convert_s,
        "llama": bench.llama_build(),
    }
    report = write_section(rows, limit_of, builds, meta)
    import docsection

    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(docsection.replace(text, "fullsize", report), encoding="utf-8")
    print(report)


def _embedding_bytes(gguf_path: Path, elements: int) -> int:
    """The bytes of a GGUF's token-embedding tensor (its own quantisation type)."""
    import gguf

    for tensor in gguf.GGUFReader(gguf_path).tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.n_bytes)
    raise SystemExit(f"{gguf_path.name} has no token_embd.weight ({elements} elements expected)")


def write_section(
    rows: list[bench.Row],
    limit_of: dict[str, float],
    builds: dict[str, dict[str, float]],
    meta: dict[str, Any],
) -> str:
    q4_0 = next(r for r in rows if r.name == "llama.cpp Q4_0").decode_median
    q4_k_m = next(r for r in rows if r.name == "llama.cpp Q4_K_M").decode_median
    lines = [
        "## At the size users run: a Phi-3.5-mini-shaped model",
        "",
        f"Random weights in Phi-3.5-mini-instruct's shape (3.8B parameters, its config.json; speed "
        f"does not depend on weight values). Measured {meta['date']} on {meta['machine']} with "
        f"`scripts/bench_fullsize`, all rows in one run: {meta['rounds']} rounds, contestants "
        f"alternating, each a fresh process (load, warm-up, then a {meta['prompt_tokens']}-token "
        f"prompt answered with {meta['tokens']} greedy tokens). llama.cpp's files were converted by "
        f"its own `convert_hf_to_gguf.py` (F16) and quantised by its quantizer ({meta['llama']}). "
        "Memory bandwidth "
        f"measured here: {meta['bandwidth'] / 1e9:.1f} GB/s; a contestant's limit is that over the "
        "weight bytes a token reads (all but the untied embedding table).",
        "",
        "| contestant | model file | TTFT | decode tok/s | peak RSS | vs Q4_0 | vs Q4_K_M | of limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row.decode
        lines.append(
            "| "
            + " | ".join(
                [
                    row.name,
                    f"{row.file_bytes / 2**30:.2f} GiB",
                    f"{bench.median(row.ttft_s):.1f} s",
                    f"{bench.median(d):.2f} ({min(d):.2f}–{max(d):.2f})",
                    f"{bench.median([float(r) for r in row.peak_rss]) / 2**30:.2f} GiB",
                    f"{bench.ratio(bench.median(d), q4_0):.2f}×",
                    f"{bench.ratio(bench.median(d), q4_k_m):.2f}×",
                    f"{bench.ratio(bench.median(d), limit_of[row.name]):.0%}",
                ]
            )
            + " |"
        )
    lines.append("")
    for name, build in builds.items():
        if build:
            lines.append(
                f"- `{name}`: `edge-pack build` took {build['build_s'] / 60:.0f} min, its largest "
                f"process peaking at {build['build_peak_rss'] / 2**30:.1f} GiB."
            )
    if meta["convert_s"]:
        lines.append(f"- llama.cpp's converter took {meta['convert_s'] / 60:.0f} min to write the F16 GGUF.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
