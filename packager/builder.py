"""The adapter around onnxruntime-genai's model builder — the only module that knows it.

The builder runs as a child process (``python -m edgephi.packager.builder``, which runs
the builder's own ``__main__`` after ``_stage``): it imports torch and transformers,
holds the whole checkpoint in memory and prints thousands of progress lines, and a child
process gives all of that back when it exits and keeps its output in a log file. Our
typed ``ExportRequest`` is the only way options reach it.

Builder habits guarded against here:

* unknown ``--extra_options`` names are silently ignored, so every option name we pass
  is checked against the names the installed builder documents (``check_option_names``);
* asymmetric INT4 with tied embeddings writes an invalid model unless
  ``shared_embeddings=false``, so that is forced whenever ``symmetric`` is off;
* it asks for a stored hub token unless told ``hf_token=false``, so a public hub id
  failed without a login: the token is asked for only when one is there to give;
* sliding-window layers get a window-sized KV cache by default, which og refuses below
  the window ("KV cache capacity must be at least local_window_size") and which refuses
  ``rewind_to`` once it has evicted — and a conversation's cache lives on rewinds. So
  every build keeps full-length caches (``windowed_kv_cache=false``): the attention still
  masks to the window, any context runs, and the memory plan's per-token KV holds for
  every layer;
* configs as transformers 5 reads them, which the builder does not expect, are staged
  in the child before the builder sees them (``stage_config``): per-layer-type
  ``rope_parameters`` (Gemma 3); and SmolLM3's NoPE layers, for which og 0.18 asks for a
  separate rotary op instead of none (``KeyError: 'position_ids'``), are built without
  rotary (``_smollm3_nope``); OLMo's parameter-free LayerNorm, which og 0.18 builds as an
  RMS norm with another epsilon, is built as the LayerNorm it is (``_olmo_layernorm``).
  The family matrix (tests/test_families.py) checks each against transformers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BuilderFailed, BuildError, DependencyMissing
from edgephi.targets import ExecutionProvider, Precision

BUILDER_MODULE = "onnxruntime_genai.models.builder"
CHILD_MODULE = "edgephi.packager.builder"

# Architectures (config.json "architectures"[0]) of text decoders we pack. The builder
# knows more; these are the families edgephi is tested and supported on.
SUPPORTED_ARCHITECTURES = (
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "SmolLM3ForCausalLM",
    "GraniteForCausalLM",
    "OlmoForCausalLM",
    "Ernie4_5ForCausalLM",
    "HunYuanDenseV1ForCausalLM",
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
    "windowed_kv_cache",
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
        opts: dict[str, str] = {"prune_lm_head": "true", "windowed_kv_cache": "false"}
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
        if self.source_is_local or not _have_hub_token():
            # A local folder needs no token, and a public hub model downloads without one;
            # a gated one then fails with the hub's own "gated" error (see ``_hint``).
            opts["hf_token"] = "false"
        return opts

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", CHILD_MODULE]
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
    if proc.returncode == -signal.SIGKILL:
        # No exception in the log: the kernel's OOM killer (or a user) ended it mid-step.
        raise BuilderFailed(
            f"{what} was killed (SIGKILL) at: {last_error_line(log_path)}",
            log=str(log_path),
            hint="most often the machine ran out of memory: the builder holds the whole model in FP32 "
            "(a 3.8B model needed more than 17 GiB); free memory or build on a larger machine",
        )
    if proc.returncode != 0:
        line = last_error_line(log_path)
        raise BuilderFailed(f"{what} failed: {line}", log=str(log_path), hint=_hint(line))


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


def _hint(line: str) -> str | None:
    """What to do about a builder error, where its last line says more than "see the log"."""
    if "GatedRepoError" in line or "gated repo" in line.lower():
        return (
            "the model is gated: accept its licence on huggingface.co, then run `hf auth login` "
            "(or set HF_TOKEN) and build again"
        )
    if "couldn't connect to" in line or "offline mode" in line or "LocalEntryNotFoundError" in line:
        return "the hub could not be reached: check the network, or download the model and give its folder"
    return None


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


def _have_hub_token() -> bool:
    """Whether a Hugging Face token is set (``HF_TOKEN``) or stored (``hf auth login``)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return bool(os.environ.get("HF_TOKEN"))
    return get_token() is not None


# --- in the builder's child process -------------------------------------------------------

_LAYER_KINDS = ("full_attention", "sliding_attention")


def stage_config(config: Any) -> Any:
    """Give the builder a transformers config in the form its family code reads.

    transformers 5 reads Gemma 3's rope settings, in either checkpoint form, as one
    ``rope_parameters`` entry per layer type; the builder's Gemma 3 path wants the
    global ones flat (``rope_type``, ``rope_theta``) and the local base as
    ``rope_local_base_freq``. Returns ``config``, changed in place.
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params and set(params) <= set(_LAYER_KINDS):
        full = dict(params.get("full_attention") or params["sliding_attention"])
        local = params.get("sliding_attention") or full
        config.rope_parameters = full
        config.rope_theta = full["rope_theta"]
        if getattr(config, "rope_local_base_freq", None) is None:
            config.rope_local_base_freq = local["rope_theta"]
    return config


def _smollm3_nope(model_cls: Any) -> None:
    """Build SmolLM3's NoPE layers (``no_rope_layers[i] == 0``) without any rotary op."""
    make_attention = model_cls.make_attention

    def patched(self: Any, layer_id: int, *args: Any, **kwargs: Any) -> Any:
        if self.no_rope_layers[layer_id]:
            return make_attention(self, layer_id, *args, **kwargs)
        rope = self.attention_attrs["rope"]
        self.attention_attrs["rope"] = False
        try:
            return make_attention(self, layer_id, *args, **kwargs)
        finally:
            self.attention_attrs["rope"] = rope

    model_cls.make_attention = patched


def _olmo_layernorm(model_cls: Any) -> None:
    """Build OLMo's norms as transformers' ``OlmoLayerNorm``: mean-centred, epsilon 1e-5."""
    init = model_cls.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.layernorm_attrs["simple"] = False
        self.layernorm_attrs["epsilon"] = 1e-5

    model_cls.__init__ = patched


def _stage() -> None:
    import runpy

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's own folder on sys.path)

    # The builder imports its family classes as top-level ``builders.*``; patch those.
    from builders.olmo import OLMoModel  # type: ignore[import-not-found]
    from builders.smollm import SmolLM3Model  # type: ignore[import-not-found]
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained

    def staged(*args: Any, **kwargs: Any) -> Any:
        return stage_config(load(*args, **kwargs))

    AutoConfig.from_pretrained = staged  # type: ignore[method-assign]
    _smollm3_nope(SmolLM3Model)
    _olmo_layernorm(OLMoModel)
    runpy.run_module(BUILDER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _stage()
