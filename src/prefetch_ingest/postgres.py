"""The PostgreSQL store: one execution per key across processes, with no other server to run.

Install with the ``postgres`` extra (``pip install 'prefetch-ingest[postgres]'``) and
pass it to the Prefetcher::

    async with Prefetcher(load, store=PostgresStore("postgresql://app@db/app")) as pf:
        stats = await pf.get(("project-1", "run-7"))

How it works and what is and is not guaranteed: ``docs/postgres.md``. This module
holds only the primitives of the shared-store interface
(:mod:`prefetch_ingest.stores.interface`) on PostgreSQL; the lease algorithm they
serve is :mod:`prefetch_ingest.stores.lease`, shared by every backend. In short:

- one row per key (by its digest) holds the outcome, the lease and the note, each
  part with its own expiry by the database's clock (``now()``); a part past its
  expiry is never read as live, and a sweep deletes rows with nothing live left
  through an index on the row's last expiry;
- every primitive is one autocommitted statement (``INSERT ... ON CONFLICT`` or
  ``UPDATE ... RETURNING`` with ``pg_notify`` in a CTE): atomic, one round trip;
- fences come from a sequence of the table (``nextval`` only grows, whatever
  happens to the rows), started at the database clock in microseconds;
- notifications: ``NOTIFY`` on a channel named after the table, payload
  ``digest:event``; one dedicated connection per store ``LISTEN``\\ s (not one of
  the pool's) and reconnects; waiters also poll.

The store runs on asyncio only (psycopg's async connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Literal, TypeVar

import anyio

try:
    import psycopg
    import psycopg_pool
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.rows import tuple_row
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "prefetch_ingest.postgres needs psycopg 3 and psycopg_pool: "
        "pip install 'prefetch-ingest[postgres]'"
    ) from _exc

from . import _log
from ._errors import CodecError
from ._fence import current_fence
from ._types import Progress
from ._validate import error_text
from .stores.codec import Codec, JSONCodec
from .stores.interface import Acquired, Completion, Outcome, Read, Run
from .stores.lease import LeasedStore, check_duration, poll_for
from .stores.signals import Signals, require_asyncio

__all__ = ["Codec", "CodecError", "JSONCodec", "PostgresStore", "current_fence", "redact"]

_PG_ERRORS: Final = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
""""PostgreSQL unreachable or failing": connection errors, a server shutting down
(``AdminShutdown`` is an ``OperationalError``), a pool that gives no connection in
time (``PoolTimeout``) or is closed (``PoolClosed``), both ``OperationalError``\\ s."""

_STORE_ERRORS: Final = (psycopg.Error, OSError)
""""The store failed": any error of the database, not only an unreachable one. A
server that refuses writes (a hot standby: ``ReadOnlySqlTransaction``), a role
without the privileges, a schema edited underneath, a value the server cannot hold:
the lease algorithm treats each as the store failing (StoreError with the cause, or
``fallback="local"``), never as a raw psycopg error to a load's waiters."""

_IDLE: Final = psycopg.pq.TransactionStatus.IDLE

_MAX_SECONDS: Final = 1e10
"""The longest lease (about 317 years) and the longest ttl the database is told: ``now()
+ interval`` must stay a timestamp PostgreSQL holds (up to the year 294276); a longer
ttl is kept forever (``infinity``)."""

_MAX_TIME: Final = 2.5e11
"""Times (seconds since the epoch) read from a row are within 0 … this (before the year
9900, what :func:`datetime.datetime.fromtimestamp` takes); others are corrupt."""

_NOTE_S: Final = 30.0
"""How long a failure note stays for the followers of a failed refresh (seconds)."""

_SWEEP_EVERY: Final = 60.0
_TABLE_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,39}")

T = TypeVar("T")


def redact(dsn: str) -> str:
    """The DSN as ``postgresql://user@host:port/dbname``: never a password, whatever the form
    (URL user part, ``?password=``, a key=value ``password=...``)."""
    try:
        d = conninfo_to_dict(dsn)
    except (psycopg.ProgrammingError, ValueError):
        return "<an unparsable DSN>"
    user = d.get("user")
    host = d.get("host") or "localhost"
    port = d.get("port") or "5432"
    db = d.get("dbname") or ""
    return f"postgresql://{'' if user is None else str(user) + '@'}{host}:{port}/{db}"


