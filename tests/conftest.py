"""Shared fixtures: real assets (cached), tiny real-architecture models, built bundles.

Expensive things are built once per session: tiny models are cached on disk across
sessions (they depend only on their spec); bundles are rebuilt each session, because the
code that builds them is what is under test.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import assets  # noqa: E402
import tiny  # noqa: E402
from edgephi import targets  # noqa: E402
from edgephi.packager.config import BuildConfig  # noqa: E402
from edgephi.runtime import load  # noqa: E402
from edgephi.runtime.engine import Engine  # noqa: E402
from edgephi.runtime.server import ModelServer, ServerConfig  # noqa: E402
from edgephi.runtime.store import Store  # noqa: E402
from edgephi.targets import Precision  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own model store and no user target profiles."""
    home = tmp_path / "edgephi-home"
    monkeypatch.setenv("EDGEPHI_HOME", str(home))
    monkeypatch.setenv("EDGEPHI_TARGETS", str(tmp_path / "no-user-targets"))
    monkeypatch.delenv("EDGEPHI_DEBUG", raising=False)
    monkeypatch.delenv("EDGEPHI_TRUST", raising=False)
    from edgephi.targets import registry

    registry.reset()
    yield home
    registry.reset()


@pytest.fixture
def store(_isolated_store: Path) -> Store:
    return Store(_isolated_store)


_PEAK_RSS = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.stderr.write(proc.stderr)
"""


def edge_run_peak(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> tuple[int, int, str]:
    """``edge-run ARGS`` as a child of a small watcher: its exit status, its peak RSS in bytes
    (the kernel's own count, ``ru_maxrss``), and its stderr."""
    exe = str(Path(sys.executable).with_name("edge-run"))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, exe, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    code, peak = (int(x) for x in out.stdout.split())
    return code, peak, out.stderr


@contextlib.contextmanager
def serving(engine: Engine, **config: Any) -> Iterator[ModelServer]:
    """``engine`` served on a free port on a thread of this process, until the block ends."""
    srv = ModelServer(engine, ServerConfig(model_name=engine.model_name, port=0, **config))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        thread.join(timeout=30)


def start_serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    """``edge-run serve ARGS --port 0`` in its own process, once it says it is serving: the
    process (stderr piped, the rest of its log) and the server's base URL."""
    exe = str(Path(sys.executable).with_name("edge-run"))
    proc = subprocess.Popen([exe, "serve", *args, "--port", "0"], stderr=subprocess.PIPE, text=True)
    line, deadline = "", time.monotonic() + 120
    while "serving" not in line:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"edge-run serve did not start: {line or proc.stderr.read()}")  # type: ignore[union-attr]
        line = proc.stderr.readline()  # type: ignore[union-attr]
    return proc, line.split(" on ")[1].split("/v1")[0]


def build_bundle(source: Path | str, out: Path, **kw: object) -> Path:
    from edgephi.packager import pipeline

    target = targets.get(str(kw.pop("target", "cpu")))
    config = BuildConfig(source=str(source), output=out, target=target, **kw)  # type: ignore[arg-type]
    pipeline.build(config)
    return out


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def phi3_dir() -> Path:
    return tiny.tiny_model("phi3.5-mini")


# The stand-ins for Phi-3.5-mini, Phi-3.5-vision and the runtime's SmolLM2 are INT4: what the
# real Phi models pack to on every CPU target (--precision auto; a tiny model would get
# INT8), and the INT4 recipes are compared against the SmolLM2 one (test_quality.py).
# The demo's auto-chosen INT8 SmolLM2 is built by test_quality.py and test_emulated_pi.py.


@pytest.fixture(scope="session")
def phi3_bundle(phi3_dir: Path, bundles_dir: Path) -> Path:
    return build_bundle(
        phi3_dir, bundles_dir / "phi35-tiny.phi", name="phi35-tiny", version="1.0.0", precision=Precision.INT4
    )


@pytest.fixture(scope="session")
def vision_dir() -> Path:
    return tiny.tiny_vision_model()


@pytest.fixture(scope="session")
def vision_bundle(vision_dir: Path, bundles_dir: Path) -> Path:
    return build_bundle(
        vision_dir,
        bundles_dir / "phi35-vision-tiny.phi",
        name="phi35-vision-tiny",
        version="1.0.0",
        precision=Precision.INT4,
    )


@pytest.fixture(scope="session")
def smollm2_bundle(bundles_dir: Path) -> Path:
    return build_bundle(assets.smollm2_gguf(), bundles_dir / "smollm2.phi", precision=Precision.INT4)


# The two bundles loaded once per test module, each module with its own store.


@pytest.fixture(scope="module")
def phi(phi3_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return load(phi3_bundle, store=Store(tmp_path_factory.mktemp("phi-store")))


@pytest.fixture(scope="module")
def smol(smollm2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return load(smollm2_bundle, store=Store(tmp_path_factory.mktemp("smol-store")))


@pytest.fixture(scope="session")
def target_bundle(bundles_dir: Path):  # type: ignore[no-untyped-def]
    """``target_bundle(name)``: the tiny Llama built for device profile ``name``, once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_bundle(
                tiny.tiny_model("llama"), bundles_dir / f"llama-{name}.phi", target=name, name=f"llama-{name}"
            )
        return built[name]

    return get
