"""A separate process sharing a PostgreSQL store with the tests:
``python -m tests.postgres_worker DSN TABLE KEY MODE``.

It opens ``Prefetcher(store=PostgresStore(DSN, table=TABLE, lease=...))``, runs
``--callers`` concurrent ``get(KEY)``, and prints one JSON line: the values the callers
got (or their errors) and the Prefetcher's stats.

The loader counts its executions in the control table ``ctl`` (``KEY:executions``),
then, by MODE: ``gate`` waits until the test writes ``KEY:go``; ``hang-first``: the first
execution (across all processes) hangs forever (the test SIGKILLs that process), later
ones return at once; ``quick`` returns at once. Once all of its callers wait, the process
adds one to ``KEY:ready``, so the test knows every process is in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import anyio
import psycopg

from prefetch_ingest import Prefetcher
from prefetch_ingest.postgres import PostgresStore

CTL = "CREATE TABLE IF NOT EXISTS ctl (name text PRIMARY KEY, n bigint NOT NULL)"
BUMP = "INSERT INTO ctl VALUES (%s, 1) ON CONFLICT (name) DO UPDATE SET n = ctl.n + 1 RETURNING n"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    control = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
    key: str = args.key

    async def bump(name: str) -> int:
        row = await (await control.execute(BUMP, (name,))).fetchone()
        assert row is not None
        return int(row[0])

    async def loader(k: str) -> str:
        executions = await bump(f"{key}:executions")
        if args.mode == "hang-first" and executions == 1:
            await anyio.sleep_forever()
        if args.mode == "gate":
            while True:  # the gate is a row the test writes
                cur = await control.execute("SELECT 1 FROM ctl WHERE name = %s", (f"{key}:go",))
                if await cur.fetchone() is not None:
                    break
                await anyio.sleep(0.01)
        return "value"

    results: list[Any] = []
    store = PostgresStore(args.dsn, table=args.table, lease=args.lease)
    try:
        async with Prefetcher(loader, store=store) as pf:

            async def caller() -> None:
                try:
                    results.append(await pf.get(key))
                except Exception as exc:
                    results.append(f"error: {type(exc).__name__}: {exc}")

            async with anyio.create_task_group() as tg:
                for _ in range(args.callers):
                    tg.start_soon(caller)
                await anyio.wait_all_tasks_blocked()
                await bump(f"{key}:ready")
            stats = pf.stats()
    finally:
        await control.close()
    return {
        "results": results,
        "hits": stats.hits,
        "joins": stats.joins,
        "misses": stats.misses,
        "successes": stats.load_successes,
    }


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("table")
    parser.add_argument("key")
    parser.add_argument("mode", choices=["gate", "hang-first", "quick"])
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--lease", type=float, default=10.0)
    report = asyncio.run(main(parser.parse_args()))
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    cli()
