"""PostgresStore's arguments, its schema for migrations, and its refusal of trio."""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg.rows import dict_row

from prefetch_ingest import Prefetcher, StoreError, current_fence
from prefetch_ingest.postgres import PostgresStore, redact
from tests.postgres_server import PostgresServer, pg_table, postgres_server

__all__ = ["pg_table", "postgres_server"]


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ("Upper", "lower-case"),
        ("a-b", "identifier"),
        ("x; DROP TABLE y", "identifier"),
        ("t" * 41, "40 characters"),
        ("", "identifier"),
        (3, "identifier"),
    ],
)
def test_a_bad_table_name_is_a_value_error(table: Any, why: str) -> None:
    with pytest.raises(ValueError, match="table must be"):
        PostgresStore("postgresql://u@h/db", table=table)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="dsn_or_pool"):
        PostgresStore(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore("postgresql://u@h/db", pool_size=0)
    with pytest.raises(ValueError, match="pool_timeout"):
        PostgresStore("postgresql://u@h/db", pool_timeout=-1)
    with pytest.raises(ValueError, match="not a PostgreSQL DSN") as caught:
        PostgresStore("host=h password=s3cr3t = =")
    assert "s3cr3t" not in str(caught.value)


def test_redact_keeps_user_host_port_and_database_only() -> None:
    assert redact("postgresql://app:pw@db.example:6432/prod?password=x&sslmode=require") == (
        "postgresql://app@db.example:6432/prod"
    )
    assert redact("host=db user=app password='p w' dbname=prod") == (
        "postgresql://app@db:5432/prod"
    )
    assert redact("postgresql://db/prod") == "postgresql://db:5432/prod"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_store_refuses_trio_when_opened() -> None:
    with pytest.raises(RuntimeError, match="asyncio only"):
        async with Prefetcher(store=PostgresStore("postgresql://u@127.0.0.1:1/db")):
            pass


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_table_made_by_a_migration_with_schema_sql_is_used_as_it_is(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    ddl = PostgresStore.schema_sql(table=pg_table)
    # quoted identifiers (a table named like a keyword works too)
    assert f'CREATE TABLE IF NOT EXISTS "{pg_table}"' in ddl and f"{pg_table}_fence" in ddl
    postgres_server.sql(ddl)
    postgres_server.sql(f"INSERT INTO {pg_table} (digest) VALUES ('marker')")

    async def load(key: str) -> str:
        return key.upper()

    async with Prefetcher(load, store=PostgresStore(postgres_server.dsn, table=pg_table)) as pf:
        assert await pf.get("k") == "K"
    digests = {r[0] for r in postgres_server.sql(f"SELECT digest FROM {pg_table}")}
    assert "marker" in digests and len(digests) == 2  # not re-created: the row is still there


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_application_pool_with_dict_rows_and_transactions_is_served_as_well(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """The application's pool makes dict rows and raw cursors (``$1`` placeholders) and
    is not autocommit: the store reads its
    own rows as tuples, its statements are committed when the connection goes back, and
    two instances on that pool (and a third on a DSN) share one run."""
    pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        postgres_server.dsn,
        min_size=1,
        max_size=4,
        open=False,
        kwargs={"row_factory": dict_row, "cursor_factory": psycopg.AsyncRawCursor},
    )
    await pool.open(wait=True)
    runs = 0

    async def load(key: str) -> str:
        nonlocal runs
        runs += 1
        return key * 2

    try:
        async with (
            Prefetcher(load, store=PostgresStore(pool, table=pg_table)) as a,
            Prefetcher(load, store=PostgresStore(pool, table=pg_table)) as b,
            Prefetcher(load, store=PostgresStore(postgres_server.dsn, table=pg_table)) as c,
        ):
            assert await a.get("k") == "kk"
            assert await b.get("k") == "kk"
            assert await c.get("k") == "kk"
            assert (await c.status("k")).status.value == "completed"
        assert runs == 1 and not pool.closed
    finally:
        await pool.close()


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_missing_fence_sequence_is_made_again_above_every_fence_of_the_table(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """The table is there but its sequence is not (at open, then dropped while open):
    the sequence is created again, starting above the greatest fence in the table, so a
    fence handed out is still greater than every earlier one."""
    fences: list[int | None] = []

    async def load(key: str) -> str:
        fences.append(current_fence())
        return key

    high = 9_000_000_000_000_000_000
    postgres_server.sql(PostgresStore.schema_sql(pg_table))
    postgres_server.sql(f"INSERT INTO {pg_table} (digest, o_fence) VALUES ('old', {high})")
    postgres_server.sql(f"DROP SEQUENCE {pg_table}_fence")
    async with Prefetcher(load, store=PostgresStore(postgres_server.dsn, table=pg_table)) as pf:
        assert await pf.get("k") == "k"
        postgres_server.sql(f"DROP SEQUENCE {pg_table}_fence")  # while open
        assert await pf.get("k2") == "k2"
    first, second = fences
    assert first is not None and second is not None and high < first < second


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_another_applications_table_of_that_name_is_a_clear_store_error(
    postgres_server: PostgresServer, pg_table: str
) -> None:
    """A table of that name without the store's columns: the open fails with a
    StoreError naming the missing columns, before any DDL touches it."""
    postgres_server.sql(f"CREATE TABLE {pg_table} (id int)")
    try:
        with pytest.raises(StoreError, match="no column") as caught:
            async with Prefetcher(store=PostgresStore(postgres_server.dsn, table=pg_table)):
                pass
        assert caught.value.__cause__ is not None
        columns = postgres_server.sql(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0",
            pg_table,
        )
        assert columns == [(1,)]  # untouched
    finally:
        postgres_server.sql(f"DROP TABLE {pg_table}")
