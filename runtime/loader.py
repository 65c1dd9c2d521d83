"""The Python entry point of the device runtime: ``load("model.phi")`` → a ready ``Engine``
(``load_model`` → the engine with its memory plan, manifest and signature check).

Order of work, cheapest check first: read and check the bundle's header (signature
policy, layout); check it was built for this device (CPU architecture, execution
provider, runtime version); plan the context that fits the memory budget
(``edgephi.runtime.memory``) — all before unpacking. Then install (verify every hash,
unpack, switch in one rename; a second load reuses the installed copy) and load with the
planned context and thread count. An already unpacked model folder skips the bundle steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgephi.core.errors import BundleNotFound, ConfigError, IncompatibleBundle, NotAModel
from edgephi.runtime import __about__, memory
from edgephi.runtime.bundle import TrustPolicy, Verification, open_bundle
from edgephi.runtime.device import ARCH_ALIASES, machine_arch
from edgephi.runtime.engine import Engine
from edgephi.runtime.genai import default_threads
from edgephi.runtime.manifest import Manifest, is_valid_name, is_valid_version, version_key
from edgephi.runtime.store import InstalledModel, InUse, Store
from edgephi.targets.profile import ExecutionProvider


def install(
    bundle_path: Path, store: Store | None = None, *, insecure_skip_verify: bool = False
) -> InstalledModel:
    """Verify and unpack a bundle (or find its installed copy) without loading it."""
    store = store or Store()
    policy = TrustPolicy.from_store(store.trust, skip=insecure_skip_verify)
    installed = store.install(Path(bundle_path), policy)
    store.adopt(installed)
    return installed


def check_runnable(manifest: Manifest, arch: str | None = None) -> None:
    """Refuse a bundle built for another CPU, another execution provider or a newer runtime."""
    target = manifest.target
    what = f"{manifest.name} {manifest.version} (target {target.name or '?'})"
    provider = target.execution_provider or ExecutionProvider.CPU
    if provider is not ExecutionProvider.CPU:
        raise IncompatibleBundle(
            f"{what} was built for the {provider.value} execution provider; this runtime runs CPU bundles"
        )
    raw_arch = (target.arch or "any").lower()
    wanted = ARCH_ALIASES.get(raw_arch, raw_arch)
    here = arch or machine_arch()
    if wanted not in ("any", here):
        raise IncompatibleBundle(f"{what} was built for {wanted} CPUs; this device is {here}")
    needed = manifest.requires.get("runtime")
    if needed and version_key(needed) > version_key(__about__.VERSION):
        raise IncompatibleBundle(
            f"{what} needs edgephi runtime {needed} or newer; this is {__about__.VERSION}",
            hint="upgrade the runtime on this device: pip install -U edgephi",
        )


def choose_threads(requested: int | None, manifest: Manifest | None) -> int:
    """``--threads``, else the target's thread count (capped by the usable cores), else the cores."""
    usable = default_threads()
    if requested is not None:
        if not 1 <= requested <= usable:
            # More threads than cores only slow onnxruntime down; thousands exhaust the process.
            raise ConfigError(
                f"--threads {requested} is not between 1 and the {usable} cores this process may use",
                hint=f"leave it out to use all {usable}",
            )
        return requested
    target_threads = (manifest.target.threads or 0) if manifest else 0
    return min(target_threads, usable) if target_threads > 0 else usable


def _budget(memory_budget: int | None) -> tuple[int | None, str]:
    if memory_budget is not None:
        return memory_budget, "--memory-budget"
    return memory.default_budget()


def plan(
    source: str | Path,
    *,
    context: int | None = None,
    memory_budget: int | None = None,
    insecure_skip_verify: bool = False,
    store: Store | None = None,
) -> memory.MemoryPlan:
    """The memory plan for a bundle or model folder, without unpacking or loading anything."""
    path = resolve(source, store)
    if path.is_dir():
        _check_model_dir(path)
        shape = memory.ModelShape.from_model_dir(path)
    else:
        if not path.exists():
            raise BundleNotFound(f"{path} does not exist")
        trust = (store or Store()).trust
        info = open_bundle(path, TrustPolicy.from_store(trust, skip=insecure_skip_verify))
        shape = memory.ModelShape.from_manifest(info.manifest)
    budget, why = _budget(memory_budget)
    return memory.plan(shape, requested=context, budget=budget, budget_source=why)


