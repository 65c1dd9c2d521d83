"""The memory planner: hand-checked numbers, the cgroup reader, and real processes kept in budget."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import edge_run_peak
from edgephi.core.errors import ConfigError, InsufficientMemory
from edgephi.runtime import bundle, load, memory
from edgephi.runtime.chat import Conversation
from edgephi.runtime.loader import load_model
from edgephi.runtime.loader import plan as plan_for
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.store import Store

MIB, GIB = 1 << 20, 1 << 30

# Phi-3.5-mini-instruct: 32 layers, 32 KV heads of 96 dims, hidden 3072, vocab 32064, 128k context.
PHI35_MINI = memory.ModelShape(
    weights_bytes=2_200_000_000,
    kv_bytes_per_token=2 * 32 * 32 * 96 * 4,
    num_attention_heads=32,
    hidden_size=3072,
    vocab_size=32064,
    context_length=131072,
    default_context=131072,
    lm_head_pruned=True,
)


def test_phi35_mini_kv_cache_at_full_context_is_96_gib() -> None:
    assert PHI35_MINI.kv_bytes_per_token == 768 * 1024  # 768 KiB per token in fp32
    assert PHI35_MINI.kv_bytes_per_token * 131072 == 96 * GIB


def test_phi35_mini_need_by_hand() -> None:
    # 160 MiB runtime + 1.5 x 2.2 GB weights + 2048 x 768 KiB KV
    # + prefill: 2048^2 x 4 B scores + 2048 x 3072 x 4 B x 24 activations + 32064 x 4 B logits (pruned head)
    expected = 167_772_160 + 3_300_000_000 + 1_610_612_736 + 16_777_216 + 603_979_776 + 128_256
    assert PHI35_MINI.need(2048) == expected


def test_phi35_mini_on_a_4_gib_pi_gets_a_bounded_context() -> None:
    p = memory.plan(PHI35_MINI, budget=4 * GIB, budget_source="test")
    assert p.limited_by == "memory"
    assert PHI35_MINI.need(p.max_length) <= 4 * GIB < PHI35_MINI.need(p.max_length + 1)
    assert 512 < p.max_length < 1024  # ~0.8k tokens, not 128k
    assert "limited by memory" in p.describe()


def test_phi35_mini_on_a_2_gib_device_is_refused_with_numbers() -> None:
    with pytest.raises(InsufficientMemory) as info:
        memory.plan(PHI35_MINI, budget=2 * GIB, budget_source="--memory-budget")
    message = str(info.value)
    assert "3.2 GiB before any context" in message and "768.0 KiB" in message and "2.0 GiB" in message


def test_requested_context_and_model_limit() -> None:
    assert memory.plan(PHI35_MINI, requested=4096, budget=None).max_length == 4096
    p = memory.plan(PHI35_MINI, requested=10**6, budget=None)
    assert (p.max_length, p.limited_by) == (131072, "model")


def test_plans_from_real_bundles(phi3_bundle: Path, smollm2_bundle: Path) -> None:
    tiny_plan = plan_for(phi3_bundle, memory_budget=1 * GIB)
    shape = tiny_plan.shape
    # tiny Phi-3.5: 2 layers x 4 KV heads x 32 dims x K,V x 4 B
    assert shape.kv_bytes_per_token == 2 * 4 * 32 * 2 * 4 and shape.num_attention_heads == 4
    assert shape.lm_head_pruned and tiny_plan.max_length == 2048
    smol = plan_for(smollm2_bundle, memory_budget=400 * MIB)
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x K,V x 4 B = 45 KiB per token
    assert smol.shape.kv_bytes_per_token == 46080
    assert smol.shape.need(smol.max_length) <= 400 * MIB < smol.shape.need(smol.max_length + 1)


@pytest.mark.parametrize(
    ("text", "value"), [("2G", 2 * GIB), ("512M", 512 * MIB), ("1.5GiB", 3 * GIB // 2), ("1000", 1000)]
)
def test_parse_size(text: str, value: int) -> None:
    assert memory.parse_size(text) == value


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="like 2G"):
        memory.parse_size("lots")


def fake_root(tmp: Path, cgroup: str, files: dict[str, str], meminfo_kb: int = 8 * 1024 * 1024) -> Path:
    (tmp / "proc/self").mkdir(parents=True)
    (tmp / "proc/meminfo").write_text(f"MemTotal: 16000000 kB\nMemAvailable: {meminfo_kb} kB\n")
    (tmp / "proc/self/cgroup").write_text(cgroup)
    for rel, content in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(content)
    return tmp


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        "0::/user.slice/app.scope\n",
        {
            "sys/fs/cgroup/user.slice/app.scope/memory.max": "1073741824\n",
            "sys/fs/cgroup/user.slice/app.scope/memory.current": "268435456\n",
        },
    )
    assert memory.cgroup_room(root) == 768 * MIB
    assert memory.available_memory(root) == 768 * MIB  # the cgroup is tighter than MemAvailable


def test_cgroup_v2_max_means_unlimited(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        "0::/a\n",
        {"sys/fs/cgroup/a/memory.max": "max\n", "sys/fs/cgroup/a/memory.current": "1000\n"},
        meminfo_kb=1024,
    )
    assert memory.cgroup_room(root) is None
    assert memory.available_memory(root) == 1024 * 1024


def test_cgroup_v2_limit_on_an_ancestor(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        "0::/parent/child\n",
        {
            "sys/fs/cgroup/parent/memory.max": "2147483648\n",
            "sys/fs/cgroup/parent/memory.current": "1073741824\n",
            "sys/fs/cgroup/parent/child/memory.max": "max\n",
        },
    )
    assert memory.cgroup_room(root) == 1 * GIB


def test_cgroup_v1_limit_and_unlimited(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path / "a",
        "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n",
        {
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": "536870912\n",
            "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": "134217728\n",
        },
    )
    assert memory.cgroup_room(root) == 384 * MIB
    unlimited = fake_root(
        tmp_path / "b",
        "12:memory:/\n",
        {"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"},
    )
    assert memory.cgroup_room(unlimited) is None


def test_default_budget_leaves_headroom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_root(tmp_path, "", {}, meminfo_kb=4 * 1024 * 1024)
    budget, why = memory.default_budget(root)
    assert budget == 4 * GIB - 4 * GIB // 10 and "headroom" in why
    monkeypatch.setenv("EDGEPHI_MEMORY_BUDGET", "1G")
    assert memory.default_budget(root) == (GIB, "EDGEPHI_MEMORY_BUDGET")


def edge_run() -> str:
    return str(Path(sys.executable).with_name("edge-run"))


def test_a_process_stays_within_its_memory_plan(smollm2_bundle: Path, store: Store) -> None:
    budget = 420 * MIB
    p = plan_for(smollm2_bundle, memory_budget=budget)
    assert p.limited_by == "memory" and p.max_length > 256
    engine = load(smollm2_bundle, memory_budget=budget)
    assert engine.context == p.max_length
    # A prompt that fills the planned context: the worst case for KV and prefill memory.
    words = "the history of the sea and of the ships that crossed it "

    def tokens(n: int) -> int:
        return engine.count_tokens(engine.format_prompt([{"role": "user", "content": words * n}]))

    lo, hi = 1, p.max_length  # the most repetitions that leave 24 tokens for the answer
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if tokens(mid) <= p.max_length - 24 else (lo, mid - 1)
    text = words * lo
    code, peak, stderr = edge_run_peak(
        str(smollm2_bundle), "-p", text, "-n", "16", "-t", "0", "--memory-budget", "420M", "--stats"
    )
    assert code == 0, stderr
    prompt_tokens = int(re.search(r"\[(\d+) prompt tokens", stderr)[1])  # type: ignore[index]
    assert prompt_tokens >= p.max_length - 64  # the context really was (nearly) full
    assert peak <= p.need <= budget, (peak, p.need)


def test_a_budget_too_small_is_refused_before_loading(smollm2_bundle: Path, store: Store) -> None:
    out = subprocess.run(
        [edge_run(), str(smollm2_bundle), "-p", "hi", "--memory-budget", "150M"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert "leaves room for 0 tokens" in line and "150.0 MiB" in line
    assert store.installed() == []  # refused before unpacking, let alone loading


def test_plan_flag_prints_without_installing(smollm2_bundle: Path, store: Store) -> None:
    out = subprocess.run(
        [edge_run(), str(smollm2_bundle), "--plan", "--memory-budget", "1G", "--context", "4096"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "4096 tokens (asked 4096, model max 8192; limited by request)" in out.stdout
    assert "45.0 KiB per token" in out.stdout
    assert store.installed() == []


def test_a_long_chat_crosses_the_context_edge_and_keeps_answering(phi3_bundle: Path, store: Store) -> None:
    engine = load(phi3_bundle, store=store, context=160)
    chat = Conversation(engine, system="You are a helpful sailor.")
    opts = GenerationOptions(max_tokens=12, temperature=0.0)
    for i in range(14):
        asked = chat.ask(f"Question {i}: tell me more about the waves, the wind and the tides.", opts)
        answer = "".join(asked)
        assert asked.stats is not None and asked.stats.generated_tokens >= 1, answer
        assert asked.stats.prompt_tokens + 12 <= 160
    assert chat.dropped >= 3  # crossed the bound several times
    prompt = engine.format_prompt(chat._all()[0])
    assert "You are a helpful sailor." in prompt and "Question 13" in prompt


def test_int8_kv_cache_target_builds_and_plans_smaller(target_bundle, store: Store) -> None:  # type: ignore[no-untyped-def]
    out = target_bundle("rpi4")
    shape = plan_for(out).shape
    assert shape.kv_bytes_per_token == 2 * 2 * 32 * 2 * 1  # int8: one byte per element
    fp32 = plan_for(target_bundle("cpu")).shape
    assert fp32.kv_bytes_per_token == 4 * shape.kv_bytes_per_token
    assert (
        memory.plan(shape, requested=4096, budget=None).need
        < memory.plan(fp32, requested=4096, budget=None).need
    )


LONG_CHAT = """
import sys
from pathlib import Path
from edgephi.runtime import GenerationOptions
from edgephi.runtime.loader import load_model
loaded = load_model(Path(sys.argv[1]), memory_budget=int(sys.argv[2]))
engine = loaded.engine
chat = engine.chat(system="You are a patient guide to the sea.")
options = GenerationOptions(max_tokens=24, min_tokens=24, temperature=0.0)
cached = []
for i in range(50):
    asked = chat.ask(f"Question {i}: tell me about the tides, the waves and the wind " * 3, options)
    "".join(asked)
    cached.append(asked.stats.cached_tokens)
    chat.settle()