_CONNECT_DEFAULTS: Final = {
    "connect_timeout": 5,
    # a connection cut without a reset (a partition, a dead host) is noticed in seconds,
    # not after the system's two hours
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def _defaults(dsn: str) -> dict[str, Any]:
    """The store's connection settings that the DSN does not set itself."""
    given = conninfo_to_dict(dsn)
    return {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}


def _q(name: str) -> str:
    """An identifier, quoted (``user``, ``order`` are keywords); names are checked
    against ``_TABLE_RE`` first, so there is no quote in them to escape."""
    return f'"{name}"'


def schema_sql(table: str) -> str:
    """The DDL of the store's table, sequence and index (idempotent).

    Also the repair of a table whose sequence is missing: the sequence is made to
    start above both the database clock in microseconds and every fence in the table.
    """
    t = _check_table(table)
    q = _q(t)
    return f"""
CREATE TABLE IF NOT EXISTS {q} (
    digest text PRIMARY KEY,
    o_ok boolean, o_token text, o_fence bigint, o_started float8, o_completed float8,
    o_background boolean, o_payload bytea, o_error_type text, o_error_message text,
    o_expires float8, o_until timestamptz,
    l_token text, l_fence bigint, l_started float8, l_background boolean, l_progress text,
    l_until timestamptz,
    n_token text, n_failed boolean, n_error_type text, n_error_message text,
    n_until timestamptz,
    gone_at timestamptz GENERATED ALWAYS AS
        (GREATEST(o_until, l_until, n_until, '-infinity'::timestamptz)) STORED
);
CREATE INDEX IF NOT EXISTS {_q(t + "_gone_at")} ON {q} (gone_at);
DO $$ BEGIN
    IF to_regclass('{_q(t + "_fence")}') IS NULL THEN
        EXECUTE format('CREATE SEQUENCE %I START %s', '{t}_fence', GREATEST(
            floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
            (SELECT coalesce(max(GREATEST(o_fence, l_fence)), 0) + 1 FROM {q})));
    END IF;
END $$;
""".strip()


def _check_table(table: object) -> str:
    if not isinstance(table, str) or _TABLE_RE.fullmatch(table) is None:
        raise ValueError(
            "table must be a lower-case SQL identifier of at most 40 characters "
            f"([a-z_][a-z0-9_]*), got {table!r}"
        )
    return table


_LEASE_COLS: Final = ("l_token", "l_fence", "l_started", "l_background", "l_progress", "l_until")
_OUT_COLS: Final = (
    "o_ok", "o_token", "o_fence", "o_started", "o_completed", "o_background", "o_payload",
    "o_error_type", "o_error_message", "o_expires", "o_until",
)  # fmt: skip
_NOTE_COLS: Final = ("n_token", "n_failed", "n_error_type", "n_error_message", "n_until")
_NO_LEASE: Final = ", ".join(f"{c} = NULL" for c in _LEASE_COLS)


def _sql(table: str) -> dict[str, str]:
    """Every statement of the backend, for one table (one round trip each)."""
    t, seq = _q(table), _q(table + "_fence")
    o_sel = ", ".join(_OUT_COLS[:-1])
    live = "o_until > now(), l_until > now(), n_until > now()"
    row = f"{o_sel}, {', '.join(_LEASE_COLS[:-1])}, {', '.join(_NOTE_COLS[:-1])}, {live}"
    # the lease may be taken: no live lease, no outcome or note to use
    take = (
        "NOT (coalesce(e.l_until > now(), false)"
        " OR coalesce(e.o_until > now() AND ((e.o_ok AND NOT %(force)s)"
        " OR e.o_token = ANY(%(accept)s)), false)"
        " OR coalesce(e.n_until > now() AND e.n_token = ANY(%(accept)s), false))"
    )
    take_set = ", ".join(
        f"{c} = CASE WHEN {take} THEN excluded.{c} ELSE e.{c} END" for c in _LEASE_COLS
    )
    # the fence: from the sequence, and above the fence of the outcome it may replace
    take_set = take_set.replace(
        "THEN excluded.l_fence", "THEN GREATEST(excluded.l_fence, coalesce(e.o_fence + 1, 0))"
    )
    sup = "coalesce(e.o_until > now() AND e.o_fence > e.l_fence, false)"
    note = "coalesce(NOT %(ok)s AND e.o_until > now() AND e.o_ok, false)"
    new_out = (
        "%(ok)s", "%(token)s", "e.l_fence", "%(started)s", "%(completed)s", "%(background)s",
        "%(payload)s", "%(etype)s", "%(emsg)s", "%(expires)s",
        "CASE WHEN %(keep)s::float8 IS NULL THEN 'infinity'::timestamptz"
        " ELSE now() + %(keep)s * interval '1 second' END",
    )  # fmt: skip
    out_set = ", ".join(
        f"{c} = CASE WHEN {sup} OR {note} THEN e.{c} ELSE {v} END"
        for c, v in zip(_OUT_COLS, new_out, strict=True)
    )
    new_note = ("%(token)s", "true", "%(etype)s", "%(emsg)s", f"now() + interval '{_NOTE_S} s'")
    note_set = ", ".join(
        f"{c} = CASE WHEN NOT {sup} AND {note} THEN {v} ELSE e.{c} END"
        for c, v in zip(_NOTE_COLS, new_note, strict=True)
    )
    e_row = ", ".join("e." + c.strip() for c in row.split(", "))
    notify = "SELECT pg_notify(%(channel)s, %(digest)s || ':' || ev) FROM up"
    return {
        "hit": f"SELECT {o_sel} FROM {t} WHERE digest = %s AND o_until > now()",
        "read": f"SELECT {row} FROM {t} WHERE digest = %s",
        "acquire": f"""
WITH up AS (
    INSERT INTO {t} AS e (digest, {", ".join(_LEASE_COLS)})
    VALUES (%(digest)s, %(token)s, nextval('{seq}'), %(started)s, %(background)s, NULL,
            now() + %(lease)s * interval '1 second')
    ON CONFLICT (digest) DO UPDATE SET {take_set}
    RETURNING e.l_token = %(token)s AS took, 's' AS ev, {e_row}
), n AS ({notify} WHERE took)
SELECT up.*, (SELECT count(*) FROM n) FROM up""",
        "renew": f"""
WITH up AS (
    UPDATE {t} SET l_until = now() + %(lease)s * interval '1 second',
        l_progress = CASE WHEN %(has)s THEN %(progress)s ELSE l_progress END
    WHERE digest = %(digest)s AND l_token = %(token)s AND l_until > now()
    RETURNING 'p' AS ev
), n AS ({notify} WHERE %(has)s)
SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM n)""",
        "complete": f"""
WITH up AS (
    UPDATE {t} AS e SET {out_set}, {note_set}, {_NO_LEASE}
    WHERE digest = %(digest)s AND l_token = %(token)s AND l_until > now()
    RETURNING CASE WHEN o_token = %(token)s OR n_token = %(token)s
        THEN CASE WHEN %(ok)s THEN 'c' ELSE 'f' END ELSE 'r' END AS ev
), n AS ({notify})
SELECT (SELECT ev FROM up), (SELECT count(*) FROM n)""",
        "release": f"""
WITH up AS (
    UPDATE {t} SET {_NO_LEASE}
    WHERE digest = %(digest)s AND l_token = %(token)s AND l_until > now()
    RETURNING 'r' AS ev
), n AS ({notify})
SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM n)""",
        "invalidate": f"""
WITH up AS (
    DELETE FROM {t} WHERE digest = %(digest)s
    RETURNING coalesce(o_until > now(), false) AS had, 'i' AS ev,
        coalesce(o_until > now() OR l_until > now() OR n_until > now(), false) AS live
), n AS ({notify} WHERE live)
SELECT (SELECT had FROM up), (SELECT count(*) FROM n)""",
        "cancel": f"""
WITH up AS (
    UPDATE {t} SET n_token = l_token, n_failed = false, n_error_type = NULL,
        n_error_message = NULL, n_until = now() + %(keep)s * interval '1 second', {_NO_LEASE}
    WHERE digest = %(digest)s AND l_until > now()
    RETURNING n_token, 'x' AS ev
), n AS ({notify})
SELECT (SELECT n_token FROM up), (SELECT count(*) FROM n)""",
        "sweep": f"DELETE FROM {t} WHERE gone_at < now()",
    }


def _json_number(x: float | None) -> float | str | None:
    """JSON has no infinity or NaN: those travel as the strings ``inf``, ``-inf``, ``nan``
    (an ETA overflows to infinity for a tiny rate)."""
    return str(x) if x is not None and not math.isfinite(x) else x


def _progress_json(p: Progress) -> str:
    return json.dumps(
        [_json_number(p.done), _json_number(p.total), p.message, _json_number(p.eta)],
        allow_nan=False,
    )


def _number(value: object) -> float | None:
    if type(value) is str and value in ("inf", "-inf", "nan"):
        return float(value)
    return float(value) if type(value) in (int, float) else None  # type: ignore[arg-type]


def _pg_text(text: str | None) -> str | None:
    """Text a PostgreSQL ``text`` column holds: a NUL escaped (``\\x00``), a lone
    surrogate (not UTF-8) as its backslash escape; any other text unchanged."""
    if text is None:
        return None
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _time(value: object) -> float | None:
    """A time read from a row, or None when it is not one (NaN, infinite, absurd)."""
    if type(value) not in (int, float):
        return None
    t = float(value)  # type: ignore[arg-type]
    return t if 0.0 <= t <= _MAX_TIME else None


def _parse_progress(text: str | None) -> Progress | None:
    if not text:
        return None
    try:
        p = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(p) is not list or len(p) != 4 or _number(p[0]) is None:
        return None
    message = p[2] if type(p[2]) is str else None
    return Progress(
        done=_number(p[0]) or 0.0, total=_number(p[1]), message=message, eta=_number(p[3])
    )


def _outcome(r: tuple[Any, ...]) -> Outcome | None:
    """Columns o_ok … o_expires (10) as an Outcome; None for a row that is not one of ours."""
    ok, token, fence, started, completed, background, payload, etype, emsg, expires = r
    if not isinstance(token, str) or not isinstance(fence, int):
        return None
    # times edited to NaN, infinity, 1e300: corrupt (the key is loaded again), as a
    # status or a duration made of them would fail or lie
    started, completed = _time(started), _time(0.0 if completed is None else completed)
    if started is None or completed is None:
        return None
    return Outcome(
        bool(ok),
        token,
        fence,
        started,
        completed,
        bool(background),
        bytes(payload) if ok and payload is not None else b"",
        None if ok else (etype or "Exception"),
        None if ok else (emsg or ""),
        _time(expires),  # informational (o_until decides): an absurd one is "none known"
    )


def _parse_read(r: tuple[Any, ...]) -> Read:
    """A ``read`` row: 10 outcome columns, 5 lease, 4 note, 3 liveness flags."""
    o_live, l_live, n_live = r[19:22]
    outcome = _outcome(r[:10]) if o_live else None
    run = None
    token, fence, started, background, progress = r[10:15]
    if l_live and isinstance(token, str) and isinstance(fence, int):
        # a live lease is followed whatever its start says; an absurd start (NaN) is
        # shown as "now" rather than crash a status
        start = _time(started)
        run = Run(
            token,
            fence,
            time.time() if start is None else start,
            bool(background),
            _parse_progress(progress),
        )
    cancelled = failed = None
    n_token, n_failed, n_etype, n_emsg = r[15:19]
    if n_live and isinstance(n_token, str):
        if n_failed:
            failed = Outcome(
                False, n_token, 0, 0.0, 0.0, False, b"", n_etype or "Exception", n_emsg or ""
            )
        else:
            cancelled = n_token
    return Read(outcome, run, cancelled, failed)


class SchemaError(psycopg.ProgrammingError):
    """The store's table name belongs to something that is not the store's table (a
    sequence, a view, another application's table): the store fails (a StoreError)."""


_RELKINDS: Final = {
    "S": "sequence",
    "v": "view",
    "m": "materialized view",
    "i": "index",
    "I": "index",
    "f": "foreign table",
    "c": "composite type",
    "t": "TOAST table",
}
_ALL_COLS: Final = ("digest", *_OUT_COLS, *_LEASE_COLS, *_NOTE_COLS, "gone_at")


class PoolExhausted(psycopg.OperationalError):
    """Every connection of the store's pool stayed busy for ``pool_timeout`` seconds."""


class _Pool:
    """The store's own connections (with a DSN): at most ``size``, made on demand.

    Not psycopg_pool's pool, on purpose: there a caller waits for its ``timeout`` while
    the pool retries connecting in the background, so an outage looked like a slow store
    for that long; here a refused connection fails the call at once (an outage the lease
    algorithm sees as one), and only a pool with every connection busy makes a caller
    wait, for at most ``timeout`` seconds, then :class:`PoolExhausted`.
    """

    def __init__(self, conninfo: str, size: int, timeout: float) -> None:
        self.conninfo = conninfo
        self.kwargs: dict[str, Any] = {"autocommit": True, **_defaults(conninfo)}
        self._size = size
        self._timeout = timeout
        self._slots = anyio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._closed:
            raise psycopg_pool.PoolClosed("the PostgresStore's pool is closed")
        try:
            self._slots.acquire_nowait()  # the usual case: no timer to set up
        except anyio.WouldBlock:
            with anyio.move_on_after(self._timeout) as waited:
                await self._slots.acquire()
            if waited.cancelled_caught:
                raise PoolExhausted(
                    f"all {self._size} connections of the PostgresStore's pool stayed busy "
                    f"for {self._timeout} s (pool_size, pool_timeout)"
                ) from None
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = await psycopg.AsyncConnection.connect(self.conninfo, **self.kwargs)
            yield conn
            if not self._closed and not conn.closed and conn.info.transaction_status == _IDLE:
                self._idle.append(conn)  # after close: closed below, never kept
                conn = None
        finally:
            self._slots.release()
            if conn is not None:  # failed, cancelled mid-statement: never reused
                with anyio.CancelScope(shield=True), contextlib.suppress(*_PG_ERRORS):
                    await conn.close()

    async def check(self) -> None:
        """Drop the idle connections (after a failure they are likely dead too)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(*_PG_ERRORS):
                await conn.close()

    async def close(self) -> None:
        self._closed = True  # a statement in flight now closes its connection when done
        await self.check()


class PostgresBackend:
    """The shared-store primitives on PostgreSQL (see :mod:`prefetch_ingest.stores.interface`)."""

    errors: tuple[type[BaseException], ...] = _STORE_ERRORS

    def __init__(
        self,
        dsn: str | None,
        pool: psycopg_pool.AsyncConnectionPool[Any] | None,
        *,
        table: str,
        poll: float,
        sweep_every: float = _SWEEP_EVERY,
        pool_size: int = 10,
        pool_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._given = pool
        self._table = table
        self._poll = poll
        self._sweep_every = sweep_every
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        self._sql = _sql(table)
        info: object = dsn if pool is None else pool.conninfo
        self._where = (
            redact(info) if isinstance(info, str) else "postgresql (the application's pool)"
        )
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | _Pool | None = None
        self._signals = Signals()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening: anyio.Event | None = None
        self._ready = False  # the table is known to exist
        self.listener_pid: int | None = None
        """The server process of the listening connection (tests terminate it)."""
        self.on_notice: Callable[[str | None, str], None] | None = None

    @property
    def where(self) -> str:
        return self._where

    @property
    def table(self) -> str:
        return self._table

    def debug_counts(self) -> dict[str, int]:
        return {
            "pool": int(self._pool is not None),
            "background tasks (listener, sweep)": sum(not t.done() for t in self._tasks),
            "listeners": len(self._signals),
        }

    # -- life cycle ----------------------------------------------------------

    async def open(self) -> None:
        require_asyncio("PostgresStore", "psycopg's async connections")
        if self._given is not None:
            self._pool = self._given
        else:
            assert self._dsn is not None
            self._pool = _Pool(self._dsn, self._pool_size, self._pool_timeout)
        loop = asyncio.get_running_loop()
        self._listening = anyio.Event()
        # the background tasks first: opened during an outage (fallback="local"), the
        # store listens and creates its table (on first use) once the server answers
        self._tasks = [
            loop.create_task(
                self._listen(), name=f"prefetch_ingest postgres listener {self._table}"
            ),
            loop.create_task(
                self._sweep_loop(), name=f"prefetch_ingest postgres sweep {self._table}"
            ),
        ]
        try:
            await self._run(self._create)
        except BaseException as exc:
            # the store's failures (an outage, a role without privileges, a foreign
            # table) are the lease algorithm's: it closes the backend, or with
            # fallback="local" keeps it (the listener, the sweep) until the server answers;
            # anything else (a bug, a cancellation) leaves no task behind
            if not isinstance(exc, _STORE_ERRORS):
                with anyio.CancelScope(shield=True):
                    await self.aclose()
            raise
        with anyio.move_on_after(self._poll * 5):
            await self._listening.wait()  # notifications from the start (bounded: polls cover)

    async def _create(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The schema, when missing; one opener at a time (a transaction-scoped advisory lock)."""
        cur = psycopg.AsyncCursor(conn, row_factory=tuple_row)
        async with conn.transaction():
            await cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext('prefetch_ingest schema ' || %s))",
                (self._table,),
            )
            kinds = await self._kinds(cur)
            self._check_kinds(kinds)
            if kinds[0] is not None:
                await self._check_columns(cur)  # before any DDL: a foreign table is refused
            if None in kinds:  # the table or its sequence missing: the idempotent DDL
                await cur.execute(schema_sql(self._table))
                kinds = await self._kinds(cur)
                self._check_kinds(kinds)
                await self._check_columns(cur)
        self._ready = True

    async def _check_columns(self, cur: psycopg.AsyncCursor[Any]) -> None:
        await cur.execute(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass(%s)"
            " AND attnum > 0 AND NOT attisdropped",
            (_q(self._table),),
        )
        missing = set(_ALL_COLS) - {r[0] for r in await cur.fetchall()}
        if missing:
            raise SchemaError(
                f"the table {self._table!r} is not a PostgresStore's: it has no column "
                f"{', '.join(sorted(missing))} (another application's table? use another "
                "table=)"
            )

    async def _kinds(self, cur: psycopg.AsyncCursor[Any]) -> tuple[str | None, str | None]:
        """The kinds (``pg_class.relkind``) of the relations named like the table and its
        sequence; None for a missing one."""
        await cur.execute(
            "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)),"
            " (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s))",
            (_q(self._table), _q(self._table + "_fence")),
        )
        row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]

    def _check_kinds(self, kinds: tuple[str | None, str | None]) -> None:
        table, sequence = kinds
        if table not in (None, "r", "p"):
            raise SchemaError(
                f"{self._table!r} is a {_RELKINDS.get(table, 'relation')}, not a table "
                "(another store's fence sequence? use another table=)"
            )
        if sequence not in (None, "S"):
            raise SchemaError(
                f"{self._table + '_fence'!r}, the fence sequence of table {self._table!r}, is "
                f"a {_RELKINDS.get(sequence, 'relation')}, not a sequence (use another table=)"
            )

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(tasks)
        self._signals.fire_all()
        pool, self._pool = self._pool, None
        if pool is not None and pool is not self._given:
            with anyio.CancelScope(shield=True):
                await pool.close()

    # -- running statements ---------------------------------------------------

    async def _run(
        self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], *, retry: bool = True
    ) -> T:
        """``fn`` on a pooled connection; once more on a fresh one if the pooled connection
        was dead (a server restart leaves every idle connection stale)."""
        pool = self._pool
        if pool is None:
            raise psycopg.OperationalError(
                "the PostgresStore is not open (the Prefetcher opens it)"
            )
        for attempt in (0, 1):
            try:
                async with pool.connection() as conn:
                    if not self._ready and fn != self._create:
                        await self._create(conn)
                    return await fn(conn)
            except psycopg.OperationalError as exc:
                if (
                    not retry
                    or attempt
                    or isinstance(
                        exc, PoolExhausted | psycopg_pool.PoolTimeout | psycopg_pool.PoolClosed
                    )
                ):
                    raise
                with anyio.move_on_after(self._pool_timeout):
                    await pool.check()  # replace every other dead idle connection
            except psycopg.errors.UndefinedTable:
                # dropped underneath (or lost by a crash of a server that does not wait
                # for its commits): created again, then the statement once more, which
                # failed as a whole, so nothing of it happened
                if attempt or not self._ready:
                    raise
                self._ready = False
        raise AssertionError("unreachable")  # pragma: no cover

    async def _one(self, name: str, params: Any, *, retry: bool = True) -> tuple[Any, ...] | None:
        sql = self._sql[name]

        async def go(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...] | None:
            # ours, whatever the application's pool makes (dict rows, raw cursors: $1)
            cur = psycopg.AsyncCursor(conn, row_factory=tuple_row)
            await cur.execute(sql, params)
            return await cur.fetchone()

        return await self._run(go, retry=retry)

    def _params(self, digest: str, **more: Any) -> dict[str, Any]:
        return {"digest": digest, "channel": self._table, **more}

    # -- the primitives ------------------------------------------------------------

    async def read(self, digest: str, *, outcome_only: bool = False) -> Read:
        if outcome_only:  # a get's lookup: one primary-key SELECT
            r = await self._one("hit", (digest,))
            return Read() if r is None else Read(_outcome(r))
        r = await self._one("read", (digest,))
        return Read() if r is None else _parse_read(r)

    async def acquire(
        self, digest: str, run: Run, lease: float, *, force: bool, accept: frozenset[str]
    ) -> Acquired:
        # idempotent: an attempt that landed before its answer was lost leaves the lease
        # with this run's token, which a second attempt reports as taken
        r = await self._one(
            "acquire",
            self._params(
                digest,
                token=run.token,
                started=run.started_at,
                background=run.background,
                lease=lease,
                force=force,
                accept=list(accept),
            ),
        )
        assert r is not None
        if r[0]:
            return Acquired(int(r[13]))
        return Acquired(None, _parse_read(r[2:24]))

    async def renew(self, digest: str, token: str, lease: float, progress: Progress | None) -> bool:
        r = await self._one(
            "renew",
            self._params(
                digest,
                token=token,
                lease=lease,
                has=progress is not None,
                progress=None if progress is None else _progress_json(progress),
            ),
        )
        return bool(r and r[0])

    async def complete(self, digest: str, outcome: Outcome, keep: float | None) -> Completion:
        o = outcome
        r = await self._one(
            "complete",
            self._params(
                digest,
                token=o.token,
                ok=o.ok,
                started=o.started_at,
                completed=o.completed_at,
                background=o.background,
                payload=o.payload if o.ok else None,
                # text PostgreSQL cannot hold (a NUL, a lone surrogate) would fail the
                # write: escaped, so the failure is recorded as the load raised it
                etype=_pg_text(o.error_type),
                emsg=_pg_text(o.error_message),
                expires=o.expires_at if _time(o.expires_at) is not None else None,
                # a ttl beyond any timestamp (1e15 s) is kept forever
                keep=None if keep is None or keep > _MAX_SECONDS else keep,
            ),
            retry=False,  # not idempotent: the lease algorithm retries and checks
        )
        ev = None if r is None else r[0]
        if ev is None:
            return Completion.LOST
        return Completion.SUPERSEDED if ev == "r" else Completion.WRITTEN

    async def release(self, digest: str, token: str) -> bool:
        r = await self._one("release", self._params(digest, token=token))
        return bool(r and r[0])

    async def invalidate(self, digest: str) -> bool:
        r = await self._one("invalidate", self._params(digest))
        return bool(r and r[0])

    async def cancel(self, digest: str, keep: float) -> str | None:
        r = await self._one("cancel", self._params(digest, keep=keep))
        return None if r is None or r[0] is None else str(r[0])

    async def wait_change(self, digest: str, timeout: float) -> None:
        await self._signals.wait(digest, timeout)

    async def sweep(self) -> int:
        """Delete the rows with nothing live left (by the index on their last expiry)."""

        async def go(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = psycopg.AsyncCursor(conn)
            await cur.execute(self._sql["sweep"])
            return cur.rowcount

        return await self._run(go)

    # -- background tasks ---------------------------------------------------------

    async def _conninfo(self) -> tuple[str, dict[str, Any]]:
        """How to connect the listener: as the pool connects (its conninfo may be a callable)."""
        if self._given is None:
            assert self._dsn is not None
            return self._dsn, {**_defaults(self._dsn), "autocommit": True}
        info: Any = self._given.conninfo
        kwargs: Any = self._given.kwargs
        if callable(info):
            info = info()
            if isinstance(info, Awaitable):
                info = await info
        if callable(kwargs):
            kwargs = kwargs()
            if isinstance(kwargs, Awaitable):
                kwargs = await kwargs
        return str(info), {**(kwargs or {}), "autocommit": True}

    async def _listen(self) -> None:
        """LISTEN on a dedicated connection; reconnect after any failure (every waiter is
        woken then: notifications may have been lost meanwhile)."""
        while True:
            try:
                conninfo, kwargs = await self._conninfo()
                conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
                try:
                    await conn.execute(f"LISTEN {_q(self._table)}")
                    self.listener_pid = conn.info.backend_pid
                    if self._listening is not None:
                        self._listening.set()
                    self._lost()  # messages may have been lost while not listening
                    async for n in conn.notifies():
                        digest, _, event = n.payload.partition(":")
                        if self.on_notice is not None:
                            self.on_notice(digest, event)
                        self._signals.fire(digest)
                finally:
                    with anyio.CancelScope(shield=True), contextlib.suppress(*_PG_ERRORS):
                        await conn.close()
            except Exception as exc:  # the server down, or anything odd: never die silently
                self.listener_pid = None
                self._wake_all()  # waiters fall back to reading the keys themselves
                if not isinstance(exc, _PG_ERRORS):
                    _log.logger.warning(
                        "prefetch.postgres_listener_error", where=self._where, error=error_text(exc)
                    )
            await anyio.sleep(self._poll)

    def _lost(self) -> None:
        if self.on_notice is not None:
            self.on_notice(None, "i")
        self._wake_all()

    def _wake_all(self) -> None:
        self._signals.fire_all()

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(self._sweep_every)
            try:
                await self.sweep()
            except Exception as exc:  # an outage waits for the next round; the odd is logged
                if not isinstance(exc, _PG_ERRORS):
                    _log.logger.warning(
                        "prefetch.postgres_sweep_error", where=self._where, error=error_text(exc)
                    )


class PostgresStore(LeasedStore):
    """A shared store on PostgreSQL: each key runs once across processes, no other server.

    Args:
        dsn_or_pool: a ``postgresql://`` URL or a key=value DSN (the store makes its
            own pool, and closes it), or the application's own
            :class:`psycopg_pool.AsyncConnectionPool` (already open; never closed
            by the store). Notifications use one more connection, made with the
            same connection information.
        table: the table's name (a lower-case SQL identifier); its sequence is
            ``{table}_fence``, its notification channel ``{table}``. Created on
            open when missing (see :meth:`schema_sql` to create it by migration).
        lease: seconds a run's lease lasts without renewal (renewed every
            ``lease / 3``); size it above the database's failover time.
        codec: how values become bytes; ``None`` is :class:`JSONCodec`.
        fallback: ``None`` (PostgreSQL unreachable → :class:`StoreError`) or ``"local"``.
        poll_interval: how often a waiter re-reads the key without a notification;
            default ``lease / 10`` clamped to 0.05 … 1 s.
        pool_size, pool_timeout: the store's own pool (with a DSN): at most this many
            connections; a call waits at most ``pool_timeout`` for one, then fails
            (as an outage).
        sweep_interval: seconds between deletions of expired rows.
    """

    kind = "PostgreSQL"

    def __init__(
        self,
        dsn_or_pool: str | psycopg_pool.AsyncConnectionPool[Any],
        *,
        table: str = "prefetch_ingest",
        lease: float = 30.0,
        codec: Codec | None = None,
        fallback: Literal["local"] | None = None,
        poll_interval: float | None = None,
        pool_size: int = 10,
        pool_timeout: float = 10.0,
        sweep_interval: float = _SWEEP_EVERY,
    ) -> None:
        dsn: str | None = None
        pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
        if isinstance(dsn_or_pool, str):
            parsed = True
            try:
                conninfo_to_dict(dsn_or_pool)
            except (psycopg.ProgrammingError, ValueError):  # a lone surrogate: UnicodeError
                parsed = False
            if not parsed:  # raised here, not in the except: no chained error shows the DSN
                raise ValueError(f"dsn_or_pool: not a PostgreSQL DSN: {redact(dsn_or_pool)!r}")
            dsn = dsn_or_pool
        elif isinstance(dsn_or_pool, psycopg_pool.AsyncConnectionPool):
            pool = dsn_or_pool
        else:
            raise TypeError(
                "dsn_or_pool must be a postgresql:// DSN or a psycopg_pool.AsyncConnectionPool, "
                f"got {type(dsn_or_pool).__name__}"
            )
        _check_table(table)
        if check_duration("lease", lease, allow_zero=False) > _MAX_SECONDS:
            raise ValueError(
                f"lease must be at most {_MAX_SECONDS:.0e} seconds (about 300 years: "
                f"now() + lease must be a PostgreSQL timestamp), got {lease!r}"
            )
        if type(pool_size) is not int or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
        pool_timeout = check_duration("pool_timeout", pool_timeout, allow_zero=False)
        sweep_interval = check_duration("sweep_interval", sweep_interval, allow_zero=False)
        self._pg = PostgresBackend(
            dsn,
            pool,
            table=table,
            poll=poll_for(lease, poll_interval),
            sweep_every=sweep_interval,
            pool_size=pool_size,
            pool_timeout=pool_timeout,
        )
        super().__init__(
            self._pg, lease=lease, codec=codec, fallback=fallback, poll_interval=poll_interval
        )

    def __repr__(self) -> str:
        return (
            f"PostgresStore({self._pg.where!r}, table={self._pg.table!r}, lease={self._lease!r}, "
            f"codec={self._codec!r}, fallback={self._fallback!r})"
        )

    @staticmethod
    def schema_sql(table: str = "prefetch_ingest") -> str:
        """The DDL the store runs on open when its table is missing (for migrations)."""
        return schema_sql(table)

    async def open(self, *, ttl: float | None, failure_ttl: float) -> None:
        """Connect, create the table when missing, start listening.

        Raises:
            RuntimeError: not running on asyncio.
            StoreError: PostgreSQL does not answer (unless ``fallback="local"``).
        """
        require_asyncio("PostgresStore", "psycopg's async connections")
        await super().open(ttl=ttl, failure_ttl=failure_ttl)

    async def sweep(self) -> int:
        """Delete expired rows now (the store also does it every ``sweep_interval``)."""
        return await self._pg.sweep()
