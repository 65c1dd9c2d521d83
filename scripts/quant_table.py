"""Measure every ``--quant`` recipe on SmolLM2-135M and write docs/quantization.md.

    python scripts/quant_table.py [--windows 4] [--window 512]

One FP32 reference build, one build per recipe, each evaluated with ``edge-pack eval``'s
code on the same text in the same run: perplexity, its rise over FP32, mean KL, top-1
agreement, and the size of the model files in bytes per parameter.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import tempfile
from pathlib import Path

import assets
import docsection
from edgephi import targets
from edgephi.packager import evaluate, imatrix, pipeline
from edgephi.packager.config import QUANT_RECIPES, BuildConfig, Recipe
from edgephi.runtime import bundle
from edgephi.targets import ModelFormat, Precision

ROOT = Path(__file__).resolve().parent.parent
PARAMS = 134_515_008  # SmolLM2-135M


def build(source: Path, out: Path, **kw: object) -> Path:
    pipeline.build(BuildConfig(source=str(source), output=out, target=targets.get("cpu"), **kw))  # type: ignore[arg-type]
    return out


def unpack(path: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    bundle.extract(path, into)
    return into


CLASS = 0.65  # bytes per parameter: the block-32 INT4 size class the CPU default must come from


def reading(rows: list[tuple[str, int, evaluate.EvalResult]]) -> list[str]:
    """The conclusion, computed from this run's rows (so it cannot go stale)."""
    recipes = [row for row in rows if row[0] in QUANT_RECIPES]
    in_class = min((r for r in recipes if r[1] / PARAMS <= CLASS), key=lambda r: r[2].ppl)
    best = min(recipes, key=lambda r: r[2].ppl)
    default = targets.get("cpu")
    default_name = next(
        n for n, spec in QUANT_RECIPES.items() if spec == Recipe(default.block_size, default.algorithm)
    )
    verdict = (
        "so it is the CPU targets' default"
        if in_class[0] == default_name
        else f"but the CPU targets' default is still `{default_name}`: change targets/profiles/cpu.json"
    )
    return [
        f"Reading it: among recipes of the INT4 size class (≤ {CLASS} bytes per parameter of model files),",
        f"`{in_class[0]}` loses least ({in_class[2].ppl_increase:+.1%}), {verdict}.",
        f"The least loss overall is `{best[0]}` ({best[2].ppl_increase:+.1%}) at "
        f"{best[1] / PARAMS:.2f} bytes per parameter.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    gguf = assets.smollm2_gguf()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ref = unpack(build(gguf, work / "fp32.phi", precision=Precision.FP32), work / "fp32")
        variants: list[tuple[str, dict[str, object]]] = [(name, {"quant": name}) for name in QUANT_RECIPES]
        variants.append(
            ("default-b32, ORT format", {"quant": "default-b32", "model_format": ModelFormat.ORT})
        )
        for index, (name, kw) in enumerate(variants):
            print(f"building {name} …", flush=True)
            path = build(gguf, work / f"{index}.phi", **kw)
            manifest = bundle.open_bundle(path).manifest
            result = evaluate.evaluate(
                unpack(path, work / str(index)), ref, window=args.window, max_windows=args.windows
            )
            rows.append((name, manifest.memory.weights_bytes, result))
            print(f"  {name}: {result.table().splitlines()[1]}", flush=True)
    ref_ppl = rows[0][2].ppl_reference
    text = rows[0][2].text
    lines = [
        "# Quantisation recipes, measured",
        "",
        f"SmolLM2-135M-Instruct (from its Q4_1 GGUF, dequantised), {rows[0][2].tokens} tokens of `{text}` in "
        f"{rows[0][2].windows} windows of {rows[0][2].window}; FP32 reference perplexity {ref_ppl:.2f}. "
        f"Measured {_dt.date.today().isoformat()} with `python scripts/quant_table.py`, all rows in one run.",
        "",
        "| recipe | model files | bytes/param | PPL | vs FP32 | mean KL | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size, r in rows:
        lines.append(
            f"| `{name}` | {size / 2**20:.1f} MiB | {size / PARAMS:.2f} | {r.ppl:.2f} | "
            f"{r.ppl_increase:+.1%} | {r.kl:.4f} | {r.top1_agreement:.1%} |"
        )
    lines += [
        "",
        "`default-b32` is the CPU targets' recipe (the quantizer's default round-to-nearest); `rtn-bN`",
        "is the builder's explicit RTN in blocks of N weights; `kquant-*` are the builder's k-quant",
        "methods (`kquant-mixed` keeps the most sensitive MatMuls in INT8, `kquant-last` the lm_head and",
        "the tied embedding, as llama.cpp's Q4_0 keeps its output matrix in Q8_0; both cost size); `hqq-b32`",
        "is onnxruntime's HQQ quantizer run by edgephi over the builder's FP32 graph, with float zero",
        "points (8 bytes of scale and zero per block instead of 4), the embedding sharing the lm_head's",
        "INT4 blocks; `imatrix-b32` is the default's layout with integer zero points, each block's",
        "range searched to minimise its rounding error weighted by the mean square of the activations",
        f"it meets on `{imatrix.CALIBRATION_TEXT.name}` (edgephi's calibration text, not this table's).",
        "Every row went through the same strip-and-fuse step; the ORT-format row is the",
        "android-arm64 target's file format (`--format ort`). Speed is not in this table (see",
        "`scripts/bench_vs_llamacpp`, `scripts/decode_levers.py`), but one thing is: onnxruntime 1.32's",
        "MatMulNBits has no fast CPU path for float zero points, and `hqq-*` decoded about 15x slower than",
        "`default-b32` in a first, unquiet bench run here — choose it where quality matters more than speed.",
        "Every build exports the MLP's gate and up projections as one MatMul; that changes no weight",
        "(blocks run along the input dimension). Build with",
        "`edge-pack build … --quant NAME`; `--eval` stores these numbers in the bundle (its quality card)",
        "and `--max-ppl-increase 5%` refuses a build that loses more.",
        "",
        *reading(rows),
        "",
    ]
    path = ROOT / "docs" / "quantization.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(docsection.keep(old, "\n".join(lines)), encoding="utf-8")
    print("wrote docs/quantization.md")


if __name__ == "__main__":
    main()
