"""``python -m prefetch_ingest demo``: the origin service's three timelines, compressed in time.

A simulated pipeline stands in for the real ingest (LLM calls, database
writes, authorship statistics): it sleeps through its steps, reports its
progress, and returns made-up statistics. Durations are given in *simulated*
seconds (Query about 2 s, the ingest about 120 s, as in the origin service)
and multiplied by ``scale`` to get real seconds, so the whole demo takes a few
seconds. Every time printed is in simulated seconds.

The timelines:

1. the background ingest finishes before the user clicks Mapping: a hit;
2. the user clicks while it is still running: the click joins that run;
3. the background ingest fails: the click runs the ingest again, synchronously,
   as the service did before prefetching existed.

:func:`run_demo` does the work and returns a :class:`DemoSummary`; it reads
time only through :func:`anyio.current_time`, so a test can run it on trio's
``MockClock`` and get exact, repeatable numbers.
"""

from __future__ import annotations

import contextlib
import functools
import random
import sys
import uuid
from collections.abc import Mapping
from typing import Any, TextIO

import anyio
import attrs

from ._progress import report_progress
from ._types import Progress, Snapshot, Status
from .ingest import IngestPrefetcher, Source

__all__ = ["DemoConfig", "DemoSummary", "ScenarioResult", "SimulatedPipeline", "run_demo"]

PROJECT = "demo-project"

# The ingest's phases: (share of the steps, message shown in the progress line).
_PHASES = (
    (0.6, "LLM calls"),
    (0.3, "writing to the database"),
    (0.1, "authorship statistics"),
)
_STEPS = 20


@attrs.frozen
class DemoConfig:
    """Settings of one demo run.

    Attributes:
        scale: real seconds per simulated second (0.01: the 120 s ingest takes 1.2 s).
        seed: seed of the made-up statistics.
        query_s: simulated duration of Query.
        ingest_s: simulated duration of one ingest.
        progress: draw a live progress line (only sensible on a terminal).
        redis_url: run two instances sharing this Redis (asyncio only):
            instance A answers the Query and runs the background ingest,
            instance B answers the Mapping click.
        postgres_dsn: the same, sharing this PostgreSQL database (a table of the run's
            own, dropped at the end).
    """

    scale: float = 0.01
    seed: int = 0
    query_s: float = 2.0
    ingest_s: float = 120.0
    progress: bool = False
    redis_url: str | None = None
    postgres_dsn: str | None = None


@attrs.frozen
class ScenarioResult:
    """One timeline's outcome. Times are simulated seconds.

    Attributes:
        number: 1, 2 or 3.
        title: what happens in it.
        label: a short title for the summary table.
        source: how the Mapping click was served (``hit``, ``joined``, ``ran``).
        waited_s: how long the click waited, with prefetching.
        without_s: how long it would have waited without prefetching (one full
            ingest, as the origin service ran it on the click).
    """

    number: int
    title: str
    label: str
    source: Source
    waited_s: float
    without_s: float

    @property
    def saved_s(self) -> float:
        """Waiting time saved by prefetching."""
        return self.without_s - self.waited_s


@attrs.frozen
class DemoSummary:
    """The three timelines' outcomes.

    ``hits``, ``joins`` and ``misses`` count the clicks by how they were
    served; ``hit_ratio`` is the share served without running an ingest (on
    one instance, the same as the Prefetcher's own ``Stats.hit_ratio``).
    """

    scenarios: tuple[ScenarioResult, ...]
    hits: int
    joins: int
    misses: int
    hit_ratio: float
    background_started: int = 0
    unclaimed: int = 0
    wasted_s: float = 0.0

    @property
    def waited_s(self) -> float:
        return sum(s.waited_s for s in self.scenarios)

    @property
    def without_s(self) -> float:
        return sum(s.without_s for s in self.scenarios)

    @property
    def saved_s(self) -> float:
        return self.without_s - self.waited_s


