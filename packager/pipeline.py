"""``edge-pack build``: from a model source to a verified .phi bundle.

The steps (``STEPS``, which also number the progress lines), each a function from the
build so far (``Build``, frozen) to the build with its part added, in one work directory:

1. ``source``    — take the source ``sources.resolve`` classified (HF folder, GGUF file,
   hub id): fetch a hub model's config, or dequantise a GGUF into an F32 Hugging Face
   folder (``packager.gguf``); stage a Phi-3.5-vision checkpoint's text decoder; choose
   the precision for the target from the model's shapes where none was given
   (``packager.precision``, ``--precision auto``);
2. ``export``    — run onnxruntime-genai's model builder for the target's precision,
   execution provider and quantisation recipe (``packager.builder``); then quantise its
   FP32 graph for the ``hqq-b32`` recipe (``packager.hqq``), or rewrite its INT4 weights
   with importance-weighted scales from an FP32 export for ``imatrix-b32``
   (``packager.imatrix``), give an INT8 build's tied embedding the lm_head's blocks and a
   quantised build's untied one blocks of its own (``packager.embedding``), build a vision
   model's image encoder and embedding models (``packager.vision``), and strip and fuse a CPU target's
   graph, checking its greedy tokens did not change (``packager.optimize``);
3. ``finalize``  — set the shipped default context, hash every file, describe the model
   and its memory needs in the manifest (``packager.finalize``);
4. ``validate``  — load the result in onnxruntime-genai and generate, and measure its
   quality when asked (``packager.validate``, ``packager.evaluate``);
5. ``write``     — check the files as a device would, sign, write the archive atomically
   and read it back (``packager.writer``).

Nothing is written at the output path unless every step succeeded; the work directory is
removed afterwards (kept with ``keep_workdir`` for debugging). When the model builder
itself fails, its log is kept beside the output (``model.phi.build.log``) and the error
names it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BuilderFailed, BuildError
from edgephi.core.fsutil import remove_tree
from edgephi.packager import (
    adapters,
    builder,
    finalize,
    imatrix,
    optimize,
    precision,
    sources,
    validate,
    vision,
    writer,
)
from edgephi.packager.config import QUANT_RECIPES, BuildConfig
from edgephi.runtime.bundle import MIN_RUNTIME
from edgephi.runtime.manifest import Manifest
from edgephi.runtime.sections import SourceFacts, TargetFacts
from edgephi.runtime.signing import SigningKey
from edgephi.targets import ExecutionProvider, KVCache, Precision

Progress = Callable[[str], None]

REFERENCE = "reference"  # the FP32 export of the same source, in the work directory
_TOOLS = ("edgephi", "onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx")


@dataclass(frozen=True)
class BuildResult:
    output: Path
    manifest: Manifest
    smoke_output: str


def tool_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in _TOOLS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _quality(
    config: BuildConfig, request: builder.ExportRequest, onnx_dir: Path, workdir: Path, progress: Progress
) -> dict[str, Any]:
    """The quality card: the packed model against an FP32 build of the same source."""
    from edgephi.packager import evaluate

    reference = workdir / REFERENCE
    if not reference.is_dir():  # an imatrix build has exported it already
        progress("      measuring quality: building an FP32 reference of the same source")
        reference = _fp32_reference(request, workdir).output_dir
    result = evaluate.evaluate(onnx_dir, reference, progress=progress)
    for line in result.table().splitlines():
        progress(f"      {line}")
    increase = result.ppl_increase or 0.0
    if config.max_ppl_increase is not None and increase > config.max_ppl_increase:
        raise BuildError(
            f"perplexity rose {increase:.1%} against FP32, above the {config.max_ppl_increase:.1%} "
            "that --max-ppl-increase allows; nothing was written",
            hint=f"choose a stronger --quant recipe ({', '.join(QUANT_RECIPES)}) or a higher --precision",
        )
    return {**result.to_dict(), "recipe": config.quant or f"target {config.target.name}"}


def _fp32_reference(request: builder.ExportRequest, workdir: Path) -> builder.ExportRequest:
    """Export the same source in FP32 (``workdir/reference``): the quality card's reference
    and the weights ``imatrix`` calibrates."""
    reference = dataclasses.replace(
        request,
        output_dir=workdir / REFERENCE,
        precision=Precision.FP32,
        kv_scale_file=None,
        adapter_path=None,
        exclude_nodes=(),
    )
    builder.export(reference)
    return reference


def _strip_and_fuse(
    config: BuildConfig, onnx_dir: Path, workdir: Path, progress: Progress
) -> optimize.GraphReport | None:
    """Optimise the CPU graph and prove it generates what the builder's graph generated."""
    if config.target.execution_provider is not ExecutionProvider.CPU:
        # Offline optimisation is specific to the execution provider it ran with; a GPU
        # graph is left for the device's onnxruntime to optimise.
        return None
    progress("      strip and fuse: onnxruntime graph optimisation (extended level)")
    before = optimize.greedy_tokens(onnx_dir, optimize.CHECK_PROMPT, optimize.CHECK_TOKENS)
    report = optimize.strip_and_fuse(onnx_dir, config.effective_model_format, workdir / "optimized")
    after = optimize.greedy_tokens(onnx_dir, optimize.CHECK_PROMPT, optimize.CHECK_TOKENS)
    if after != before:
        raise BuildError(
            "the optimised graph generates other greedy tokens than the builder's "
            f"({after[:8]} vs {before[:8]}); nothing was written",
            hint="report it with the model; --keep-workdir keeps both graphs for a look",
        )
    progress(f"      {report.line()}, same {len(after)} greedy tokens")
    return report


