"""``watch`` on a shared store must describe the run itself, from running to completed.

Found by the FastAPI example on Redis with two workers (tests/test_examples.py): its
event stream showed a run going ``running`` → ``not_started`` → ``completed`` (the
progress bar fell back to 0 just before it completed), and on a worker where a
Mapping click joined the other worker's run, a ``running`` state without the run's
progress and with ``background: false``. Both are fixed; these are the regression tests
(the example's tests no longer filter those states out).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

import anyio
import pytest

from prefetch_ingest import Prefetcher, Snapshot, Status, report_progress
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore

from .redis_server import RedisServer, redis_server_fixture

pytestmark = pytest.mark.anyio

redis_server = redis_server_fixture()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def new_store(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """Makes stores that share one server (a MemoryServer, or a private redis-server)."""
    if request.param == "memory":
        server = MemoryServer()
        return lambda: MemoryStore(server)
    if request.getfixturevalue("anyio_backend") != "asyncio":
        pytest.skip("the Redis store runs on asyncio only")
    from prefetch_ingest.redis import RedisStore

    redis: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisStore(redis.url)


class _Steps:
    """A load that reports progress 0/2, waits, 1/2, waits, and returns."""

    def __init__(self) -> None:
        self.step = anyio.Event()
        self.finish = anyio.Event()

    async def __call__(self, key: Hashable) -> dict[str, int]:
        report_progress(0, 2, "first")
        await self.step.wait()
        report_progress(1, 2, "second")
        await self.finish.wait()
        return {"rows": 2}


class _Watched:
    """``pf.watch(key)`` collected by a task until it ends."""

    def __init__(self) -> None:
        self.seen: list[Snapshot] = []
        self._progress: dict[float, anyio.Event] = {}

    def _event(self, done: float) -> anyio.Event:
        return self._progress.setdefault(done, anyio.Event())

    async def progress(self, done: float) -> None:
        """Return once the watch has yielded this progress."""
        with anyio.fail_after(10):
            await self._event(done).wait()

    async def collect(self, pf: Prefetcher[Any, Any], key: Hashable) -> None:
        async with pf.watch(key) as snapshots:
            async for snapshot in snapshots:
                self.seen.append(snapshot)
                if snapshot.progress is not None:
                    self._event(snapshot.progress.done).set()


@contextlib.asynccontextmanager
async def _watching(pf: Prefetcher[Any, Any], key: Hashable) -> AsyncIterator[_Watched]:
    watched = _Watched()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watched.collect, pf, key)
        yield watched


def _check_the_run(seen: list[Snapshot]) -> None:
    """From its first ``running`` snapshot on, the watch describes the run, to completed.

    (A follower may see ``not_started`` first: the run was not in the store yet.)
    """
    first = next(n for n, s in enumerate(seen) if s.status is Status.RUNNING)
    seen = seen[first:]
    described = [(s.status.value, s.background, s.progress and s.progress.done) for s in seen]
    if seen[-1].status is not Status.COMPLETED:  # not the bug: the test went wrong
        pytest.fail(f"the watch did not end with completed: {described}")
    reported = next(n for n, s in enumerate(seen) if s.progress is not None)
    running = [s for s in seen[reported:] if s.status is Status.RUNNING]
    assert all(s.progress is not None for s in running), described  # once reported, kept
    assert all(s.status is not Status.NOT_STARTED for s in seen), described
    assert all(s.background for s in seen), described


async def test_the_owners_watch_goes_from_running_to_completed(
    new_store: Callable[[], Any],
) -> None:
    load = _Steps()
    with anyio.fail_after(30):
        async with Prefetcher(load, store=new_store()) as pf:
            assert pf.prefetch("k")
            async with _watching(pf, "k") as watched:
                await watched.progress(0)
                load.step.set()
                await watched.progress(1)
                load.finish.set()
    _check_the_run(watched.seen)


async def test_a_followers_watch_keeps_describing_the_run_a_caller_there_joins(
    new_store: Callable[[], Any],
) -> None:
    load = _Steps()
    served = []
    with anyio.fail_after(30):
        async with (
            Prefetcher(load, store=new_store()) as owner,
            Prefetcher(load, store=new_store()) as follower,
        ):
            assert owner.prefetch("k")
            async with _watching(follower, "k") as watched, anyio.create_task_group() as tg:
                await watched.progress(0)

                async def click() -> None:
                    served.append(await follower.serve("k"))

                tg.start_soon(click)  # joins the owner's run
                await anyio.wait_all_tasks_blocked()
                if follower.stats().waiters != 1:
                    pytest.fail("the click is not waiting for the run")
                load.step.set()
                await watched.progress(1)
                load.finish.set()
    if [s.source.value for s in served] != ["joined"]:
        pytest.fail(f"the click did not join the run: {served}")
    _check_the_run(watched.seen)
