"""LoRA adapters a device can switch at run time (``edge-pack build --adapter NAME=PATH``).

The model builder bakes a PEFT LoRA adapter into the graph as extra MatMuls. To make
adapters switchable, the build:

1. builds once with the first adapter, to learn the names of the LoRA MatMul nodes;
2. builds once per adapter with those nodes left unquantised, so each build holds that
   adapter's exact LoRA weights (scaled as the builder scales them) as plain tensors;
3. takes the first build as the base model, turns every LoRA weight into a graph input
   whose default is the initializer — with the B matrices zeroed, so the model with no
   adapter active is the base model — and
4. writes each adapter's weights as ``adapters/<name>.onnx_adapter`` (onnxruntime's adapter
   format), which onnxruntime-genai feeds into those inputs when the adapter is active.

All adapters of one bundle must target the same modules with the same rank.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from edgephi.core.errors import BuildError, ConfigError, DependencyMissing
from edgephi.packager import builder

ADAPTER_DIR = "adapters"
SUFFIX = ".onnx_adapter"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def parse(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) → name → PEFT adapter folder."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        folder = Path(path).expanduser()
        name = name or folder.name.lower().replace(".", "-")
        if not _NAME_RE.match(name):
            raise ConfigError(f"adapter name {name!r} must be lowercase letters, digits, '-' or '_'")
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"adapter {folder} has no adapter_config.json (a PEFT LoRA folder is expected)")
        if name in out:
            raise ConfigError(f"two adapters are named {name!r}")
        out[name] = folder
    return out


def _onnx():  # type: ignore[no-untyped-def]
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise DependencyMissing("adapters need the onnx package") from None
    return onnx, helper, numpy_helper


def export_with_adapters(
    request: builder.ExportRequest, adapters: dict[str, Path], workdir: Path, progress: Callable[[str], None]
) -> None:
    """Build ``request.output_dir`` as a base model with switchable ``adapters``."""
    onnx, helper, numpy_helper = _onnx()
    import numpy as np
    import onnxruntime as ort

    names = list(adapters)
    probe = dataclasses.replace(
        request, output_dir=workdir / "adapter-probe", adapter_path=adapters[names[0]]
    )
    builder.export(probe)
    probe_model = onnx.load(str(probe.output_dir / "model.onnx"), load_external_data=False)
    lora_nodes = tuple(
        sorted({re.sub(r"_Q\d+$", "", n.name) for n in probe_model.graph.node if "/lora_" in n.name})
    )
    if not lora_nodes:
        raise BuildError(f"adapter {names[0]} adds no LoRA layers this builder recognises")
    shutil.rmtree(probe.output_dir)

    builds: dict[str, Path] = {}
    for name in names:
        progress(f"      building adapter {name}")
        one = dataclasses.replace(
            request,
            output_dir=workdir / f"adapter-{name}",
            adapter_path=adapters[name],
            exclude_nodes=lora_nodes,
        )
        builder.export(one)
        builds[name] = one.output_dir

    base_dir = request.output_dir
    if base_dir.exists():
        shutil.rmtree(base_dir)
    shutil.copytree(builds[names[0]], base_dir)
    model = onnx.load(str(base_dir / "model.onnx"))
    lora = {
        init.name: numpy_helper.to_array(init).shape
        for init in model.graph.initializer
        if ".lora_" in init.name
    }
    for init in model.graph.initializer:
        if init.name in lora:
            if ".lora_B." in init.name:
                # No adapter active = the base model: a zero B makes the LoRA branch add nothing.
                init.CopyFrom(numpy_helper.from_array(np.zeros(lora[init.name], np.float32), init.name))
            model.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(lora[init.name]))
            )
    (base_dir / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(
        model,
        str(base_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )

    (base_dir / ADAPTER_DIR).mkdir()
    for name, folder in builds.items():
        other = onnx.load(str(folder / "model.onnx"))
        params = {}
        for init in other.graph.initializer:
            if init.name in lora:
                arr = numpy_helper.to_array(init)
                if arr.shape != lora[init.name]:
                    raise BuildError(
                        f"adapter {name} has {init.name} of shape {arr.shape}, the others {lora[init.name]}; "
                        "all adapters of a bundle need the same target modules and rank"
                    )
                params[init.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        if set(params) != set(lora):
            raise BuildError(f"adapter {name} does not adapt the same modules as {names[0]}")
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(params)
        fmt.export_adapter(str(base_dir / ADAPTER_DIR / f"{name}{SUFFIX}"))
        shutil.rmtree(folder)
