"""``edge-run bench`` on a tiny model: finite numbers, exact prompt lengths (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from edgephi.core.errors import ConfigError
from edgephi.runtime import bench, load
from edgephi.runtime.cli import app as run_app
from edgephi.runtime.store import Store
from typer.testing import CliRunner


def test_spread_is_median_and_range() -> None:
    s = bench.Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high) == (2.5, 1.0, 10.0)
    assert s.text("ms", 1000, 0) == "2500 ms (1000-10000)"
    with pytest.raises(ValueError):
        bench.Spread.of([])


def test_prompt_of_has_exactly_the_asked_tokens(phi3_bundle: Path, store: Store) -> None:
    engine = load(phi3_bundle, store=store)
    for n in (1, 17, 128):
        assert engine.count_tokens(bench.prompt_of(engine, n)) == n
    with pytest.raises(ConfigError):
        bench.prompt_of(engine, engine.context)


def test_bench_reports_finite_numbers(phi3_bundle: Path) -> None:
    result = CliRunner().invoke(
        run_app,
        ["bench", str(phi3_bundle), "--runs", "2", "--tokens", "8", "--prompt-tokens", "32", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompt_tokens"] == 32 and data["generated_tokens"] == 8 and data["runs"] == 2
    for key in ("ttft_s", "decode_tokens_per_s"):
        spread = data[key]
        assert all(math.isfinite(spread[k]) and spread[k] > 0 for k in ("median", "low", "high"))
    assert data["load_s"] > 0 and data["peak_rss_bytes"] > 50 * 2**20
    table = CliRunner().invoke(run_app, ["bench", str(phi3_bundle), "--runs", "1", "--tokens", "4"]).stdout
    assert "tok/s" in table and "TTFT" in table
