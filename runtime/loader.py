"""The Python entry point of the device runtime: ``load("model.phi")`` → a ready ``Engine``.

A ``.phi`` file is verified and installed into the store first (a second load reuses the
installed copy); an already unpacked model folder is loaded as it is. Before loading, the
bundle's target is checked against what this runtime can execute.
"""

from __future__ import annotations

from pathlib import Path

from edgephi.runtime.engine import Engine
from edgephi.runtime.errors import BundleNotFound, ConfigError
from edgephi.runtime.manifest import Manifest
from edgephi.runtime.store import InstalledModel, Store


def install(bundle_path: Path, store: Store | None = None) -> InstalledModel:
    """Verify and unpack a bundle (or find its installed copy) without loading it."""
    return (store or Store()).install(Path(bundle_path))


def check_runnable(manifest: Manifest) -> None:
    """Refuse a bundle built for an execution provider this runtime cannot use."""
    provider = str(manifest.target.get("execution_provider", "cpu"))
    if provider != "cpu":
        raise ConfigError(
            f"{manifest.name} {manifest.version} was built for the {provider} execution provider "
            f"(target {manifest.target.get('name', '?')}); this runtime runs CPU bundles",
            hint="rebuild it with `edge-pack build --target cpu` (or a CPU device target)",
        )


def load(
    source: str | Path,
    *,
    store: Store | None = None,
    threads: int | None = None,
    context: int | None = None,
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
    installed = install(path, store)
    check_runnable(installed.manifest)
    return Engine(
        installed.path, threads=threads, context=context, chat_template=installed.manifest.chat_template
    )
