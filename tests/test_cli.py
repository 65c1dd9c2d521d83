"""The two CLIs as a user meets them: through typer's runner and as real processes."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import bundlekit
import pytest
import tiny
from conftest import build_bundle, start_serve
from edgephi.core.errors import StoreError
from edgephi.packager.cli import app as pack_app
from edgephi.runtime.cli import app as run_app
from edgephi.runtime.store import InUse, Store
from typer.testing import CliRunner


def exe(name: str) -> list[str]:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (pip install -e .)"
    return [found]


def test_targets_command_lists_profiles() -> None:
    result = CliRunner().invoke(pack_app, ["targets"])
    assert result.exit_code == 0
    assert "rpi5" in result.stdout and "android-arm64" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    # The precision each profile packs at (auto: chosen per model) and what auto chooses by.
    assert rows["rpi5"][:8] == ["rpi5", "cpu", "auto", "ctx", "2048", "8", "GB", "10"]
    assert rows["cuda"][:6] == ["cuda", "cuda", "int4", "ctx", "4096", "-"]


def test_inspect_shows_the_bundle(phi3_bundle: Path) -> None:
    result = CliRunner().invoke(pack_app, ["inspect", str(phi3_bundle)])
    assert result.exit_code == 0, result.output
    assert "phi35-tiny 1.0.0" in result.stdout and "Phi3ForCausalLM" in result.stdout
    data = json.loads(CliRunner().invoke(pack_app, ["inspect", str(phi3_bundle), "--json"]).stdout)
    assert data["name"] == "phi35-tiny" and len(data["digest"]) == 64


def test_edge_run_as_a_process_streams_an_answer(phi3_bundle: Path) -> None:
    proc = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-p", "Hi", "-n", "8", "-t", "0", "--stats"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "8 generated" in proc.stderr  # stats go to stderr, the answer alone to stdout


def test_piped_stdin_is_the_prompt(phi3_bundle: Path) -> None:
    direct = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-p", "Hi there", "-n", "8", "-t", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    piped = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-n", "8", "-t", "0"],
        input="Hi there\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == direct.stdout


class Terminal:
    """``edge-run`` on a pseudo-terminal, so it sees a real tty and chats."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = b""

    def type(self, line: bytes) -> None:
        os.write(self.master, line + b"\n")

    def wait_for(self, count: int, marker: bytes, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.seen.count(marker) < count and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:
                    break
        assert self.seen.count(marker) >= count, self.seen.decode(errors="replace")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)

    def prompt_tokens(self) -> list[int]:
        return [int(n) for n in re.findall(rb"\[(\d+) prompt tokens", self.seen)]

    def cached_tokens(self) -> list[int]:
        return [int(n) for n in re.findall(rb"prompt tokens \((\d+) cached\)", self.seen)]


def test_interactive_chat_on_a_terminal(phi3_bundle: Path) -> None:
    term = Terminal([*exe("edge-run"), str(phi3_bundle), "-n", "6", "-t", "0", "--stats"])
    term.wait_for(1, b"> ")
    term.type(b"first question")
    term.wait_for(1, b"6 generated")
    term.type(b"second question")
    term.wait_for(2, b"6 generated")
    term.type(b"/exit")
    assert term.close() == 0
    first, second = term.prompt_tokens()
    assert second > first + 6  # the second prompt carries the first exchange
    # ... which the KV cache already held: all of the first prompt at least came from it.
    cold, warm = term.cached_tokens()
    assert cold == 0 and warm >= first - 2


