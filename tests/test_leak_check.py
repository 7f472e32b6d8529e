"""The task leak check of ``conftest.py`` can fail: it finds a task of the library left
alive (on asyncio and on trio), names it and where it waits, and stays quiet otherwise.

The checker is tried directly; the real hook is tried by running the suite's conftest
(pytester) on tests that leak. The Redis store's tasks (its backend's notification reader,
the lease algorithm's renewal loops) are recognised as ours and are gone once their
Prefetcher closed, as is any lookup whose caller was cancelled while Redis did not answer
(v1 ran shared lookups as tasks of their own; v2 shares one read among concurrent lookups
without a task).
"""

from __future__ import annotations

import asyncio
import textwrap
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from prefetch_ingest import Prefetcher
from prefetch_ingest.engine.wrap import _call
from prefetch_ingest.redis import RedisStore

from .conftest import check_no_task_of_ours, tasks_of_ours_left
from .helpers import GatedLoader
from .redis_server import RedisServer, redis_server_fixture

pytest_plugins = ["pytester"]

redis_server = redis_server_fixture()


async def _value(key: Any) -> str:
    return f"v{key}"


@pytest.mark.anyio
async def test_quiet_when_every_task_of_ours_ended() -> None:
    async with Prefetcher(_value) as pf:
        assert await pf.get(1) == "v1"
        pf.prefetch(2)
        await pf.wait(2)
    assert tasks_of_ours_left() == []
    assert tasks_of_ours_left([pf]) == []
    check_no_task_of_ours([pf])


@pytest.mark.anyio
async def test_the_tasks_of_an_open_prefetcher_are_ours_but_not_leaks() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        pf.prefetch("k")
        await loader.started.wait()
        assert tasks_of_ours_left([pf]) == []  # it is open: its tasks end when it closes
        unowned = tasks_of_ours_left()  # told of no Prefetcher: they are listed
        assert len(unowned) == 2, unowned
        assert any("'prefetch_ingest sweeper'" in t and "_sweeper" in t for t in unowned)
        assert any("'prefetch_ingest load'" in t and "GatedLoader.__call__" in t for t in unowned)
        loader.release()
    assert tasks_of_ours_left() == []


@pytest.mark.anyio
async def test_a_task_of_a_closed_prefetcher_is_a_leak_named_with_where_it_waits() -> None:
    async with Prefetcher(_value) as pf:
        pass
    async with anyio.create_task_group() as tg:
        tg.start_soon(pf._sweeper)  # a coroutine of the engine outliving its Prefetcher
        await wait_all_tasks_blocked()
        left = tasks_of_ours_left([pf])
        assert len(left) == 1, left
        assert "Prefetcher._sweeper (engine/prefetcher.py:" in left[0]
        assert "Event.wait" in left[0]  # where it is suspended
        with pytest.raises(AssertionError, match=r"still alive after the test:\n.*_sweeper"):
            check_no_task_of_ours([pf])
        tg.cancel_scope.cancel()
    check_no_task_of_ours([pf])