def build(config: BuildConfig, progress: Progress = lambda _msg: None) -> BuildResult:
    source = sources.resolve(config.source)
    # Load the key before hours of work, not after.
    keys = [SigningKey.load(config.sign_key)] if config.sign_key else []
    # Work beside the output: same disk the user chose for the result, and not /tmp, which
    # is often a small RAM disk while a dequantised checkpoint is several GB.
    config.output.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".edgepack-", dir=config.output.parent))
    kept_log = failure_log_path(config.output)
    try:
        result = _build_in(config, source, keys, workdir, progress)
    except BuilderFailed as exc:
        # The work directory goes; the builder's own account of the failure stays.
        try:
            shutil.copyfile(exc.log, kept_log)
        except OSError:  # (a full disk, say): the error itself still reaches the user
            raise BuildError(str(exc), hint=exc.hint) from None
        hint = f"{exc.hint}; " if exc.hint and exc.hint != BuildError.hint else ""
        raise BuildError(
            str(exc), hint=f"{hint}its full log is {kept_log}; nothing else was written"
        ) from None
    else:
        kept_log.unlink(missing_ok=True)  # the log of an earlier failed attempt at this output
        return result
    finally:
        if config.keep_workdir:
            progress(f"work directory kept: {workdir}")
        else:
            remove_tree(workdir)


def failure_log_path(output: Path) -> Path:
    """Where a failed build of ``output`` leaves the builder's log: ``model.phi.build.log``."""
    return output.with_name(output.name + ".build.log")


def _check_vision(config: BuildConfig, source: sources.Source) -> None:
    """Refuse, before any work, what a vision build cannot do yet."""
    if source.kind != "hf-folder":
        raise BuildError(
            "a Phi-3.5-vision model is packed from a local checkpoint folder, whose image-side "
            "weights edgephi exports itself",
            hint="download the checkpoint (config.json and *.safetensors) and give its folder",
        )
    if config.target.execution_provider is not ExecutionProvider.CPU:
        raise BuildError(f"vision bundles are built for CPU targets; {config.target.name} is not one")
    unsupported = [
        what
        for what, on in (
            ("--adapter", bool(config.adapters)),
            ("--eval / --max-ppl-increase", config.measures_quality),
            ("an int8 KV cache target", config.target.kv_cache is KVCache.INT8),
            # Its calibration feeds token ids; a vision decoder takes embeddings.
            (f"--quant {config.quant}", config.uses_imatrix),
        )
        if on
    ]
    if unsupported:
        raise BuildError(f"vision bundles cannot be built with {', '.join(unsupported)} yet")


