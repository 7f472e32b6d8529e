"""Fencing numbers of the Redis store: each run of a key holds a greater fence than every
earlier run of that key, across a Redis restart that lost every key too; a completion never
replaces a record of a greater fence; and a system the load writes to (PostgreSQL here) can use
the fence to refuse a stale owner's write."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import Prefetcher
from prefetch_ingest._redis_records import dump_outcome, parse_lease, parse_outcome
from prefetch_ingest.redis import RedisStore, current_fence
from prefetch_ingest.stores.interface import Outcome

from .postgres_server import postgres_server
from .redis_server import RedisServer, redis_server_fixture
from .test_examples import postgres_admin_dsn, postgres_url
from .test_redis_store import lease_key, opened, record_key

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

redis_server = redis_server_fixture()
# fixtures used here, defined there
__all__ = ["postgres_admin_dsn", "postgres_server", "postgres_url"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore is asyncio only


def server_time_us(server: RedisServer) -> int:
    seconds, micros = server.command("TIME")
    return int(seconds) * 1_000_000 + int(micros)


def completed_record(token: str, fence: int, payload: bytes) -> bytes:
    """A completed outcome as a run holding ``fence`` would store it."""
    return dump_outcome(
        Outcome(
            ok=True,
            token=token,
            fence=fence,
            started_at=0.0,
            completed_at=0.0,
            background=False,
            payload=payload,
        )
    )


def fenced(value: Any, seen: list[int | None]) -> Any:
    async def load() -> Any:
        seen.append(current_fence())
        return value

    return load


async def test_each_run_of_a_key_gets_a_greater_fence_from_the_servers_clock(
    redis_server: RedisServer,
) -> None:
    seen: list[int | None] = []
    async with opened(RedisStore(redis_server.url), ttl=60.0) as store:
        before = server_time_us(redis_server)
        for i in range(5):
            await store.load("k", fenced(i, seen), background=False, force=True)
        after = server_time_us(redis_server)
        record = redis_server.command("GET", record_key("prefetch_ingest", "k"))
    fences = [f for f in seen if f is not None]
    assert len(fences) == 5
    assert fences == sorted(set(fences))  # strictly increasing
    assert before <= fences[0] and fences[-1] <= after  # the epoch is Redis's own clock
    assert parse_outcome(record).fence == fences[-1]  # the stored result carries its run's fence
    assert current_fence() is None  # outside a load


async def test_the_fence_goes_on_from_a_stored_fence_ahead_of_the_clock(
    redis_server: RedisServer,
) -> None:
    """A record whose fence is ahead of the server's clock (the clock was set back, or the
    record comes from a server whose clock ran ahead): the next run still gets a greater one."""
    ahead = server_time_us(redis_server) + 10**12  # about 11.6 days ahead
    redis_server.command(
        "SET",
        record_key("prefetch_ingest", "k"),
        completed_record("a" * 16, ahead, b'"from ahead"'),
    )
    seen: list[int | None] = []
    async with opened(RedisStore(redis_server.url)) as store:
        outcome = await store.load("k", fenced("new", seen), background=False, force=True)
        assert outcome.ran_here
        entry = await store.lookup("k")
    assert seen == [ahead + 1]
    assert entry is not None and entry.value == "new"


async def test_a_completion_never_replaces_a_result_of_a_greater_fence(
    redis_server: RedisServer,
) -> None:
    """While a run holds its lease, a result of a later run (a greater fence) is stored: the
    run's caller still gets its value, but the stored result stays the later one, the refusal
    is logged, and the lease is handed back."""
    started = anyio.Event()
    finish = anyio.Event()
    seen: list[int | None] = []

    async def slow() -> Any:
        seen.append(current_fence())
        started.set()
        await finish.wait()
        return "older run"

    result: list[Any] = []
    with capture_logs() as logs:
        async with opened(RedisStore(redis_server.url), ttl=60.0) as store:
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    result.append(await store.load("k", slow, background=False, force=False))

                tg.start_soon(run)
                await started.wait()
                (fence,) = seen
                assert fence is not None
                lease = redis_server.command("GET", lease_key("prefetch_ingest", "k"))
                assert parse_lease(lease).fence == fence
                later = completed_record("b" * 16, fence + 1, b'"later run"')
                redis_server.command("SET", record_key("prefetch_ingest", "k"), later)
                finish.set()
            entry = await store.lookup("k")
    assert result[0].value == "older run" and result[0].ran_here
    assert entry is not None and entry.value == "later run"
    assert [e["fence"] for e in logs if e["event"] == "prefetch.store_superseded"] == [fence]
    assert redis_server.command("EXISTS", lease_key("prefetch_ingest", "k")) == 0


async def test_fenced_writes_to_postgresql_keep_the_result_of_the_run_after_a_redis_restart(
    redis_server: RedisServer, postgres_url: str
) -> None:
    """The origin problem's database: an owner runs, Redis restarts empty, a second instance
    runs the key again and writes its stats; then the first owner wakes and writes too. With
    the fence in the upsert's condition, PostgreSQL keeps the second run's stats, and Redis
    holds the second run's result; the old owner's caller still gets its own value."""
    import asyncpg

    db = await asyncpg.connect(postgres_url)
    try:
        await db.execute(
            "CREATE TABLE run_stats (run_id text PRIMARY KEY, stats text NOT NULL,"
            " fence bigint NOT NULL)"
        )

        async def write_stats(stats: str) -> str:
            fence = current_fence()
            assert fence is not None
            status: str = await db.execute(
                "INSERT INTO run_stats (run_id, stats, fence) VALUES ($1, $2, $3)"
                " ON CONFLICT (run_id) DO UPDATE SET stats = EXCLUDED.stats,"
                " fence = EXCLUDED.fence WHERE run_stats.fence < EXCLUDED.fence",
                "run-7",
                stats,
                fence,
            )
            return status

        started = anyio.Event()
        finish = anyio.Event()
        statuses: dict[str, str] = {}

        async def old_owner(key: str) -> str:
            started.set()
            await finish.wait()
            statuses["old"] = await write_stats("old stats")
            return "old stats"

        async def new_owner(key: str) -> str:
            statuses["new"] = await write_stats("new stats")
            return "new stats"

        with capture_logs() as logs:
            async with (
                Prefetcher(old_owner, store=RedisStore(redis_server.url)) as a,
                Prefetcher(new_owner, store=RedisStore(redis_server.url)) as b,
                anyio.create_task_group() as tg,
            ):
                got: dict[str, Any] = {}

                async def in_a() -> None:
                    got["a"] = await a.get("run-7")

                tg.start_soon(in_a)
                await started.wait()
                redis_server.kill()
                redis_server.start()  # same port, every key lost
                got["b"] = await b.get("run-7")
                finish.set()
            assert got == {"a": "old stats", "b": "new stats"}
            async with opened(RedisStore(redis_server.url)) as store:
                entry = await store.lookup("run-7")
        row = await db.fetchrow("SELECT stats, fence FROM run_stats WHERE run_id = 'run-7'")
    finally:
        await db.close()
    assert statuses == {"new": "INSERT 0 1", "old": "INSERT 0 0"}  # the stale write refused
    assert row is not None and row["stats"] == "new stats"
    assert entry is not None and entry.value == "new stats"
    assert any(e["event"] == "prefetch.store_lease_lost" for e in logs)
