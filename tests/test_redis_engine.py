"""The Prefetcher on a RedisStore: end to end, in this process and in real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from prefetch_ingest import (
    Prefetcher,
    PrefetcherClosed,
    Progress,
    RemoteLoadError,
    Status,
    StoreError,
    report_progress,
)
from prefetch_ingest.redis import RedisStore

from .redis_server import RedisServer, redis_server_fixture

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

redis_server = redis_server_fixture()

ROOT = Path(__file__).resolve().parent.parent
MEASURING = {"info", "hello", "client|setinfo"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore is asyncio only


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Poll a condition that lives in Redis or in another process (bounded)."""
    with anyio.fail_after(timeout):
        while True:
            if await condition():
                return
            await anyio.sleep(0.02)  # nothing to wait on: the state is elsewhere


class Counter:
    """A loader that counts its executions and can be held at a gate."""

    def __init__(self, value: Any = "value") -> None:
        self.calls = 0
        self.value = value
        self.gate: anyio.Event | None = None
        self.started = anyio.Event()

    async def __call__(self, key: Any) -> Any:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.value


# -- one process -------------------------------------------------------------------


async def test_get_then_hit_with_one_redis_command(redis_server: RedisServer) -> None:
    """A cold get runs the load; a later get is a hit costing exactly one Redis command."""
    load = Counter({"stats": 1})
    async with Prefetcher(load, store=RedisStore(redis_server.url)) as pf:
        assert await pf.get(("p", "r")) == {"stats": 1}
        before = redis_server.command_calls()
        assert await pf.get(("p", "r")) == {"stats": 1}
        after = redis_server.command_calls()
        assert load.calls == 1
        assert pf.stats().hits == 1
    delta = {
        k: after[k] - before.get(k, 0)
        for k in after
        if after[k] != before.get(k, 0) and k not in MEASURING
    }
    assert delta == {"get": 1}  # the outcome only: a get needs nothing else


async def test_a_stampede_on_a_cold_key_costs_three_round_trips(
    redis_server: RedisServer,
) -> None:
    """100 concurrent gets of a cold key in one process: one GET (lookups of one key are
    shared), the acquire script and the completion script; the loader runs once."""
    load = Counter()
    async with Prefetcher(load, store=RedisStore(redis_server.url)) as pf:
        await pf.get("warm-up")  # loads the Lua scripts into Redis once
        load.calls = 0
        load.started = anyio.Event()
        load.gate = anyio.Event()
        before = redis_server.command_calls()
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(pf.get, "cold")
            await load.started.wait()
            load.gate.set()
        after = redis_server.command_calls()
    assert load.calls == 1
    client_side = {
        k: after[k] - before.get(k, 0)
        for k in ("mget", "evalsha", "evalsha_ro", "get", "set", "eval")
        if after.get(k, 0) != before.get(k, 0)
    }
    # one GET of the outcome by the lookup; the others are the ones the two scripts run
    # inside Redis (acquire: GET outcome, lease and cancel note, SET lease; complete: GET
    # lease, GET outcome for its fence, SET outcome)
    assert client_side == {"evalsha": 2, "get": 6, "set": 2}


async def test_a_brand_new_instance_sees_status_and_hits(redis_server: RedisServer) -> None:
    async with Prefetcher(Counter(7), store=RedisStore(redis_server.url)) as first:
        assert first.prefetch("k")
        snap = await first.wait("k")
        assert snap.status is Status.COMPLETED
    second_load = Counter(8)
    async with Prefetcher(second_load, store=RedisStore(redis_server.url)) as second:
        snap = await second.status("k")
        assert snap.status is Status.COMPLETED
        assert snap.result == 7
        assert snap.background is True
        assert snap.started_at is not None and snap.completed_at is not None
        assert snap.started_at.tzinfo is not None
        assert snap.expires_at is not None
        assert await second.get("k") == 7
        assert second_load.calls == 0
        assert (await second.status("unknown")).status is Status.NOT_STARTED


