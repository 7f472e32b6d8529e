"""Scenarios 1-6 of issue 7 (the Redis one lives in ``_redis.py``).

Every timed scenario interleaves the systems: repeat ``r`` runs each system
once, in an order rotated by ``r``, so a slow phase of the machine hits every
system alike; the headline figure is the median over the repeats. The
garbage collector is collected before and disabled during each timed section
(as ``timeit`` does), for every system alike.
"""

from __future__ import annotations

import gc
import itertools
import math
import random
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from ._results import Check, Row, ScenarioResult, median
from ._systems import Getter, Options, System

__all__ = [
    "FULL",
    "QUICK",
    "Sizes",
    "hit_latency",
    "many_cold_keys",
    "memory_per_entry",
    "mixed_workload",
    "stampede",
    "sweep_cost",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``FULL`` is issue 7's, ``QUICK`` the smoke run's."""

    repeats: int
    hit_keys: int
    hit_target_s: float  # wall time one hit sample aims for (calls chosen to match)
    hit_min_calls: int
    hit_max_calls: int
    stampede_callers: int
    stampede_sleep: float
    cold_keys: int
    cold_callers: int
    cold_sleep: float
    memory_entries: int
    memory_repeats: int
    sweep_entries: int
    sweep_repeats: int
    mixed_calls: int
    mixed_universe: int
    mixed_max_entries: int
    mixed_workers: int
    mixed_ttl: float
    mixed_refresh_after: float
    mixed_repeats: int
    redis_hits: int
    redis_processes: int
    redis_callers: int
    redis_repeats: int


FULL = Sizes(
    repeats=7,
    hit_keys=1_000,
    hit_target_s=0.25,
    hit_min_calls=2_000,
    hit_max_calls=1_000_000,
    stampede_callers=10_000,
    stampede_sleep=0.010,
    cold_keys=10_000,
    cold_callers=3,
    cold_sleep=0.010,
    memory_entries=100_000,
    memory_repeats=2,
    sweep_entries=1_000_000,
    sweep_repeats=5,
    mixed_calls=50_000,
    mixed_universe=20_000,
    mixed_max_entries=2_000,
    mixed_workers=8,
    mixed_ttl=1.0,
    mixed_refresh_after=0.25,
    mixed_repeats=3,
    redis_hits=20_000,
    redis_processes=8,
    redis_callers=100,
    redis_repeats=3,
)

QUICK = Sizes(
    repeats=2,
    hit_keys=100,
    hit_target_s=0.01,
    hit_min_calls=500,
    hit_max_calls=5_000,
    stampede_callers=300,
    stampede_sleep=0.005,
    cold_keys=200,
    cold_callers=3,
    cold_sleep=0.005,
    memory_entries=2_000,
    memory_repeats=1,
    sweep_entries=20_000,
    sweep_repeats=2,
    mixed_calls=2_000,
    mixed_universe=1_000,
    mixed_max_entries=200,
    mixed_workers=4,
    mixed_ttl=0.2,
    mixed_refresh_after=0.05,
    mixed_repeats=1,
    redis_hits=500,
    redis_processes=2,
    redis_callers=10,
    redis_repeats=1,
)

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------
# helpers


@contextmanager
def _quiet_gc() -> Iterator[None]:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rotations(systems: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """(repeat, system) pairs, each repeat in an order rotated by one."""
    n = len(systems)
    for r in range(repeats):
        for i in range(n):
            yield r, systems[(r + i) % n]


def _value_of(key: str) -> str:
    return "value:" + key


def _role_row(system: System, value: float | None, **kw: Any) -> Row:
    return Row(system.name, system.role, value, **kw)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# ---------------------------------------------------------------------------
# 1. hit latency


async def _timed_calls(get: Getter, seq: Sequence[str]) -> float:
    with _quiet_gc():
        start = time.perf_counter()
        for key in seq:
            await get(key)
        return time.perf_counter() - start


async def hit_latency(systems: Sequence[System], sizes: Sizes, say: Progress) -> ScenarioResult:
    """``get`` of completed keys: many keys, many calls, nanoseconds per call."""
    keys = [f"hit-{i:06d}" for i in range(sizes.hit_keys)]
    values = {k: _value_of(k) for k in keys}
    calls_for: dict[str, int] = {}
    samples: dict[str, list[float]] = {s.name: [] for s in systems}
    loads: dict[str, int] = {s.name: 0 for s in systems}
    wrong: dict[str, int] = {s.name: 0 for s in systems}

    async def one(system: System, calls: int | None) -> float:
        runs = 0

        async def load(key: str) -> str:
            nonlocal runs
            runs += 1
            return values[key]

        async with system.open(load, Options(ttl=3600.0)) as get:
            for key in keys:
                if await get(key) != values[key]:
                    wrong[system.name] += 1
            if calls is None:  # calibration: how many calls make a sample of hit_target_s
                probe = keys * max(1, sizes.hit_min_calls // len(keys))
                per_call = await _timed_calls(get, probe) / len(probe)
                n = int(sizes.hit_target_s / max(per_call, 1e-9))
                calls_for[system.name] = min(max(n, sizes.hit_min_calls), sizes.hit_max_calls)
                return per_call
            seq = list(itertools.islice(itertools.cycle(keys), calls))
            elapsed = await _timed_calls(get, seq)
            loads[system.name] = max(loads[system.name], runs)
            return elapsed / calls

    for system in systems:
        await one(system, None)
    for _, system in _rotations(systems, sizes.repeats):
        samples[system.name].append(await one(system, calls_for[system.name]))
    say(f"hit latency: {sizes.repeats} repeats done")

    rows = [
        _role_row(
            s,
            median(samples[s.name]) * 1e9,
            samples=[x * 1e9 for x in samples[s.name]],
            extra={"calls": calls_for[s.name]},
        )
        for s in systems
    ]
    checks = [
        Check(
            f"hit: {s.name} served every timed call from memory (loads = keys)",
            loads[s.name] == len(keys) and wrong[s.name] == 0,
            f"{loads[s.name]} loads for {len(keys)} keys, {wrong[s.name]} wrong values",
            required=s.role == "ours",
        )
        for s in systems
    ]
    return ScenarioResult(
        "hit",
        f"1. Hit latency: get of a completed key ({_fmt_int(len(keys))} keys)",
        "ns/get",
        rows,
        columns=[("calls", "calls/sample", ",d")],
        notes=[
            "One coroutine awaits get(key) in a loop over pre-filled keys; the loop "
            "itself is part of every figure, the floor's included.",
        ],
        checks=checks,
    )


# ---------------------------------------------------------------------------
# 2. stampede and 3. many cold keys


async def _crowd(
    system: System, pairs: Sequence[str], sleep: float
) -> tuple[float, int, int, dict[str, int]]:
    """One task per entry of ``pairs`` (a key each), all started at once; time them all."""
    runs_by_key: dict[str, int] = {}
    served = 0

    async def load(key: str) -> str:
        runs_by_key[key] = runs_by_key.get(key, 0) + 1
        await anyio.sleep(sleep)
        return _value_of(key)

    async def caller(get: Getter, key: str) -> None:
        nonlocal served
        if await get(key) == _value_of(key):
            served += 1

    async with system.open(load, Options(ttl=3600.0)) as get:
        with _quiet_gc():
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for key in pairs:
                    tg.start_soon(caller, get, key)
            elapsed = time.perf_counter() - start
    return elapsed, sum(runs_by_key.values()), served, runs_by_key


async def stampede(systems: Sequence[System], sizes: Sizes, say: Progress) -> ScenarioResult:
    """N concurrent callers of one cold key whose loader sleeps briefly."""
    n = sizes.stampede_callers
    sleep = sizes.stampede_sleep
    pairs = ["stampede"] * n
    samples: dict[str, list[float]] = {s.name: [] for s in systems}
    runs: dict[str, list[int]] = {s.name: [] for s in systems}
    served: dict[str, list[int]] = {s.name: [] for s in systems}
    for _, system in _rotations(systems, sizes.repeats):
        elapsed, executions, ok, _ = await _crowd(system, pairs, sleep)
        samples[system.name].append(elapsed)
        runs[system.name].append(executions)
        served[system.name].append(ok)
    say(f"stampede: {sizes.repeats} repeats done")

    rows: list[Row] = []
    checks: list[Check] = []
    for s in systems:
        elapsed = median(samples[s.name])
        per_waiter_us = max(elapsed - sleep, 0.0) / n * 1e6
        max_runs = max(runs[s.name])
        min_served = min(served[s.name])
        extra: dict[str, float | int | str] = {
            "executions": max_runs,
            "served": min_served,
            "elapsed_ms": elapsed * 1e3,
        }
        deduped = max_runs == 1
        lacks = None
        if s.dedup is None:
            lacks = f"no dedup ({_fmt_int(max_runs)} executions)"
        elif not deduped:
            lacks = f"dedup failed ({_fmt_int(max_runs)} executions)"
        rows.append(
            _role_row(
                s,
                None if lacks else per_waiter_us,
                lacks=lacks,
                extra=extra,
                samples=[max(x - sleep, 0.0) / n * 1e6 for x in samples[s.name]],
            )
        )
        if s.dedup is not None:
            checks.append(
                Check(
                    f"stampede: {s.name} ran the cold key once for {_fmt_int(n)} callers, "
                    "served them all",
                    deduped and min_served == n,
                    f"executions {runs[s.name]}, served {served[s.name]}",
                    required=s.role == "ours",
                )
            )
    return ScenarioResult(
        "stampede",
        f"2. Cold-key stampede: {_fmt_int(n)} concurrent callers of one key, "
        f"loader sleeps {sleep * 1e3:g} ms",
        "µs/waiter",
        rows,
        columns=[
            ("executions", "executions", ",d"),
            ("served", "served", ",d"),
            ("elapsed_ms", "elapsed ms", ".1f"),
        ],
        notes=[
            "Time per waiter = (elapsed - loader sleep) / callers, elapsed from the first "
            "start_soon to the last caller served (task creation included, for every system).",
        ],
        checks=checks,
        floor_name="",
        floor_header="x floor",
    )


async def many_cold_keys(systems: Sequence[System], sizes: Sizes, say: Progress) -> ScenarioResult:
    """K cold keys x C concurrent callers each (callers of one key not adjacent)."""
    k, c, sleep = sizes.cold_keys, sizes.cold_callers, sizes.cold_sleep
    keys = [f"cold-{i:06d}" for i in range(k)]
    pairs = [key for _ in range(c) for key in keys]
    samples: dict[str, list[float]] = {s.name: [] for s in systems}
    runs: dict[str, list[int]] = {s.name: [] for s in systems}
    served: dict[str, list[int]] = {s.name: [] for s in systems}
    worst_key: dict[str, int] = {s.name: 0 for s in systems}
    for _, system in _rotations(systems, sizes.repeats):
        elapsed, executions, ok, by_key = await _crowd(system, pairs, sleep)
        samples[system.name].append(elapsed)
        runs[system.name].append(executions)
        served[system.name].append(ok)
        worst_key[system.name] = max(worst_key[system.name], max(by_key.values(), default=0))
    say(f"many cold keys: {sizes.repeats} repeats done")

    rows: list[Row] = []
    checks: list[Check] = []
    calls = len(pairs)
    for s in systems:
        elapsed = median(samples[s.name])
        per_call_us = max(elapsed - sleep, 0.0) / calls * 1e6
        max_runs = max(runs[s.name])
        lacks = None
        if s.dedup is None:
            lacks = f"no dedup ({_fmt_int(max_runs)} executions)"
        elif worst_key[s.name] != 1:
            lacks = f"dedup failed (up to {worst_key[s.name]} per key)"
        rows.append(
            _role_row(
                s,
                None if lacks else per_call_us,
                lacks=lacks,
                extra={
                    "executions": max_runs,
                    "served": min(served[s.name]),
                    "elapsed_ms": elapsed * 1e3,
                },
                samples=[max(x - sleep, 0.0) / calls * 1e6 for x in samples[s.name]],
            )
        )
        if s.dedup is not None:
            checks.append(
                Check(
                    f"many cold keys: {s.name} ran each of {_fmt_int(k)} keys once, "
                    f"served all {_fmt_int(calls)} callers",
                    worst_key[s.name] == 1 and max_runs == k and min(served[s.name]) == calls,
                    f"executions {runs[s.name]}, served {served[s.name]}",
                    required=s.role == "ours",
                )
            )
    return ScenarioResult(
        "cold",
        f"3. Many cold keys: {_fmt_int(k)} keys x {c} concurrent callers, "
        f"loader sleeps {sleep * 1e3:g} ms",
        "µs/call",
        rows,
        columns=[
            ("executions", "executions", ",d"),
            ("served", "served", ",d"),
            ("elapsed_ms", "elapsed ms", ".1f"),
        ],
        notes=["Time per call = (elapsed - loader sleep) / callers."],
        checks=checks,
        floor_name="",
    )


# ---------------------------------------------------------------------------
# 4. memory per entry


async def _memory_sample(system: System, keys: Sequence[str], values: dict[str, str]) -> float:
    async def load(key: str) -> str:
        return values[key]

    async with system.open(load, Options(ttl=3600.0, background_scan=False)) as get:
        await get("warm-up")  # lazily created structures belong to no entry
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for key in keys:
                await get(key)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        for key in keys[:: max(1, len(keys) // 100)]:  # still there, and a hit
            if await get(key) is not values[key]:
                raise AssertionError(f"{system.name} lost or copied {key!r}")
    return (after - before) / len(keys)


async def memory_per_entry(
    systems: Sequence[System], sizes: Sizes, say: Progress
) -> ScenarioResult:
    """tracemalloc delta of filling each system with N completed entries, per entry."""
    n = sizes.memory_entries
    keys = [f"key-{i:07d}" for i in range(n)]
    values = {k: f"value-{i:07d}" for i, k in enumerate(keys)}
    values["warm-up"] = "warm-up value"
    samples: dict[str, list[float]] = {s.name: [] for s in systems}
    for _, system in _rotations(systems, sizes.memory_repeats):
        samples[system.name].append(await _memory_sample(system, keys, values))
    say(f"memory: {sizes.memory_repeats} repeats done")
    rows = [_role_row(s, median(samples[s.name]), samples=samples[s.name]) for s in systems]
    return ScenarioResult(
        "memory",
        f"4. Memory per completed entry beyond key and value ({_fmt_int(n)} entries, ttl set)",
        "B/entry",
        rows,
        notes=[
            "Keys (str) and values (str) are built before measuring and the loader returns "
            "the prebuilt value, so neither is counted; the figure is the tracemalloc delta "
            "of filling the cache through its getter (one awaited call per key, after a "
            "warm-up key and gc.collect(), and again gc.collect() before reading), divided "
            "by the entries. Every system gets ttl=3600 s (the floor has no ttl), so "
            "whatever a system keeps per entry to expire it is counted. cashews' once-a-second "
            "full-scan task is turned off here (check_interval=0): it retains nothing per "
            "entry, and rescanning every entry each second under tracemalloc made filling "
            "it take minutes.",
        ],
    )


# ---------------------------------------------------------------------------
# 5. sweep


class _Rec:
    """What a scanning sweep reads per entry: its completion time."""

    __slots__ = ("done", "value")

    def __init__(self, value: str, done: float) -> None:
        self.value = value
        self.done = done


def _loop_scan(table: dict[str, _Rec], now: float, ttl: float) -> int:
    removed = 0
    for key, rec in list(table.items()):
        if now - rec.done >= ttl:
            del table[key]
            removed += 1
    return removed


def _full_scan(table: dict[str, _Rec], now: float, ttl: float) -> int:
    expired = [key for key, rec in table.items() if now - rec.done >= ttl]
    for key in expired:
        del table[key]
    return len(expired)


async def sweep_cost(systems: Sequence[System], sizes: Sizes, say: Progress) -> ScenarioResult:
    """1% of N entries expired: our ``sweep()`` against a full scan of the N entries."""
    n = sizes.sweep_entries
    batches = 100  # one batch = 1% of the entries, one clock tick apart
    per_batch = n // batches
    ttl = float(batches)
    reps = sizes.sweep_repeats
    rows: list[Row] = []
    checks: list[Check] = []
    by_name = {s.name: s for s in systems}

    def batch_keys(b: int) -> list[str]:
        return [f"s{b:04d}-{i:06d}" for i in range(per_batch)]

    # -- baselines on a plain dict -------------------------------------------------
    # Three ways to remove the expired 1%, rotated over the rounds on one dict:
    # the cheapest full scan (a comprehension), the full scan a plain sweep is
    # usually written as (a for loop over a copy of the items), and the lower
    # bound of any sweep (deleting the expired keys, already known).
    table: dict[str, _Rec] = {}
    for b in range(batches):
        for key in batch_keys(b):
            table[key] = _Rec(key, float(b))
    names = ("full scan (dict)", "full scan (for loop)", "delete the 1% only")
    base_samples: dict[str, list[float]] = {name: [] for name in names}
    base_removed: dict[str, list[int]] = {name: [] for name in names}
    for i in range(3 * reps):
        name = names[i % 3]
        now = float(batches + i)
        doomed = batch_keys(i)
        with _quiet_gc():
            start = time.perf_counter()
            if name == names[0]:
                removed = _full_scan(table, now, ttl)
            elif name == names[1]:
                removed = _loop_scan(table, now, ttl)
            else:
                for key in doomed:
                    del table[key]
                removed = len(doomed)
            base_samples[name].append(time.perf_counter() - start)
        base_removed[name].append(removed)
        for key in batch_keys(batches + i):
            table[key] = _Rec(key, now)
    del table
    say("sweep: baselines done")

    # -- prefetch_ingest -------------------------------------------------------
    ours = next((s for s in systems if s.role == "ours"), None)
    if ours is not None:
        from prefetch_ingest import Prefetcher

        clock_now = [0.0]

        async def load(key: str) -> str:
            return key

        async def fill(pf: Prefetcher[str, str], keys: list[str]) -> None:
            for key in keys:
                pf.prefetch(key)
            for key in keys:
                await pf.get(key)

        ours_samples: list[float] = []
        ours_removed: list[int] = []
        fill_start = time.perf_counter()
        async with Prefetcher(
            load, ttl=ttl, clock=lambda: clock_now[0], cleanup_interval=10.0**6
        ) as pf:
            for b in range(batches):
                clock_now[0] = float(b)
                await fill(pf, batch_keys(b))
            fill_s = time.perf_counter() - fill_start
            held = pf.stats().completed
            for r in range(reps):
                clock_now[0] = float(batches + r)
                with _quiet_gc():
                    start = time.perf_counter()
                    removed = pf.sweep()
                    ours_samples.append(time.perf_counter() - start)
                ours_removed.append(removed)
                await fill(pf, batch_keys(batches + r))
        say(f"sweep: prefetch_ingest done (filling {n:,} entries took {fill_s:.1f} s)")
        rows.append(
            Row(
                ours.name,
                "ours",
                median(ours_samples) * 1e3,
                samples=[x * 1e3 for x in ours_samples],
                extra={"removed": ours_removed[0], "held": held},
            )
        )
        checks.append(
            Check(
                f"sweep: prefetch_ingest removed exactly the expired 1% ({per_batch:,}) each time",
                all(x == per_batch for x in ours_removed) and held == n,
                f"removed {ours_removed}, held {held:,} before",
            )
        )

    for name in names:
        rows.append(
            Row(
                name,
                "baseline",
                median(base_samples[name]) * 1e3,
                samples=[x * 1e3 for x in base_samples[name]],
                extra={"removed": base_removed[name][0], "held": n},
            )
        )

    # -- cashews: one pass of its own expiry loop ----------------------------------
    if "cashews" in by_name:
        rows.append(await _cashews_pass(n, per_batch, reps))
        say("sweep: cashews done")
    for name, why in (
        ("async-lru", "no sweep: one loop timer per entry"),
        ("aiocache", "no sweep: one loop timer per entry"),
        ("anyio lru_cache", "no sweep: expired entries stay until touched"),
        ("floor (dict)", "no expiry"),
    ):
        if name in by_name:
            rows.append(Row(name, by_name[name].role, None, lacks=why))
    return ScenarioResult(
        "sweep",
        f"5. Sweep with 1% of {_fmt_int(n)} entries expired",
        "ms/sweep",
        rows,
        columns=[("removed", "removed", ",d")],
        notes=[
            "prefetch_ingest: sweep() on a Prefetcher filled through prefetch()/get() with an "
            "injected clock (100 batches of 1%, one tick apart, ttl = 100 ticks; each repeat "
            "advances one tick, sweeps, and refills 1%). Baselines, on a dict of as many "
            "keys holding slotted records, same 1% expired: 'full scan (dict)' is the "
            "cheapest scanning sweep (a comprehension finding the expired, then deleting "
            "them), the reference of the 'x full scan' column and of the sweep target; 'full scan "
            "(for loop)' is the sweep as usually written (a for loop over a copy of the "
            "items); 'delete the 1% only' deletes the expired keys, known in advance: the "
            "lower bound of any sweep that frees them. cashews: one pass of what its memory "
            "backend's expiry task does every second (get() of every key), on as many "
            "entries with 1% expired.",
        ],
        checks=checks,
        floor_name="full scan (dict)",
        floor_header="x full scan",
    )


async def _cashews_pass(n: int, per_batch: int, reps: int) -> Row:
    from cashews.backends.memory import Memory

    backend = Memory(size=2 * n, check_interval=0)
    await backend.init()
    samples: list[float] = []
    removed: list[int] = []
    try:

        async def fill_expired(tag: int) -> None:
            for i in range(per_batch):
                key = f"x{tag:04d}-{i:06d}"
                await backend.set(key, key, expire=1e-6)

        for i in range(n - per_batch):
            key = f"k-{i:07d}"
            await backend.set(key, key, expire=3600.0)
        for r in range(reps):
            await fill_expired(r)
            await anyio.sleep(0.001)
            held = len(backend.store)
            with _quiet_gc():
                start = time.perf_counter()
                for key in dict(backend.store):
                    await backend.get(key)
                samples.append(time.perf_counter() - start)
            removed.append(held - len(backend.store))
    finally:
        await backend.clear()
        await backend.close()
    return Row(
        "cashews",
        "peer",
        median(samples) * 1e3,
        samples=[x * 1e3 for x in samples],
        extra={"removed": removed[0]},
    )


# ---------------------------------------------------------------------------
# 6. mixed workload


def _zipf_sequence(universe: int, calls: int, seed: int = 7, s: float = 1.1) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / math.pow(i + 1, s) for i in range(universe)]
    cum = list(itertools.accumulate(weights))
    keys = [f"mix-{i:06d}" for i in range(universe)]
    order = list(range(universe))
    rng.shuffle(order)  # popularity unrelated to key order
    return [keys[order[i]] for i in rng.choices(range(universe), cum_weights=cum, k=calls)]


async def mixed_workload(systems: Sequence[System], sizes: Sizes, say: Progress) -> ScenarioResult:
    """Zipf-distributed keys, bounded table, ttl and refresh_after: throughput and hit ratio."""
    seq = _zipf_sequence(sizes.mixed_universe, sizes.mixed_calls)
    w = sizes.mixed_workers
    slices = [seq[i::w] for i in range(w)]
    options = Options(
        ttl=sizes.mixed_ttl,
        max_entries=sizes.mixed_max_entries,
        refresh_after=sizes.mixed_refresh_after,
    )
    samples: dict[str, list[float]] = {s.name: [] for s in systems}
    ratios: dict[str, list[float]] = {s.name: [] for s in systems}
    own_ratio: list[float] = []

    async def one(system: System) -> None:
        runs = 0

        async def load(key: str) -> str:
            nonlocal runs
            runs += 1
            await anyio.lowlevel.checkpoint()
            return _value_of(key)

        async def worker(get: Getter, part: list[str]) -> None:
            for key in part:
                await get(key)

        async with system.open(load, options) as get:
            with _quiet_gc():
                start = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for part in slices:
                        tg.start_soon(worker, get, part)
                elapsed = time.perf_counter() - start
            owner: Any = getattr(get, "__self__", None)
            if system.role == "ours" and owner is not None:
                own_ratio.append(float(owner.stats().hit_ratio))
        samples[system.name].append(elapsed / len(seq))
        ratios[system.name].append(1.0 - runs / len(seq))

    for _, system in _rotations(systems, sizes.mixed_repeats):
        await one(system)
    say(f"mixed: {sizes.mixed_repeats} repeats done")

    rows: list[Row] = []
    for s in systems:
        per_call = median(samples[s.name])
        missing = []
        if not s.bounded:
            missing.append("unbounded")
        if not s.refresh:
            missing.append("no refresh")
        if s.expiry is None:
            missing.append("no expiry")
        extra: dict[str, float | int | str] = {
            "calls_per_s": 1.0 / per_call,
            "hit_ratio": median(ratios[s.name]),
            "lacks": ", ".join(missing) or "-",
        }
        rows.append(
            _role_row(s, per_call * 1e6, extra=extra, samples=[x * 1e6 for x in samples[s.name]])
        )
    notes = [
        f"{_fmt_int(len(seq))} calls over {_fmt_int(sizes.mixed_universe)} keys (Zipf s=1.1, "
        f"fixed seed) by {w} concurrent workers; max_entries={sizes.mixed_max_entries:,}, "
        f"ttl={sizes.mixed_ttl:g} s, refresh_after={sizes.mixed_refresh_after:g} s, each "
        "system honouring what it supports (column 'lacks'). The loader checkpoints once. "
        "Hit ratio = 1 - loads/calls for every system alike (a background refresh counts as "
        "a load).",
    ]
    if own_ratio:
        notes.append(
            f"prefetch_ingest's own stats().hit_ratio (refreshes served as hits): "
            f"{median(own_ratio):.3f}."
        )
    return ScenarioResult(
        "mixed",
        "6. Mixed workload: max_entries + ttl + refresh_after",
        "µs/call",
        rows,
        columns=[
            ("calls_per_s", "calls/s", ",.0f"),
            ("hit_ratio", "hit ratio", ".3f"),
            ("lacks", "lacks", "s"),
        ],
        notes=notes,
    )


ScenarioFn = Callable[[Sequence[System], Sizes, Progress], Awaitable[ScenarioResult]]
