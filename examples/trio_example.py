"""prefetch_ingest on trio: the same Prefetcher, under a trio nursery's rules.

Run with ``python examples/trio_example.py``.

Thumbnails are expensive to render. A gallery prefetches the next page's
thumbnails while the user looks at the current one; a viewer that opens one
of them follows it with ``watch`` until it is ready, and a viewer that gives
up (a timeout) leaves the render running for the others.
"""

from __future__ import annotations

import trio

from prefetch_ingest import Prefetcher, Status, report_progress


async def render(image: str, size: int) -> bytes:
    """The expensive coroutine, with an argument of its own besides the key."""
    for row in range(size):
        report_progress(row, size, f"rendering {image}")
        await trio.sleep(0.02)
    return f"<{size}px thumbnail of {image}>".encode()


async def main() -> None:
    async with Prefetcher[str, bytes](ttl=60) as thumbnails:
        for image in ("a.png", "b.png", "c.png"):
            thumbnails.prefetch(image, render, image, 8)

        async for snapshot in thumbnails.watch("b.png"):
            if snapshot.status is Status.RUNNING and snapshot.progress is not None:
                print(f"b.png: {snapshot.progress.done:.0f}/{snapshot.progress.total:.0f}")
        print("b.png:", await thumbnails.get("b.png", render, "b.png", 8))

        try:
            await thumbnails.get("d.png", render, "d.png", 50, timeout=0.1)
        except TimeoutError:
            print("d.png: gave up waiting; its render goes on")
        snapshot = await thumbnails.wait("d.png")
        print("d.png:", snapshot.status, snapshot.result)
        print(thumbnails.stats())


if __name__ == "__main__":
    trio.run(main)
