"""The adapter around onnxruntime-genai's model builder — the only module that knows it.

The builder runs as a child process (``python -m onnxruntime_genai.models.builder``): it
imports torch and transformers, holds the whole checkpoint in memory and prints
thousands of progress lines, and a child process gives all of that back when it exits
and keeps its output in a log file. Our typed ``ExportRequest`` is the only way options
reach it.

Two builder habits are guarded against here:

* unknown ``--extra_options`` names are silently ignored, so every option name we pass
  is checked against the names the installed builder documents (``check_option_names``);
* asymmetric INT4 with tied embeddings writes an invalid model unless
  ``shared_embeddings=false``, so that is forced whenever ``symmetric`` is off.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgephi.runtime.errors import BuildError, DependencyMissing
from edgephi.targets import ExecutionProvider, Precision

BUILDER_MODULE = "onnxruntime_genai.models.builder"

# Architectures (config.json "architectures"[0]) of text decoders we pack. The builder
# knows more; these are the families edgephi is tested and supported on.
SUPPORTED_ARCHITECTURES = (
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "Phi3SmallForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "SmolLM3ForCausalLM",
    # Phi-3(.5)-vision: the builder exports its text decoder, edgephi.packager.vision the rest.
    "Phi3VForCausalLM",
)

# Our option names, each a documented builder extra option.
OPTION_NAMES = (
    "block_size",
    "accuracy_level",
    "is_symmetric",
    "shared_embeddings",
    "hf_token",
    "prune_lm_head",
    "algo_config",
    "kv_cache_quant_scheme",
    "kv_cache_scale_file",
    "adapter_path",
    "nodes_to_exclude",
    "fuse_mlp_gate_up",
    "exclude_embeds",
)
CALIBRATION_MODULE = "onnxruntime_genai.models.quantization.kv_cache_calibration"
KV_INT8_SCHEME = "int8_per_channel"


@dataclass(frozen=True)
class ExportRequest:
    """One builder run. ``source`` is a local Hugging Face folder or a hub model id."""

    source: str
    source_is_local: bool
    output_dir: Path
    cache_dir: Path
    log_path: Path
    precision: Precision
    execution_provider: ExecutionProvider
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True
    algorithm: str = "default"
    tied_embeddings: bool = False
    kv_scale_file: Path | None = None  # calibrated scales: quantise the KV cache to int8
    adapter_path: Path | None = None  # a PEFT LoRA adapter folder to build in
    exclude_nodes: tuple[str, ...] = ()  # MatMuls left unquantised (the LoRA ones)
    fuse_gate_up: bool = True
    inputs_embeds: bool = False  # a decoder fed embeddings (a vision model's), not token ids

    def extra_options(self) -> dict[str, str]:
        # Only the last position's logits are needed to generate; computing them for every
        # prompt token costs prompt length x vocabulary x 4 bytes (300 MB for SmolLM2 at 1.5k).
        opts: dict[str, str] = {"prune_lm_head": "true"}
        if self.fuse_gate_up and self.adapter_path is None and not self.exclude_nodes:
            # One MatMul for the MLP's gate and up projections instead of two: the same
            # weights, one fewer kernel and activation quantisation per layer. On SmolLM2
            # the gain is within this machine's noise (docs/decode-levers.md). The builder
            # refuses it for LoRA-adapted projections.
            opts["fuse_mlp_gate_up"] = "true"
        if self.precision in (Precision.INT4, Precision.INT8):
            opts["block_size"] = str(self.block_size)
            opts["accuracy_level"] = str(self.accuracy_level)
            opts["is_symmetric"] = "true" if self.symmetric else "false"
            if self.algorithm != "default":
                opts["algo_config"] = self.algorithm
            if not self.symmetric and self.tied_embeddings:
                # Asymmetric weights with a shared embedding/lm_head matrix produce a model
                # onnxruntime rejects; keep the two matrices separate.
                opts["shared_embeddings"] = "false"
        if self.inputs_embeds:
            opts["exclude_embeds"] = "true"
        if self.adapter_path is not None:
            opts["adapter_path"] = str(self.adapter_path)
        if self.exclude_nodes:
            opts["nodes_to_exclude"] = ",".join(self.exclude_nodes)
        if self.kv_scale_file is not None:
            opts["kv_cache_quant_scheme"] = KV_INT8_SCHEME
            opts["kv_cache_scale_file"] = str(self.kv_scale_file)
        if self.source_is_local:
            opts["hf_token"] = "false"
        return opts

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", BUILDER_MODULE]
        args += ["-i", self.source] if self.source_is_local else ["-m", self.source]
        args += [
            "-o",
            str(self.output_dir),
            "-p",
            self.precision.value,
            "-e",
            self.execution_provider.value,
            "-c",
            str(self.cache_dir),
        ]
        extra = self.extra_options()
        if extra:
            args += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
        return args


def _builder_path() -> Path:
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyMissing("onnxruntime-genai is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    if not path.is_file():
        raise DependencyMissing(f"this onnxruntime-genai has no model builder ({path} is missing)")
    return path


@functools.lru_cache(maxsize=1)
def documented_options() -> frozenset[str]:
    """Extra-option names the installed builder documents in its help text.

    The builder's own ``--help`` crashes, so the names are read from its source.
    """
    text = _builder_path().read_text(encoding="utf-8")
    return frozenset(re.findall(r"^\s{12,}([a-z][a-z0-9_]*) = ", text, flags=re.MULTILINE))


def check_option_names(names: tuple[str, ...] = OPTION_NAMES) -> None:
    unknown = sorted(set(names) - documented_options())
    if unknown:
        raise BuildError(
            f"the installed model builder does not know the option(s) {unknown} "
            "and would ignore them silently",
            hint="install a supported onnxruntime-genai: pip install 'onnxruntime-genai==0.18.*'",
        )


def _missing_packages() -> list[str]:
    needed = {"torch": "torch==2.13.0", "transformers": "transformers", "onnx": "onnx", "onnx_ir": "onnx-ir"}
    return [pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None]


def _missing_for(request: ExportRequest) -> list[str]:
    missing = _missing_packages()
    if request.adapter_path is not None and importlib.util.find_spec("peft") is None:
        missing.append("peft")
    return missing


def _run_logged(argv: list[str], log_path: Path, offline: bool, what: str) -> None:
    env = dict(os.environ)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONUNBUFFERED"] = "1"
    if offline:
        # A local folder needs nothing from the hub; don't let transformers try.
        env["HF_HUB_OFFLINE"] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed: {last_error_line(log_path)}")


def export(request: ExportRequest) -> None:
    """Run the builder; on failure raise ``BuildError`` quoting the builder's own error."""
    missing = _missing_for(request)
    if missing:
        raise DependencyMissing(f"packing needs {', '.join(missing)}, which is not installed")
    check_option_names(tuple(request.extra_options()))
    _run_logged(request.argv(), request.log_path, request.source_is_local, "the model builder")
    if not (request.output_dir / "genai_config.json").is_file():
        raise BuildError("the model builder finished without writing genai_config.json")


def calibrate_kv_cache(baseline_dir: Path, tokenizer: str, out: Path, log_path: Path, offline: bool) -> Path:
    """Per-channel int8 KV-cache scales from a float-KV build, on the calibration tool's own corpus."""
    argv = [
        sys.executable,
        "-m",
        CALIBRATION_MODULE,
        "--model",
        str(baseline_dir),
        "--tokenizer",
        tokenizer,
        "--out",
        str(out),
        "--quant-type",
        KV_INT8_SCHEME,
    ]
    _run_logged(argv, log_path, offline, "KV-cache calibration")
    if not out.is_file():
        raise BuildError("KV-cache calibration finished without writing its scale file")
    return out


def last_error_line(log_path: Path) -> str:
    """The most telling line of a builder log: the final exception, else the last line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [ln for ln in lines if ln]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line):
            return line[:400]
    return lines[-1][:400] if lines else "(empty log)"
