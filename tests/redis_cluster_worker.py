"""A worker process for the failover tests: ``python -m tests.redis_cluster_worker STORE CONTROL``.

It opens ``Prefetcher(store=RedisStore(STORE, ...))`` (any URL the store takes:
``redis://``, ``redis+cluster://``, ``redis+sentinel://``) and runs ``--callers``
concurrent ``get(key)`` for each of ``--keys`` keys (``k0``, ``k1``, ...), then
prints one JSON line: per key, the values its callers got (or their errors).

The counters and the gate live in a separate plain Redis (CONTROL), which the
test does not fail over, so that what it counts survives what it breaks:

- each execution of key ``k`` does ``INCR {k}:executions`` and ``RPUSH runs``
  (``k``, pid, start and end times), then waits until ``go`` is set (``gate``
  mode) or returns at once (``quick``);
- once all its callers are blocked the process does ``INCR ready``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import anyio
import redis.asyncio as aioredis

from prefetch_ingest import Prefetcher
from prefetch_ingest.redis import RedisStore


async def main(args: argparse.Namespace) -> dict[str, Any]:
    control = aioredis.Redis.from_url(args.control)

    async def loader(k: str) -> str:
        started = time.time()
        await control.incr(f"{k}:executions")
        await control.rpush("started", json.dumps([k, started]))
        if args.mode == "gate":
            while True:  # the gate is a key set by the test, in the control Redis
                if await control.exists("go"):
                    break
                await anyio.sleep(0.02)
        await control.rpush("runs", json.dumps([k, os.getpid(), started, time.time()]))
        return f"value-{k}"

    results: dict[str, list[str]] = {}
    store = RedisStore(
        args.store,
        prefix="fo",
        lease=args.lease,
        poll_interval=min(0.25, args.lease / 10),
        replicas=args.replicas,
    )
    try:
        async with Prefetcher(loader, store=store) as pf:

            async def caller(k: str) -> None:
                try:
                    got = await pf.get(k)
                except Exception as exc:
                    got = f"error: {type(exc).__name__}: {exc}"
                results.setdefault(k, []).append(got)

            async with anyio.create_task_group() as tg:
                for i in range(args.keys):
                    for _ in range(args.callers):
                        tg.start_soon(caller, f"k{i}")
                await anyio.wait_all_tasks_blocked()
                await control.incr("ready")
    finally:
        await control.aclose()
    return {"results": results}


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("control")
    parser.add_argument("--mode", choices=["gate", "quick"], default="gate")
    parser.add_argument("--keys", type=int, default=12)
    parser.add_argument("--callers", type=int, default=5)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=0)
    report = asyncio.run(main(parser.parse_args()))
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    cli()
