"""Faults on the PostgreSQL side, against a private cluster the tests start (never the
machine's own): an owner process SIGKILLed, the server restarted mid-load, the pool
exhausted, the listener's connection terminated, hostile keys and values, secrets in
DSNs, several instances creating the table at once, the sweep."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import psycopg_pool
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import Prefetcher, StoreError, current_fence
from prefetch_ingest.postgres import PostgresStore, redact

from .postgres_server import PostgresServer, pg_table, postgres_server
from .test_redis_engine import reap, report

__all__ = ["pg_table", "postgres_server"]

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # PostgresStore is asyncio only


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll a condition that lives in another process or the database (bounded)."""
    with anyio.fail_after(timeout):
        while True:
            if await condition():
                return
            await anyio.sleep(0.01)  # nothing local to wait on: the state is elsewhere


@asynccontextmanager
async def opened(store: PostgresStore, ttl: float | None = None) -> AsyncIterator[PostgresStore]:
    await store.open(ttl=ttl, failure_ttl=0.0)
    try:
        yield store
    finally:
        await store.aclose()


def spawn(server: PostgresServer, table: str, key: str, mode: str, *extra: str) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.postgres_worker", server.dsn, table, key, mode, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def ctl(server: PostgresServer, name: str) -> int:
    server.sql("CREATE TABLE IF NOT EXISTS ctl (name text PRIMARY KEY, n bigint NOT NULL)")
    rows = server.sql("SELECT n FROM ctl WHERE name = %s", name)
    return int(rows[0][0]) if rows else 0


class Gate:
    """A load that counts its executions (and their fences) and returns when released."""

    def __init__(self, value: Any = "value") -> None:
        self.value = value
        self.calls = 0
        self.fences: list[int | None] = []
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, key: Any) -> Any:
        self.calls += 1
        self.fences.append(current_fence())
        self.started.set()
        await self.release.wait()
        return self.value


