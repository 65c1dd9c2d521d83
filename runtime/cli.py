"""``edge-run``: run a .phi bundle on the device.

    edge-run model.phi -p "Hello"        answer once and exit
    echo "Hello" | edge-run model.phi    piped stdin is the prompt
    edge-run model.phi                   interactive chat on a terminal
    edge-run list                        installed models

A thin shell: it parses options into ``GenerationOptions``, calls ``loader.load`` and
prints chunks as ``Engine.stream`` yields them. ``run`` is the default command, so
``edge-run model.phi`` works without naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from edgephi.runtime import console, loader, memory
from edgephi.runtime.chat import Conversation
from edgephi.runtime.engine import Engine
from edgephi.runtime.errors import ConfigError
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store

PROG = "edge-run"

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Run .phi model bundles on this device.",
)

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Model store directory (default: $EDGEPHI_HOME or ~/.local/share/edgephi)."),
]


@app.command()
def run(
    bundle: Annotated[
        Path, typer.Argument(help="A .phi bundle, an installed model's name, or an unpacked model folder.")
    ],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this and exit.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per answer.")] = 256,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", "-t", help="0 = greedy; default: the model's own setting."),
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample from the k likeliest.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="Threads for onnxruntime (default: usable cores)."),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option("--context", help="Context length in tokens (default: the bundle's)."),
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="Print a line of statistics after each answer.")
    ] = False,
    insecure_skip_verify: Annotated[
        bool,
        typer.Option(
            "--insecure-skip-verify", help="Run without checking the signature (hashes are still checked)."
        ),
    ] = False,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="Memory to plan for, e.g. 2G (default: what is free)."),
    ] = None,
    show_plan: Annotated[
        bool, typer.Option("--plan", help="Print the memory plan and exit without loading.")
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Chat with a model bundle, or answer one prompt."""
    options = GenerationOptions(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    budget = memory.parse_size(memory_budget) if memory_budget else None
    the_store = Store(store) if store else None
    if show_plan:
        print(
            loader.plan(
                bundle,
                context=context,
                memory_budget=budget,
                insecure_skip_verify=insecure_skip_verify,
                store=the_store,
            ).describe()
        )
        return
    engine = loader.load(
        bundle,
        store=the_store,
        threads=threads,
        context=context,
        memory_budget=budget,
        insecure_skip_verify=insecure_skip_verify,
    )
    if engine.plan is not None and engine.plan.limited_by == "memory":
        console.info(
            f"(context limited to {engine.plan.max_length} tokens by the memory budget; `--plan` explains)"
        )
    if engine.verification is not None and engine.verification.warning:
        console.info(engine.verification.warning)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ConfigError(
                "stdin was empty", hint="give a prompt with -p, pipe one in, or run on a terminal to chat"
            )
    conversation = Conversation(engine, system=system)
    if prompt is not None:
        _answer(conversation, prompt, options, stats)
        return
    _chat(conversation, options, stats)


def _answer(conversation: Conversation, text: str, options: GenerationOptions, stats: bool) -> None:
    dropped = conversation.dropped
    for chunk in conversation.ask(text, options):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if conversation.dropped > dropped:
        console.info(f"(dropped {conversation.dropped - dropped} oldest exchange(s) to fit the context)")
    if stats and conversation.engine.last_stats:
        console.info(conversation.engine.last_stats.line())


def _chat(conversation: Conversation, options: GenerationOptions, stats: bool) -> None:
    engine: Engine = conversation.engine
    console.info(f"Chatting with the model (context {engine.context} tokens). /exit or Ctrl-D to quit.")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            console.info("")
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        try:
            _answer(conversation, text, options, stats)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the chat.
            console.info("\n(interrupted)")


@app.command("list")
def list_models(store: StoreOpt = None) -> None:
    """List the models installed in the store."""
    the_store = Store(store) if store else Store()
    models = the_store.installed()
    if not models:
        console.info("no models installed")
        return
    for m in models:
        current = the_store.current(m.manifest.name)
        mark = "current" if current is not None and current.path == m.path else ""
        print(f"{m.manifest.name}\t{m.manifest.version}\t{m.manifest.precision}\t{mark}\t{m.path}")


trust_app = typer.Typer(help="Manage the publisher keys this device trusts.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")


@trust_app.command("add")
def trust_add(
    key: Annotated[Path, typer.Argument(help="A publisher's public key (from edge-pack keygen).")],
    store: StoreOpt = None,
) -> None:
    """Trust a publisher key; from then on only bundles signed by a trusted key run."""
    trust = (Store(store) if store else Store()).trust
    added = trust.add(key)
    print(f"trusted key {added.key_id} ({trust.folder}); unsigned bundles are now refused")


@trust_app.command("list")
def trust_list(store: StoreOpt = None) -> None:
    """List the trusted publisher keys."""
    trust = (Store(store) if store else Store()).trust
    keys = trust.keys()
    if not keys:
        console.info(f"no trusted keys in {trust.folder}: unsigned bundles run, with a warning")
    for kid, key in keys.items():
        print(f"{kid}\t{key.comment}")


@app.command("update")
def update_cmd(
    channel_url: Annotated[str, typer.Argument(help="The channel: an http(s) URL or a folder.")],
    model: Annotated[
        str | None, typer.Argument(help="Model name (default: every installed one offered).")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Only say whether an update is available.")] = False,
    store: StoreOpt = None,
) -> None:
    """Update models from a signed channel: verify, download with resume, health-check, switch."""
    from edgephi.runtime import updater

    results = updater.update(
        channel_url, model, store=Store(store) if store else None, check_only=check, say=console.info
    )
    for result in results:
        print(result.line())


@app.command("rollback")
def rollback_cmd(
    model: Annotated[str, typer.Argument(help="The model to return to its previous version.")],
    store: StoreOpt = None,
) -> None:
    """Make the previous version of a model current again."""
    from edgephi.runtime import updater

    restored = updater.rollback(model, Store(store) if store else None)
    print(f"{model}: rolled back to {restored.manifest.version}")


_COMMANDS = {"run", "list", "trust", "update", "rollback"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # `run` is the default command: `edge-run model.phi …` means `edge-run run model.phi …`.
    if args and args[0] not in _COMMANDS and args[0] not in ("--help", "-h"):
        args.insert(0, "run")
    console.run_app(app, PROG, args)


if __name__ == "__main__":
    main()