class SimulatedPipeline:
    """An ingest that sleeps through its steps and reports progress.

    Args:
        config: durations and scale.
        fail_once: run ids whose first ingest fails part-way (a simulated
            rate-limit error from the LLM provider).
    """

    def __init__(self, config: DemoConfig, *, fail_once: set[str] | None = None) -> None:
        self._config = config
        self._fail_once = set(fail_once or ())
        self.durations: dict[str, float] = {}
        """Simulated duration of each run's last successful ingest."""

    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        cfg = self._config
        start = anyio.current_time()
        step = cfg.ingest_s * cfg.scale / _STEPS
        fail_at = _STEPS // 5 if run_id in self._fail_once else None
        for i in range(_STEPS):
            report_progress(i, _STEPS, _phase(i))
            if i == fail_at:
                self._fail_once.discard(run_id)
                raise RuntimeError("LLM provider answered 429 Too Many Requests")
            await anyio.sleep(step)
        report_progress(_STEPS, _STEPS, "done")
        self.durations[run_id] = (anyio.current_time() - start) / cfg.scale
        rng = random.Random(f"{cfg.seed}:{project_id}:{run_id}")
        papers = rng.randint(80, 400)
        return {
            "papers": papers,
            "authors": rng.randint(papers, papers * 4),
            "llm_calls": papers * 2,
        }


def _phase(step: int) -> str:
    edge = 0.0
    for share, message in _PHASES:
        edge += share * _STEPS
        if step < edge:
            return message
    return _PHASES[-1][1]


class _Screen:
    """Prints timeline lines, and a live progress line below them on a terminal."""

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self._out = out
        self._live = live
        self._line_shown = False

    def print(self, text: str = "") -> None:
        self.clear_progress()
        self._out.write(text + "\n")
        self._out.flush()

    def progress(self, text: str) -> None:
        if not self._live:
            return
        self._out.write("\r\x1b[K" + text)
        self._out.flush()
        self._line_shown = True

    def clear_progress(self) -> None:
        if self._line_shown:
            self._out.write("\r\x1b[K")
            self._line_shown = False


