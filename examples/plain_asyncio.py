"""prefetch_ingest with plain asyncio: start an expensive coroutine early, collect it later.

Run with ``python examples/plain_asyncio.py``.

A report that takes a while to build is prefetched as soon as we know it will
probably be wanted; meanwhile, other work goes on. When the report is finally
asked for, it is served from the run already in flight (or already finished),
and five concurrent requests for another report share a single build.
"""

from __future__ import annotations

import asyncio
import time

from prefetch_ingest import Prefetcher, report_progress

BUILDS: list[str] = []


async def build_report(name: str) -> dict[str, object]:
    """The expensive coroutine: say, a few slow queries."""
    BUILDS.append(name)
    for step in range(4):
        report_progress(step, 4, f"query {step + 1} of 4")
        await asyncio.sleep(0.1)
    return {"report": name, "rows": 42 * len(name)}


async def main() -> None:
    async with Prefetcher(build_report, ttl=600) as reports:
        started = time.perf_counter()
        reports.prefetch("sales")  # returns at once; the build runs in the background
        await asyncio.sleep(0.25)  # the application does something else meanwhile
        status = await reports.status("sales")
        print(f"sales is {status.status}, progress {status.progress}")
        sales = await reports.get("sales")  # joins the build in flight
        print(f"sales after {time.perf_counter() - started:.2f} s: {sales}")

        again = time.perf_counter()
        await reports.get("sales")  # a hit: no waiting
        print(f"sales again after {(time.perf_counter() - again) * 1e6:.0f} µs")

        results = await asyncio.gather(*(reports.get("stock") for _ in range(5)))
        print(f"5 concurrent gets of stock, {BUILDS.count('stock')} build: {results[0]}")
        print(reports.stats())


if __name__ == "__main__":
    asyncio.run(main())
