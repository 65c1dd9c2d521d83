"""Build on x86-64, run on an (emulated) Raspberry Pi 4 and 5 with only the runtime installed.

Skipped, with the reason, where emulation is not possible (no root, no qemu-user-static or
debootstrap); ``scripts/setup`` installs both when it runs as root, as on CI.
"""

from __future__ import annotations

from pathlib import Path

import assets
import emulated_pi
import pytest
from conftest import build_bundle
from edgephi.runtime import bundle, load
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store

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
    assert "Paris" in out.stdout

    # The same files on x86-64 (unpacked by hand: the runtime itself refuses an aarch64 bundle here).
    folder = tmp_path / "x86"
    folder.mkdir()
    bundle.extract(path, folder)
    engine = load(folder, store=Store(tmp_path / "x86-home"))
    x86 = engine.generate(
        [{"role": "user", "content": QUESTION}], GenerationOptions(max_tokens=TOKENS, temperature=0)
    )
    # Compare a prefix: the Pi 5's dot-product kernels round differently, and greedy paths may
    # part after many tokens (seen after ~20); the first words must agree.
    assert out.stdout.split()[:6] == x86.text.split()[:6], (out.stdout, x86.text)