async def test_two_instances_fifty_callers_each_one_execution(redis_server: RedisServer) -> None:
    a_load, b_load = Counter("v"), Counter("v")
    a_load.gate = b_load.gate = anyio.Event()
    a_load.started = b_load.started = anyio.Event()
    got: list[Any] = []
    async with (
        Prefetcher(a_load, store=RedisStore(redis_server.url, lease=5.0)) as a,
        Prefetcher(b_load, store=RedisStore(redis_server.url, lease=5.0)) as b,
    ):

        async def call(pf: Prefetcher[Any, Any]) -> None:
            got.append(await pf.get("cold"))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call, a)
                tg.start_soon(call, b)
            await a_load.started.wait()  # one of them runs it (a Redis round trip away)
            await anyio.wait_all_tasks_blocked()
            assert a_load.calls + b_load.calls == 1
            a_load.gate.set()
    assert got == ["v"] * 100
    assert a_load.calls + b_load.calls == 1


async def test_remote_failure_is_raised_in_the_other_instance(redis_server: RedisServer) -> None:
    async def failing(key: Any) -> Any:
        raise ValueError("ingest broke")

    async with (
        Prefetcher(failing, failure_ttl=30.0, store=RedisStore(redis_server.url)) as a,
        Prefetcher(Counter(), failure_ttl=30.0, store=RedisStore(redis_server.url)) as b,
    ):
        with pytest.raises(ValueError, match="ingest broke"):
            await a.get("k")
        with pytest.raises(RemoteLoadError, match="ValueError: ingest broke"):
            await b.get("k")
        snap = await b.status("k")
        assert snap.status is Status.FAILED and snap.error == "ValueError: ingest broke"
        assert await b.get("k", force_refresh=True) == "value"


async def test_invalidate_forgets_the_shared_result(redis_server: RedisServer) -> None:
    load = Counter()
    async with Prefetcher(load, store=RedisStore(redis_server.url)) as pf:
        await pf.get("k")
        assert await pf.invalidate("k")
        await pf.get("k")
        assert load.calls == 2


async def test_progress_and_watch_across_instances(redis_server: RedisServer) -> None:
    step = anyio.Event()
    finish = anyio.Event()

    async def load(key: Any) -> str:
        report_progress(1, 4, "first")
        await step.wait()
        report_progress(4, 4, "last")
        await finish.wait()
        return "done"

    async with (
        Prefetcher(load, store=RedisStore(redis_server.url)) as owner,
        Prefetcher(store=RedisStore(redis_server.url)) as observer,
    ):
        owner.prefetch("k")

        async def running_with_progress() -> bool:
            snap = await observer.status("k")
            return snap.status is Status.RUNNING and snap.progress is not None

        await until(running_with_progress)
        seen: list[tuple[Status, Progress | None]] = []
        with anyio.fail_after(30):
            async for snap in observer.watch("k"):
                seen.append((snap.status, snap.progress))
                if snap.progress is not None and snap.progress.done == 1:
                    step.set()
                if snap.progress is not None and snap.progress.done == 4:
                    finish.set()
        assert seen[-1][0] is Status.COMPLETED
        assert any(p is not None and p.done == 4 for _, p in seen)


async def test_unreachable_redis_fails_clearly(redis_server: RedisServer) -> None:
    redis_server.kill()
    with capture_logs() as logs, pytest.raises(StoreError, match="unreachable"):
        async with Prefetcher(Counter(), store=RedisStore(redis_server.url)):
            pass
    assert any(e["event"] == "prefetch.store_unavailable" and e["store"] == "Redis" for e in logs)


async def test_fallback_local_behaves_like_one_instance(redis_server: RedisServer) -> None:
    redis_server.kill()
    load = Counter()
    with capture_logs() as logs:
        async with Prefetcher(load, store=RedisStore(redis_server.url, fallback="local")) as pf:
            assert await pf.get("k") == "value"
            assert await pf.get("k") == "value"  # kept here, as with no shared store
            assert (await pf.status("k")).status is Status.COMPLETED
    assert load.calls == 1
    assert any(
        e["event"] == "prefetch.store_unavailable" and e["fallback"] == "local" for e in logs
    )


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_entering_fails_clearly(redis_server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="asyncio only"):
        async with Prefetcher(Counter(), store=RedisStore(redis_server.url)):
            pass


async def test_closing_cancels_a_load_and_releases_its_lease(redis_server: RedisServer) -> None:
    load = Counter()
    load.gate = anyio.Event()  # never set
    async with Prefetcher(load, store=RedisStore(redis_server.url, lease=30.0)) as pf:
        pf.prefetch("k")
        await load.started.wait()
        assert redis_server.command("KEYS", "*:l")
    assert redis_server.command("KEYS", "*") == []