def _bar(progress: Progress | None, width: int = 24) -> str:
    if progress is None or not progress.total:
        return "[" + " " * width + "]   ?%"
    share = min(progress.done / progress.total, 1.0)
    filled = round(share * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {share:4.0%}"


class _Timeline:
    """One scenario: its clock in simulated seconds, and its printed events."""

    def __init__(self, screen: _Screen, config: DemoConfig, run_id: str) -> None:
        self.screen = screen
        self.config = config
        self.run_id = run_id
        self.t0 = anyio.current_time()

    def now(self) -> float:
        return (anyio.current_time() - self.t0) / self.config.scale

    async def sleep(self, simulated_s: float) -> None:
        await anyio.sleep(simulated_s * self.config.scale)

    def event(self, text: str) -> None:
        self.screen.print(f"  t={self.now():6.1f} s  {text}")

    def describe(self, snapshot: Snapshot) -> str:
        status = snapshot.status.value
        if snapshot.status is Status.FAILED:
            return f"{status} ({snapshot.error})"
        if snapshot.status is Status.RUNNING and snapshot.progress and snapshot.progress.total:
            share = snapshot.progress.done / snapshot.progress.total
            return f"{status}, {share:.0%} done ({snapshot.progress.message})"
        return status

    def show_progress(self, snapshot: Snapshot) -> None:
        progress = snapshot.progress
        eta = ""
        if progress is not None and progress.eta is not None:
            eta = f"  eta {progress.eta / self.config.scale:5.1f} s"
        message = progress.message if progress is not None and progress.message else ""
        self.screen.progress(
            f"  t={self.now():6.1f} s  {self.run_id} {_bar(progress)}  {message}{eta}"
        )


async def _follow(
    ingest: IngestPrefetcher, tl: _Timeline, completed: anyio.Event, *, again: bool, prefix: str
) -> None:
    """Print each load's end, and draw the progress line, until cancelled.

    ``watch`` ends after a terminal status; with ``again``, a later load of
    the same key (the fallback of timeline 3) is followed by watching again.
    ``completed`` is set once a completion has been printed.
    """
    key = (PROJECT, tl.run_id)
    seen: tuple[Any, ...] | None = None
    while True:
        fresh = False
        async with ingest.prefetcher.watch(key) as snapshots:
            async for snapshot in snapshots:
                ident = (snapshot.status, snapshot.started_at, snapshot.completed_at)
                if ident != seen:
                    fresh = True
                    who = "background" if snapshot.background else "on-demand"
                    if snapshot.status is Status.COMPLETED:
                        tl.event(f"{prefix}{who} ingest completed: {dict(snapshot.result)}")
                        completed.set()
                    elif snapshot.status is Status.FAILED:
                        tl.event(f"{prefix}{who} ingest failed: {snapshot.error}")
                    seen = ident
                if snapshot.status is Status.RUNNING:
                    tl.show_progress(snapshot)
        if not again:
            completed.set()
            return
        if not fresh:
            # Only the old terminal state so far: the next load has not started yet.
            await anyio.sleep(tl.config.scale)


async def _scenario(
    sides: tuple[IngestPrefetcher, IngestPrefetcher],
    screen: _Screen,
    config: DemoConfig,
    pipeline: SimulatedPipeline,
    number: int,
    title: str,
    label: str,
    click_after_s: float,
    settled: bool,
) -> ScenarioResult:
    query_side, ingest = sides
    run_id = f"run-{number}"
    screen.print(f"Timeline {number}: {title}")
    tl = _Timeline(screen, config, run_id)
    async with anyio.create_task_group() as tg:
        tl.event(f"user runs Query for {run_id}")
        await tl.sleep(config.query_s)
        started = query_side.after_query(PROJECT, run_id)
        tl.event(
            ("Query answered" if query_side is ingest else "Query answered by A")
            + "; background ingest "
            + ("started" if started else "not started (already known)")
        )
        completed = anyio.Event()
        if query_side is ingest:
            tg.start_soon(functools.partial(_follow, ingest, tl, completed, again=True, prefix=""))
        else:
            # Two instances: follow the background run on A, which ran it; B's
            # own fallback run (timeline 3) shows only in its answer.
            tg.start_soon(
                functools.partial(_follow, query_side, tl, completed, again=False, prefix="A: ")
            )
        await tl.sleep(click_after_s)
        if settled:
            # The timeline is defined by the background run having ended before
            # the click; on a slow machine, make sure it has.
            await query_side.prefetcher.wait((PROJECT, run_id))
        status = await ingest.prefetcher.status((PROJECT, run_id))
        where = "" if query_side is ingest else " on B"
        tl.event(f"user clicks Mapping{where}; the run is {tl.describe(status)}")
        clicked = tl.now()
        result = await ingest.ingest(PROJECT, run_id)
        waited = tl.now() - clicked
        # Let the follower print the completion before the answer.
        with anyio.move_on_after(1.0):
            await completed.wait()
        tg.cancel_scope.cancel()
    tl.event(f"Mapping answered ({result.source}) after waiting {waited:.1f} s")
    screen.print()
    return ScenarioResult(
        number=number,
        title=title,
        label=label,
        source=result.source,
        waited_s=waited,
        without_s=pipeline.durations[run_id],
    )


async def run_demo(config: DemoConfig, out: TextIO | None = None) -> DemoSummary:
    """Run the three timelines, print them and the summary table to ``out``, return the summary."""
    stream = sys.stdout if out is None else out
    screen = _Screen(stream, live=config.progress)
    pipeline = SimulatedPipeline(config, fail_once={"run-3"})
    screen.print(
        f"prefetch_ingest demo: Query takes {config.query_s:g} s and the ingest "
        f"{config.ingest_s:g} s (simulated seconds; 1 s runs in {config.scale * 1000:g} ms)."
    )
    screen.print()
    results = []
    async with contextlib.AsyncExitStack() as stack:
        shared = config.redis_url is not None or config.postgres_dsn is not None
        if not shared:
            one = await stack.enter_async_context(
                IngestPrefetcher(pipeline, clock=anyio.current_time)
            )
            sides = (one, one)
        else:
            sides = await _two_instances(stack, pipeline, config)
            screen.print(
                f"Two instances share {'Redis' if config.redis_url else 'PostgreSQL'}: "
                "A answers Query and runs the background ingest, B answers the Mapping click."
            )
            screen.print()
        # (title, label in the table, click time as a share of the ingest, the
        # background run has ended by the click)
        timelines = (
            (
                "the background ingest finishes before the click",
                "finished before the click",
                1.25,
                True,
            ),
            (
                "the user clicks while the background ingest runs",
                "clicked while running",
                0.25,
                False,
            ),
            (
                "the background ingest fails; the click runs it again",
                "background run failed",
                0.5,
                True,
            ),
        )
        for number, (title, label, click_at, settled) in enumerate(timelines, start=1):
            results.append(
                await _scenario(
                    sides,
                    screen,
                    config,
                    pipeline,
                    number,
                    title,
                    label,
                    click_after_s=config.ingest_s * click_at,
                    settled=settled,
                )
            )
        if shared:
            for number in range(1, len(timelines) + 1):  # leave nothing behind in the store
                await sides[1].prefetcher.invalidate((PROJECT, f"run-{number}"))
    sources = [r.source for r in results]
    stats = [side.prefetcher.stats() for side in {id(side): side for side in sides}.values()]
    summary = DemoSummary(
        background_started=sum(st.prefetches for st in stats),
        unclaimed=sum(st.unclaimed for st in stats),
        wasted_s=sum(st.wasted_seconds for st in stats),
        scenarios=tuple(results),
        hits=sources.count("hit"),
        joins=sources.count("joined"),
        misses=sources.count("ran"),
        hit_ratio=(len(sources) - sources.count("ran")) / len(sources),
    )
    for line in format_summary(summary):
        screen.print(line)
    return summary


async def _two_instances(
    stack: contextlib.AsyncExitStack, pipeline: SimulatedPipeline, config: DemoConfig
) -> tuple[IngestPrefetcher, IngestPrefetcher]:
    """Instances A and B: two Prefetchers on one Redis or PostgreSQL, in a namespace (a key
    prefix, a table) of this run's own."""
    prefix = f"prefetch_ingest_demo_{uuid.uuid4().hex[:12]}"
    dsn = config.postgres_dsn
    if dsn is not None:
        stack.push_async_callback(_drop_table, dsn, prefix)  # runs after both have closed
    instances = []
    for _ in range(2):
        store: Any
        if dsn is not None:
            from .postgres import PostgresStore

            store = PostgresStore(dsn, table=prefix)
        else:
            from .redis import RedisStore

            assert config.redis_url is not None
            store = RedisStore(config.redis_url, prefix=prefix)
        instances.append(
            await stack.enter_async_context(
                IngestPrefetcher(pipeline, store=store, ttl=600.0, clock=anyio.current_time)
            )
        )
    return instances[0], instances[1]


async def _drop_table(dsn: str, table: str) -> None:
    """Leave nothing behind in the database: the demo's table and its fence sequence."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DROP SEQUENCE IF EXISTS {table}_fence")


def _secs(value: float) -> str:
    value = round(value, 1)
    return f"{value + 0.0:.1f} s"  # + 0.0 turns -0.0 into 0.0


def format_summary(summary: DemoSummary) -> list[str]:
    """The summary table, one string per line."""
    header = ("timeline", "served", "wait with prefetch", "wait without", "time saved")
    rows: list[tuple[str, ...]] = [
        (
            f"{s.number}. {s.label}",
            s.source,
            _secs(s.waited_s),
            _secs(s.without_s),
            _secs(s.saved_s),
        )
        for s in summary.scenarios
    ]
    rows.append(
        (
            "total",
            "",
            _secs(summary.waited_s),
            _secs(summary.without_s),
            _secs(summary.saved_s),
        )
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    share = summary.saved_s / summary.without_s if summary.without_s else 0.0
    calls = summary.hits + summary.joins + summary.misses
    hits_alone = summary.hits / calls if calls else 0.0
    return [
        "Summary (simulated seconds)",
        line(header),
        rule,
        *(line(row) for row in rows[:-1]),
        rule,
        line(rows[-1]),
        "",
        f"time saved: {_secs(summary.saved_s)} of {_secs(summary.without_s)} ({share:.0%})",
        f"hit ratio: {summary.hit_ratio:.0%} ({summary.hits} hit, {summary.joins} joined, "
        f"{summary.misses} ran, of {calls} clicks)",
        f"hits alone: {hits_alone:.0%} ({summary.hits} of {calls} clicks found the ingest "
        "finished)",
        f"speculation: {summary.background_started} background ingest(s) started, "
        f"{summary.unclaimed} unclaimed (finished but never served to a click: "
        f"{_secs(summary.wasted_s)} of ingest nobody read)",
        "",
        "What the figures mean",
        "  served              how the click was served: hit = the background ingest had",
        "                      finished, its stats came at once; joined = it was running,",
        "                      the click awaited that same run (no second one); ran = there",
        "                      was nothing to use (it failed), so the click ran the ingest",
        "                      itself, as before prefetching",
        "  wait with prefetch  how long the click waited for its stats in this run",
        "  wait without        how long the same click would have waited without",
        "                      prefetching: a whole ingest, started by the click",
        "  time saved          wait without minus wait with: what prefetching saved the user",
        "  hit ratio           clicks served by a background run, finished (hit) or still",
        "                      running (joined): a join also saves the time the run had",
        "                      already spent; 'hits alone' counts only the finished ones",
        "  unclaimed, wasted   background ingests that finished but no click ever read,",
        "                      and their ingest time: the cost of prefetching for nothing",
    ]
