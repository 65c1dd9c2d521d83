"""An emulated Raspberry Pi (arm64 Debian bookworm under qemu user mode) with only the runtime.

    python scripts/emulated_pi.py setup                 # cached root file system + runtime install
    python scripts/emulated_pi.py run --cpu pi5 -- edge-run model.phi -p "Hello"

The root file system is made once with ``debootstrap --foreign`` (download and unpack, no
binfmt or chroot needed) and cached under the cache folder; the runtime is the project's
base install only — its wheel built on this host plus its dependencies' manylinux aarch64
wheels, installed with ``pip --target``: no torch, transformers or onnx. Programs run as
``qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3.11``. qemu passes the host's x86
``/proc/cpuinfo`` through, which makes onnxruntime crash, so a Pi's real cpuinfo (Pi 4:
Cortex-A72 without dot-product, Pi 5: Cortex-A76 with it) is put at ROOTFS/proc/cpuinfo,
which ``-L`` serves in its place, and ``QEMU_CPU`` emulates the matching core.

Needs root (debootstrap), ``qemu-user-static`` and ``debootstrap`` (Debian packages);
``available()`` says why not when they are missing. Emulated speed says nothing about a
real Pi — this proves correctness only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import assets

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
PYTHON = "/usr/bin/python3.11"
SITE = "/opt/edgephi"
HEAVY = ("torch", "transformers", "onnx", "onnx_ir", "gguf", "accelerate", "peft")

# The Features and CPU part lines are what onnxruntime and edgephi read.
CPUINFO = {
    "pi4": ("cortex-a72", "0xd08", "fp asimd evtstrm crc32 cpuid"),
    "pi5": (
        "cortex-a76",
        "0xd0b",
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    ),
}


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "emulation needs Linux"
    if os.geteuid() != 0:
        return "debootstrap needs root"
    for tool in ("qemu-aarch64-static", "debootstrap", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install qemu-user-static debootstrap)"
    return None


def available() -> bool:
    return unavailable_reason() is None


@dataclass(frozen=True)
class EmulatedPi:
    rootfs: Path

    @property
    def site(self) -> Path:
        return self.rootfs / SITE.lstrip("/")

    def installed_distributions(self) -> list[str]:
        return sorted(p.name.split("-")[0].lower() for p in self.site.glob("*.dist-info"))

    def site_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.site.rglob("*") if p.is_file())

    def run(
        self, args: list[str], cpu: str = "pi5", env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python3.11 ARGS`` on the emulated Pi (``pi4`` or ``pi5``)."""
        qemu_cpu, part, features = CPUINFO[cpu]
        (self.rootfs / "proc").mkdir(exist_ok=True)
        (self.rootfs / "proc" / "cpuinfo").write_text(
            "".join(
                f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                f"CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: {part}\nCPU revision\t: 1\n\n"
                for i in range(4)
            )
        )
        full_env = {**os.environ, "QEMU_CPU": qemu_cpu, "PYTHONPATH": SITE, **(env or {})}
        cmd = ["qemu-aarch64-static", "-L", str(self.rootfs), str(self.rootfs / PYTHON.lstrip("/")), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, check=False)


def _rootfs(cache: Path) -> Path:
    rootfs = cache / f"rootfs-{SUITE}-arm64"
    if (rootfs / PYTHON.lstrip("/")).is_file():
        return rootfs
    partial = rootfs.with_name(rootfs.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # --foreign only downloads and unpacks (no second stage, so no binfmt or chroot);
    # the packages --include names are downloaded but left packed, so unpack them here.
    subprocess.run(
        [
            "debootstrap",
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3",
            SUITE,
            str(partial),
        ],
        check=True,
        capture_output=True,
    )
    for deb in sorted((partial / "var/cache/apt/archives").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
    os.replace(partial, rootfs)
    return rootfs


def install_runtime(pi: EmulatedPi) -> None:
    """(Re)install the runtime — this checkout's base install — into the emulated Pi."""
    wheels = pi.rootfs.parent / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(pi.site, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(pi.site),
            "--platform",
            "manylinux_2_28_aarch64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--only-binary=:all:",
            *map(str, wheels.glob("edgephi-*.whl")),
        ],
        check=True,
        capture_output=True,
    )


def setup(cache: Path | None = None) -> EmulatedPi:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot emulate a Pi here: {reason}")
    cache = cache or assets.cache_dir() / "emulated-pi"
    cache.mkdir(parents=True, exist_ok=True)
    pi = EmulatedPi(_rootfs(cache))
    install_runtime(pi)
    return pi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup")
    run = sub.add_parser("run")
    run.add_argument("--cpu", choices=sorted(CPUINFO), default="pi5")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    pi = setup()
    if args.command == "setup":
        dists = pi.installed_distributions()
        print(f"{pi.rootfs}: runtime installed, {pi.site_bytes() / 2**20:.0f} MiB: {', '.join(dists)}")
        return
    argv = [a for a in args.argv if a != "--"]
    if argv and argv[0] == "edge-run":
        argv = ["-m", "edgephi.runtime.cli", *argv[1:]]
    proc = pi.run(argv, args.cpu)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