async def test_a_caller_waiting_on_redis_gets_prefetcher_closed_when_it_closes(
    redis_server: RedisServer,
) -> None:
    """A get from a task outside the Prefetcher waits on a lookup Redis does not answer; the
    Prefetcher closes: the lookup is ended (no task left) and the caller gets
    PrefetcherClosed, not a stray cancellation."""
    outcome: list[BaseException] = []
    store = RedisStore(redis_server.url)

    async def caller(pf: Prefetcher[str, str]) -> None:
        try:
            await pf.get("k")
        except Exception as exc:  # the outcome is the assertion
            outcome.append(exc)

    async def looking_up() -> bool:
        return bool(store._debug_counts()["shared lookups"])

    try:
        async with anyio.create_task_group() as outside:
            async with Prefetcher(Counter(), store=store) as pf:
                assert await pf.get("warm") == "value"
                redis_server.pause()  # the next MGET gets no answer
                outside.start_soon(caller, pf)
                await until(looking_up)
            assert not store._debug_counts()["shared lookups"]
    finally:
        redis_server.resume()
    assert len(outcome) == 1 and isinstance(outcome[0], PrefetcherClosed), outcome


async def test_application_client_is_left_open(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with Prefetcher(Counter(), store=RedisStore(client)) as pf:
            await pf.get("k")
        assert await client.get("x") is None  # still usable
    finally:
        await client.aclose()


# -- real processes -----------------------------------------------------------------


def spawn(server: RedisServer, key: str, mode: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.redis_worker", server.url, key, mode, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


async def report(process: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    out, err = await anyio.to_thread.run_sync(lambda: process.communicate(timeout=timeout))
    assert process.returncode == 0, err
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no report; stdout={out!r} stderr={err!r}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def reap(processes: list[subprocess.Popen[str]]) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
        p.communicate()


async def counter(server: RedisServer, name: str) -> int:
    value = server.command("GET", name)
    return int(value) if value is not None else 0


@pytest.mark.slow
async def test_four_processes_fifty_callers_one_execution(redis_server: RedisServer) -> None:
    """4 processes x 50 concurrent callers of one cold key: the loader runs exactly once."""
    processes = [spawn(redis_server, "cold", "gate") for _ in range(4)]
    try:

        async def all_in() -> bool:
            return await counter(redis_server, "cold:ready") == 4

        await until(all_in, timeout=60)
        redis_server.command("SET", "cold:go", "1")
        reports = [await report(p) for p in processes]
    finally:
        reap(processes)
    assert await counter(redis_server, "cold:executions") == 1
    assert [r["results"] for r in reports] == [["value"] * 50] * 4
    assert sum(r["successes"] for r in reports) == 1


@pytest.mark.slow
async def test_a_value_completed_by_one_process_is_a_hit_for_a_new_one(
    redis_server: RedisServer,
) -> None:
    first = await report(spawn(redis_server, "k", "quick", "--callers", "1"))
    assert first["results"] == ["value"] and first["misses"] == 1
    second = await report(spawn(redis_server, "k", "quick", "--callers", "3"))
    assert second["results"] == ["value"] * 3
    assert second["hits"] == 3 and second["successes"] == 0
    assert await counter(redis_server, "k:executions") == 1


@pytest.mark.slow
async def test_sigkill_of_the_owner_another_process_takes_over(redis_server: RedisServer) -> None:
    """The owning process is killed mid-load; a waiting process takes over when the lease
    lapses, completes, and nobody hangs."""
    lease = ("--lease", "1.0")
    owner = spawn(redis_server, "k", "hang-first", "--callers", "5", *lease)
    processes = [owner]
    try:

        async def owner_running() -> bool:
            return await counter(redis_server, "k:executions") == 1

        await until(owner_running)
        waiter = spawn(redis_server, "k", "hang-first", "--callers", "5", *lease)
        processes.append(waiter)

        async def waiter_in() -> bool:
            return await counter(redis_server, "k:ready") == 2

        await until(waiter_in)
        owner.send_signal(signal.SIGKILL)
        result = await report(waiter, timeout=60)
    finally:
        reap(processes)
    assert result["results"] == ["value"] * 5
    assert await counter(redis_server, "k:executions") == 2
    assert redis_server.command("KEYS", "mp:*:l") == []
