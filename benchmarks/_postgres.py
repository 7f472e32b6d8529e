"""Scenario 9: prefetch_ingest with its PostgreSQL store, against a bare primary-key
``SELECT`` loop on the same pool (``python -m benchmarks --only postgres``).

The measurements are those of ``python -m benchmarks.postgres`` (which prints them
alone); here they become a section of ``docs/benchmarks.md`` like every other scenario.
"""

from __future__ import annotations

import glob
import shutil
from typing import Any

import anyio

from ._results import Check, Row, ScenarioResult
from ._scenarios import Sizes

TITLE = "9. PostgreSQL store"


def _binaries() -> bool:
    return all(
        shutil.which(name) or glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
        for name in ("initdb", "pg_ctl")
    )


def skipped(why: str) -> ScenarioResult:
    return ScenarioResult("postgres", TITLE, "µs/hit", [], skipped=why)


async def postgres_scenario(sizes: Sizes, say: Any) -> ScenarioResult:
    if not _binaries():
        return skipped("no initdb/pg_ctl (PostgreSQL's server binaries)")
    from tests.postgres_server import PostgresServer

    from . import postgres as pg

    server = PostgresServer()
    await anyio.to_thread.run_sync(server.start)
    try:
        n = sizes.redis_hits
        say("postgres: hits ...")
        store_us, bare_us, per_hit = await pg.hits(server.dsn, n)
        cold_n = max(10, n // 100)
        per_cold = await pg.cold(server.dsn, cold_n)
        rows_us, locks_us = await pg.leases(server.dsn, max(50, n // 20))
        say("postgres: 8 processes x 100 callers ...")
        execs = await anyio.to_thread.run_sync(pg.processes, server, sizes.redis_repeats)
    finally:
        await anyio.to_thread.run_sync(server.remove)
    statements_cold = sum(per_cold.values())
    rows = [
        Row(
            "bare primary-key SELECT (same pool)",
            "floor",
            bare_us,
            extra={"hits_per_s": 1e6 / bare_us, "stmts_per_hit": 1.0},
        ),
        Row(
            "prefetch_ingest",
            "ours",
            store_us,
            extra={
                "hits_per_s": 1e6 / store_us,
                "stmts_per_hit": per_hit,
                "stmts_per_cold": statements_cold,
                "cross_executions": ", ".join(str(e) for e in execs),
            },
        ),
    ]
    cold_text = ", ".join(f"{k} {v:.2f}" for k, v in per_cold.items())
    return ScenarioResult(
        "postgres",
        TITLE,
        "µs/hit",
        rows,
        columns=[
            ("hits_per_s", "hits/s", ",.0f"),
            ("stmts_per_hit", "statements/hit", ".2f"),
            ("stmts_per_cold", "statements/cold", ".2f"),
            ("cross_executions", "8 x 100 callers: executions per round", "s"),
        ],
        notes=[
            "A private PostgreSQL cluster (initdb/pg_ctl on a free port, as the tests use). "
            f"Hits: {n:,} gets of one completed key, interleaved in rounds with the bare "
            "SELECT of its row on the store's own pool; medians.",
            f"Statements per cold load ({cold_n} new keys): {cold_text}.",
            f"Lease rows (acquire + fenced completion, one key): {rows_us:.0f} µs; an advisory "
            f"lock taken and released (no data, no fence, no expiry): {locks_us:.0f} µs. Rows "
            "were chosen: a lock holds a pooled connection for the whole load (see "
            "docs/postgres.md).",
            "Cross-process: 8 processes x 100 callers of one cold key per round, released "
            "together; executions counted in the database.",
        ],
        checks=[
            Check("PostgreSQL: a hit is one statement", per_hit <= 1.0, f"{per_hit:.2f}"),
            Check(
                "PostgreSQL: one execution per cold key across 8 processes x 100 callers",
                all(e == 1 for e in execs),
                f"executions per round: {execs}",
            ),
        ],
        floor_name="bare primary-key SELECT (same pool)",
        floor_header="x bare SELECT",
    )
