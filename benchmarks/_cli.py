"""The command: ``python -m benchmarks [--quick] ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import anyio

from . import _report
from ._results import Check, ScenarioResult
from ._scenarios import (
    FULL,
    QUICK,
    ScenarioFn,
    Sizes,
    hit_latency,
    many_cold_keys,
    memory_per_entry,
    mixed_workload,
    stampede,
    sweep_cost,
)
from ._systems import System, available_systems

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS: dict[str, ScenarioFn] = {
    "hit": hit_latency,
    "stampede": stampede,
    "cold": many_cold_keys,
    "memory": memory_per_entry,
    "sweep": sweep_cost,
    "mixed": mixed_workload,
}
ALL = [*SCENARIOS, "redis", "speculation", "postgres"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="prefetch_ingest against async-lru, aiocache, cashews, anyio's lru_cache "
        "and a dict floor: every scenario of issue 7 in one process.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, for CI: checks behaviour (exit 1 if prefetch_ingest misbehaves), "
        "writes no docs unless --out-dir is given",
    )
    p.add_argument("--repeats", type=int, help="repeats of the timed scenarios (default 7)")
    p.add_argument(
        "--only",
        help=f"comma-separated scenarios to run, of: {','.join(ALL)} (default: all)",
    )
    p.add_argument("--no-redis", action="store_true", help="skip the Redis scenario")
    p.add_argument("--json", type=Path, help="also write every figure and check as JSON here")
    p.add_argument(
        "--out-dir",
        type=Path,
        help="where benchmarks.md and benchmarks.png go (default: docs/ for a full run of "
        "every scenario; nothing for --quick or --only)",
    )
    return p


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def _run(
    names: Sequence[str], systems: list[System], sizes: Sizes, no_redis: bool
) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    for name in names:
        if name == "speculation":
            from ._speculation import SPEC_FULL, SPEC_QUICK, speculation

            _say("speculation ...")
            results.append(await speculation(SPEC_QUICK if sizes is QUICK else SPEC_FULL, _say))
            continue
        if name == "postgres":
            from ._postgres import postgres_scenario, skipped

            if no_redis:  # --no-redis: no store scenario (they start servers)
                results.append(skipped("--no-redis"))
            else:
                results.append(await postgres_scenario(sizes, _say))
            continue
        if name == "redis":
            from ._redis import redis_scenario

            if no_redis:
                results.append(_skipped_redis("--no-redis"))
            else:
                results.append(await redis_scenario(sizes, _say))
            continue
        _say(f"{name} ...")
        results.append(await SCENARIOS[name](systems, sizes, _say))
    return results


def _skipped_redis(why: str) -> ScenarioResult:
    return ScenarioResult("redis", "7. Redis store", "µs/hit", [], skipped=why)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            _parser().error("--repeats must be at least 1")
        sizes = _with_repeats(sizes, args.repeats)
    names = ALL if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        _parser().error(f"unknown scenario(s) {unknown}; choose from {ALL}")
    systems, missing = available_systems()
    if missing:
        _say(f"not installed, left out: {', '.join(missing)} (pip install -e '.[bench]')")
    if not any(s.role == "ours" for s in systems):
        _say("prefetch_ingest does not import; nothing to compare")
        return 2

    started = time.perf_counter()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = anyio.run(_run, names, systems, sizes, args.no_redis, backend="asyncio")
    duration = time.perf_counter() - started

    print(_report.text_tables(results))
    vs = _report.verdicts(results)
    if not args.quick:
        print(_report.verdict_text(vs))
    checks = [c for r in results for c in r.checks]
    print("\nbehaviour checks")
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "note")
        print(f"  [{mark}] {c.what}  ({c.detail})")
    print(f"\ntook {duration:.1f} s")

    command = "python -m benchmarks" + (" " + " ".join(sys.argv[1:]) if argv is None else "")
    out_dir = args.out_dir
    if out_dir is None and not args.quick and not args.only:
        out_dir = ROOT / "docs"
    if out_dir is not None:
        chart = out_dir / "benchmarks.png"
        _report.render_chart(results, chart)
        md = _report.markdown(
            results,
            vs,
            command=command.strip(),
            date=date,
            duration_s=duration,
            chart=chart.name,
        )
        (out_dir / "benchmarks.md").write_text(md, encoding="utf-8")
        _say(f"wrote {out_dir / 'benchmarks.md'} and {chart}")
    if args.json is not None:
        payload = {
            "quick": args.quick,
            "date": date,
            "duration_s": duration,
            "machine": _report.machine(),
            "results": [asdict(r) for r in results],
            "verdicts": [asdict(v) for v in vs],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    return 1 if _failed(checks) else 0


def _failed(checks: Sequence[Check]) -> bool:
    return any(c.required and not c.ok for c in checks)


def _with_repeats(sizes: Sizes, repeats: int) -> Sizes:
    from dataclasses import replace

    return replace(sizes, repeats=repeats)
