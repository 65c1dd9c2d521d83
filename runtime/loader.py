"""The Python entry point of the device runtime: ``load("model.phi")`` → a ready ``Engine``.

A ``.phi`` file is verified (signature policy, hashes, model checks) and installed into
the store first; a second load reuses the installed copy. An already unpacked model
folder is loaded as it is. Before loading, the bundle's target is checked against this
device: CPU architecture, execution provider and the runtime version it needs.
"""

from __future__ import annotations

import platform
from pathlib import Path

from edgephi.runtime import __about__
from edgephi.runtime.bundle import TrustPolicy, open_bundle
from edgephi.runtime.engine import Engine
from edgephi.runtime.errors import BundleNotFound, IncompatibleBundle
from edgephi.runtime.manifest import Manifest, version_key
from edgephi.runtime.store import InstalledModel, Store

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def machine_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def install(
    bundle_path: Path, store: Store | None = None, *, insecure_skip_verify: bool = False
) -> InstalledModel:
    """Verify and unpack a bundle (or find its installed copy) without loading it."""
    store = store or Store()
    policy = TrustPolicy.from_store(store.trust, skip=insecure_skip_verify)
    return store.install(Path(bundle_path), policy)


def check_runnable(manifest: Manifest, arch: str | None = None) -> None:
    """Refuse a bundle built for another CPU, another execution provider or a newer runtime."""
    what = f"{manifest.name} {manifest.version} (target {manifest.target.get('name', '?')})"
    provider = str(manifest.target.get("execution_provider", "cpu"))
    if provider != "cpu":
        raise IncompatibleBundle(
            f"{what} was built for the {provider} execution provider; this runtime runs CPU bundles"
        )
    wanted = _ARCH_ALIASES.get(
        str(manifest.target.get("arch", "any")).lower(), str(manifest.target.get("arch", "any"))
    )
    here = arch or machine_arch()
    if wanted not in ("any", here):
        raise IncompatibleBundle(f"{what} was built for {wanted} CPUs; this device is {here}")
    needed = manifest.requires.get("runtime")
    if needed and version_key(needed) > version_key(__about__.VERSION):
        raise IncompatibleBundle(
            f"{what} needs edgephi runtime {needed} or newer; this is {__about__.VERSION}",
            hint="upgrade the runtime on this device: pip install -U edgephi",
        )


def load(
    source: str | Path,
    *,
    store: Store | None = None,
    threads: int | None = None,
    context: int | None = None,
    insecure_skip_verify: bool = False,
) -> Engine:
    """Load a bundle or an unpacked model folder, ready to ``stream()`` from."""
    path = Path(source)
    if path.is_dir():
        manifest_file = path / "manifest.json"
        has_template = True
        if manifest_file.is_file():
            manifest = Manifest.from_bytes(manifest_file.read_bytes())
            check_runnable(manifest)
            has_template = manifest.chat_template
        return Engine(path, threads=threads, context=context, chat_template=has_template)
    if not path.exists():
        raise BundleNotFound(f"{path} does not exist")
    store = store or Store()
    policy = TrustPolicy.from_store(store.trust, skip=insecure_skip_verify)
    # Refuse a bundle for another device before spending time and disk on unpacking it.
    check_runnable(open_bundle(path, policy).manifest)
    installed = store.install(path, policy)
    engine = Engine(
        installed.path, threads=threads, context=context, chat_template=installed.manifest.chat_template
    )
    engine.verification = installed.verification
    return engine
