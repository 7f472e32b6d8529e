"""Scenario 8: the origin service, with speculative ingests competing for the CPU.

One event loop serves *foreground* requests — short CPU-bound handlers
arriving at a steady rate, each with a latency budget — while Query results
arrive in bursts and each triggers a *background* ingest (``prefetch``): a
chain of CPU-heavy steps separated by I/O waits (the LLM calls). A share of
the runs is clicked later (``get``), the rest is speculation nobody reads.

Three runs of the same arrivals, each in a fresh Prefetcher:

- **no background work**: the foreground alone (the reference latency);
- **fixed max_concurrency**: every burst is admitted up to the fixed limit;
- **LagAdmission**: the limit follows the event loop's lag.

Foreground latency is measured from each request's *scheduled* arrival (an
open-loop driver), so a loop that is late to start a request counts it.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

import anyio

from prefetch_ingest import LagAdmission, Prefetcher

from ._results import Check, Row, ScenarioResult

__all__ = ["SpecSizes", "SPEC_FULL", "SPEC_QUICK", "speculation"]


@dataclass(frozen=True)
class SpecSizes:
    duration_s: float = 6.0  # arrivals stop after this
    fg_interval_s: float = 0.004  # a foreground request every 4 ms ...
    fg_cpu_s: float = 0.001  # ... each 1 ms of CPU
    burst_every_s: float = 0.75  # a burst of Query results ...
    burst_size: int = 10  # ... of this many runs
    steps: int = 12  # an ingest: this many steps of
    step_cpu_s: float = 0.001  # CPU (parsing, scoring)
    step_io_s: float = 0.008  # then I/O (the LLM call)
    click_share: float = 0.3  # share of runs clicked later
    click_after_s: float = 0.5
    fixed_limit: int = 10
    target_lag_s: float = 0.001
    probe_s: float = 0.02


SPEC_FULL = SpecSizes()
SPEC_QUICK = SpecSizes(duration_s=1.5)


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class _Outcome:
    mode: str
    p50_ms: float
    p99_ms: float
    requests: int
    started: int
    completed: int
    clicked: int
    unclaimed: int
    wasted_s: float
    final_limit: int | None


async def _run(mode: str, s: SpecSizes) -> _Outcome:
    latencies: list[float] = []
    started = completed = clicked = issued = 0
    admission: LagAdmission | None = None
    options: dict[str, Any] = {}
    if mode == "fixed":
        options["max_concurrency"] = s.fixed_limit
    elif mode == "lag":
        admission = LagAdmission(
            max_concurrency=s.fixed_limit,
            target_lag=s.target_lag_s,
            interval=s.probe_s,
            initial=1,
        )
        options["admission"] = admission

    async def ingest(run_id: int) -> dict[str, int]:
        nonlocal started, completed
        started += 1
        for _ in range(s.steps):
            _burn(s.step_cpu_s)
            await anyio.sleep(s.step_io_s)
        completed += 1
        return {"run": run_id}

    gc.collect()
    async with Prefetcher(ingest, **options) as pf, anyio.create_task_group() as tg:
        t0 = time.perf_counter()
        end = t0 + s.duration_s

        async def handler(due: float) -> None:
            _burn(s.fg_cpu_s)
            latencies.append(time.perf_counter() - due)

        async def foreground() -> None:
            i = 0
            while (due := t0 + i * s.fg_interval_s) < end:
                delay = due - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(handler, due)
                i += 1

        async def click(run_id: int) -> None:
            nonlocal clicked
            await anyio.sleep(s.click_after_s)
            if time.perf_counter() < end:
                await pf.get(run_id)
                clicked += 1

        async def queries() -> None:
            nonlocal issued
            run_id = 0
            every = max(1, round(1 / s.click_share)) if s.click_share > 0 else 0
            b = 0
            while (due := t0 + b * s.burst_every_s) < end:
                delay = due - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                for _ in range(s.burst_size):
                    run_id += 1
                    issued = run_id
                    pf.prefetch(run_id)
                    if every and run_id % every == 0:
                        tg.start_soon(click, run_id)
                b += 1

        tg.start_soon(foreground)
        if mode != "none":
            tg.start_soon(queries)
        await anyio.sleep(s.duration_s)
        await anyio.sleep(s.click_after_s)  # let the last clicks finish or give up
        snapshot_started, snapshot_completed = started, completed
        for snap in pf.in_flight():
            await pf.cancel(snap.key)
        for key in range(1, issued + 1):
            await pf.invalidate(key)
        stats = pf.stats()
        tg.cancel_scope.cancel()
    return _Outcome(
        mode=mode,
        p50_ms=_pct(latencies, 0.50) * 1e3,
        p99_ms=_pct(latencies, 0.99) * 1e3,
        requests=len(latencies),
        started=snapshot_started,
        completed=snapshot_completed,
        clicked=clicked,
        unclaimed=stats.unclaimed,
        wasted_s=stats.wasted_seconds,
        final_limit=None if admission is None else admission.limit(),
    )


_TITLES = {
    "none": "no background work",
    "fixed": "fixed max_concurrency",
    "lag": "LagAdmission",
}


async def speculation(s: SpecSizes, say: Any) -> ScenarioResult:
    outcomes = {mode: await _run(mode, s) for mode in ("none", "fixed", "lag")}
    say("speculation: 3 runs done")
    base = outcomes["none"]
    rows = []
    for mode, o in outcomes.items():
        rows.append(
            Row(
                system=_TITLES[mode],
                role="ours" if mode == "lag" else "baseline",
                value=o.p99_ms,
                extra={
                    "p50_ms": o.p50_ms,
                    "started": o.started,
                    "completed": o.completed,
                    "clicked": o.clicked,
                    "unclaimed": o.unclaimed,
                    "wasted_s": o.wasted_s,
                },
            )
        )
    fixed, lag = outcomes["fixed"], outcomes["lag"]
    p99_ok = lag.p99_ms <= 1.5 * base.p99_ms
    starts_ok = fixed.started == 0 or lag.started >= 0.8 * fixed.started
    checks = [
        Check(
            "speculation: LagAdmission keeps the foreground p99 within 1.5x of no background work",
            p99_ok,
            f"p99 {lag.p99_ms:.2f} ms vs {base.p99_ms:.2f} ms ({lag.p99_ms / base.p99_ms:.2f}x); "
            f"fixed {fixed.p99_ms:.2f} ms",
            required=False,
        ),
        Check(
            "speculation: LagAdmission starts at least 80% of the runs the fixed limit starts",
            starts_ok,
            f"{lag.started} vs {fixed.started}",
            required=False,
        ),
    ]
    return ScenarioResult(
        "speculation",
        f"8. Speculation: foreground every {s.fg_interval_s * 1e3:g} ms "
        f"({s.fg_cpu_s * 1e3:g} ms CPU), bursts of {s.burst_size} ingests every "
        f"{s.burst_every_s:g} s ({s.steps} x {s.step_cpu_s * 1e3:g} ms CPU + "
        f"{s.step_io_s * 1e3:g} ms I/O), {s.duration_s:g} s",
        "p99 ms",
        rows,
        columns=[
            ("p50_ms", "p50 ms", ".2f"),
            ("started", "started", ",d"),
            ("completed", "completed", ",d"),
            ("clicked", "clicked", ",d"),
            ("unclaimed", "unclaimed", ",d"),
            ("wasted_s", "wasted s", ".2f"),
        ],
        notes=[
            f"fixed: max_concurrency={s.fixed_limit}; LagAdmission(max_concurrency="
            f"{s.fixed_limit}, target_lag={s.target_lag_s:g}, interval={s.probe_s:g}, "
            "initial=1). Foreground latency from the scheduled arrival (open loop). "
            f"{s.click_share:.0%} of the runs are clicked {s.click_after_s:g} s after their "
            "query; 'unclaimed'/'wasted s' are Stats.unclaimed/wasted_seconds after every "
            "run is invalidated at the end (speculation nobody read).",
        ],
        checks=checks,
        floor_name="no background work",
        floor_header="x none",
    )


if __name__ == "__main__":  # python -m benchmarks._speculation: one run, printed
    import sys

    sizes = SPEC_QUICK if "--quick" in sys.argv else SPEC_FULL

    async def main() -> None:
        for mode in ("none", "fixed", "lag"):
            print(await _run(mode, sizes))

    anyio.run(main)
