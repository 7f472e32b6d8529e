"""A separate process sharing a Redis with the tests: ``python -m tests.redis_worker URL KEY MODE``.

It opens ``Prefetcher(store=RedisStore(URL, prefix=..., lease=...))``, runs
``--callers`` concurrent ``get(KEY)``, and prints one JSON line: the values the
callers got (or their errors) and the Prefetcher's stats.

The loader counts its executions with ``INCR {KEY}:executions`` in Redis and
then, by MODE:

- ``gate``: waits until the test sets ``{KEY}:go``, then returns ``"value"``;
- ``hang-first``: the first execution (across all processes) hangs forever
  (the test SIGKILLs that process); later ones return ``"value"``;
- ``quick``: returns ``"value"`` at once;
- ``stale-first``: the first execution waits until the test sets ``{KEY}:go``
  and returns ``"stale"`` (the test pauses that process past its lease
  meanwhile); later ones return ``"value"`` at once.

Before awaiting its callers, the process increments ``{KEY}:ready`` once all
of its callers are blocked, so the test knows every process is in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import anyio
import redis.asyncio as aioredis

from prefetch_ingest import Prefetcher
from prefetch_ingest.redis import RedisStore


async def main(args: argparse.Namespace) -> dict[str, Any]:
    control = aioredis.Redis.from_url(args.url)
    key: str = args.key

    async def loader(k: str) -> str:
        executions = await control.incr(f"{key}:executions")
        if args.mode == "hang-first" and executions == 1:
            await anyio.sleep_forever()
        if args.mode == "stale-first" and executions == 1:
            while True:
                if await control.exists(f"{key}:go"):
                    return "stale"
                await anyio.sleep(0.01)
        if args.mode == "gate":
            while True:  # the gate is a key set by the test, in Redis
                if await control.exists(f"{key}:go"):
                    break
                await anyio.sleep(0.01)
        return "value"

    results: list[Any] = []
    store = RedisStore(args.url, prefix=args.prefix, lease=args.lease)
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
                await control.incr(f"{key}:ready")
            stats = pf.stats()
    finally:
        await control.aclose()
    return {
        "results": results,
        "hits": stats.hits,
        "joins": stats.joins,
        "misses": stats.misses,
        "successes": stats.load_successes,
    }


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("mode", choices=["gate", "hang-first", "quick", "stale-first"])
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--prefix", default="mp")
    parser.add_argument("--lease", type=float, default=10.0)
    report = asyncio.run(main(parser.parse_args()))
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    cli()
