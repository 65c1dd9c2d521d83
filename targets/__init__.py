"""Device profiles (``edgephi.targets``): the bottom layer, imported by runtime and packager."""

from edgephi.targets.profile import ExecutionProvider, Precision, Target
from edgephi.targets.registry import DEFAULT, all_targets, get, names, register

__all__ = ["DEFAULT", "ExecutionProvider", "Precision", "Target", "all_targets", "get", "names", "register"]
