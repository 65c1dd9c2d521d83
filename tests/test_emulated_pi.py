"""Build on x86-64, run on an (emulated) Raspberry Pi 4 and 5 with only the runtime installed.

Skipped, with the reason, where emulation is not possible (no root, no qemu-user-static or
debootstrap); ``scripts/setup`` installs both when it runs as root, as on CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import assets
import emulated_pi
import numpy as np
import pytest
from conftest import build_bundle
from edgephi.runtime import bundle, images, load
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store
from edgephi.targets import Precision
from test_vision import distance, picture

pytestmark = pytest.mark.skipif(not emulated_pi.available(), reason=str(emulated_pi.unavailable_reason()))

QUESTION = "What is the capital of France?"
TOKENS = 10
DEVICES = {
    "pi5": ("rpi5", "Cortex-A76", "dot-product: yes"),
    "pi4": ("rpi4", "Cortex-A72", "dot-product: no"),
}


@pytest.fixture(scope="module")
def pi() -> emulated_pi.EmulatedPi:
    return emulated_pi.setup()


@pytest.fixture(scope="module")
def pi_bundles(bundles_dir: Path) -> dict[str, Path]:
    return {
        target: build_bundle(assets.smollm2_gguf(), bundles_dir / f"smollm2-{target}.phi", target=target)
        for target in ("rpi5", "rpi4")
    }


def test_only_the_runtime_is_installed(pi: emulated_pi.EmulatedPi) -> None:
    dists = pi.installed_distributions()
    assert "edgephi" in dists and "onnxruntime_genai" in dists
    heavy = [d for d in dists if d in emulated_pi.HEAVY]
    assert heavy == []
    size = pi.site_bytes()
    print(
        f"runtime install on the Pi: {size / 2**20:.0f} MiB, {len(dists)} distributions: {', '.join(dists)}"
    )
    assert size < 400 * 2**20


@pytest.mark.parametrize("cpu", list(DEVICES))
def test_an_x86_built_bundle_answers_on_the_pi(
    cpu: str, pi: emulated_pi.EmulatedPi, pi_bundles: dict[str, Path], tmp_path: Path
) -> None:
    target, core, dot = DEVICES[cpu]
    path = pi_bundles[target]
    env = {"EDGEPHI_HOME": str(tmp_path / "pi-home")}
    plan = pi.run(["-m", "edgephi.runtime.cli", str(path), "--plan"], cpu, env)
    assert plan.returncode == 0, plan.stderr
    assert f"aarch64 {core}" in plan.stdout and dot in plan.stdout and "tokens (asked" in plan.stdout

    out = pi.run(
        ["-m", "edgephi.runtime.cli", str(path), "-p", QUESTION, "-t", "0", "-n", str(TOKENS)], cpu, env
    )
    assert out.returncode == 0, out.stderr

    # The same files on x86-64 (unpacked by hand: the runtime itself refuses an aarch64 bundle here).
    folder = tmp_path / "x86"
    folder.mkdir()
    bundle.extract(path, folder)
    engine = load(folder, store=Store(tmp_path / "x86-home"))
    x86 = engine.generate(
        [{"role": "user", "content": QUESTION}], GenerationOptions(max_tokens=TOKENS, temperature=0)
    )
    assert "Paris" in x86.text
    # The Pi's kernels round differently (the Pi 5's dot-product ones, the Pi 4's without),
    # so greedy paths may part at a near-tie; the first tokens must agree. Measured on this
    # INT8 bundle (--precision auto): "L'Étoile: Paris, la" on the Pi 5 before it parts, the
    # Pi 4 (int8 KV cache) "L'Étoile" (the INT4 build agreed on 6 words on both).
    agreed = next(
        (i for i, (a, b) in enumerate(zip(out.stdout, x86.text, strict=False)) if a != b), len(x86.text)
    )
    assert agreed >= len("L'Étoile"), (out.stdout, x86.text)


# Image features from a bundle's vision.onnx for pixels in an .npy file (a 1x2 crop grid).
ENCODE = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1])
feed = {"pixel_values": np.load(sys.argv[2]), "image_sizes": np.array([[336, 672]], np.int64)}
np.save(sys.argv[3], session.run(None, feed)[0])
"""


@pytest.fixture(scope="module")
def vision_bundles(vision_dir: Path, vision_bundle: Path, bundles_dir: Path) -> dict[str, Path]:
    # The decoder as the FP32-image-side bundle's (INT4): only the image side differs.
    int8 = build_bundle(
        vision_dir,
        bundles_dir / "phi35-vision-tiny-int8.phi",
        vision_precision=Precision.INT8,
        precision=Precision.INT4,
    )
    return {"fp32": vision_bundle, "int8": int8}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_x86_built_vision_bundle_looks_at_a_picture_on_the_pi(
    precision: str, pi: emulated_pi.EmulatedPi, vision_bundles: dict[str, Path], tmp_path: Path
) -> None:
    path = vision_bundles[precision]
    folder = tmp_path / "model"
    folder.mkdir()
    bundle.extract(path, folder)

    # The encoder on the Pi 5's kernels (the INT8 one's 8-bit MatMulNBits among them)
    # against the FP32 encoder on x86-64.
    pixels = np.random.default_rng(0).standard_normal((1, 17, 3, 336, 336), dtype=np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    encoded = pi.run(
        ["-c", ENCODE, str(folder / "vision.onnx"), str(tmp_path / "pixels.npy"), str(tmp_path / "pi.npy")],
        "pi5",
    )
    assert encoded.returncode == 0, encoded.stderr
    import onnxruntime as ort

    reference = tmp_path / "fp32"
    reference.mkdir()
    bundle.extract(vision_bundles["fp32"], reference)
    want = ort.InferenceSession(str(reference / "vision.onnx")).run(
        None, {"pixel_values": pixels, "image_sizes": np.array([[336, 672]], np.int64)}
    )[0]
    got = np.load(tmp_path / "pi.npy")
    # A 1x2 grid: (2 crops + the global view) x 144 + glb_GN + 2 rows' separators x 12.
    assert got.shape == want.shape == (3 * 144 + 1 + 2 * 12, 128)
    error, cosine = distance(got, want)
    # FP32 differs only in summation order (measured: 6e-7); INT8 as much as on x86-64
    # (test_vision.py; measured here: 1.5%, cosine 0.9998).
    assert error <= (1e-4 if precision == "fp32" else 0.02) and cosine > 0.999

    photo = tmp_path / "photo.png"
    photo.write_bytes(picture(400, 300, seed=9))
    env = {"EDGEPHI_HOME": str(tmp_path / "pi-home")}
    question = ["-p", "What is in this picture?", "-t", "0", "-n", "6", "--json", "--insecure-skip-verify"]
    out = pi.run(["-m", "edgephi.runtime.cli", str(path), "--image", str(photo), *question], "pi5", env)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    x86 = load(folder, store=Store(tmp_path / "x86-home")).generate(
        [{"role": "user", "content": "What is in this picture?"}],
        GenerationOptions(max_tokens=6, temperature=0),
        images=[photo],
    )
    assert record["stats"]["generated_tokens"] == 6 and record["text"].strip()
    assert record["stats"]["prompt_tokens"] == x86.stats.prompt_tokens > images.image_tokens(400, 300)