@pytest.mark.anyio
async def test_an_unnamed_library_coroutine_and_a_task_named_like_ours_are_found() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_call, anyio.sleep_forever, (), {})  # defined in the package, no owner
        tg.start_soon(anyio.sleep_forever, name="prefetch_ingest load")  # named like ours
        tg.start_soon(anyio.sleep_forever)  # neither: not ours
        await wait_all_tasks_blocked()
        left = tasks_of_ours_left()
        assert len(left) == 2, left
        assert any("_call (engine/wrap.py:" in t for t in left)
        assert any(t.startswith("task 'prefetch_ingest load'") for t in left)
        tg.cancel_scope.cancel()
    assert tasks_of_ours_left() == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_loose_asyncio_task_of_ours_is_found() -> None:
    """Like the Redis backend's notification reader: created with ``create_task``, in no
    task group."""
    task = asyncio.get_running_loop().create_task(_call(anyio.sleep_forever, (), {}))
    await wait_all_tasks_blocked()
    left = tasks_of_ours_left()
    assert len(left) == 1 and "_call" in left[0], left
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tasks_of_ours_left() == []


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_redis_stores_tasks_are_ours_and_gone_once_its_prefetcher_closed(
    redis_server: RedisServer,
) -> None:
    loader = GatedLoader()
    store = RedisStore(redis_server.url, lease=0.3)
    async with Prefetcher(loader, store=store) as pf:  # (its notification reader runs from open)
        pf.prefetch("k")
        await loader.started.wait()
        await wait_all_tasks_blocked()  # the renewal loop is in its sleep between renewals
        assert tasks_of_ours_left([pf]) == []
        unowned = "\n".join(tasks_of_ours_left())
        assert "'prefetch_ingest redis notifications" in unowned, unowned
        assert "RedisBackend._read_notifications (prefetch_ingest/redis.py:" in unowned
        assert "LeasedStore._renew_loop (stores/lease.py:" in unowned
        assert "'prefetch_ingest load'" in unowned and "'prefetch_ingest sweeper'" in unowned
        loader.release()
        await pf.wait("k", timeout=10)
    assert tasks_of_ours_left() == []
    held = store._debug_counts()
    assert held["notification reader"] == 0 and held["owned leases (renewal loops)"] == 0
    assert not any(held.values()), held


_LEAKY = textwrap.dedent(
    """
    import asyncio

    import anyio
    import pytest
    import trio
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st

    from prefetch_ingest import Prefetcher

    pytestmark = pytest.mark.anyio


    async def value(key):
        return key


    async def leave_a_task_of_ours(anyio_backend):
        async with Prefetcher(value) as pf:
            assert await pf.get(1) == 1
        if anyio_backend == "asyncio":
            asyncio.get_running_loop().create_task(pf._sweeper())
        else:
            trio.lowlevel.spawn_system_task(pf._sweeper)
        await anyio.wait_all_tasks_blocked()


    async def test_leaves_a_task_of_ours(anyio_backend):
        await leave_a_task_of_ours(anyio_backend)


    @settings(
        max_examples=2,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # a failure is not shrunk: it fails the same every time
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(st.integers())
    async def test_hypothesis_leaves_a_task_of_ours(anyio_backend, n):
        await leave_a_task_of_ours(anyio_backend)


    async def test_leaves_nothing():
        async with Prefetcher(value) as pf:
            assert await pf.get(1) == 1
    """
)


def test_the_hook_fails_every_async_test_that_leaves_a_task_of_ours(
    pytester: pytest.Pytester,
) -> None:
    """The real plumbing: the suite's conftest, run on tests that leak, on both backends."""
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]\n')
    pytester.makepyfile(test_leaky=_LEAKY)
    reprec = pytester.inline_run("-p", "no:cacheprovider")
    passed, skipped, failed = reprec.listoutcomes()
    assert sorted(r.nodeid.split("::")[1] for r in passed) == [
        "test_leaves_nothing[asyncio]",
        "test_leaves_nothing[trio]",
    ]
    assert not skipped
    assert sorted(r.nodeid.split("::")[1] for r in failed) == [
        "test_hypothesis_leaves_a_task_of_ours[asyncio]",
        "test_hypothesis_leaves_a_task_of_ours[trio]",
        "test_leaves_a_task_of_ours[asyncio]",
        "test_leaves_a_task_of_ours[trio]",
    ]
    for report in failed:
        assert report.when == "call", report.nodeid
        text = str(report.longrepr)
        assert "tasks of prefetch_ingest still alive after the test" in text, text
        assert "(of a Prefetcher in state 'closed') suspended in Prefetcher._sweeper" in text


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_lookup_whose_caller_was_cancelled_ends_when_its_prefetcher_closes(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url)
    client: Any = None
    try:
        async with Prefetcher(_value, store=store) as pf:
            client = store._redis._client
            assert await pf.get("warm") == "vwarm"
            redis_server.pause()  # the next MGET gets no answer
            with anyio.move_on_after(0.2):
                await pf.get("k")  # cancelled while its lookup waits for Redis
        check_no_task_of_ours([pf])
        assert not any(store._debug_counts().values()), store._debug_counts()
    finally:
        redis_server.resume()
        if client is not None:
            await client.connection_pool.disconnect()
