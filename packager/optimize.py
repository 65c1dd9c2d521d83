"""Strip and fuse: onnxruntime's offline graph optimisation of the builder's decoder.

Runs between the export and the finalising step of a build (``packager.pipeline``):

* doc strings are dropped (they are text nobody on a device reads);
* onnxruntime optimises the graph at the *extended* level — fusions such as SiLU into
  ``QuickGelu`` that every CPU build of onnxruntime has — not at "all", whose layout
  transforms are specific to the build host's hardware. Unused initializers go with it;
* constant folding is left off: it would fold the ``Reshape`` that lets the embedding
  ``Gather`` read the tied lm_head's INT4 weights into a second copy of those weights
  (+14 MB on SmolLM2, and the reason a plain ORT-format conversion came out larger than
  the ONNX model). The device's onnxruntime folds constants in memory at load anyway;
* mobile targets may take the result in ORT format (``model.ort``, named in
  ``genai_config.json``) with the operator list a reduced onnxruntime build needs
  (``required_operators.config``, the file onnxruntime's ``build.sh --include_ops_by_config``
  takes).

The pipeline then checks the optimised folder generates the same greedy tokens as the
builder's (``same_greedy_tokens``) before anything is shipped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BuildError, DependencyMissing
from edgephi.runtime.sections import GraphFacts
from edgephi.targets import ModelFormat

OPS_CONFIG = "required_operators.config"
CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 16
ORT_MODEL = "model.ort"
_DISABLED = ["ConstantFolding"]  # see the module docstring: it unshares the tied embedding


@dataclass(frozen=True)
class GraphReport:
    """Node count and model-file bytes before and after; shown in the build summary."""

    format: str
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int

    def line(self) -> str:
        return (
            f"graph: {self.nodes_before} → {self.nodes_after} nodes, "
            f"{self.bytes_before / 2**20:.1f} → {self.bytes_after / 2**20:.1f} MiB ({self.format})"
        )

    def facts(self) -> GraphFacts:
        """The manifest's ``model.graph``."""
        return GraphFacts(
            optimization="extended",
            format=ModelFormat(self.format),
            nodes=self.nodes_after,
            nodes_before=self.nodes_before,
        )


def decoder_file(model_dir: Path) -> str:
    genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    return str(genai["model"]["decoder"]["filename"])


def replace_decoder(model_dir: Path, name: str, workdir: Path) -> None:
    """Swap the new decoder files written in ``workdir`` in for ``name`` and its external data."""
    for old in [p for p in model_dir.iterdir() if p.name.startswith(name)]:
        old.unlink()
    for new in workdir.iterdir():
        shutil.move(str(new), model_dir / new.name)


def save_decoder(model: Any, model_dir: Path, name: str, workdir: Path) -> None:
    """Write an edited decoder graph (weights as external data) in place of ``name``."""
    import onnx

    workdir.mkdir(parents=True, exist_ok=True)
    onnx.save(
        model,
        str(workdir / name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=name + ".data",
        size_threshold=1024,
    )
    replace_decoder(model_dir, name, workdir)


def _model_bytes(model_dir: Path, name: str) -> int:
    """The graph file and its external data (``model.onnx``, ``model.onnx.data``)."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith(name))


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _strip_doc_strings(path: Path) -> None:
    """Clear doc strings in the graph file; external weights are referenced, not rewritten."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    onnx.save(model, str(path))


def _optimise(src: Path, out: Path, ort_format: bool) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise DependencyMissing(
            "optimising the graph needs onnxruntime (pip install 'edgephi[pack]')"
        ) from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    if ort_format:
        options.add_session_config_entry("session.save_model_format", "ORT")
    else:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", out.name + ".data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    try:
        ort.InferenceSession(
            str(src), options, providers=["CPUExecutionProvider"], disabled_optimizers=_DISABLED
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BuildError(f"onnxruntime could not optimise {src.name}: {str(exc).splitlines()[0]}") from None


def _ops_config(ort_model: Path, out: Path) -> None:
    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    create_config_from_models([ort_model], out, enable_type_reduction=False)
    # The tool names the model by its build-host path in a comment; ship the bundle's name.
    lines = out.read_text(encoding="utf-8").splitlines()
    lines = [f"# - {ort_model.name}" if ln.startswith("# - ") else ln for ln in lines]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def strip_and_fuse(model_dir: Path, model_format: ModelFormat, workdir: Path) -> GraphReport:
    """Optimise ``model_dir``'s decoder in place (through ``workdir``); return the report."""
    name = decoder_file(model_dir)
    if not name.endswith(".onnx"):
        raise BuildError(f"the decoder {name} is not an ONNX file; nothing to optimise")
    src = model_dir / name
    nodes_before = _node_count(src)
    bytes_before = _model_bytes(model_dir, name)
    workdir.mkdir(parents=True, exist_ok=True)
    ort_format = model_format is ModelFormat.ORT
    if ort_format:
        # An ORT file is not edited afterwards; its input must carry no doc strings. An
        # ONNX result is stripped once, after the optimiser has added its own.
        _strip_doc_strings(src)
    out = workdir / (ORT_MODEL if ort_format else name)
    _optimise(src, out, ort_format)

    replace_decoder(model_dir, name, workdir)
    if ort_format:
        _ops_config(model_dir / ORT_MODEL, model_dir / OPS_CONFIG)
        config_path = model_dir / "genai_config.json"
        genai = json.loads(config_path.read_text(encoding="utf-8"))
        genai["model"]["decoder"]["filename"] = ORT_MODEL
        config_path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
        nodes_after = _ort_node_count(model_dir / ORT_MODEL)
        bytes_after = (model_dir / ORT_MODEL).stat().st_size
    else:
        _strip_doc_strings(model_dir / name)  # the optimiser writes its own on fused nodes
        nodes_after = _node_count(model_dir / name)
        bytes_after = _model_bytes(model_dir, name)
    return GraphReport(model_format.value, nodes_before, nodes_after, bytes_before, bytes_after)


def _ort_node_count(path: Path) -> int:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    buf = path.read_bytes()
    graph = InferenceSession.GetRootAsInferenceSession(buf, 0).Model().Graph()
    return int(graph.NodesLength())


def greedy_tokens(model_dir: Path, prompt: str, count: int) -> list[int]:
    """``count`` greedy tokens after ``prompt``: the check that an optimisation changed nothing."""
    from edgephi.runtime.genai import default_threads, open_model
    from edgephi.runtime.genai import og as _og

    og = _og()
    model = open_model(model_dir, default_threads())
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    ids = tokenizer.encode(prompt)
    params.set_search_options(max_length=len(ids) + count, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out
