"""Measurements behind docs/deployment.md (issue 13), not tests.

``python -m tests.measure_redis_scale {wait,publish,restart}``; each starts its own
servers on free loopback ports and stops them.

- ``wait``: 500 sequential cold loads with ``replicas=0`` and ``replicas=1``, on a master
  with one replica and on a 3 + 3 cluster: the cost of ``WAIT`` per completion;
- ``publish``: ``redis-benchmark`` of ``PUBLISH`` against ``SPUBLISH`` on a 3 + 3 cluster,
  with the CPU time the other nodes spent (the broadcast over the cluster bus);
- ``restart``: 8 processes x 100 callers looping over 50 keys for 5 s; Redis (no
  persistence) SIGKILLed after 1.5 s and restarted empty 1 s later: calls, failed calls,
  executions.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefetch_ingest import Prefetcher
from prefetch_ingest.redis import RedisStore
from tests.redis_cluster import Cluster
from tests.redis_server import RedisServer


async def _cold_loads(url: str, replicas: int, prefix: str, n: int = 500) -> float:
    store = RedisStore(url, replicas=replicas, prefix=prefix)
    await store.open(ttl=None, failure_ttl=0)

    async def value() -> str:
        return "x"

    try:
        for i in range(20):
            await store.load(f"warm{i}", value, background=False, force=False)
        start = time.perf_counter()
        for i in range(n):
            await store.load(f"k{i}", value, background=False, force=False)
        return (time.perf_counter() - start) / n * 1e6
    finally:
        await store.aclose()


def wait_cost(directory: Path) -> None:
    for sub in ("m", "r"):
        (directory / sub).mkdir()
    master, replica = RedisServer(directory / "m"), RedisServer(directory / "r")
    cluster = Cluster(directory / "c", masters=3, replicas=1)
    try:
        master.start()
        replica.start()
        master.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
        replica.command("REPLICAOF", "127.0.0.1", str(master.port))
        while replica.command("ROLE")[3] != b"connected":
            time.sleep(0.05)
        cluster.start()
        for rep in range(2):
            for url, name in ((master.url, "master + replica"), (cluster.url, "cluster 3 + 3")):
                plain = asyncio.run(_cold_loads(url, 0, f"w0-{rep}"))
                waited = asyncio.run(_cold_loads(url, 1, f"w1-{rep}"))
                print(
                    f"{name}: {plain:.0f} µs per cold load with replicas=0, {waited:.0f} µs "
                    f"with replicas=1 (+{waited - plain:.0f} µs)"
                )
    finally:
        master.kill()
        replica.kill()
        cluster.kill_all()


def publish_cost(directory: Path) -> None:
    cluster = Cluster(directory, masters=3, replicas=1)
    try:
        cluster.start()
        channel = "fo:{abc}:notify"
        owner = cluster.master_of(channel)
        message = "0123456789abcdef0123456789abcdef:c"

        def cpu() -> dict[int, float]:
            out = {}
            for node in cluster.nodes:
                info = node.command("INFO", "cpu")
                out[node.port] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
            return out

        for command in ("PUBLISH", "SPUBLISH"):
            for _ in range(2):
                before = cpu()
                target = channel if command == "SPUBLISH" else "fo:notify"
                out = subprocess.run(
                    [
                        *("redis-benchmark", "-p", str(owner.port), "-n", "100000", "-c", "8"),
                        *("-q", command, target, message),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                after = cpu()
                rate = re.findall(r"([\d.]+) requests per second", out)
                others = sum(after[p] - before[p] for p in after if p != owner.port)
                print(
                    f"{command}: {rate} per s; CPU s on the publishing node "
                    f"{after[owner.port] - before[owner.port]:.2f}, on the 5 others {others:.2f}"
                )
    finally:
        cluster.kill_all()


def _restart_worker(url: str, control_url: str, results: Any, until: float) -> None:
    import anyio
    import redis.asyncio as aioredis
    import structlog

    def drop(*_: Any) -> Any:
        raise structlog.DropEvent

    structlog.configure(processors=[drop])

    async def main() -> None:
        control = aioredis.Redis.from_url(control_url)

        async def load(key: str) -> str:
            await control.incr("executions")
            await asyncio.sleep(0.05)
            return key

        calls = failed = 0
        async with Prefetcher(load, store=RedisStore(url, lease=5.0), ttl=0.5) as pf:

            async def caller() -> None:
                nonlocal calls, failed
                while time.time() < until:
                    calls += 1
                    try:
                        await pf.get(f"k{random.randrange(50)}")
                    except Exception:
                        failed += 1
                        await asyncio.sleep(0.01)

            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(caller)
        await control.aclose()
        results.put((calls, failed))

    asyncio.run(main())


def restart_under_load(directory: Path) -> None:
    for sub in ("r", "c"):
        (directory / sub).mkdir()
    server, control = RedisServer(directory / "r"), RedisServer(directory / "c")
    try:
        server.start()
        control.start()
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        t0 = time.time() + 3.0  # the processes start meanwhile
        procs = [
            ctx.Process(target=_restart_worker, args=(server.url, control.url, results, t0 + 5))
            for _ in range(8)
        ]
        for p in procs:
            p.start()
        time.sleep(max(0.0, t0 + 1.5 - time.time()))
        server.kill()
        time.sleep(1.0)
        server.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        executions = int(control.command("GET", "executions"))
        print(
            f"calls {sum(g[0] for g in got)}, failed {sum(g[1] for g in got)}, "
            f"executions {executions}"
        )
    finally:
        server.kill()
        control.kill()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    runs = {"wait": wait_cost, "publish": publish_cost, "restart": restart_under_load}
    if what not in runs:
        sys.exit(f"usage: python -m tests.measure_redis_scale {{{','.join(runs)}}}")
    with tempfile.TemporaryDirectory(prefix="pi-measure-") as tmp:
        runs[what](Path(tmp))
