"""Hostile chat templates: a bundle's template is code, and og renders it with no limits.

Each template here took the process down or froze it before templates were rendered in
the forked sandbox (``edgephi.runtime.sandbox``): a macro that calls itself (SIGSEGV),
nested loops (the GIL held: /health silent, SIGTERM ignored), a string doubled until it
holds gigabytes. Now each is one error line (CLI) or an OpenAI-shaped 500 (server), the
server keeps answering meanwhile, and an update to such a release fails its health check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import serving
from edgephi.core.errors import TemplateError
from edgephi.runtime import sandbox
from edgephi.runtime.engine import Engine
from edgephi.runtime.store import Store

pytestmark = pytest.mark.skipif(not sandbox.available(), reason="the template sandbox needs fork()")

HOSTILE = {
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "loops": "{% for a in range(20000) %}{% for b in range(20000) %}{% endfor %}{% endfor %}",
    "memory": "{% set s = namespace(t='xxxxxxxxxxxxxxxx') %}"
    "{% for i in range(40) %}{% set s.t = s.t + s.t %}{% endfor %}{{ s.t | length }}",
}


def with_template(model: Path, out: Path, template: str) -> Path:
    """A copy of the installed model folder ``model`` whose chat template is ``template``."""
    shutil.copytree(model, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = out / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["chat_template"] = template
    config.write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def model(phi3_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Store(tmp_path_factory.mktemp("store")).install(phi3_bundle).path


def edge_run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("edge-run"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_template_is_one_error_line(case: str, model: Path, tmp_path: Path) -> None:
    folder = with_template(model, tmp_path / "m", HOSTILE[case])
    start = time.monotonic()
    out = edge_run(str(folder), "-p", "hi", "--max-tokens", "2")
    took = time.monotonic() - start
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr  # not -11 (SIGSEGV), not a hang
    assert len(lines) == 1 and "chat template was stopped" in lines[0], out.stderr
    assert took < 60


def test_a_good_template_renders_as_before(model: Path) -> None:
    # The sandbox changes where the template runs, not what it gives.
    engine = Engine(model)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello — how can I help? ✓"},
        {"role": "user", "content": "Name a colour."},
    ]
    rendered = engine.format_prompt(messages)
    direct = engine._tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert rendered == direct and "help? ✓" in rendered and rendered.count("<|user|>") == 2


def test_the_server_answers_health_while_a_template_loops_and_says_500(model: Path, tmp_path: Path) -> None:
    engine = Engine(with_template(model, tmp_path / "m", HOSTILE["loops"]))
    with serving(engine) as server:
        result: dict[str, object] = {}

        def ask() -> None:
            body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
            request = urllib.request.Request(
                f"{server.url}/v1/chat/completions", body, {"Content-Type": "application/json"}
            )
            try:
                urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as exc:
                result["status"], result["body"] = exc.code, json.loads(exc.read())

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(1.0)  # the template is looping now
        start = time.monotonic()
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as resp:
            assert resp.status == 200
        assert time.monotonic() - start < 2  # not held up by the loop
        asker.join(60)
    assert result["status"] == 500
    error = result["body"]["error"]  # type: ignore[index]
    assert error["code"] == "chat_template" and "chat template was stopped" in error["message"]


def test_an_engine_refuses_a_hostile_template_and_stays_usable(model: Path, tmp_path: Path) -> None:
    engine = Engine(with_template(model, tmp_path / "m", HOSTILE["memory"]))
    with pytest.raises(TemplateError, match="chat template was stopped"):
        engine.format_prompt([{"role": "user", "content": "hi"}])
    # The same process generates from a plain prompt afterwards.
    assert "".join(engine.stream_prompt("hello", None))