@dataclass(frozen=True)
class Build:
    """A build so far: what the user asked for, and what each step has added."""

    config: BuildConfig
    source: sources.Source
    keys: tuple[SigningKey, ...]
    workdir: Path
    progress: Progress
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    builder_input: str = ""
    multimodal: bool = False
    request: builder.ExportRequest | None = None
    spec: vision.VisionSpec | None = None
    graph: optimize.GraphReport | None = None
    manifest: Manifest | None = None
    smoke: str = ""
    calibration: imatrix.Calibration | None = None

    @property
    def onnx_dir(self) -> Path:
        return self.workdir / "onnx"


@dataclass(frozen=True)
class Step:
    name: str
    headline: Callable[[Build], str]  # its progress line, after "[k/n] "
    run: Callable[[Build], Build]


def _source_headline(b: Build) -> str:
    if b.source.kind == "hf-id":
        return f"fetching {b.source.ref}'s config from the Hugging Face hub"
    if b.source.kind == "gguf":
        assert b.source.path is not None
        return f"dequantising {b.source.path.name} to an F32 Hugging Face folder"
    return f"using {b.source.kind} {b.source.ref}"


def _source(b: Build) -> Build:
    config, source, workdir = b.config, b.source, b.workdir
    hf_config = source.config
    builder_input = source.ref
    if source.kind == "hf-id":
        hf_config = sources.hub_config(source.ref, workdir / "builder-cache")
    multimodal = vision.is_vision(hf_config)
    if not multimodal and config.vision_precision is not None:
        raise BuildError(
            f"--vision-precision is for vision models; {config.source} is a text model",
            hint="leave --vision-precision out",
        )
    if multimodal:
        _check_vision(config, source)
        # The builder loads weights with transformers, which reads Phi-3-vision only through
        # the checkpoint's own (remote) code; the decoder is a native Phi-3, so stage that.
        assert source.path is not None
        builder_input = str(vision.stage_text_folder(source.path, hf_config, workdir / "text"))
    if source.kind == "gguf":
        assert source.path is not None
        from edgephi.packager import gguf

        hf_config = gguf.to_hf_folder(source.path, workdir / "hf")
        builder_input = str(workdir / "hf")
    if config.chooses_precision:
        # Calibration feeds token ids to a CPU graph of the plain decoder.
        calibrate = not (multimodal or config.adapters)
        choice = precision.choose(hf_config, config.target, config.effective_context, calibrate=calibrate)
        b.progress(f"      precision auto: {choice.reason}")
        config = dataclasses.replace(config, precision=choice.precision, quant=choice.quant)
    return dataclasses.replace(
        b, config=config, hf_config=hf_config, builder_input=builder_input, multimodal=multimodal
    )


def _export_headline(b: Build) -> str:
    ep = b.config.target.execution_provider.value
    return f"exporting {b.config.effective_precision.value} for {ep} with the model builder"