status = Path("/proc/self/status").read_text()
peak = next(int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM:"))
print(peak, loaded.plan.need, chat.dropped, sum(c > 0 for c in cached))
"""


def test_a_fifty_turn_chat_stays_within_its_memory_plan(smollm2_bundle: Path) -> None:
    budget = 420 * MIB
    out = subprocess.run(
        [sys.executable, "-c", LONG_CHAT, str(smollm2_bundle), str(budget)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    peak, need, dropped, reused = (int(x) for x in out.stdout.split())
    assert dropped >= 10  # the history overflowed the planned context many times
    assert reused >= 45  # and the cache served nearly every turn
    assert peak <= need <= budget, (peak, need)


def test_the_plan_counts_the_weight_files_and_a_large_tokenizer_whatever_the_manifest_says(
    smollm2_bundle: Path,
) -> None:
    """A manifest claiming no weights is planned from its (hashed) file list, and a big
    tokenizer.json is counted, not left to the fixed overhead."""
    real = bundle.open_bundle(smollm2_bundle).manifest
    lying = dataclasses.replace(real, memory=dataclasses.replace(real.memory, weights_bytes=0))
    assert (
        memory.ModelShape.from_manifest(lying).weights_bytes
        >= memory.ModelShape.from_manifest(real).weights_bytes
    )
    files = tuple(
        dataclasses.replace(f, size=300 << 20) if f.path == "tokenizer.json" else f for f in real.files
    )
    big = memory.ModelShape.from_manifest(dataclasses.replace(real, files=files))
    assert big.weights_bytes - memory.ModelShape.from_manifest(real).weights_bytes > 600 << 20


def test_load_model_gives_the_plan_the_engine_runs_with_and_reads_the_manifest_once(
    smollm2_bundle: Path, tmp_path: Path
) -> None:
    shape = memory.ModelShape.from_manifest(bundle.open_bundle(smollm2_bundle).manifest)
    budget = memory.plan(shape, requested=512, budget=None).need
    loaded = load_model(smollm2_bundle, store=Store(tmp_path / "store"), memory_budget=budget)
    assert loaded.plan.limited_by == "memory" and loaded.engine.context == loaded.plan.max_length <= 512
    assert (
        loaded.manifest is not None
        and loaded.manifest.digest == bundle.open_bundle(smollm2_bundle).manifest.digest
    )
    assert loaded.verification is not None and loaded.verification.status == "unsigned"
    assert loaded.engine.in_use is not None  # the store's lock, held as long as the engine

    # The installed folder, run by path: the same manifest and plan, no signature to report.
    folder = load_model(loaded.engine.model_dir, store=Store(tmp_path / "store"), memory_budget=budget)
    assert folder.manifest == loaded.manifest and folder.verification is None
    assert folder.engine.model_name == loaded.manifest.name and folder.plan == loaded.plan
