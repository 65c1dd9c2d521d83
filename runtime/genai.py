"""The one door to onnxruntime-genai: its module with telemetry off, and models opened on N threads.

Every part of edgephi that runs a model — the engine and its sessions on the device, the
packager's checks and evaluation on the build host, the benchmarks — goes through here, so
og's two surprising defaults (usage telemetry on, one intra-op thread) are fixed once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def og() -> Any:
    """The ``onnxruntime_genai`` module, imported on first use (the runtime's import stays light)."""
    import onnxruntime_genai

    # og reports usage events unless told not to; a device runtime must not phone home.
    onnxruntime_genai.disable_telemetry_events()
    return onnxruntime_genai


def default_threads() -> int:
    """Cores this process may run on (honours taskset/cgroup cpusets, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def open_model(model_dir: Path, threads: int, max_length: int | None = None) -> Any:
    """An ``og.Model`` on ``threads`` threads: og runs on one unless the config says otherwise."""
    genai = og()
    overlay: dict[str, Any] = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    if max_length is not None:
        overlay["search"] = {"max_length": max_length}
    config = genai.Config(str(model_dir))
    config.overlay(json.dumps(overlay))
    return genai.Model(config)
