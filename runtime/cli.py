"""``edge-run``: run a .phi bundle on the device.

    edge-run model.phi -p "Hello"        answer once and exit
    edge-run model.phi --image photo.jpg -p "What is in this picture?"   (a vision model)
    echo "Hello" | edge-run model.phi    piped stdin is the prompt
    edge-run model.phi                   interactive chat on a terminal
    edge-run list                        installed models

A thin shell: it parses options into ``GenerationOptions``, calls ``loader.load_model`` and
hands the answer or the chat to ``edgephi.runtime.repl``, which prints chunks as they come.
``run`` is the default command, so ``edge-run model.phi`` works without naming it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from edgephi.core.errors import BundleNotFound, ConfigError, IntegrityError, KeyFileError
from edgephi.runtime import console, loader, memory, repl
from edgephi.runtime.chat import Conversation
from edgephi.runtime.images import image_tokens, load_image
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.session import Session
from edgephi.runtime.signing import MAX_ROTATION_BYTES
from edgephi.runtime.store import Store

PROG = repl.PROG

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


# Options of `run`, `serve` and `bench`.
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most new tokens per answer.")]
Temperature = Annotated[
    float | None, typer.Option("--temperature", "-t", help="0 = greedy; default: the model's own setting.")
]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Sample from the k likeliest tokens.")]
MinP = Annotated[float | None, typer.Option("--min-p", help="Drop tokens below min-p x the likeliest.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")]
Threads = Annotated[
    int | None, typer.Option("--threads", help="onnxruntime threads (default: usable cores).")
]
Context = Annotated[int | None, typer.Option("--context", help="Context in tokens (default: the bundle's).")]
MemoryBudget = Annotated[
    str | None, typer.Option("--memory-budget", help="Memory to plan for, e.g. 2G (default: what is free).")
]
SkipVerify = Annotated[
    bool,
    typer.Option(
        "--insecure-skip-verify", help="Run without checking the signature (hashes are still checked)."
    ),
]
ModelArg = Annotated[
    Path, typer.Argument(help="A .phi bundle, an installed model's name, or an unpacked model folder.")
]


def _load(
    bundle: Path,
    store: Path | None,
    threads: int | None,
    context: int | None,
    memory_budget: str | None,
    insecure_skip_verify: bool,
) -> loader.LoadedModel:
    loaded = loader.load_model(
        bundle,
        store=Store(store),
        threads=threads,
        context=context,
        memory_budget=memory.parse_size(memory_budget) if memory_budget else None,
        insecure_skip_verify=insecure_skip_verify,
    )
    engine, plan = loaded.engine, loaded.plan
    if loaded.verification is not None and loaded.verification.warning:
        console.info(loaded.verification.warning)
    if plan.limited_by == "memory":
        console.info(f"(context limited to {plan.max_length} tokens by the memory budget; `--plan` explains)")
    most = plan.shape.max_image_tokens
    if engine.vision and most and engine.context < most + memory.MIN_CONTEXT:
        console.info(
            f"(a picture takes up to {most} tokens, a square one {image_tokens(1, 1)}; "
            f"the {engine.context}-token context may not hold one; `--plan` explains)"
        )
    return loaded


@app.command()
def run(
    bundle: ModelArg,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this and exit.")] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", help="A PNG or JPEG to ask a vision model about (repeatable)."),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_tokens: MaxTokens = 256,
    min_tokens: Annotated[int, typer.Option("--min-tokens", help="Fewest new tokens per answer.")] = 0,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    seed: Seed = None,
    repetition_penalty: Annotated[
        float | None, typer.Option("--repetition-penalty", help="> 1 discourages repeating tokens.")
    ] = None,
    no_repeat_ngram: Annotated[
        int, typer.Option("--no-repeat-ngram", help="Never repeat an n-gram of this size.")
    ] = 0,
    num_beams: Annotated[int, typer.Option("--num-beams", help="Beam search with this many beams.")] = 1,
    length_penalty: Annotated[
        float, typer.Option("--length-penalty", help="Beam search length penalty.")
    ] = 1.0,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
    ] = None,
    json_schema: Annotated[
        Path | None, typer.Option("--json-schema", help="Constrain the answer to this JSON schema (a file).")
    ] = None,
    regex: Annotated[str | None, typer.Option("--regex", help="Constrain the answer to this regex.")] = None,
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="Activate this LoRA adapter of the bundle.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per answer (for scripts).")
    ] = False,
    threads: Threads = None,
    context: Context = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="Print a line of statistics after each answer.")
    ] = False,
    insecure_skip_verify: SkipVerify = False,
    memory_budget: MemoryBudget = None,
    show_plan: Annotated[
        bool, typer.Option("--plan", help="Print the memory plan and exit without loading.")
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Chat with a model, or answer one prompt."""
    if json_schema is not None and not json_schema.is_file():
        raise ConfigError(f"--json-schema {json_schema} is not a file")
    # Read and check the pictures before the model loads: a bad file costs nothing then.
    pictures = [load_image(p) for p in image or ()]
    try:
        options = GenerationOptions(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram=no_repeat_ngram,
            num_beams=num_beams,
            length_penalty=length_penalty,
            stop=tuple(stop or ()),
            json_schema=json_schema.read_text(encoding="utf-8") if json_schema else None,
            regex=regex,
            adapter=adapter,
        )
    except ConfigError as exc:
        # The options' own words are their Python/JSON names; on this command line they are flags.
        raise ConfigError(as_flags(str(exc)), hint=exc.hint) from None
    if show_plan:
        budget = memory.parse_size(memory_budget) if memory_budget else None
        the_plan = loader.plan(
            bundle,
            context=context,
            memory_budget=budget,
            insecure_skip_verify=insecure_skip_verify,
            store=Store(store),
        )
        from edgephi.runtime.device import cpu_info

        print(f"{'device':<10}{cpu_info().describe()}")
        print(the_plan.describe())
        return
    engine = _load(bundle, store, threads, context, memory_budget, insecure_skip_verify).engine
    engine.check_images(pictures)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ConfigError(
                "stdin was empty", hint="give a prompt with -p, pipe one in, or run on a terminal to chat"
            )
    printer = repl.print_json if as_json else repl.print_answer
    if prompt is not None:
        # One answer and exit: a KV cache for that answer, not for a conversation to come.
        single = Conversation(engine, system=system, session=Session(engine, one_shot=True))
        printer(single, prompt, options, stats, pictures)
        return
    history = Store(store).root / "chat_history"
    repl.chat(Conversation(engine, system=system), options, stats, printer, pictures, repl.ChatLine(history))