def _export(b: Build) -> Build:
    config, workdir, progress, onnx_dir = b.config, b.workdir, b.progress, b.onnx_dir
    target = config.target
    weights = config.effective_precision
    request = builder.ExportRequest(
        source=b.builder_input,
        source_is_local=b.source.kind != "hf-id",
        output_dir=onnx_dir,
        cache_dir=workdir / "builder-cache",
        log_path=workdir / "builder.log",
        # HQQ quantises the builder's FP32 graph itself.
        precision=Precision.FP32 if config.uses_hqq else weights,
        execution_provider=target.execution_provider,
        block_size=config.recipe.block_size,
        accuracy_level=target.accuracy_level,
        # imatrix writes its own zero points over a symmetric scaffold: the builder's
        # asymmetric export cannot share a tied embedding (``packager.builder``).
        symmetric=target.symmetric or config.uses_imatrix,
        algorithm=config.builder_algorithm,
        tied_embeddings=bool(b.hf_config.get("tie_word_embeddings", False)),
        inputs_embeds=b.multimodal,
    )
    if target.kv_cache is KVCache.INT8:
        # Two passes: a float-KV build to measure K/V ranges on, then the real one with scales.
        baseline = dataclasses.replace(request, output_dir=workdir / "baseline")
        builder.export(baseline)
        progress("      calibrating int8 KV-cache scales on the float-KV build")
        scales = builder.calibrate_kv_cache(
            baseline.output_dir,
            b.builder_input,
            workdir / "kv_scales.json",
            request.log_path,
            offline=request.source_is_local,
        )
        request = dataclasses.replace(request, kv_scale_file=scales)
    if config.adapters:
        adapters.export_with_adapters(request, dict(config.adapters), workdir, progress)
    else:
        builder.export(request)
    if config.uses_hqq:
        progress(
            f"      HQQ: quantising the FP32 graph's weights to INT4 in blocks of {config.recipe.block_size}"
        )
        from edgephi.packager import hqq

        hqq.quantize(onnx_dir, config.recipe.block_size, target.accuracy_level, workdir / "hqq")
    calibration = None
    if config.uses_imatrix:
        progress("      imatrix: exporting FP32 weights of the same source to calibrate on")
        fp32 = _fp32_reference(request, workdir)
        calibration = imatrix.quantize(
            onnx_dir,
            fp32.output_dir,
            workdir / "imatrix",
            int8_budget=config.recipe.int8_budget,
            progress=progress,
        )
    if weights in (Precision.INT4, Precision.INT8) and target.execution_provider is ExecutionProvider.CPU:
        from edgephi.packager import embedding

        bits = 4 if weights is Precision.INT4 else 8
        saved = embedding.share_int8_embedding(onnx_dir, workdir / "embedding") if bits == 8 else 0
        if saved:
            mib = saved / 2**20
            progress(f"      INT8: the tied embedding now reads the lm_head's blocks, {mib:.0f} MiB less")
        saved = embedding.quantize_untied(onnx_dir, workdir / "embedding", bits, config.recipe.block_size)
        if saved:
            progress(
                f"      {weights.value.upper()}: the untied embedding table in {bits}-bit blocks, "
                f"{saved / 2**20:.0f} MiB less"
            )
    spec = None
    if b.multimodal:
        assert b.source.path is not None
        # Accuracy level 4 whatever the target's: measured faster and leaner than
        # dequantising to FP32 (scripts/vision_scale.py).
        int8 = None
        if config.effective_vision_precision is Precision.INT8:
            int8 = vision.Int8(block_size=target.block_size, accuracy_level=4)
        progress(
            "      vision: exporting the image encoder and the embedding model "
            f"({config.effective_vision_precision.value.upper()})"
        )
        spec = vision.export(b.source.path, b.hf_config, onnx_dir, int8)
    graph = _strip_and_fuse(config, onnx_dir, workdir, progress)
    return dataclasses.replace(b, request=request, spec=spec, graph=graph, calibration=calibration)


