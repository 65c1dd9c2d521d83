"""What a bundle's model files may ask of the runtime — checked before anything loads them.

Two files can make onnxruntime(-genai) do more than run a model:

* ``genai_config.json`` can name a custom-op library to load, switch on profiling (which
  writes files), or point at files by name. Session options must come from an
  allowlist; no key anywhere may name a library or profiling; every ``*filename`` value
  must be a file of the bundle.
* an ONNX model can keep tensors in "external data" files at any path. Every
  ``location`` — in graphs, subgraphs and local functions, of every file genai_config
  loads whatever its name — must be a plain relative path to a file of the bundle.
  ``config_entries`` may only tune (an allowlist): some entries name files.

The packager runs the same checks before writing a bundle, the store after unpacking one
and before it becomes live. The ONNX check parses the protobuf wire format directly, so
the device needs no ``onnx`` package.
"""

from __future__ import annotations

import json
import mmap
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgephi.core.errors import UnsafeBundle
from edgephi.runtime.manifest import check_member_path

SESSION_OPTIONS_ALLOWED = frozenset(
    {
        "log_id",
        "log_severity_level",
        "provider_options",
        "intra_op_num_threads",
        "inter_op_num_threads",
        "enable_cpu_mem_arena",
        "enable_mem_pattern",
        "graph_optimization_level",
        "disable_cpu_ep_fallback",
        "disable_quant_qdq",
        "enable_quant_qdq_cleanup",
        "use_env_allocators",
        "use_device_allocator_for_initializers",
        "config_entries",
    }
)
PROVIDERS_ALLOWED = frozenset({"cpu", "cuda", "dml", "webgpu", "qnn", "openvino", "NvTensorRtRtx", "rocm"})
_FORBIDDEN_KEY_PARTS = (
    "library",
    "profil",
    "custom_ops",
    "ep_context_file",
    "dump",
    "optimized_model_filepath",
)
_PATHLIKE_SUFFIXES = (".so", ".dll", ".dylib")
# onnxruntime config entries a bundle may set: tuning only. Others name files to read or
# write (ep.context_file_path, session.optimized_model_external_initializers_file_name, …).
CONFIG_ENTRIES_ALLOWED = frozenset(
    {
        "session.intra_op.allow_spinning",
        "session.inter_op.allow_spinning",
        "session.disable_prepacking",
        "session.set_denormal_as_zero",
        "session.use_device_allocator_for_initializers",
        "session.disable_cpu_ep_fallback",
        "mlas.enable_gemm_fastmath_arm64_bfloat16",
    }
)
MAX_GRAPH_DEPTH = 32