@pytest.mark.slow
async def test_an_owner_sigkilled_mid_load_is_taken_over_after_its_lease_and_run_once_more(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """Process A takes the key and hangs; it is SIGKILLed. Process B, waiting on it, takes
    the lease over once it lapses (by the database's clock) and runs the key: two
    executions in all, one of them the re-run, and every caller of B served."""
    key = f"{pg_table}-killed"
    a = spawn(postgres_server, pg_table, key, "hang-first", "--lease", "1.0", "--callers", "5")
    processes = [a]
    try:
        await until(lambda: _ctl_is(postgres_server, f"{key}:executions", 1))
        b = spawn(postgres_server, pg_table, key, "quick", "--lease", "1.0", "--callers", "20")
        processes.append(b)
        await until(lambda: _ctl_is(postgres_server, f"{key}:ready", 2))
        a.send_signal(signal.SIGKILL)
        got = await report(b)
    finally:
        reap(processes)
    assert got["results"] == ["value"] * 20
    assert got["successes"] == 1
    assert ctl(postgres_server, f"{key}:executions") == 2


async def _ctl_is(server: PostgresServer, name: str, n: int) -> bool:
    return await anyio.to_thread.run_sync(ctl, server, name) >= n


@pytest.mark.slow
async def test_eight_processes_of_a_hundred_callers_run_a_cold_key_once(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    key = f"{pg_table}-cold"
    processes = [
        spawn(postgres_server, pg_table, key, "gate", "--callers", "100") for _ in range(8)
    ]
    try:
        await until(lambda: _ctl_is(postgres_server, f"{key}:ready", 8), timeout=60)
        postgres_server.sql("INSERT INTO ctl VALUES (%s, 1)", f"{key}:go")
        reports = [await report(p) for p in processes]
    finally:
        reap(processes)
    assert ctl(postgres_server, f"{key}:executions") == 1
    assert [r["results"] for r in reports] == [["value"] * 100] * 8
    assert sum(r["successes"] for r in reports) == 1


async def test_a_restart_mid_load_hangs_no_waiter_and_writes_nothing_stale(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """PostgreSQL restarts while A runs the key and B follows it: B rides the restart out
    and gets A's value; A's completion is written once, after the restart. The key's
    row then deleted (invalidate), a later run holds a greater fence all the same (the
    fence comes from a sequence, not from the row), and the old run's token can no
    longer write."""
    load = Gate("first")
    store_a = PostgresStore(postgres_server.dsn, table=pg_table, lease=5.0, poll_interval=0.05)
    store_b = PostgresStore(postgres_server.dsn, table=pg_table, lease=5.0, poll_interval=0.05)
    async with (
        Prefetcher(load, store=store_a) as a,
        Prefetcher(load, store=store_b) as b,
        anyio.create_task_group() as tg,
    ):
        got: list[Any] = []

        async def in_b() -> None:
            got.append(await b.get("k"))

        a.prefetch("k")
        await load.started.wait()
        tg.start_soon(in_b)
        await until(lambda: _following(b))
        await anyio.to_thread.run_sync(postgres_server.restart)
        load.release.set()
        await until(lambda: _true(bool(got)))  # B's waiter ends: never hung
        assert got == ["first"]
        assert (await a.get("k")) == "first"
        assert load.calls == 1
        first_fence = load.fences[0]
        assert await b.invalidate("k")  # the row is deleted
        second = Gate("second")
        second.release.set()
        assert await b.get("k", second, "k") == "second"
        assert second.fences[0] is not None and first_fence is not None
        assert second.fences[0] > first_fence
    rows = postgres_server.sql(f"SELECT count(*) FROM {pg_table} WHERE o_token IS NOT NULL")
    assert rows == [(1,)]


async def _following(pf: Prefetcher[Any, Any]) -> bool:
    store = pf._remote
    return bool(store is not None and store._backend._signals)  # type: ignore[attr-defined]


async def test_an_exhausted_pool_is_a_clear_error_not_a_deadlock(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """Every connection of the store's own pool held (and then of an application's
    psycopg_pool pool): a get fails within the pool's timeout with a StoreError naming
    the cause; once a connection is free again the same Prefetcher works; the
    application's pool is never closed by the store."""
    store = PostgresStore(postgres_server.dsn, table=pg_table, pool_size=1, pool_timeout=0.3)
    async with Prefetcher(Gate(), store=store) as pf:
        pool = store._pg._pool
        assert pool is not None
        async with pool.connection():
            with anyio.fail_after(5), pytest.raises(StoreError) as caught:
                await pf.get("k")
        assert "pool" in str(caught.value) and "busy" in str(caught.value)
        loaded = Gate("v")
        loaded.release.set()
        assert await pf.get("k", loaded, "k") == "v"

    app_pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        postgres_server.dsn, min_size=1, max_size=1, timeout=0.3, open=False
    )
    await app_pool.open(wait=True)
    try:
        store = PostgresStore(app_pool, table=pg_table)
        async with Prefetcher(Gate(), store=store) as pf:
            async with app_pool.connection():
                with anyio.fail_after(5), pytest.raises(StoreError) as caught:
                    await pf.get("k2")
            assert "PoolTimeout" in str(caught.value)
            assert await pf.get("k") == "v"  # stored by the first Prefetcher
        assert not app_pool.closed  # the application's pool stays open
        async with app_pool.connection() as conn:
            await conn.execute("SELECT 1")
    finally:
        await app_pool.close()


async def test_waiters_are_woken_when_the_listener_connection_is_terminated(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """pg_terminate_backend on B's listening connection while B follows A's run: B
    reconnects its listener (a new backend) and its waiter gets A's value."""
    load = Gate("v")
    store_b = PostgresStore(postgres_server.dsn, table=pg_table, poll_interval=0.2)
    async with (
        Prefetcher(load, store=PostgresStore(postgres_server.dsn, table=pg_table)) as a,
        Prefetcher(load, store=store_b) as b,
        anyio.create_task_group() as tg,
    ):
        got: list[Any] = []

        async def in_b() -> None:
            got.append(await b.get("k"))

        a.prefetch("k")
        await load.started.wait()
        tg.start_soon(in_b)
        await until(lambda: _following(b))
        old = store_b._pg.listener_pid
        assert old is not None
        assert postgres_server.sql("SELECT pg_terminate_backend(%s)", old) == [(True,)]

        async def reconnected() -> bool:
            return store_b._pg.listener_pid not in (None, old)

        await until(reconnected)
        load.release.set()
        await until(lambda: _true(bool(got)), timeout=5)
    assert got == ["v"] and load.calls == 1


async def _true(value: bool) -> bool:
    return value


HOSTILE_KEYS: list[Any] = [
    "'; DROP TABLE prefetch_ingest; --",
    "a\x00b",
    "\\x00",
    "$$ || pg_sleep(5) || $$",
    "ключ 🔑",
    ("tenant'", 'run"7', None, 1.5, True),
    "x" * 100_000,
    "",
]
HOSTILE_VALUES: list[Any] = [
    "'); DELETE FROM ctl; --",
    {"a\u0000b": "nul in a JSON key", "$1": [None, -0.0, 10**30]},
    "\ud7ff\ue000 \\u0000 \\x",
    ["x" * 1_000_000],
]


async def test_hostile_keys_and_values_round_trip_and_inject_nothing(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """Keys and values full of SQL, quotes, NUL and odd unicode go through two instances
    unchanged (each key its own row, by its digest); the table is all still there."""
    runs = 0

    async def load(key: Any) -> Any:
        nonlocal runs
        runs += 1
        return HOSTILE_VALUES[HOSTILE_KEYS.index(key) % len(HOSTILE_VALUES)]

    def make() -> PostgresStore:
        return PostgresStore(postgres_server.dsn, table=pg_table)

    async with Prefetcher(load, store=make()) as a, Prefetcher(load, store=make()) as b:
        for i, key in enumerate(HOSTILE_KEYS):
            want = HOSTILE_VALUES[i % len(HOSTILE_VALUES)]
            assert await a.get(key) == want
            assert await b.get(key) == want  # from the store
    assert runs == len(HOSTILE_KEYS)
    rows = postgres_server.sql(f"SELECT count(*) FROM {pg_table}")
    assert rows == [(len(HOSTILE_KEYS),)]


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://postgres:s3cr3t-pw@127.0.0.1:{port}/postgres",
        "postgresql://postgres@127.0.0.1:{port}/postgres?password=s3cr3t-pw",
        "host=127.0.0.1 port={port} user=postgres password=s3cr3t-pw dbname=postgres",
        "host=127.0.0.1 port={port} user=postgres password='s3cr3t-pw x' dbname=postgres",
    ],
)
async def test_no_password_in_where_repr_errors_or_logs(
    postgres_server: PostgresServer, pg_table: str, template: str
) -> None:
    """A DSN's password (URL user part, ``?password=``, key=value) appears in no repr,
    ``where``, StoreError or log event; also when the server is down."""
    port = postgres_server.port
    dsn = template.format(port=port)
    dead = template.format(port=1)  # nothing listens there: every operation fails
    for text in (redact(dsn), repr(PostgresStore(dsn, table=pg_table))):
        assert "s3cr3t" not in text and "127.0.0.1" in text
    async with opened(PostgresStore(dsn, table=pg_table)) as ok:
        assert "s3cr3t" not in ok._pg.where
    with capture_logs() as logs, pytest.raises(StoreError) as caught:
        async with Prefetcher(Gate(), store=PostgresStore(dead, table=pg_table, pool_timeout=1)):
            pass
    texts = [str(caught.value), repr(caught.value), *map(str, logs)]
    assert not [t for t in texts if "s3cr3t" in t]
    assert "PostgreSQL at postgresql://postgres@127.0.0.1:1/postgres" in str(caught.value)


async def test_several_instances_creating_the_table_at_once_all_open(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """Eight stores open on a missing table at the same moment: every one opens (one of
    them creates it, under an advisory lock); ``schema_sql`` runs again harmlessly."""
    stores = [PostgresStore(postgres_server.dsn, table=pg_table) for _ in range(8)]
    async with anyio.create_task_group() as tg:
        for s in stores:
            tg.start_soon(functools.partial(s.open, ttl=None, failure_ttl=0.0))
    try:
        assert all(s._open for s in stores)
    finally:
        for s in stores:
            await s.aclose()
    postgres_server.sql(PostgresStore.schema_sql(pg_table))
    assert postgres_server.sql(f"SELECT count(*) FROM {pg_table}") == [(0,)]


async def test_the_sweep_deletes_expired_rows_only_through_the_expiry_index(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """Rows whose every part expired (by the database's clock) are deleted by the sweep;
    a live row stays; the sweep's plan is an index scan on the expiry."""
    async with opened(PostgresStore(postgres_server.dsn, table=pg_table), ttl=0.2) as short:
        for i in range(20):
            await short.load(f"old{i}", _value(i), background=False, force=False)
    async with opened(PostgresStore(postgres_server.dsn, table=pg_table), ttl=None) as keep:
        await keep.load("kept", _value("kept"), background=False, force=False)
        rows = postgres_server.sql(
            f"SELECT count(*) FROM {pg_table} WHERE gone_at > now() - interval '1 hour'"
        )
        assert rows == [(21,)]
        await until(lambda: _none_live(postgres_server, pg_table))
        assert await keep.sweep() == 20
        entry = await keep.lookup("kept")
        assert entry is not None and entry.value == "kept"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(f"EXPLAIN DELETE FROM {pg_table} WHERE gone_at < now()").fetchall()
    assert any(f"{pg_table}_gone_at" in line[0] for line in plan), plan


async def _none_live(server: PostgresServer, table: str) -> bool:
    rows = await anyio.to_thread.run_sync(
        lambda: server.sql(f"SELECT count(*) FROM {table} WHERE gone_at < now()")
    )
    return bool(rows == [(20,)])


def _value(v: Any) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        return v

    return run


async def test_opened_during_an_outage_with_fallback_local_it_creates_its_table_later(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """The database is down when the Prefetcher opens (``fallback="local"``): the key runs
    here; once the database answers, the store creates its missing table on first use,
    listens, and is the truth again (a second instance sees the stored value)."""
    load = Gate("v")
    load.release.set()
    await anyio.to_thread.run_sync(postgres_server.stop)
    try:
        store = PostgresStore(postgres_server.dsn, table=pg_table, fallback="local")
        async with Prefetcher(load, store=store) as a:
            assert await a.get("during") == "v"
            await anyio.to_thread.run_sync(postgres_server.start)
            await until(lambda: _true(store._pg.listener_pid is not None))
            assert await a.get("after", load, "after") == "v"
            other = PostgresStore(postgres_server.dsn, table=pg_table)
            async with Prefetcher(load, store=other) as b:
                assert await b.get("after") == "v"
    finally:
        if not postgres_server.running():
            postgres_server.start()
    assert load.calls == 2  # "during" here, "after" once for both instances


async def test_a_server_crash_mid_load_loses_no_committed_lease_and_fences_grow(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """PostgreSQL SIGKILLed (a crash, recovery on the next start) while A runs the key and
    B follows: the committed lease survives, so B does not run the key; A's completion
    lands once the server is back and B gets it; the next run's fence is greater (the
    sequence is recovered ahead, never behind)."""
    load = Gate("first")
    store_b = PostgresStore(postgres_server.dsn, table=pg_table, lease=10.0, poll_interval=0.05)
    async with (
        Prefetcher(load, store=PostgresStore(postgres_server.dsn, table=pg_table, lease=10.0)) as a,
        Prefetcher(load, store=store_b) as b,
        anyio.create_task_group() as tg,
    ):
        got: list[Any] = []

        async def in_b() -> None:
            got.append(await b.get("k"))

        a.prefetch("k")
        await load.started.wait()
        tg.start_soon(in_b)
        await until(lambda: _following(b))
        await anyio.to_thread.run_sync(postgres_server.kill)
        await anyio.to_thread.run_sync(postgres_server.start)
        load.release.set()
        await until(lambda: _true(bool(got)))
        assert got == ["first"] and load.calls == 1
        assert await b.invalidate("k")
        second = Gate("second")
        second.release.set()
        assert await a.get("k", second, "k") == "second"
        assert second.fences[0] is not None and load.fences[0] is not None
        assert second.fences[0] > load.fences[0]


async def test_a_table_dropped_underneath_is_created_again(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """``DROP TABLE`` while an instance is open: its next call creates the table again
    and goes on (the statement that found no table did nothing, and runs once more)."""
    load = Gate("v")
    load.release.set()
    async with Prefetcher(load, store=PostgresStore(postgres_server.dsn, table=pg_table)) as a:
        assert await a.get("k") == "v"
        postgres_server.sql(f"DROP TABLE {pg_table}")
        assert await a.get("k") == "v"  # gone with the table: run again, stored again
        assert load.calls == 2
    assert postgres_server.sql(f"SELECT count(*) FROM {pg_table}") == [(1,)]


async def test_an_outage_longer_than_the_lease_fences_out_the_old_owner(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """The database is down for longer than A's lease while A runs the key: when it is
    back, A's lease has lapsed by the database's clock, B (which rode the outage out)
    takes the key over and stores its value; A's load then returns, its own caller gets
    its value, and its completion is refused: the newer value stands."""
    started = anyio.Event()
    finish = anyio.Event()

    async def old_owner() -> Any:
        started.set()
        await finish.wait()
        return "old owner"

    a = PostgresStore(postgres_server.dsn, table=pg_table, lease=1.0)
    b = PostgresStore(postgres_server.dsn, table=pg_table, lease=10.0, poll_interval=0.05)
    outcomes: dict[str, Any] = {}
    with capture_logs() as logs:
        async with opened(a), opened(b), anyio.create_task_group() as tg:

            async def in_a() -> None:
                outcomes["a"] = await a.load("k", old_owner, background=False, force=False)

            async def in_b() -> None:
                outcomes["b"] = await b.load(
                    "k", _value("new owner"), background=False, force=False
                )

            tg.start_soon(in_a)
            await started.wait()
            tg.start_soon(in_b)
            await until(lambda: _true(bool(b._pg._signals)))
            await anyio.to_thread.run_sync(postgres_server.stop)
            # the lease lapses by the database's clock, which no one can ask while the
            # server is down: the outage itself has to last that long
            await anyio.sleep(1.5)
            await anyio.to_thread.run_sync(postgres_server.start)
            await until(lambda: _true("b" in outcomes))

            async def a_knows() -> bool:
                return any(e["event"] == "prefetch.store_lease_lost" for e in logs)

            await until(a_knows)
            finish.set()
        async with opened(PostgresStore(postgres_server.dsn, table=pg_table)) as c:
            entry = await c.lookup("k")
    assert outcomes["b"].ran_here and outcomes["b"].value == "new owner"
    assert outcomes["a"].value == "old owner"  # its own caller still gets its value
    assert entry is not None and entry.value == "new owner"  # never stored over the newer
