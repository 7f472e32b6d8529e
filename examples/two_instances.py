"""Two instances of a service share one Redis: each key runs once, wherever it is asked for.

Run with ``python examples/two_instances.py [redis://host:port/db]`` (default
``redis://127.0.0.1:6379/0``; needs ``pip install 'prefetch-ingest[redis]'``).

Each instance is started as its own process, as two replicas of a web service
would be. Both receive requests for the same reports at the same moment; the
builds counter lives in Redis (``INCR`` inside the loader), so it counts
executions across processes. Then a third, brand-new process asks again and is
served from Redis without building anything.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import redis.asyncio as aioredis

from prefetch_ingest import Prefetcher
from prefetch_ingest.redis import RedisStore

REPORTS = ["sales", "stock", "staff"]


async def instance(url: str, prefix: str, name: str) -> None:
    """One replica: 10 concurrent requests for every report."""
    counter = aioredis.Redis.from_url(url)

    async def build(report: str) -> dict[str, object]:
        await counter.incr(f"{prefix}:builds:{report}")  # counts executions, all processes
        await asyncio.sleep(0.3)  # the expensive part
        return {"report": report, "built_by": name}

    try:
        async with Prefetcher(build, ttl=600, store=RedisStore(url, prefix=prefix)) as pf:
            results = await asyncio.gather(*(pf.get(r) for r in REPORTS for _ in range(10)))
            stats = pf.stats()
    finally:
        await counter.aclose()
    owners = sorted({str(result["built_by"]) for result in results})
    print(
        f"{name}: {len(results)} answers, built by {owners}; "
        f"ran {stats.load_successes} here, joined {stats.joins}, hits {stats.hits}"
    )


async def report_builds(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        for report in REPORTS:
            builds = int(await client.get(f"{prefix}:builds:{report}") or 0)
            print(f"{report}: built {builds} time(s)")
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--instance":
        url, prefix, name = sys.argv[2:5]
        asyncio.run(instance(url, prefix, name))
        return
    url = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"
    prefix = f"two-instances-{uuid.uuid4().hex[:8]}"  # this run's own namespace

    def spawn(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, __file__, "--instance", url, prefix, name])

    replicas = [spawn("A"), spawn("B")]  # at the same moment
    if any(replica.wait() != 0 for replica in replicas):
        sys.exit("an instance failed")
    late = spawn("C (started later)")
    if late.wait() != 0:
        sys.exit("the late instance failed")
    asyncio.run(report_builds(url, prefix))


if __name__ == "__main__":
    main()