def check_genai_config(config: Any, bundle_files: set[str]) -> None:
    """Refuse a genai_config that loads code, writes files or names files outside the bundle."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UnsafeBundle("genai_config.json must be an object with a 'model' section")
    _walk_config(config, "", bundle_files)


def _walk_config(node: Any, where: str, files: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            lowered = str(key).lower()
            if any(part in lowered for part in _FORBIDDEN_KEY_PARTS):
                raise UnsafeBundle(f"genai_config.json sets {path}, which would load code or write files")
            if where.endswith("session_options") and key not in SESSION_OPTIONS_ALLOWED:
                raise UnsafeBundle(f"genai_config.json sets {path}, which is not an allowed session option")
            if key == "provider_options":
                _check_providers(value, path)
            if key == "config_entries":
                _check_config_entries(value, path)
            if lowered.endswith("filename") and value is not None:
                _check_file_ref(value, path, files)
            _walk_config(value, path, files)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _walk_config(item, f"{where}[{i}]", files)
    elif isinstance(node, str) and node.lower().endswith(_PATHLIKE_SUFFIXES):
        raise UnsafeBundle(f"genai_config.json {where} names a native library ({node!r})")


def _check_providers(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise UnsafeBundle(f"genai_config.json {where} must be a list")
    for entry in value:
        if not isinstance(entry, dict):
            raise UnsafeBundle(f"genai_config.json {where} entries must be objects")
        for provider, options in entry.items():
            if provider not in PROVIDERS_ALLOWED:
                raise UnsafeBundle(f"genai_config.json {where} names an unknown provider {provider!r}")
            for k, v in (options or {}).items() if isinstance(options, dict) else []:
                if isinstance(v, str) and ("/" in v or "\\" in v):
                    raise UnsafeBundle(f"genai_config.json {where}.{provider}.{k} is a path ({v!r})")


def _check_config_entries(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise UnsafeBundle(f"genai_config.json {where} must be an object")
    for key, entry in value.items():
        if key not in CONFIG_ENTRIES_ALLOWED:
            raise UnsafeBundle(f"genai_config.json {where}.{key} is not an allowed onnxruntime config entry")
        if not isinstance(entry, str) or len(entry) > 16:
            raise UnsafeBundle(f"genai_config.json {where}.{key} must be a short string")


def _file_refs(node: Any) -> Iterator[str]:
    """Every ``filename`` value in a genai_config: the model files og loads (a
    ``config_filename`` names a processor's JSON instead)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "filename" and isinstance(value, str):
                yield value
            yield from _file_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _file_refs(item)


def _check_file_ref(value: Any, where: str, files: set[str]) -> None:
    if not isinstance(value, str):
        raise UnsafeBundle(f"genai_config.json {where} must be a file name")
    try:
        check_member_path(value)
    except Exception:
        raise UnsafeBundle(
            f"genai_config.json {where} = {value!r} is not a plain path inside the bundle"
        ) from None
    if value not in files:
        raise UnsafeBundle(f"genai_config.json {where} names {value}, which the bundle does not contain")


def check_model_dir(model_dir: Path, bundle_files: set[str]) -> None:
    """Run every check on an unpacked model folder whose files are ``bundle_files``."""
    config_path = model_dir / "genai_config.json"
    if "genai_config.json" not in bundle_files:
        raise UnsafeBundle("the bundle has no genai_config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeBundle(f"genai_config.json is not valid JSON: {exc}") from None
    check_genai_config(config, bundle_files)
    # Every ONNX file, whatever its name: the ones genai_config loads, and any *.onnx.
    models = {rel for rel in bundle_files if rel.endswith(".onnx")}
    models |= {rel for rel in _file_refs(config) if rel in bundle_files and not rel.endswith(".ort")}
    for rel in sorted(models):
        for location in external_data_locations(model_dir / rel):
            _check_external(rel, location, bundle_files)
    check_chat_template(model_dir, bundle_files)


MAX_TEMPLATE_CHARS = 256 << 10  # the largest real template (Mistral's) is under 20 KB


def check_chat_template(model_dir: Path, bundle_files: set[str]) -> None:
    """A chat template is code og runs on every prompt (rendered in the engine's sandbox, so
    a hostile one cannot take the runtime down): here, only that it is text of a sane size."""
    templates: list[tuple[str, object]] = []
    if "chat_template.jinja" in bundle_files:
        try:
            templates.append(("chat_template.jinja", (model_dir / "chat_template.jinja").read_text("utf-8")))
        except UnicodeDecodeError:
            raise UnsafeBundle("chat_template.jinja is not UTF-8 text") from None
    if "tokenizer_config.json" in bundle_files:
        try:
            config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsafeBundle(f"tokenizer_config.json is not valid JSON: {exc}") from None
        if isinstance(config, dict) and "chat_template" in config:
            templates.append(("tokenizer_config.json's chat_template", config["chat_template"]))
    for where, template in templates:
        if isinstance(template, list):  # named templates: [{"name", "template"}, …]
            template = "".join(t.get("template", "") if isinstance(t, dict) else "\0" for t in template)
        if not isinstance(template, str) or "\0" in template:
            raise UnsafeBundle(f"{where} is not a template")
        if len(template) > MAX_TEMPLATE_CHARS:
            raise UnsafeBundle(
                f"{where} is {len(template)} characters, over the {MAX_TEMPLATE_CHARS} allowed"
            )


def _check_external(model_rel: str, location: str, files: set[str]) -> None:
    base = posixpath.dirname(model_rel)
    joined = posixpath.normpath(posixpath.join(base, location)) if base else location
    try:
        check_member_path(location if not base else joined)
        if "\\" in location or location.startswith("/") or ".." in location.split("/"):
            raise ValueError(location)
    except Exception:
        raise UnsafeBundle(f"{model_rel} keeps tensor data at {location!r}, outside the bundle") from None
    if joined not in files:
        raise UnsafeBundle(f"{model_rel} keeps tensor data in {location}, which the bundle does not contain")


# --- a minimal protobuf reader for ONNX external-data locations ------------------------------

# (message, field number) pairs that lead to TensorProtos, from onnx.proto.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE_PROTO = 7, 11
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise UnsafeBundle("ONNX model is truncated or malformed (varint)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (field number, start, end) of each length-delimited field; skip the others."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise UnsafeBundle("ONNX model is truncated or malformed (length)")
            yield field, pos, pos + length
            pos += length
        else:
            raise UnsafeBundle(f"ONNX model uses protobuf wire type {wire}, which ONNX does not")
        if pos > end:
            raise UnsafeBundle("ONNX model is truncated or malformed")


def _tensor_locations(buf: memoryview, s: int, e: int) -> Iterator[str]:
    for field, fs, fe in _fields(buf, s, e):
        if field == _TENSOR_EXTERNAL_DATA:
            key = value = None
            for f2, s2, e2 in _fields(buf, fs, fe):
                if f2 == _ENTRY_KEY:
                    key = bytes(buf[s2:e2]).decode("utf-8", "replace")
                elif f2 == _ENTRY_VALUE:
                    value = bytes(buf[s2:e2]).decode("utf-8", "replace")
            if key == "location" and value is not None:
                yield value


def _sparse_locations(buf: memoryview, s: int, e: int) -> Iterator[str]:
    for field, fs, fe in _fields(buf, s, e):
        if field in (_SPARSE_VALUES, _SPARSE_INDICES):
            yield from _tensor_locations(buf, fs, fe)


def _graph_locations(buf: memoryview, s: int, e: int, depth: int) -> Iterator[str]:
    if depth > MAX_GRAPH_DEPTH:
        raise UnsafeBundle(f"ONNX model nests graphs deeper than {MAX_GRAPH_DEPTH}")
    for field, fs, fe in _fields(buf, s, e):
        if field == _GRAPH_INITIALIZER:
            yield from _tensor_locations(buf, fs, fe)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            yield from _sparse_locations(buf, fs, fe)
        elif field == _GRAPH_NODE:
            for f2, s2, e2 in _fields(buf, fs, fe):
                if f2 == _NODE_ATTRIBUTE:
                    yield from _attribute_locations(buf, s2, e2, depth)


def _attribute_locations(buf: memoryview, s: int, e: int, depth: int) -> Iterator[str]:
    for field, fs, fe in _fields(buf, s, e):
        if field in (_ATTR_T, _ATTR_TENSORS):
            yield from _tensor_locations(buf, fs, fe)
        elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
            yield from _sparse_locations(buf, fs, fe)
        elif field in (_ATTR_G, _ATTR_GRAPHS):
            yield from _graph_locations(buf, fs, fe, depth + 1)


def _function_locations(buf: memoryview, s: int, e: int) -> Iterator[str]:
    for field, fs, fe in _fields(buf, s, e):
        if field == _FUNCTION_NODE:
            for f2, s2, e2 in _fields(buf, fs, fe):
                if f2 == _NODE_ATTRIBUTE:
                    yield from _attribute_locations(buf, s2, e2, 1)
        elif field == _FUNCTION_ATTRIBUTE_PROTO:  # attribute defaults
            yield from _attribute_locations(buf, fs, fe, 1)


def external_data_locations(onnx_path: Path) -> list[str]:
    """Every external-data ``location`` an ONNX model file refers to."""
    with open(onnx_path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            raise UnsafeBundle(f"{onnx_path.name} is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                out: list[str] = []
                for field, s, e in _fields(buf, 0, len(buf)):
                    if field == _MODEL_GRAPH:
                        out.extend(_graph_locations(buf, s, e, 0))
                    elif field == _MODEL_FUNCTIONS:  # local functions: their nodes' tensors too
                        out.extend(_function_locations(buf, s, e))
                return out
            finally:
                buf.release()
