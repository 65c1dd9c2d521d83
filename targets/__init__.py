"""Device profiles (``edgephi.targets``): the bottom layer, imported by runtime and packager."""

from edgephi.targets.profile import ExecutionProvider, KVCache, ModelFormat, Precision, Target
from edgephi.targets.registry import DEFAULT, all_targets, get, names, register

__all__ = [
    "DEFAULT",
    "ExecutionProvider",
    "KVCache",
    "ModelFormat",
    "Precision",
    "Target",
    "all_targets",
    "get",
    "names",
    "register",
]
