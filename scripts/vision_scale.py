"""Phi-3.5-vision's image encoder at its real size, with random weights: time, memory, INT8.

The tests check the encoder's ONNX graph on a scaled-down tower. This builds it at the
published size — CLIP ViT-L/14-336 (1024 wide, 16 heads, MLP 4096; 23 of its 24 layers
run) and Phi-3.5-vision's projector (4096 → 3072 → 3072) — from random weights, in FP32
and with 8-bit weights (``--vision-precision int8``), runs one square picture (4×4 crops +
the global view, the most crops og passes) through each in fresh processes, alternating,
and prints size, encode time and the peak memory each run added (next to the planner's
estimate, ``edgephi.packager.finalize.vision_scratch``), and how far INT8's features are
from FP32's. Random weights have no outliers: the distance says the graph and the blocks
are right, not what real weights lose. Nothing is downloaded.

    python scripts/vision_scale.py [--threads N] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, MLP, DEPTH, HIDDEN = 1024, 4096, 24, 3072


def build(folder: Path) -> None:
    """``folder/fp32/vision.onnx`` and ``folder/int8/vision.onnx`` from the same random weights."""
    import numpy as np
    from edgephi.packager import vision

    rng = np.random.default_rng(0)
    t, p = vision.TOWER, vision.PREFIX

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    w = {
        t + "embeddings.patch_embedding.weight": r(WIDTH, 3, 14, 14),
        t + "embeddings.class_embedding": r(WIDTH),
        t + "embeddings.position_embedding.weight": r(577, WIDTH),
        t + "pre_layrnorm.weight": np.ones(WIDTH, np.float32),
        t + "pre_layrnorm.bias": np.zeros(WIDTH, np.float32),
        p + "sub_GN": r(1, 1, 1, 4 * WIDTH),
        p + "glb_GN": r(1, 1, 4 * WIDTH),
        p + "img_projection.0.weight": r(HIDDEN, 4 * WIDTH),
        p + "img_projection.0.bias": r(HIDDEN),
        p + "img_projection.2.weight": r(HIDDEN, HIDDEN),
        p + "img_projection.2.bias": r(HIDDEN),
    }
    for i in range(DEPTH - 1):  # the last layer is never run (layer_idx -2)
        layer = f"{t}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[f"{layer}self_attn.{name}.weight"], w[f"{layer}self_attn.{name}.bias"] = (
                r(WIDTH, WIDTH),
                r(WIDTH),
            )
        w[layer + "mlp.fc1.weight"], w[layer + "mlp.fc1.bias"] = r(MLP, WIDTH), r(MLP)
        w[layer + "mlp.fc2.weight"], w[layer + "mlp.fc2.bias"] = r(WIDTH, MLP), r(WIDTH)
        for norm in ("layer_norm1", "layer_norm2"):
            w[f"{layer}{norm}.weight"], w[f"{layer}{norm}.bias"] = (
                np.ones(WIDTH, np.float32),
                np.zeros(WIDTH, np.float32),
            )
    config = {
        "embd_layer": {
            "use_hd_transform": True,
            "with_learnable_separator": True,
            "hd_transform_order": "sub_glb",
        },
        "img_processor": {"layer_idx": -1},  # 23 layers stored here: run them all, as -2 of 24 would
    }
    spec = vision.spec_from(config, w)
    for precision, int8 in (("fp32", None), ("int8", vision.Int8())):
        (folder / precision).mkdir()
        vision._save(vision.vision_model(spec, w, int8), folder / precision / "vision.onnx")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run(folder: Path, threads: int) -> None:
    """In a fresh process, so that its peak RSS is the encoder's alone; features to features.npy."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "vision.onnx"), options)
    pixels = np.random.default_rng(1).standard_normal((1, 17, 3, 336, 336), dtype=np.float32)
    # Reset the high-water mark to what is resident now (Linux: clear_refs 5), so the peak
    # below is the run's, not the session load's.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    out = session.run(None, {"pixel_values": pixels, "image_sizes": np.array([[1344, 1344]], np.int64)})[0]
    took = time.perf_counter() - start
    np.save(folder / "features.npy", out)
    print(json.dumps({"seconds": took, "peak": _status("VmHWM") - before}))


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each encoder, alternating")
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.run:
        run(args.run, threads)
        return
    from edgephi.packager import finalize
    from edgephi.runtime.sections import EncoderFacts
    from edgephi.targets import Precision

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        build(folder)
        print(f"exported ViT-L/14-336 + projector in FP32 and INT8 in {time.perf_counter() - start:.0f} s")
        encoder = {"width": WIDTH, "mlp": MLP, "heads": WIDTH // 64, "patch": 14, "image_size": 336}
        runs: dict[str, list[dict[str, float]]] = {"fp32": [], "int8": []}
        for _ in range(args.rounds):
            for precision, results in runs.items():
                done = subprocess.run(
                    [sys.executable, __file__, "--run", str(folder / precision), "--threads", str(threads)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results.append(json.loads(done.stdout.splitlines()[-1]))
        print(f"one square picture (2509 image features), {threads} threads, best of {args.rounds}:")
        for precision, results in runs.items():
            size = sum(f.stat().st_size for f in (folder / precision).glob("vision.onnx*"))
            seconds = min(r["seconds"] for r in results)
            peak = max(r["peak"] for r in results) / 2**30
            facts = EncoderFacts(**encoder, precision=Precision(precision))
            estimate = finalize.vision_scratch(facts) / 2**30
            print(
                f"  {precision}  {size / 2**30:.2f} GiB on disk, {seconds:.1f} s, "
                f"run added {peak:.2f} GiB (planner: {estimate:.2f} GiB)"
            )
        fp32, int8 = (np.load(folder / p / "features.npy") for p in ("fp32", "int8"))
        ratio = min(r["seconds"] for r in runs["fp32"]) / min(r["seconds"] for r in runs["int8"])
        cosine = (fp32 * int8).sum(-1) / np.linalg.norm(fp32, axis=-1) / np.linalg.norm(int8, axis=-1)
        error = np.abs(fp32 - int8).max() / np.abs(fp32).max()
        print(
            f"INT8 / FP32: {ratio:.2f}x as fast; features' cosine >= {cosine.min():.5f}, "
            f"largest difference {error:.2%} of the largest feature"
        )


if __name__ == "__main__":
    main()
