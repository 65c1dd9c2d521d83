"""``edge-pack``: build .phi bundles on a workstation.

    edge-pack build SOURCE -o model.phi [--target rpi5] [--precision auto] [--version 1.0.0]
    edge-pack inspect model.phi [--json]
    edge-pack verify model.phi [--key publisher.pub]
    edge-pack keygen publisher.key            (writes publisher.key and publisher.key.pub)
    edge-pack sign model.phi --key publisher.key [-o signed.phi]
    edge-pack publish model.phi CHANNEL_DIR --key publisher.key
    edge-pack rotate-key CHANNEL_DIR --old publisher.key --new next.key
    edge-pack targets

A thin shell over ``edgephi.packager.pipeline``: options become a ``BuildConfig``, the
effective settings are printed, the pipeline runs, the result is summarised.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from edgephi import targets
from edgephi.core.errors import ConfigError
from edgephi.packager.config import BuildConfig
from edgephi.runtime import bundle, console, signing
from edgephi.runtime.sections import GenerationDefaults, ModelFacts
from edgephi.targets import ModelFormat, Precision

PROG = "edge-pack"

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Pack language models into .phi bundles.",
)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _fraction(text: str) -> float:
    """``5%`` or ``0.05`` → 0.05."""
    try:
        return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a fraction like 5% or 0.05") from None


class PrecisionChoice(str, enum.Enum):
    """``--precision``: one of the weight precisions, or ``auto`` (``packager.precision``)."""

    AUTO = "auto"
    INT4 = "int4"
    INT8 = "int8"
    FP16 = "fp16"
    FP32 = "fp32"


@app.command()
def build(
    source: Annotated[str, typer.Argument(help="HF model folder, .gguf file, or hub model id (org/name).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle to write (.phi).")],
    target: Annotated[
        str, typer.Option("--target", help="Device profile; see `edge-pack targets`.")
    ] = targets.DEFAULT,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(
            "--precision",
            "-p",
            help="Weight precision; auto chooses for the target and the model, and says why.",
        ),
    ] = PrecisionChoice.AUTO,
    version: Annotated[
        str, typer.Option("--version", help="Semantic version of this model build.")
    ] = "0.1.0",
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: from the source).")] = None,
    context: Annotated[
        int | None, typer.Option("--context", help="Default context length shipped in the bundle.")
    ] = None,
    sign_key: Annotated[
        Path | None,
        typer.Option("--sign-key", help="Sign the bundle with this private key (edge-pack keygen)."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="A PEFT LoRA adapter to ship, NAME=PATH or PATH (repeatable)."),
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant", help="Weight recipe, e.g. imatrix-b32, imatrix-mix-s-b32, hqq-b32, rtn-b128."
        ),
    ] = None,
    model_format: Annotated[
        ModelFormat | None,
        typer.Option(
            "--format", help="Decoder file format: onnx, or ort for mobile (default: the target's)."
        ),
    ] = None,
    vision_precision: Annotated[
        Precision | None,
        typer.Option(
            "--vision-precision",
            help="A vision model's image encoder and embedding table: fp32 or int8 (default: the target's).",
        ),
    ] = None,
    measure: Annotated[
        bool, typer.Option("--eval", help="Measure and store the quality card (builds an FP32 reference).")
    ] = False,
    max_ppl_increase: Annotated[
        str | None,
        typer.Option("--max-ppl-increase", help="Fail (write nothing) above this perplexity rise, e.g. 5%."),
    ] = None,
    keep_workdir: Annotated[bool, typer.Option("--keep-workdir", help="Keep intermediate files.")] = False,
) -> None:
    """Build a bundle from a model."""
    from edgephi.packager import adapters, pipeline

    config = BuildConfig(
        source=source,
        output=output,
        target=targets.get(target),
        version=version,
        name=name,
        precision=None if precision is PrecisionChoice.AUTO else Precision(precision.value),
        context=context,
        sign_key=sign_key,
        adapters=tuple(adapters.parse(adapter or []).items()),
        quant=quant,
        model_format=model_format,
        vision_precision=vision_precision,
        evaluate=measure,
        max_ppl_increase=_fraction(max_ppl_increase) if max_ppl_increase is not None else None,
        keep_workdir=keep_workdir,
    )
    console.info("edge-pack build\n" + config.display())
    result = pipeline.build(config, progress=console.info)
    m = result.manifest
    console.info(
        f"wrote {result.output} — {m.name} {m.version}, {m.precision}, target {m.target.name}, "
        f"{_size(result.output.stat().st_size)}"
    )
    if m.quality:
        console.info(f"quality: {_quality_line(m.quality)}")


def _generation_line(generation: GenerationDefaults | None) -> str:
    """How an answer is chosen when the user says nothing: ``greedy, repetition penalty 1.1 (…)``."""
    if generation is None:
        return "the builder's (greedy)"
    g = generation
    how = (
        f"sampling at temperature {g.temperature}, top-p {g.top_p}, top-k {g.top_k}"
        if g.do_sample
        else "greedy"
    )
    origin = (
        "the model's generation_config"
        if g.origin == "generation_config"
        else "edgephi's: the model gives none"
    )
    return f"{how}, repetition penalty {g.repetition_penalty} ({origin})"


def _inputs_line(model: ModelFacts) -> str:
    vision = model.vision
    if vision is None:
        return "text"
    files = ", ".join(f"{role} {s.file or '?'}" for role, s in (model.sessions or {}).items())
    formats, most = "/".join(vision.formats or ()), vision.max_image_tokens or "?"
    encoder = vision.encoder.precision if vision.encoder else None
    precision = encoder.value if encoder else "?"
    return f"text and images ({formats}, up to {most} tokens each, {precision} encoder); sessions: {files}"


def _quality_line(q: dict[str, object]) -> str:
    calibrated = f"; calibrated on {q['calibration']}" if "calibration" in q else ""
    if "ppl" not in q:
        return "not measured (edge-pack build --eval)" + calibrated
    ppl, ref, rise = q.get("ppl", 0), q.get("ppl_reference", 0), q.get("ppl_increase", 0)
    kl, top1 = q.get("kl", 0), q.get("top1_agreement", 0)
    return (
        f"PPL {ppl:.2f} vs FP32 {ref:.2f} ({rise:+.1%}), KL {kl:.4f}, top-1 {top1:.0%} "
        f"on {q.get('text')} [{q.get('recipe')}]{calibrated}"
    )


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A .phi bundle.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show what a bundle holds (checks its container and manifest, not its hashes)."""
    info = bundle.open_bundle(path)
    m = info.manifest
    provider = m.target.execution_provider
    if as_json:
        print(
            json.dumps({**m.to_dict(), "digest": m.digest, "signature": info.verification.status}, indent=2)
        )
        return
    rows = [
        ("model", f"{m.name} {m.version}"),
        ("architecture", m.model.architecture or "?"),
        ("precision", m.precision),
        ("target", f"{m.target.name or '?'} ({provider.value if provider else '?'})"),
        ("context", f"{m.model.default_context or '?'} default, {m.model.context_length or '?'} max"),
        ("weights", _size(m.memory.weights_bytes or 0)),
        ("KV cache", f"{_size(m.memory.kv_bytes_per_token or 0)} per token"),
        ("chat template", "yes" if m.chat_template else "no"),
        ("defaults", _generation_line(m.model.generation)),
        ("inputs", _inputs_line(m.model)),
        ("quality", _quality_line(m.quality)),
        ("signature", f"signed by {', '.join(m.signed_by)}" if m.signed_by else "unsigned"),
        (
            "requires",
            f"edgephi runtime >= {m.requires.get('runtime', '?')}, {m.target.arch or 'any'} CPU",
        ),
        ("source", f"{m.source.kind or '?'} {m.source.ref or ''}"),
        ("built", f"{m.created_at} with " + ", ".join(f"{k} {v}" for k, v in m.created_by.items())),
        ("digest", m.digest),
    ]
    for key, value in rows:
        print(f"{key:<14}{value}")
    print(f"files ({len(m.files)}, {_size(m.total_size)}):")
    for f in m.files:
        print(f"  {f.path:<40}{_size(f.size):>12}  {f.sha256[:16]}")


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A .phi bundle or an unpacked model folder.")],
    reference: Annotated[
        Path | None, typer.Option("--reference", help="The FP32 bundle or folder to compare with.")
    ] = None,
    text: Annotated[
        Path | None, typer.Option("--text", help="Text to evaluate on (default: a licence).")
    ] = None,
    window: Annotated[int, typer.Option("--window", help="Tokens per window.")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="How many windows at most.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Perplexity of a packed model, and KL / top-1 agreement against its reference."""
    from edgephi.packager import evaluate

    result = evaluate.evaluate_paths(
        model, reference, text, window=window, max_windows=windows, progress=console.info
    )
    print(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


KeysOpt = Annotated[
    list[Path] | None, typer.Option("--key", help="Publisher public key(s) the signature must verify with.")
]


@app.command()
def verify(path: Annotated[Path, typer.Argument(help="A .phi bundle.")], key: KeysOpt = None) -> None:
    """Check every file's hash and, with --key, the signature; exit 1 on any mismatch."""
    trusted = {k.key_id: k for k in (signing.load_public_key(p) for p in key or [])}
    info = bundle.verify_content(path, bundle.TrustPolicy(trusted))
    m = info.manifest
    if trusted:
        print(f"OK {path}: {m.name} {m.version}, {len(m.files)} files, {info.verification.describe()}")
    else:
        # Hashes only: say so on the OK line itself, not in a note a script never sees.
        print(
            f"OK {path}: {m.name} {m.version}, {len(m.files)} files hashed; "
            "signature NOT checked (give --key KEY.pub to check it)"
        )


@app.command()
def keygen(
    path: Annotated[
        Path, typer.Argument(help="Private key file to create; the public key goes to PATH.pub.")
    ],
    comment: Annotated[str, typer.Option("--comment", help="A label stored with the public key.")] = "",
) -> None:
    """Create an Ed25519 key pair for signing bundles."""
    key = signing.SigningKey.generate()
    public = key.save(path, comment)
    print(f"private key {path} (keep it secret), public key {public}, key id {key.key_id}")


@app.command()
def sign(
    path: Annotated[Path, typer.Argument(help="The .phi bundle to sign.")],
    key: Annotated[
        list[Path], typer.Option("--key", help="Private key (edge-pack keygen); again for more signers.")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: in place).")
    ] = None,
) -> None:
    """(Re-)sign an existing bundle without rebuilding it; its content is verified first."""
    from edgephi.packager import writer

    keys = [signing.SigningKey.load(k) for k in key]
    manifest = writer.resign(path, output or path, keys)
    ids = ", ".join(k.key_id for k in keys)
    print(f"signed {output or path}: {manifest.name} {manifest.version} by key {ids}")


@app.command()
def publish(
    path: Annotated[Path, typer.Argument(help="The signed .phi bundle to publish.")],
    channel_dir: Annotated[Path, typer.Argument(help="The channel folder (created if missing).")],
    key: Annotated[
        list[Path],
        typer.Option("--key", help="The publisher's private key; it signs the index (again for more)."),
    ],
    expires_days: Annotated[
        float, typer.Option("--expires-days", help="Days until devices refuse the index.")
    ] = 30,
    blobs: Annotated[
        bool, typer.Option("--blobs/--no-blobs", help="Offer per-file blobs (deltas), or the whole bundle.")
    ] = True,
) -> None:
    """Add a bundle to an update channel and re-sign its index."""
    from edgephi.packager.publish import publish as do_publish

    keys = [signing.SigningKey.load(k) for k in key]
    release = do_publish(path, channel_dir, keys, expires_days=expires_days, blobs=blobs)
    print(f"published {release.name} {release.version} to {channel_dir} ({release.size} bytes)")


@app.command("rotate-key")
def rotate_key(
    channel_dir: Annotated[Path, typer.Argument(help="The channel folder.")],
    old: Annotated[Path, typer.Option("--old", help="The private key devices trust now.")],
    new: Annotated[Path, typer.Option("--new", help="The private key to hand over to.")],
    also: Annotated[
        list[Path] | None,
        typer.Option("--also", help="Another trusted key that co-signs (devices with a threshold)."),
    ] = None,
    expires_days: Annotated[
        float, typer.Option("--expires-days", help="Days until devices refuse the index.")
    ] = 30,
) -> None:
    """Hand a channel over to a new key: devices that trust the old key take the new one."""
    from edgephi.packager.publish import rotate_key as do_rotate

    old_key, new_key = signing.SigningKey.load(old), signing.SigningKey.load(new)
    others = [signing.SigningKey.load(k) for k in also or []]
    do_rotate(channel_dir, old_key, new_key, others, expires_days)
    print(
        f"{channel_dir}: key {old_key.key_id} hands over to {new_key.key_id}; publish with {new} from now on"
    )


@app.command("targets")
def list_targets() -> None:
    """List the device profiles builds can aim at."""
    for t in targets.all_targets():
        # What --precision auto chooses by: the device's memory and bandwidth.
        device = f"{t.ram_gb:g} GB {t.bandwidth_gbs:g} GB/s" if t.ram_gb and t.bandwidth_gbs else "-"
        print(
            f"{t.name:<14}{t.execution_provider.value:<6}{t.precision_name:<6}"
            f"ctx {t.context:<6}{device:<16}{t.description}"
        )


def main(argv: list[str] | None = None) -> None:
    console.run_app(app, PROG, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
