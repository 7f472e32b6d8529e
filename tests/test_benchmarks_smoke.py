"""The benchmarks' ``--quick`` mode runs and the behaviour it checks holds (no timings judged)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("async_lru", "aiocache", "cashews", "matplotlib")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ROOT / "benchmarks" / "__main__.py").exists(),
        reason="the benchmarks/ directory is not in this checkout (installed package only)",
    ),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in PEERS),
        reason="the benchmark peers are not installed: pip install -e '.[bench]'",
    ),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--json",
            str(out / "quick.json"),
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "never awaited" not in proc.stderr
    assert "Task exception was never retrieved" not in proc.stderr
    data: dict[str, Any] = json.loads((out / "quick.json").read_text())
    data["_out"] = str(out)
    return data


def _scenario(data: dict[str, Any], key: str) -> dict[str, Any]:
    for result in data["results"]:
        if result["key"] == key:
            return dict(result)
    raise AssertionError(f"scenario {key} missing from the quick run")


def _ours(result: dict[str, Any]) -> dict[str, Any]:
    for row in result["rows"]:
        if row["system"] == "prefetch_ingest":
            return dict(row)
    raise AssertionError(f"prefetch_ingest missing from {result['key']}")


def test_every_required_check_passed(quick_run: dict[str, Any]) -> None:
    """The run itself verifies dedup, hits and sweeps; none of its checks on us failed."""
    checks = [c for r in quick_run["results"] for c in r["checks"]]
    assert checks
    failed = [c for c in checks if c["required"] and not c["ok"]]
    assert not failed, failed


def test_stampede_runs_the_cold_key_once_and_serves_everyone(quick_run: dict[str, Any]) -> None:
    """Every concurrent caller of one cold key is served by exactly one execution."""
    ours = _ours(_scenario(quick_run, "stampede"))
    assert ours["lacks"] is None
    assert ours["extra"]["executions"] == 1
    assert ours["extra"]["served"] >= 100


def test_many_cold_keys_run_once_each(quick_run: dict[str, Any]) -> None:
    """Three callers per cold key: one execution per key, every caller served."""
    ours = _ours(_scenario(quick_run, "cold"))
    assert ours["lacks"] is None
    assert ours["extra"]["served"] == 3 * ours["extra"]["executions"]


def test_sweep_removes_exactly_the_expired(quick_run: dict[str, Any]) -> None:
    """With 1% of the entries expired, a sweep removes that 1%, as the full scan does."""
    sweep = _scenario(quick_run, "sweep")
    ours = _ours(sweep)
    scan = next(r for r in sweep["rows"] if r["system"] == "full scan (dict)")
    assert ours["extra"]["removed"] == scan["extra"]["removed"] > 0


def test_every_system_has_a_figure_or_a_reason(quick_run: dict[str, Any]) -> None:
    """A table cell is a number or says what the system lacks, never blank."""
    for result in quick_run["results"]:
        if result["skipped"]:
            continue
        for row in result["rows"]:
            assert (row["value"] is not None) != (row["lacks"] is not None), (result["key"], row)


def test_report_and_chart_written(quick_run: dict[str, Any]) -> None:
    """The Markdown report has the command, the machine and every scenario; the chart is a PNG."""
    out = Path(quick_run["_out"])
    md = (out / "benchmarks.md").read_text()
    assert "python -m benchmarks" in md
    assert "Machine" in md
    for n in range(1, 7):
        assert f"## {n}. " in md
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.redis
def test_redis_hit_is_one_round_trip_and_cold_key_runs_once(quick_run: dict[str, Any]) -> None:
    """Through the Redis store a hit is one round trip; a cold key runs once across processes."""
    redis = _scenario(quick_run, "redis")
    if redis["skipped"]:
        if shutil.which("redis-server") is None and os.environ.get("CI") != "true":
            pytest.skip(f"Redis scenario skipped: {redis['skipped']}")
        raise AssertionError(f"Redis scenario skipped: {redis['skipped']}")
    ours = _ours(redis)
    assert ours["extra"]["trips_per_hit"] == 1.0
    assert ours["extra"]["cross_executions"] == 1
