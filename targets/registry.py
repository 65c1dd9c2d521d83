"""The registry of device profiles: ``register()``, ``get()``, ``names()``.

Built-in profiles are the JSON files in ``profiles/``. Users add their own by putting
``NAME.json`` files in a folder named by ``EDGEPHI_TARGETS`` (several folders separated by
the OS path separator) or in ``~/.config/edgephi/targets``; a user profile may replace a
built-in one of the same name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgephi.core.errors import ConfigError, UnknownTarget
from edgephi.targets.profile import Target

_BUILTIN_DIR = Path(__file__).with_name("profiles")
_registry: dict[str, Target] = {}
_loaded = False

DEFAULT = "cpu"


def register(target: Target, *, replace: bool = False) -> Target:
    """Add a profile. A name that is already taken needs ``replace=True``."""
    if target.name in _registry and not replace:
        raise ConfigError(f"a target named {target.name!r} is already registered")
    _registry[target.name] = target
    return target


def load_file(path: Path) -> Target:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read target profile {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"target profile {path} must hold a JSON object")
    return Target.from_dict(data)


def _user_dirs() -> list[Path]:
    env = os.environ.get("EDGEPHI_TARGETS")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(config_home) / "edgephi" / "targets"]


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    for path in sorted(_BUILTIN_DIR.glob("*.json")):
        register(load_file(path), replace=True)
    for folder in _user_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                register(load_file(path), replace=True)
    _loaded = True


def get(name: str) -> Target:
    """The profile called ``name``; an unknown name lists the known ones."""
    _ensure_loaded()
    try:
        return _registry[name]
    except KeyError:
        raise UnknownTarget(f"unknown target {name!r}; known targets: {', '.join(names())}") from None


def names() -> list[str]:
    _ensure_loaded()
    return sorted(_registry)


def all_targets() -> list[Target]:
    _ensure_loaded()
    return [_registry[n] for n in sorted(_registry)]


def reset() -> None:
    """Forget every profile so the next lookup reloads them (tests, changed EDGEPHI_TARGETS)."""
    global _loaded
    _registry.clear()
    _loaded = False
