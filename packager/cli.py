"""``edge-pack``: build .phi bundles on a workstation.

    edge-pack build SOURCE -o model.phi [--target rpi5] [--precision int4] [--version 1.0.0]
    edge-pack inspect model.phi [--json]
    edge-pack targets

A thin shell over ``edgephi.packager.pipeline``: options become a ``BuildConfig``, the
effective settings are printed, the pipeline runs, the result is summarised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from edgephi import targets
from edgephi.packager.config import BuildConfig
from edgephi.runtime import bundle, console
from edgephi.targets import Precision

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


@app.command()
def build(
    source: Annotated[str, typer.Argument(help="HF model folder, .gguf file, or hub model id (org/name).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle to write (.phi).")],
    target: Annotated[
        str, typer.Option("--target", help="Device profile; see `edge-pack targets`.")
    ] = targets.DEFAULT,
    precision: Annotated[
        Precision | None, typer.Option("--precision", "-p", help="Weight precision (default: the target's).")
    ] = None,
    version: Annotated[
        str, typer.Option("--version", help="Semantic version of this model build.")
    ] = "0.1.0",
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: from the source).")] = None,
    context: Annotated[
        int | None, typer.Option("--context", help="Default context length shipped in the bundle.")
    ] = None,
    keep_workdir: Annotated[bool, typer.Option("--keep-workdir", help="Keep intermediate files.")] = False,
) -> None:
    """Build a bundle from a model."""
    from edgephi.packager import pipeline

    config = BuildConfig(
        source=source,
        output=output,
        target=targets.get(target),
        version=version,
        name=name,
        precision=precision,
        context=context,
        keep_workdir=keep_workdir,
    )
    console.info("edge-pack build\n" + config.display())
    result = pipeline.build(config, progress=console.info)
    m = result.manifest
    console.info(
        f"wrote {result.output} — {m.name} {m.version}, {m.precision}, target {m.target['name']}, "
        f"{_size(result.output.stat().st_size)}"
    )


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A .phi bundle.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show what a bundle holds (checks its container and manifest, not its hashes)."""
    info = bundle.open_bundle(path)
    m = info.manifest
    if as_json:
        print(json.dumps({**m.to_dict(), "digest": m.digest}, indent=2))
        return
    rows = [
        ("model", f"{m.name} {m.version}"),
        ("architecture", str(m.model.get("architecture", "?"))),
        ("precision", m.precision),
        ("target", f"{m.target.get('name', '?')} ({m.target.get('execution_provider', '?')})"),
        (
            "context",
            f"{m.model.get('default_context', '?')} default, {m.model.get('context_length', '?')} max",
        ),
        ("weights", _size(m.memory.get("weights_bytes", 0))),
        ("KV cache", f"{_size(m.memory.get('kv_bytes_per_token', 0))} per token"),
        ("chat template", "yes" if m.chat_template else "no"),
        ("source", f"{m.source.get('kind', '?')} {m.source.get('ref', '')}"),
        ("built", f"{m.created_at} with " + ", ".join(f"{k} {v}" for k, v in m.created_by.items())),
        ("digest", m.digest),
    ]
    for key, value in rows:
        print(f"{key:<14}{value}")
    print(f"files ({len(m.files)}, {_size(m.total_size)}):")
    for f in m.files:
        print(f"  {f.path:<40}{_size(f.size):>12}  {f.sha256[:16]}")


@app.command("targets")
def list_targets() -> None:
    """List the device profiles builds can aim at."""
    for t in targets.all_targets():
        print(
            f"{t.name:<14}{t.execution_provider.value:<6}{t.precision.value:<6}"
            f"ctx {t.context:<6}{t.description}"
        )


def main(argv: list[str] | None = None) -> None:
    console.run_app(app, PROG, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