def test_corrupt_bundle_is_refused_in_one_line(phi3_bundle: Path, tmp_path: Path) -> None:
    data = bytearray(phi3_bundle.read_bytes())
    with zipfile.ZipFile(phi3_bundle) as zf:
        info = zf.getinfo("model/model.onnx.data")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 4096] ^= 0xFF
    bad = tmp_path / "bad.phi"
    bad.write_bytes(bytes(data))
    proc = subprocess.run(
        [*exe("edge-run"), str(bad), "-p", "Hi"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-run: error: model.onnx.data")
    assert "fresh copy" in lines[0]
    store = Store()
    assert store.installed() == []
    assert not store.staging_dir.exists() or list(store.staging_dir.iterdir()) == []


def test_missing_bundle_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*exe("edge-run"), str(tmp_path / "nope.phi"), "-p", "Hi"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"edge-run: error: {tmp_path / 'nope.phi'} does not exist — check the path to the .phi file"
    ]


def test_bad_option_is_exit_2_and_names_it(phi3_bundle: Path) -> None:
    result = CliRunner().invoke(run_app, ["run", str(phi3_bundle), "-p", "x", "--top-p", "3"])
    assert result.exit_code != 0
    proc = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-p", "x", "--top-p", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--top-p must be in (0, 1], not 3.0" in proc.stderr


def test_debug_variable_shows_the_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEPHI_DEBUG": "1"}
    proc = subprocess.run(
        [*exe("edge-run"), str(tmp_path / "nope.phi"), "-p", "Hi"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_list_shows_installed_models(phi3_bundle: Path) -> None:
    assert CliRunner().invoke(run_app, ["list"]).stdout == ""
    Store().install(phi3_bundle)  # installed, but not run: no version is current yet
    lines = CliRunner().invoke(run_app, ["list"]).stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "PRECISION"]
    assert lines[1].split()[:4] == ["phi35-tiny", "1.0.0", "int4", "cpu"]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_works(argv: list[str]) -> None:
    assert CliRunner().invoke(run_app, argv).exit_code == 0


def test_cli_build_signs_and_versions_a_bundle(tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "k.key"
    assert runner.invoke(pack_app, ["keygen", str(key)]).exit_code == 0
    out = tmp_path / "llama.phi"
    result = runner.invoke(
        pack_app,
        [
            "build",
            str(tiny.tiny_model("llama")),
            "-o",
            str(out),
            "--version",
            "2.1.0",
            "--name",
            "tiny-llama",
            "--sign-key",
            str(key),
            "--target",
            "x86-64",
            "--context",
            "512",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(runner.invoke(pack_app, ["inspect", str(out), "--json"]).stdout)
    assert (data["name"], data["version"], data["target"]["name"]) == ("tiny-llama", "2.1.0", "x86-64")
    assert data["model"]["default_context"] == 512 and len(data["signed_by"]) == 1
    assert runner.invoke(pack_app, ["verify", str(out), "--key", f"{key}.pub"]).exit_code == 0


def test_bundle_for_another_cpu_is_refused_before_unpacking(phi3_bundle: Path, tmp_path: Path) -> None:
    import dataclasses

    from edgephi.packager import writer
    from edgephi.runtime.device import machine_arch

    installed = Store().install(phi3_bundle)
    other = "x86_64" if machine_arch() == "aarch64" else "aarch64"
    manifest = dataclasses.replace(
        installed.manifest, target=dataclasses.replace(installed.manifest.target, arch=other)
    )
    foreign = tmp_path / "foreign.phi"
    writer.write_bundle(foreign, manifest, installed.path)
    proc = subprocess.run(
        [*exe("edge-run"), str(foreign), "-p", "Hi"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert f"built for {other} CPUs" in line and "edge-pack build --target" in line
    assert [m.manifest.digest for m in Store().installed()] == [installed.manifest.digest]


def test_json_output_mode(phi3_bundle: Path) -> None:
    proc = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-p", "Hi", "-n", "5", "-t", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["text"] and record["stats"]["generated_tokens"] == 5 and record["dropped_exchanges"] == 0


def test_chat_commands_reset_and_system(phi3_bundle: Path) -> None:
    term = Terminal([*exe("edge-run"), str(phi3_bundle), "-n", "4", "-t", "0", "--stats"])
    term.wait_for(1, b"> ")
    for i, line in enumerate([b"first question", b"second question"], start=1):
        term.type(line)
        term.wait_for(i, b"4 generated")
    term.type(b"/reset")
    term.wait_for(1, b"(conversation cleared)")
    term.type(b"/system You are terse.")
    term.wait_for(1, b"(system message set)")
    term.type(b"third question")
    term.wait_for(3, b"4 generated")
    term.type(b"/nonsense")
    term.wait_for(2, b"/reset clears")  # once in the banner, once as the answer to /nonsense
    term.type(b"/exit")
    assert term.close() == 0
    first, second, third = term.prompt_tokens()
    assert second > first  # history kept
    assert third < second  # /reset dropped it (the new system message is shorter than an exchange)


def test_the_chat_line_edits_remembers_and_takes_several_lines(phi3_bundle: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    argv = [*exe("edge-run"), str(phi3_bundle), "-n", "4", "-t", "0", "--stats", "--store", str(home)]
    term = Terminal(argv)
    term.wait_for(1, b"> ")
    term.type(b"first question")
    term.wait_for(2, b"> ")
    # Up-arrow brings the last line back (no raw ^[[A reaches the model); Ctrl-A and
    # typing edit it at its start.
    term.type(b"\x1b[A\x01edited ")
    term.wait_for(3, b"> ")
    term.type(b'"""')
    term.type(b"line one")
    term.type(b'line two"""')
    term.wait_for(4, b"> ")
    term.type(b"/exit")
    assert term.close() == 0
    assert b"^[[A" not in term.seen
    assert term.seen.count(b"4 generated") == 3  # three turns: the multi-line message was one
    assert term.seen.count(b"(cut at --max-tokens 4") == 3
    history = (home / "chat_history").read_text().splitlines()
    assert history[:2] == ["first question", "edited first question"]


def _one_error_line(proc: subprocess.CompletedProcess[str], prog: str = "edge-run") -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, proc.stderr
    assert proc.stderr.strip().endswith(lines[0])  # nothing after it: no box, no traceback
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says", "code"),
    [
        (["-n", "0"], "error: --max-tokens must be at least 1, not 0 — fix the option named above", 2),
        (["-t", "0", "--seed", "3"], "error: --temperature 0 means greedy decoding; --seed only apply", 2),
        (["--bogus"], "error: No such option: --bogus — see `edge-run run --help`", 2),
        (["-n", "many"], "'--max-tokens' / '-n': Input should be a valid integer", 2),
    ],
)
def test_option_errors_are_one_line_naming_the_flag(
    phi3_bundle: Path, args: list[str], says: str, code: int
) -> None:
    proc = subprocess.run(
        [*exe("edge-run"), "run", str(phi3_bundle), "-p", "Hi", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code
    assert says in _one_error_line(proc)


def test_a_gguf_given_to_edge_run_is_named_with_the_command_that_packs_it(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    proc = subprocess.run(
        [*exe("edge-run"), str(gguf), "-p", "Hi"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert f"{gguf} is a GGUF model file, not a .phi bundle" in line
    assert f"edge-pack build {gguf} -o model.Q4_K_M.phi" in line


def test_a_busy_port_is_named_with_the_option_that_moves_it(phi3_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*exe("edge-run"), "serve", str(phi3_bundle), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line
    assert "pick another --port" in line


def test_a_memory_budget_too_small_for_an_int4_bundle_does_not_suggest_int4(phi3_bundle: Path) -> None:
    proc = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-p", "Hi", "--memory-budget", "10M"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = _one_error_line(proc)
    assert "leaves room for" in line and "int4" not in line


def test_verify_without_a_key_says_it_checked_no_signature(phi3_bundle: Path) -> None:
    proc = subprocess.run(
        [*exe("edge-pack"), "verify", str(phi3_bundle)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"OK {phi3_bundle}: ")
    assert "signature NOT checked (give --key KEY.pub to check it)" in proc.stdout


def test_an_unsigned_bundle_refused_by_the_trust_store_asks_for_a_signed_one(
    phi3_bundle: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    subprocess.run([*exe("edge-pack"), "keygen", str(tmp_path / "k")], check=True, capture_output=True)
    subprocess.run(
        [*exe("edge-run"), "trust", "add", str(tmp_path / "k.pub"), "--store", str(home)],
        check=True,
        capture_output=True,
    )
    proc = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-p", "Hi", "--store", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "the bundle is unsigned" in line and "ask its publisher for a signed build" in line
    assert "trust add" not in line


def test_installed_models_run_list_and_go_by_name(tmp_path: Path) -> None:
    """Ollama's habits: the first install of a name is current, NAME[:VERSION] runs, rm removes."""
    home = ["--store", str(tmp_path / "home")]
    v1, v2 = (
        build_bundle(tiny.tiny_model("llama"), tmp_path / f"v{v}.phi", name="names", version=v)
        for v in ("1.0.0", "1.1.0")
    )

    def edge_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*exe("edge-run"), *args, *home], capture_output=True, text=True, timeout=120)

    by_file = edge_run(str(v1), "-p", "Hi", "-n", "4", "-t", "0")
    assert by_file.returncode == 0, by_file.stderr
    assert edge_run(str(v2), "-p", "Hi", "-n", "4", "-t", "0").returncode == 0  # installed, not current
    for ref in ("names", "names:1.0.0"):
        by_name = edge_run(ref, "-p", "Hi", "-n", "4", "-t", "0")
        assert by_name.returncode == 0 and by_name.stdout == by_file.stdout, by_name.stderr
    assert edge_run("names:1.1.0", "-p", "Hi", "-n", "4", "-t", "0").returncode == 0
    missing = edge_run("names:9.9.9", "-p", "Hi")
    assert "names has no version 9.9.9 installed; it has 1.0.0, 1.1.0" in _one_error_line(missing)

    listing = edge_run("list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "VERSION", "PRECISION", "TARGET", "SIZE", "INSTALLED"]
    assert [ln.split()[:3] for ln in listing[1:]] == [["*", "names", "1.0.0"], ["names", "1.1.0", "int8"]]
    rows = json.loads(edge_run("list", "--json").stdout)
    assert [(r["version"], r["current"]) for r in rows] == [("1.0.0", True), ("1.1.0", False)]
    assert all(r["size_bytes"] > 1 << 20 for r in rows)

    refused = edge_run("rm", "names:1.0.0")
    assert refused.returncode == 1
    assert "names:1.0.0 is the current version of names" in _one_error_line(refused)
    assert edge_run("rm", "names:1.1.0").stdout.startswith("removed names:1.1.0 (1 install, ")
    assert [r["version"] for r in json.loads(edge_run("list", "--json").stdout)] == ["1.0.0"]
    assert edge_run("rm", "names").returncode == 0
    assert json.loads(edge_run("list", "--json").stdout) == []
    assert "names is not installed" in _one_error_line(edge_run("rm", "names"))


def test_a_model_in_use_is_not_removed_and_prune_keeps_what_matters(tmp_path: Path) -> None:
    home = tmp_path / "home"
    versions = ("1.0.0", "1.1.0", "1.2.0")
    bundles = [
        build_bundle(tiny.tiny_model("llama"), tmp_path / f"v{v}.phi", name="busy", version=v)
        for v in versions
    ]
    store = Store(home)
    for b in bundles:
        store.install(b)
    store.switch(store.find("busy", "1.0.0"))  # type: ignore[arg-type]
    store.switch(store.find("busy", "1.1.0"))  # type: ignore[arg-type]  (1.0.0 is previous now)
    server, _ = start_serve("busy:1.1.0", "--store", str(home))
    try:
        refused = subprocess.run(
            [*exe("edge-run"), "rm", "busy", "--store", str(home)], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1
        assert "busy 1.1.0 is in use by a running edge-run" in _one_error_line(refused)
        assert len(store.installed("busy")) == 3  # nothing was removed
        pruned = subprocess.run(
            [*exe("edge-run"), "prune", "--store", str(home)], capture_output=True, text=True, timeout=60
        )
        assert pruned.returncode == 0, pruned.stderr
        # 1.2.0 was neither current (1.1.0, and in use) nor previous (1.0.0): it went.
        assert sorted(m.manifest.version for m in store.installed("busy")) == ["1.0.0", "1.1.0"]
        assert pruned.stdout.splitlines()[-1].startswith("freed ")
    finally:
        server.terminate()
        server.wait(timeout=60)
    removed = subprocess.run(
        [*exe("edge-run"), "rm", "busy", "--store", str(home)], capture_output=True, text=True, timeout=60
    )
    assert removed.returncode == 0 and removed.stdout.startswith("removed busy (2 installs, ")


def test_a_rebuild_of_an_installed_version_replaces_it(tmp_path: Path) -> None:
    """Running a rebuilt bundle of the same NAME:VERSION leaves one copy, the new one, current."""
    store = Store(tmp_path / "home")
    first = store.install(bundlekit.good_bundle(tmp_path / "a.phi", created_at="2026-01-01T00:00:00Z"))
    store.adopt(first)
    held = InUse(first.path)  # a chat still reading the old copy
    second = store.install(bundlekit.good_bundle(tmp_path / "b.phi", created_at="2026-02-01T00:00:00Z"))
    assert second.path != first.path and not second.reused
    for ref in (store.find("tiny"), store.find("tiny", "1.0.0")):
        assert ref is not None and ref.path == second.path
    assert first.path.is_dir()  # in use: left for prune
    del held
    assert store.prune("tiny") == [first.path] and not first.path.exists()
    third = store.install(bundlekit.good_bundle(tmp_path / "c.phi", created_at="2026-03-01T00:00:00Z"))
    assert [m.path for m in store.installed("tiny")] == [third.path]
    assert store.current("tiny").path == third.path  # type: ignore[union-attr]


def test_threads_past_the_cores_and_a_never_expiring_channel_are_refused(
    phi3_bundle: Path, tmp_path: Path
) -> None:
    cores = len(os.sched_getaffinity(0))
    run = subprocess.run(
        [*exe("edge-run"), str(phi3_bundle), "-p", "Hi", "--threads", "100000"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EDGEPHI_HOME": str(tmp_path / "home")},
    )
    assert run.returncode == 2  # a usage error
    assert f"--threads 100000 is not between 1 and the {cores} cores" in _one_error_line(run)
    subprocess.run([*exe("edge-pack"), "keygen", str(tmp_path / "k")], check=True, capture_output=True)
    signed = tmp_path / "s.phi"
    subprocess.run(
        [
            *exe("edge-pack"),
            "sign",
            str(bundlekit.good_bundle(tmp_path / "u.phi")),
            "-o",
            str(signed),
            "--key",
            str(tmp_path / "k"),
        ],
        check=True,
        capture_output=True,
    )
    published = subprocess.run(
        [
            *exe("edge-pack"),
            "publish",
            str(signed),
            str(tmp_path / "ch"),
            "--key",
            str(tmp_path / "k"),
            "--expires-days",
            "36500000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert published.returncode == 2
    assert "--expires-days must be above 0 and at most 3660" in _one_error_line(published, "edge-pack")
    assert not (tmp_path / "ch" / "index.json").exists()


def test_an_install_that_would_not_fit_is_refused_before_writing(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StoreError, match=r"installing big needs \d+ MB free on .*, there is \d+ MB"):
        store.check_space(free, "installing big")  # the margin makes even "all of it" too much
    store.check_space(1 << 20, "installing small")
    assert not store.root.exists()  # a check writes nothing


def test_a_damaged_install_is_found_set_aside_and_reinstalled(phi3_bundle: Path, tmp_path: Path) -> None:
    home = ["--store", str(tmp_path / "home")]
    store = Store(tmp_path / "home")

    def edge_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*exe("edge-run"), *args, *home], capture_output=True, text=True, timeout=120)

    first = edge_run(str(phi3_bundle), "-p", "Hi", "-n", "4", "-t", "0")
    assert first.returncode == 0, first.stderr
    ok = edge_run("verify", "phi35-tiny")
    assert ok.returncode == 0 and "every sha256 matches" in ok.stdout, ok.stderr
    # Bytes flipped in place (a failing card): same size, so only a re-hash sees it.
    weights = store.current("phi35-tiny").path / "model.onnx.data"  # type: ignore[union-attr]
    data = bytearray(weights.read_bytes())
    data[1000:3000] = bytes(b ^ 0xFF for b in data[1000:3000])
    weights.write_bytes(bytes(data))
    bad = edge_run("verify", "phi35-tiny")
    assert bad.returncode == 1
    line = _one_error_line(bad)
    assert "phi35-tiny:1.0.0 is damaged: model.onnx.data does not match its sha256; it was set aside" in line
    assert "run its .phi again to reinstall it" in line
    gone = _one_error_line(edge_run("phi35-tiny", "-p", "Hi"))
    assert "phi35-tiny's installed copy was set aside as damaged" in gone
    again = edge_run(str(phi3_bundle), "-p", "Hi", "-n", "4", "-t", "0")
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    assert edge_run("verify", "phi35-tiny").returncode == 0
    # A file cut short is seen at the next run of the bundle (sizes are checked each time).
    tokenizer = store.current("phi35-tiny").path / "tokenizer.json"  # type: ignore[union-attr]
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    third = edge_run(str(phi3_bundle), "-p", "Hi", "-n", "4", "-t", "0")
    assert third.returncode == 0 and third.stdout == first.stdout, third.stderr
    assert edge_run("verify", "phi35-tiny").returncode == 0
    assert edge_run("prune").returncode == 0 and not list(
        (store.models_dir / "phi35-tiny").glob(".damaged-*")
    )