_OPTION_NAMES = re.compile(
    r"\b(max_tokens|min_tokens|temperature|top_p|top_k|min_p|seed|repetition_penalty|no_repeat_ngram"
    r"|num_beams|length_penalty|json_schema|regex|adapter|stop)\b"
)


def as_flags(message: str) -> str:
    """``max_tokens must be at least 1`` as the command line spells it: ``--max-tokens …``."""
    return _OPTION_NAMES.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


@app.command("list")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array, for scripts.")] = False,
    store: StoreOpt = None,
) -> None:
    """List the installed models; * marks the version `edge-run NAME` runs."""
    the_store = Store(store)
    rows: list[dict[str, Any]] = []
    for m in the_store.installed():
        current = the_store.current(m.manifest.name)
        rows.append(
            {
                "name": m.manifest.name,
                "version": m.manifest.version,
                "current": current is not None and current.path == m.path,
                "precision": m.manifest.precision,
                "target": m.manifest.target.name or "?",
                "size_bytes": the_store.size(m),
                "installed": time.strftime("%Y-%m-%d %H:%M", time.localtime(m.path.stat().st_mtime)),
                "path": str(m.path),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        console.info("no models installed (`edge-run MODEL.phi` installs one)")
        return
    print(f"  {'NAME':<28} {'VERSION':<12} {'PRECISION':<9} {'TARGET':<14} {'SIZE':>9}  INSTALLED")
    for r in rows:
        mark = "*" if r["current"] else " "
        size = memory.format_size(r["size_bytes"])
        print(
            f"{mark} {r['name']:<28} {r['version']:<12} {r['precision']:<9} {r['target']:<14} "
            f"{size:>9}  {r['installed']}"
        )


@app.command("rm")
def remove(
    model: Annotated[str, typer.Argument(help="NAME (every version) or NAME:VERSION.")],
    store: StoreOpt = None,
) -> None:
    """Remove an installed model, or one version of it that is not the current one."""
    name, _, version = model.partition(":")
    the_store = Store(store)
    removed = the_store.remove(name, version or None)
    if not removed:
        raise BundleNotFound(f"{model} is not installed", hint="`edge-run list` shows what is")
    freed = memory.format_size(sum(the_store.size(m) for m in removed))
    print(f"removed {model} ({len(removed)} install{'s' if len(removed) > 1 else ''}, {freed})")


@app.command("verify")
def verify_cmd(
    model: Annotated[str, typer.Argument(help="NAME (its current version) or NAME:VERSION.")],
    store: StoreOpt = None,
) -> None:
    """Re-hash an installed model's files; a damaged copy is set aside so it cannot run."""
    name, _, version = model.partition(":")
    the_store = Store(store)
    found = the_store.find(name, version or None)
    if found is None:
        raise BundleNotFound(f"{model} is not installed", hint="`edge-run list` shows what is")
    start = time.perf_counter()
    problems = the_store.damage(found)
    took = time.perf_counter() - start
    ref = f"{found.manifest.name}:{found.manifest.version}"
    if problems:
        the_store.quarantine(found)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(
            f"{ref} is damaged: {problems[0]}{more}; it was set aside and will not run",
            hint="run its .phi again to reinstall it, or `edge-run update` from its channel",
        )
    size = memory.format_size(the_store.size(found))
    print(f"{ref}: {len(found.manifest.files)} files, {size}, every sha256 matches ({took:.2f} s)")


@app.command("prune")
def prune_cmd(
    model: Annotated[str | None, typer.Argument(help="One model (default: every installed one).")] = None,
    store: StoreOpt = None,
) -> None:
    """Remove old installs: never the current or previous version, nor one a running edge-run uses."""
    the_store = Store(store)
    names = [model] if model else sorted({m.manifest.name for m in the_store.installed()})
    freed = 0
    for name in names:
        sizes = {m.path: the_store.size(m) for m in the_store.installed(name)}
        for path in the_store.prune(name):
            freed += sizes.get(path, 0)
            print(f"removed {name} {path.name}")
    print(f"freed {memory.format_size(freed)}")


trust_app = typer.Typer(help="Manage the publisher keys this device trusts.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")


@trust_app.command("add")
def trust_add(
    key: Annotated[Path, typer.Argument(help="A publisher's public key (from edge-pack keygen).")],
    store: StoreOpt = None,
) -> None:
    """Trust a publisher key; from then on only bundles signed by a trusted key run."""
    trust = Store(store).trust
    added = trust.add(key)
    print(f"trusted key {added.key_id} ({trust.folder}); unsigned bundles are now refused")


@trust_app.command("remove")
def trust_remove(
    key: Annotated[str, typer.Argument(help="The key id (from `edge-run trust list`), or its file's name.")],
    store: StoreOpt = None,
) -> None:
    """Stop trusting a publisher key (a revoked or rotated one)."""
    trust = Store(store).trust
    removed = trust.remove(key)
    print(f"removed {', '.join(p.name for p in removed)} from {trust.folder}")
    if not trust.active:
        console.info("warning: that was the last trusted key; unsigned bundles run again, with a warning")


@trust_app.command("list")
def trust_list(store: StoreOpt = None) -> None:
    """List the trusted publisher keys, the keys rotated out, and the threshold."""
    trust = Store(store).trust
    keys = trust.keys()
    for problem in trust.unreadable():
        console.info(f"warning: {problem}; that key is not trusted (remove or replace the file)")
    if not trust.active:
        console.info(f"no trusted keys in {trust.folder}: unsigned bundles run, with a warning")
    for kid, key in keys.items():
        print(f"{kid}\t{key.comment}")
    for kid in trust.retired():
        print(f"{kid}\t(retired by a rotation)")
    if trust.active and trust.threshold > 1:
        console.info(f"each bundle and channel index needs {trust.threshold} of these keys' signatures")


@trust_app.command("threshold")
def trust_threshold(
    count: Annotated[int, typer.Argument(help="How many trusted keys must sign (1 to the number trusted).")],
    store: StoreOpt = None,
) -> None:
    """Require signatures by COUNT distinct trusted keys on every bundle and channel index."""
    trust = Store(store).trust
    trust.set_threshold(count)
    print(f"bundles and channel indexes now need {count} trusted signature(s) ({trust.policy_file})")


@trust_app.command("rotate")
def trust_rotate(
    statement: Annotated[Path, typer.Argument(help="A key rotation statement (keys/rotations.json entry).")],
    store: StoreOpt = None,
) -> None:
    """Take a publisher's key rotation by hand (updates take the channel's on their own)."""
    trust = Store(store).trust
    try:
        with open(statement, "rb") as fh:
            raw = fh.read(MAX_ROTATION_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {statement}: {exc.strerror or exc}") from None
    if len(raw) > MAX_ROTATION_BYTES:
        raise KeyFileError(f"{statement} is larger than a key rotation statement can be")
    rotation = trust.check_rotation(raw)
    if rotation is None:
        raise KeyFileError(
            f"{statement} hands over a key this device does not trust (or it was taken already)",
            hint="`edge-run trust list` shows the keys trusted here",
        )
    trust.rotate(rotation)
    print(f"trusted key {rotation.new.key_id} in place of {rotation.old} (retired)")


@app.command("update")
def update_cmd(
    channel_url: Annotated[str, typer.Argument(help="The channel: an http(s) URL or a folder.")],
    model: Annotated[
        str | None, typer.Argument(help="Model name (default: every installed one offered).")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Only say whether an update is available.")] = False,
    retry: Annotated[
        bool, typer.Option("--retry", help="Take again the versions of MODEL rolled back on this device.")
    ] = False,
    deadline: Annotated[
        float,
        typer.Option(
            "--deadline",
            min=1,
            help="Seconds all downloads may take; past it (or under 1 KB/s for 30 s) the update "
            "stops and the next one resumes.",
        ),
    ] = 3600,
    store: StoreOpt = None,
) -> None:
    """Update models from a signed channel: verify, download with resume, health-check, switch."""
    from edgephi.runtime import download, updater

    if retry:
        if model is None:
            raise ConfigError("--retry needs the MODEL whose rolled-back versions to take again")
        cleared = Store(store).clear_rejected(model)
        if cleared:
            console.info(f"({model}: {', '.join(sorted(cleared))} may be installed again)")
    pace = download.Pace(deadline=deadline)
    results = updater.update(
        channel_url, model, store=Store(store), check_only=check, say=console.info, pace=pace
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

    restored = updater.rollback(model, Store(store))
    print(
        f"{model}: rolled back to {restored.manifest.version}; updates skip the version rolled back "
        f"from until a newer one is published (`edge-run update CHANNEL {model} --retry` takes it again)"
    )


@app.command("hold")
def hold_cmd(
    model: Annotated[str, typer.Argument(help="The model to keep at its current version.")],
    off: Annotated[bool, typer.Option("--off", help="Let updates move it again.")] = False,
    store: StoreOpt = None,
) -> None:
    """Keep a model at its current version whatever its channel offers (for fleets that must not move)."""
    the_store = Store(store)
    current = the_store.current(model)
    if current is None:
        raise BundleNotFound(f"{model} is not installed", hint="`edge-run list` shows what is")
    the_store.hold(model, not off)
    print(f"{model}: {'released; updates may move it' if off else f'held at {current.manifest.version}'}")


@app.command()
def serve(
    bundle: ModelArg,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (keep 127.0.0.1 unless you mean it).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0 picks a free one).")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="EDGEPHI_API_KEY",
            help="Require Authorization: Bearer KEY (needed to listen beyond 127.0.0.1).",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option("--insecure-no-auth", help="Listen beyond 127.0.0.1 without an API key."),
    ] = False,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait; more get 503.")] = 8,
    max_body: Annotated[
        int | None,
        typer.Option(
            "--max-body", help="Largest request body in bytes (default 1 MiB, 32 MiB for a vision model)."
        ),
    ] = None,
    max_tokens: MaxTokens = 256,
    slots: Annotated[
        int | None,
        typer.Option(
            "--slots", help="Conversations whose KV cache is kept (default: what memory holds, up to 4)."
        ),
    ] = None,
    log: Annotated[
        bool,
        typer.Option(
            "--log/--no-log",
            help="One line per request on stderr: method, path, status, tokens, TTFT, time; never text.",
        ),
    ] = True,
    log_prompts: Annotated[
        bool,
        typer.Option("--log-prompts", help="Add each request's prompt and answer to its log line."),
    ] = False,
    threads: Threads = None,
    context: Context = None,
    memory_budget: MemoryBudget = None,
    insecure_skip_verify: SkipVerify = False,
    store: StoreOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API until SIGTERM or Ctrl-C."""
    from edgephi.runtime import server

    if not server.is_loopback(host) and api_key is None and not insecure_no_auth:
        raise ConfigError(
            f"--host {host} lets anyone who can reach this device use the model, and no --api-key is set",
            hint="give --api-key KEY (or EDGEPHI_API_KEY), or --insecure-no-auth on a network of yours alone",
        )
    if slots is not None:
        # Checked from the bundle's header, before anything is unpacked or loaded.
        planned = loader.plan(
            bundle,
            context=context,
            memory_budget=memory.parse_size(memory_budget) if memory_budget else None,
            insecure_skip_verify=insecure_skip_verify,
            store=Store(store),
        )
        holds = planned.kv_caches(slots)
        if slots > holds:
            raise ConfigError(
                f"--slots {slots} needs {slots} KV caches of {planned.max_length} tokens; "
                f"the memory budget holds {holds}",
                hint="ask for fewer slots, a smaller --context, or a larger --memory-budget",
            )
    loaded = _load(bundle, store, threads, context, memory_budget, insecure_skip_verify)
    engine, name, fit = loaded.engine, loaded.engine.model_name, loaded.plan.kv_caches()
    config = server.ServerConfig(
        model_name=name,
        host=host,
        api_key=api_key,
        port=port,
        max_queue=max_queue,
        max_body=max_body or (server.VISION_MAX_BODY if engine.vision else server.TEXT_MAX_BODY),
        max_tokens_default=max_tokens,
        slots=slots or fit,
        log_requests=log or log_prompts,
        log_prompts=log_prompts,
    )
    caches = f"{config.slots} conversation cache{'s' if config.slots > 1 else ''}"
    server.serve(
        engine, config, ready=lambda s: console.info(f"serving {name} on {s.url}/v1, {caches} (Ctrl-C stops)")
    )


@app.command()
def bench(
    bundle: ModelArg,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length for TTFT.")] = 128,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens generated per run.")] = 64,
    runs: Annotated[int, typer.Option("--runs", help="Measured runs (after one warm-up).")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    threads: Threads = None,
    context: Context = None,
    memory_budget: MemoryBudget = None,
    insecure_skip_verify: SkipVerify = False,
    store: StoreOpt = None,
) -> None:
    """Measure load time, time to first token, decode speed and peak memory on this device."""
    from edgephi.runtime import bench as benchmark

    result = benchmark.run(
        lambda: _load(bundle, store, threads, context, memory_budget, insecure_skip_verify).engine,
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        runs=runs,
    )
    print(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


# Every command and group registered above (a new one cannot be forgotten here).
_COMMANDS = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands} | {
    g.name or "" for g in app.registered_groups
}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # `run` is the default command: `edge-run model.phi …` means `edge-run run model.phi …`.
    if args and args[0] not in _COMMANDS and args[0] not in ("--help", "-h"):
        args.insert(0, "run")
    console.run_app(app, PROG, args)


if __name__ == "__main__":
    main()
