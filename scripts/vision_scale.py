"""Phi-3.5-vision's image encoder at its real size, with random weights: time and memory.

The tests check the encoder's ONNX graph on a scaled-down tower. This builds it at the
published size — CLIP ViT-L/14-336 (1024 wide, 16 heads, MLP 4096; 23 of its 24 layers
run) and Phi-3.5-vision's projector (4096 → 3072 → 3072) — from random weights, runs
one square picture (4×4 crops + the global view, the most crops og passes), and prints
the encode time and the peak memory it added next to the planner's estimate
(``edgephi.packager.finalize.vision_scratch``). Nothing is downloaded.

    python scripts/vision_scale.py [--threads N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, MLP, DEPTH, HIDDEN = 1024, 4096, 24, 3072


def build(folder: Path) -> None:
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
    vision._save(vision.vision_model(spec, w), folder / "vision.onnx")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run(folder: Path, threads: int) -> None:
    """In a fresh process, so that its peak RSS is the encoder's alone."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    start = time.perf_counter()
    session = ort.InferenceSession(str(folder / "vision.onnx"), options)
    loaded = time.perf_counter() - start
    pixels = np.random.default_rng(1).standard_normal((1, 17, 3, 336, 336), dtype=np.float32)
    # Reset the high-water mark to what is resident now (Linux: clear_refs 5), so the peak
    # below is the run's, not the session load's.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    out = session.run(None, {"pixel_values": pixels, "image_sizes": np.array([[1344, 1344]], np.int64)})[0]
    took = time.perf_counter() - start
    peak = _status("VmHWM")
    features = f"{out.shape[0]} image features of {out.shape[1]}"
    print(f"{features} in {took:.1f} s on {threads} threads (session load {loaded:.1f} s)")
    print(f"peak memory added by the run: {(peak - before) / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or len(__import__("os").sched_getaffinity(0))
    if args.run:
        run(args.run, threads)
        return
    from edgephi.packager import finalize

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        build(folder)
        size = sum(f.stat().st_size for f in folder.iterdir())
        took = time.perf_counter() - start
        print(f"exported ViT-L/14-336 + projector: {size / 2**30:.2f} GiB in {took:.0f} s")
        encoder = {"width": WIDTH, "mlp": MLP, "heads": WIDTH // 64, "patch": 14, "image_size": 336}
        estimate = finalize.vision_scratch(encoder) / 2**30
        print(f"planner's estimate of the encoder's working memory: {estimate:.2f} GiB")
        subprocess.run(
            [sys.executable, __file__, "--run", str(folder), "--threads", str(threads)], check=True
        )


if __name__ == "__main__":
    main()
