"""Which build and run settings make decode faster on this machine, measured in one run.

    scripts/setup && .venv/bin/python scripts/decode_levers.py [--rounds 5]

The levers of the benchmark issue, each changed alone from the CPU default on SmolLM2-135M
(the same F32 source as ``scripts/bench_vs_llamacpp``): gate/up fusion, block size, the
MatMulNBits accuracy level (INT8 vs FP32 compute), the thread count, and an INT8 lm_head.
Every variant is exported by the builder and stripped and fused as ``edge-pack build``
does, its perplexity measured on the same text, and its decode speed raced against the
default's with the raw onnxruntime-genai loop — fresh processes, alternating, round by round.
Writes ``docs/decode-levers.md``; prints the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import bench_vs_llamacpp as bench
from edgephi.packager import builder, evaluate, gguf, optimize
from edgephi.targets import ExecutionProvider, ModelFormat, Precision

CACHE = bench.CACHE / "levers"
THREADS = len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Variant:
    """One change from the default: to the builder's request, the threads, or session options."""

    name: str
    build: dict[str, object] = field(default_factory=dict)
    threads: int = THREADS
    session: dict[str, object] = field(default_factory=dict)  # genai_config session_options

    @property
    def export_key(self) -> str:
        """Names the export; variants that differ only at run time share one."""
        return "-".join(f"{k}={v}" for k, v in sorted(self.build.items())) or "default"


VARIANTS = [
    Variant("default: fused QKV and gate/up, block 32, accuracy 4"),
    Variant("gate/up not fused", build={"fuse_gate_up": False}),
    Variant("block 64", build={"block_size": 64}),
    Variant("block 128", build={"block_size": 128}),
    Variant("accuracy level 1 (FP32 compute)", build={"accuracy_level": 1}),
    Variant("lm_head in INT8 (kquant-last-b32)", build={"algorithm": "k_quant_last"}),
    Variant("1 thread", threads=1),
    Variant("CPU memory arena off", session={"enable_cpu_mem_arena": False}),
]


def with_session_options(folder: Path, out: Path, options: dict[str, object]) -> Path:
    """A copy of ``folder`` whose decoder session gets ``options``."""
    if not out.exists():
        part = out.with_name(out.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(folder, part)
        config = json.loads((part / "genai_config.json").read_text(encoding="utf-8"))
        config["model"]["decoder"]["session_options"].update(options)
        (part / "genai_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
        part.rename(out)
    return out


def export(hf: Path, out: Path, changes: dict[str, object]) -> Path:
    if out.exists():
        return out
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    request = builder.ExportRequest(
        source=str(hf),
        source_is_local=True,
        output_dir=part,
        cache_dir=CACHE / "builder-cache",
        log_path=CACHE / "builder.log",
        precision=Precision.INT4,
        execution_provider=ExecutionProvider.CPU,
        tied_embeddings=True,
    )
    builder.export(dataclasses.replace(request, **changes))  # type: ignore[arg-type]
    optimize.strip_and_fuse(part, ModelFormat.ONNX, CACHE / "work")
    part.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    import assets

    CACHE.mkdir(parents=True, exist_ok=True)
    print("preparing variants (cached in .cache/bench/levers) …", flush=True)
    f32 = bench.f32_gguf(assets.smollm2_gguf(), bench.CACHE / "smollm2-f32.gguf")
    hf = CACHE / "hf"
    if not hf.exists():
        gguf.to_hf_folder(f32, CACHE / "hf.part")
        (CACHE / "hf.part").rename(hf)
    built: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    for variant in VARIANTS:
        if variant.export_key not in built:
            built[variant.export_key] = export(hf, CACHE / variant.export_key, variant.build)
        folders[variant.name] = built[variant.export_key]
        if variant.session:
            run = CACHE / ("run-" + "-".join(f"{k}={v}" for k, v in sorted(variant.session.items())))
            folders[variant.name] = with_session_options(folders[variant.name], run, variant.session)

    text = evaluate.default_text()
    ppl_of = {
        folder: evaluate.evaluate(folder, None, text, window=512, max_windows=4).ppl
        for folder in built.values()
    }
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(next(iter(folders.values())))))
    ids = [int(t) for t in tokenizer.encode(bench.FILLER * 15)][:128]
    keys = [v.name for v in VARIANTS]
    threads = {v.name: v.threads for v in VARIANTS}
    decode: dict[str, list[float]] = {key: [] for key in keys}
    for round_no in range(args.rounds):
        for key in bench.alternating(keys, round_no):
            decode[key].append(bench.run_worker("og", folders[key], ids, args.tokens, threads[key])["decode"])
        print(f"round {round_no + 1}/{args.rounds} done", flush=True)

    base = bench.median(decode[keys[0]])
    lines = [
        "# Decode levers, measured",
        "",
        f"SmolLM2-135M-Instruct, INT4, CPU; measured {_dt.date.today().isoformat()} with "
        f"`scripts/decode_levers.py`, all rows in one run: {args.rounds} rounds, variants alternating, "
        f"each a fresh process (the raw onnxruntime-genai loop, a 128-token prompt, {args.tokens} greedy "
        f"tokens). Each row changes one thing from the first. PPL: 2044 tokens of "
        f"`{evaluate.text_id(text)}` (F32: 23.76, docs/benchmarks.md).",
        "",
        "| variant | threads | PPL | decode tok/s | vs default |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        key = variant.name
        d = decode[key]
        speed = f"{bench.median(d):.0f} ({min(d):.0f}–{max(d):.0f})"
        lines.append(
            f"| {key} | {threads[key]} | {ppl_of[built[variant.export_key]]:.2f} | {speed} | "
            f"{bench.ratio(bench.median(d), base):.2f}× |"
        )
    lines.append("")
    report = "\n".join(lines)
    (bench.ROOT / "docs" / "decode-levers.md").write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
