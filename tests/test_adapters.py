"""LoRA adapters shipped in a bundle and switched at run time, per request."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import tiny
from conftest import serving
from edgephi.core.errors import ConfigError
from edgephi.packager.cli import app as pack_app
from edgephi.runtime import load
from edgephi.runtime.engine import Engine
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.session import ADAPTER_NOTE
from edgephi.runtime.store import Store
from typer.testing import CliRunner

HI = [{"role": "user", "content": "Hello there"}]


def greedy(adapter: str | None = None) -> GenerationOptions:
    return GenerationOptions(max_tokens=12, temperature=0.0, adapter=adapter)


@pytest.fixture(scope="module")
def lora_bundle(bundles_dir: Path) -> Path:
    out = bundles_dir / "llama-lora.phi"
    result = CliRunner().invoke(
        pack_app,
        [
            "build",
            str(tiny.tiny_model("llama")),
            "-o",
            str(out),
            "--name",
            "llama-lora",
            "--adapter",
            f"formal={tiny.tiny_lora('formal', 1)}",
            "--adapter",
            f"pirate={tiny.tiny_lora('pirate', 2)}",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def engine(lora_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return load(lora_bundle, store=Store(tmp_path_factory.mktemp("lora-store")))


def test_the_bundle_carries_the_adapters(engine: Engine, lora_bundle: Path) -> None:
    assert engine.adapter_names == ["formal", "pirate"]
    inspect = CliRunner().invoke(pack_app, ["inspect", str(lora_bundle)]).stdout
    assert "adapters/formal.onnx_adapter" in inspect and "adapters/pirate.onnx_adapter" in inspect


def test_an_adapter_changes_the_output_and_switching_back_restores_it(
    engine: Engine,
    target_bundle,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    base = engine.generate(HI, greedy()).text
    formal = engine.generate(HI, greedy("formal")).text
    pirate = engine.generate(HI, greedy("pirate")).text
    assert len({base, formal, pirate}) == 3
    assert engine.generate(HI, greedy()).text == base
    assert engine.generate(HI, greedy("formal")).text == formal
    # Another adapter needs a new generator: the answer says so; the same adapter then reuses it.
    longer = [{"role": "user", "content": "Hello there, how are the ships and the sailors today?"}]
    first = engine.generate(longer, greedy("pirate"))
    assert first.stats.cache_note == ADAPTER_NOTE and first.stats.cached_tokens == 0
    same = engine.generate(longer, greedy("pirate"))
    assert same.text == first.text and same.stats.cache_note == "" and same.stats.cached_tokens > 0
    # With no adapter active the model is the plain base model.
    plain = load(target_bundle("cpu"), store=Store(tmp_path / "s"))
    assert plain.generate(HI, greedy()).text == base


def test_an_unknown_adapter_is_named(engine: Engine) -> None:
    with pytest.raises(ConfigError, match=r"formal, pirate"):
        engine.generate(HI, greedy("sailor"))


def test_the_server_switches_adapters_per_request(engine: Engine) -> None:
    with serving(engine) as server:

        def ask(adapter: str | None) -> str:
            body = {"messages": HI, "max_tokens": 12, "temperature": 0}
            if adapter:
                body["adapter"] = adapter
            req = urllib.request.Request(
                server.url + "/v1/chat/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                return str(json.loads(resp.read())["choices"][0]["message"]["content"])

        assert ask("pirate") == engine.generate(HI, greedy("pirate")).text
        assert ask(None) == engine.generate(HI, greedy()).text
        assert ask("formal") != ask("pirate")


def test_bad_adapter_specs_are_refused(tmp_path: Path) -> None:
    from edgephi.packager import adapters

    with pytest.raises(ConfigError, match=r"adapter_config\.json"):
        adapters.parse([f"x={tmp_path}"])
    with pytest.raises(ConfigError, match="adapter name"):
        adapters.parse([f"Bad Name={tiny.tiny_lora('formal', 1)}"])
