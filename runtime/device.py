"""What CPU this device has, read from /proc/cpuinfo: the facts that decide its speed.

On ARM the ``CPU part`` names the core (a Raspberry Pi 4 is a Cortex-A72, a Pi 5 a
Cortex-A76) and the ``asimddp`` feature says whether int8 dot-product instructions exist
— onnxruntime's INT4 kernels with int8 activations (accuracy level 4) are several times
faster with them. On x86 the model name and AVX2/AVX-512 flags play that role.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from edgephi.runtime.genai import default_threads

ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def machine_arch() -> str:
    machine = platform.machine().lower()
    return ARCH_ALIASES.get(machine, machine)


ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4b": "Cortex-A78C",
    "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
    "0xd82": "Cortex-X4",
}


@dataclass(frozen=True)
class CpuInfo:
    arch: str
    model: str
    cores: int
    features: frozenset[str]

    @property
    def dot_product(self) -> bool | None:
        if self.arch == "aarch64":
            return "asimddp" in self.features
        return None

    def describe(self) -> str:
        extras = []
        if self.dot_product is not None:
            extras.append(f"dot-product: {'yes' if self.dot_product else 'no'}")
        for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"):
            if flag in self.features:
                extras.append(flag)
        extra = f", {', '.join(extras)}" if extras else ""
        return f"{self.arch} {self.model}, {self.cores} usable cores{extra}"


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo"), arch: str | None = None) -> CpuInfo:
    arch = arch or machine_arch()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    parts: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "CPU part":
            parts.append(value.lower())
        fields.setdefault(key, value)
    features = frozenset((fields.get("Features") or fields.get("flags") or "").split())
    if parts:
        # big.LITTLE parts list several cores; name each kind once, biggest last as listed.
        names = list(dict.fromkeys(ARM_PARTS.get(p, f"ARM part {p}") for p in parts))
        model = " + ".join(names)
    else:
        model = fields.get("model name") or fields.get("Model") or "unknown CPU"
    return CpuInfo(arch=arch, model=model, cores=default_threads(), features=features)