def _finalize(b: Build) -> Build:
    config, source, spec, onnx_dir = b.config, b.source, b.spec, b.onnx_dir
    assert b.request is not None
    target = config.target
    wanted = config.effective_context
    if spec is not None and config.context is None:
        # The target's default would not hold one picture (up to 2653 tokens) and a question.
        wanted = max(wanted, finalize.VISION_CONTEXT)
    context = finalize.set_default_context(onnx_dir, wanted)
    if source.kind == "hf-id":
        found = sorted(b.request.cache_dir.rglob("generation_config.json"))
        generation_config = found[0] if found else None
    else:
        folder = source.path if b.multimodal and source.path is not None else Path(b.builder_input)
        generation_config = folder / "generation_config.json"
    generation = finalize.set_generation_defaults(onnx_dir, generation_config)
    chat_template = finalize.has_chat_template(onnx_dir)
    files = finalize.file_entries(onnx_dir)
    model = dataclasses.replace(
        finalize.model_facts(onnx_dir, b.hf_config),
        default_context=context,
        generation=generation,
        lm_head_pruned=True,
        kv_cache=target.kv_cache,
        graph=b.graph.facts() if b.graph is not None else None,
    )
    if spec is not None:
        model = dataclasses.replace(
            model,
            modalities=("text", "image"),
            sessions=finalize.sessions(onnx_dir),
            vision=finalize.vision_facts(spec, config.effective_vision_precision),
        )
    manifest = Manifest(
        name=config.name or source.default_name,
        version=config.version,
        precision=config.effective_precision.value,
        # What was built: a profile that says "auto" records the precision chosen.
        target=TargetFacts.from_dict({**target.to_dict(), "precision": config.effective_precision.value}),
        files=tuple(files),
        created_at=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        created_by=tool_versions(),
        source=SourceFacts(
            kind=source.kind, ref=Path(source.ref).name if source.kind != "hf-id" else source.ref
        ),
        model=model,
        memory=finalize.memory_facts(files, model),
        requires={"runtime": MIN_RUNTIME},
        chat_template=chat_template,
    )
    return dataclasses.replace(b, manifest=manifest)


def _validate(b: Build) -> Build:
    config, manifest = b.config, b.manifest
    assert manifest is not None and b.request is not None
    smoke = ""
    if config.target.execution_provider is ExecutionProvider.CPU:
        health = validate.smoke_test(b.onnx_dir, manifest.chat_template)
        manifest = dataclasses.replace(manifest, health=health)
        smoke = str(health["text"])
    else:
        ep = config.target.execution_provider.value
        b.progress(f"      (skipped: {ep} models cannot run on this CPU host)")
    # What a calibrated recipe learnt from, by name and hash, measured or not.
    quality = b.calibration.card() if b.calibration is not None else {}
    if config.measures_quality:
        quality |= _quality(config, b.request, b.onnx_dir, b.workdir, b.progress)
    if quality:
        manifest = dataclasses.replace(manifest, quality=quality)
    return dataclasses.replace(b, manifest=manifest, smoke=smoke)


def _write_headline(b: Build) -> str:
    return f"writing {b.config.output}" + (f", signed by {b.keys[0].key_id}" if b.keys else "")


def _write(b: Build) -> Build:
    assert b.manifest is not None
    try:
        manifest = writer.write_bundle(b.config.output, b.manifest, b.onnx_dir, list(b.keys))
    except OSError as exc:
        raise BuildError(f"cannot write {b.config.output}: {exc.strerror or exc}") from None
    return dataclasses.replace(b, manifest=manifest)


STEPS = (
    Step("source", _source_headline, _source),
    Step("export", _export_headline, _export),
    Step("finalize", lambda _b: "finalising: default context, hashes, manifest", _finalize),
    Step("validate", lambda _b: "validating: loading in onnxruntime-genai and generating", _validate),
    Step("write", _write_headline, _write),
)


def _build_in(
    config: BuildConfig, source: sources.Source, keys: list[SigningKey], workdir: Path, progress: Progress
) -> BuildResult:
    b = Build(config, source, tuple(keys), workdir, progress)
    for number, step in enumerate(STEPS, 1):
        progress(f"[{number}/{len(STEPS)}] {step.headline(b)}")
        b = step.run(b)
    assert b.manifest is not None
    return BuildResult(config.output, b.manifest, b.smoke)