def resolve(source: str | Path, store: Store | None = None) -> Path:
    """A path as given, or an installed model called ``NAME`` (its current version) or
    ``NAME:VERSION``."""
    path = Path(source)
    if path.exists():
        return path
    name, _, version = str(source).partition(":")
    if is_valid_name(name) and (not version or is_valid_version(version)):
        the_store = store or Store()
        found = the_store.find(name, version or None)
        if found is not None:
            return found.path
        versions = sorted({m.manifest.version for m in the_store.installed(name)}, key=version_key)
        if version and versions:
            raise BundleNotFound(
                f"{name} has no version {version} installed; it has {', '.join(versions)}",
                hint="`edge-run list` shows what is installed",
            )
        if not versions and any((the_store.models_dir / name).glob(".damaged-*")):
            raise BundleNotFound(
                f"{name}'s installed copy was set aside as damaged (`edge-run verify`)",
                hint="run its .phi again to reinstall it, or `edge-run update` from its channel",
            )
    return path


def _check_model_dir(path: Path) -> None:
    if not (path / "genai_config.json").is_file():
        raise NotAModel(
            f"{path} is a folder without genai_config.json, so not an unpacked model",
            hint="give a .phi bundle or an installed model folder (see `edge-run list`)",
        )


@dataclass(frozen=True)
class LoadedModel:
    """What ``load_model`` gives: the engine, and what was learnt on the way, read once —
    the manifest (``None`` for a folder without one), the memory plan behind the engine's
    context, and how the bundle's origin was checked (``None`` for a folder: checked when
    it was installed, if it ever was)."""

    engine: Engine
    plan: memory.MemoryPlan
    manifest: Manifest | None
    verification: Verification | None


def load_model(
    source: str | Path,
    *,
    store: Store | None = None,
    threads: int | None = None,
    context: int | None = None,
    memory_budget: int | None = None,
    insecure_skip_verify: bool = False,
) -> LoadedModel:
    """Load a bundle or an unpacked model folder: the engine, its plan and its provenance."""
    path = resolve(source, store)
    budget, why = _budget(memory_budget)
    if path.is_dir():
        _check_model_dir(path)
        manifest = None
        manifest_file = path / "manifest.json"
        if manifest_file.is_file():
            manifest = Manifest.from_bytes(manifest_file.read_bytes())
            check_runnable(manifest)
        shape = (
            memory.ModelShape.from_manifest(manifest) if manifest else memory.ModelShape.from_model_dir(path)
        )
        mem_plan = memory.plan(shape, requested=context, budget=budget, budget_source=why)
        by_name = path.resolve().parent.parent == (store or Store()).models_dir.resolve()
        engine = Engine(
            path,
            threads=choose_threads(threads, manifest),
            context=mem_plan.max_length,
            chat_template=manifest.chat_template if manifest else True,
            name=manifest.name if manifest else path.name,
            in_use=InUse(path) if by_name else None,  # a model run by name from the store
        )
        return LoadedModel(engine, mem_plan, manifest, None)
    if not path.exists():
        raise BundleNotFound(f"{path} does not exist")
    store = store or Store()
    policy = TrustPolicy.from_store(store.trust, skip=insecure_skip_verify)
    # Refuse a bundle for another device, or one that cannot fit, before unpacking it.
    checked = open_bundle(path, policy)
    check_runnable(checked.manifest)
    mem_plan = memory.plan(
        memory.ModelShape.from_manifest(checked.manifest), requested=context, budget=budget, budget_source=why
    )
    installed = store.install(path, policy, checked)
    store.adopt(installed)
    engine = Engine(
        installed.path,
        threads=choose_threads(threads, installed.manifest),
        context=mem_plan.max_length,
        chat_template=installed.manifest.chat_template,
        name=installed.manifest.name,
        in_use=InUse(installed.path),
    )
    return LoadedModel(engine, mem_plan, installed.manifest, installed.verification)


def load(
    source: str | Path,
    *,
    store: Store | None = None,
    threads: int | None = None,
    context: int | None = None,
    memory_budget: int | None = None,
    insecure_skip_verify: bool = False,
) -> Engine:
    """Load a bundle or an unpacked model folder, ready to ``stream()`` from: the engine of
    ``load_model``, for callers that need neither its plan nor its provenance."""
    return load_model(
        source,
        store=store,
        threads=threads,
        context=context,
        memory_budget=memory_budget,
        insecure_skip_verify=insecure_skip_verify,
    ).engine
