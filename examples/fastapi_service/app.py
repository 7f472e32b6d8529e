"""The origin service, rebuilt on prefetch_ingest: Query, a background ingest, Mapping, status.

Endpoints (ids: letters, digits, ``_ . -``, at most 64 characters):

- ``POST /api/projects/{project_id}/runs/{run_id}/query`` answers the (simulated)
  Query and starts the run's ingest in the background;
- ``POST /api/projects/{project_id}/runs/{run_id}/ingest`` with the JSON body
  ``{"force_refresh": false}`` (the body may be left out) is the Mapping click:
  the stats of the background ingest, awaited if it still runs, or run now;
- ``GET /api/projects/{project_id}/runs/{run_id}/ingest/status`` is the run's
  state as JSON;
- ``GET /api/projects/{project_id}/runs/{run_id}/ingest/events`` streams that
  state as server-sent events until the run completes or fails;
- ``GET /`` is a small page with a progress bar fed by that stream.

The simulated ingest writes its stats to a database, and the status endpoint
reads them back when the process knows nothing of a run (after a restart,
say): SQLite by default, PostgreSQL when ``DATABASE_URL`` is a
``postgresql://`` URL. Run ids starting with ``fail`` fail, to show a failure.

Where the runs are shared, one environment variable each (a URL):

- neither set: in memory, in each worker (the default);
- ``REDIS_URL=redis://...`` (or ``redis+sentinel://``, ``redis+cluster://``):
  every worker's Prefetcher uses ``RedisStore(REDIS_URL)``;
- ``POSTGRES_URL=postgresql://...``: ``PostgresStore(POSTGRES_URL)`` (it may
  be the database of ``DATABASE_URL``: no other server to run).

With a shared store, several worker processes (``--workers 2``) and replicas
share the runs: a run started by one worker is followed, joined and served by
every other. Each response carries the ``X-Worker-Pid`` header of the worker
that answered.

``GET /metrics`` is the Prometheus text exposition of this worker's
Prefetcher (every ``Stats`` field and a histogram of load durations, through
``prefetch_ingest.otel`` and the OpenTelemetry Prometheus exporter).
``SHUTDOWN_GRACE`` (seconds, default 10) is how long a shutdown (uvicorn's
SIGTERM) lets running ingests finish and be stored before they are cancelled;
``INGEST_STEP_SECONDS`` (default 0.5) is the simulated ingest's step (10 steps).

Run it with ``python examples/fastapi_service/app.py`` and open
http://127.0.0.1:8000/; with Redis and two workers, from the repository root::

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_service.app:app --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefetch_ingest import PrefetcherClosed, report_progress
from prefetch_ingest.ingest import IngestPipeline, IngestPrefetcher

if TYPE_CHECKING:
    from prefetch_ingest import SharedStore

HERE = Path(__file__).resolve().parent
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
Id = Annotated[str, PathParam(pattern=ID_PATTERN, description="a project or run id")]
RUN = "/api/projects/{project_id}/runs/{run_id}"
SSE_RETRY_MS = 1000
"""How soon a browser reconnects an event stream that was cut (by a proxy, a restart ...)."""


# -- where the stats are persisted ----------------------------------------------


class StatsDB(Protocol):
    """The ingest's stats table."""

    async def save(self, project_id: str, run_id: str, stats: Mapping[str, Any]) -> None: ...

    async def load(self, project_id: str, run_id: str) -> Mapping[str, Any] | None: ...

    async def aclose(self) -> None: ...


class SqliteStats:
    """The stats table in a SQLite file, through aiosqlite.

    Several worker processes may share the file: it is put in WAL mode (readers
    never wait for a writer) and a writer waits up to 10 s for another's lock.
    """

    def __init__(self, connection: Any) -> None:
        self._db = connection

    @classmethod
    async def open(cls, path: str) -> SqliteStats:
        import aiosqlite

        connection = await aiosqlite.connect(path, timeout=10.0)
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS ingest_stats ("
                " project_id TEXT NOT NULL, run_id TEXT NOT NULL, stats TEXT NOT NULL,"
                " completed_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,"
                " PRIMARY KEY (project_id, run_id))"
            )
            await connection.commit()
        except BaseException:
            await connection.close()
            raise
        return cls(connection)

    async def save(self, project_id: str, run_id: str, stats: Mapping[str, Any]) -> None:
        await self._db.execute(
            "INSERT INTO ingest_stats (project_id, run_id, stats) VALUES (?, ?, ?)"
            " ON CONFLICT (project_id, run_id) DO UPDATE"
            " SET stats = excluded.stats, completed_at = CURRENT_TIMESTAMP",
            (project_id, run_id, json.dumps(dict(stats))),
        )
        await self._db.commit()

    async def load(self, project_id: str, run_id: str) -> Mapping[str, Any] | None:
        async with self._db.execute(
            "SELECT stats FROM ingest_stats WHERE project_id = ? AND run_id = ?",
            (project_id, run_id),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else dict(json.loads(row[0]))

    async def aclose(self) -> None:
        await self._db.close()


class PostgresStats:
    """The stats table in PostgreSQL, through an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStats:
        import asyncpg

        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        try:
            await pool.execute(
                "CREATE TABLE IF NOT EXISTS ingest_stats ("
                " project_id text NOT NULL, run_id text NOT NULL, stats jsonb NOT NULL,"
                " completed_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (project_id, run_id))"
            )
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def save(self, project_id: str, run_id: str, stats: Mapping[str, Any]) -> None:
        await self._pool.execute(
            "INSERT INTO ingest_stats (project_id, run_id, stats) VALUES ($1, $2, $3::jsonb)"
            " ON CONFLICT (project_id, run_id) DO UPDATE"
            " SET stats = excluded.stats, completed_at = now()",
            project_id,
            run_id,
            json.dumps(dict(stats)),
        )

    async def load(self, project_id: str, run_id: str) -> Mapping[str, Any] | None:
        text = await self._pool.fetchval(
            "SELECT stats::text FROM ingest_stats WHERE project_id = $1 AND run_id = $2",
            project_id,
            run_id,
        )
        return None if text is None else dict(json.loads(text))

    async def aclose(self) -> None:
        await self._pool.close()


async def open_stats_db(url: str | None) -> StatsDB:
    """``postgresql://...`` → PostgreSQL; ``sqlite:///path`` or None → SQLite (default file)."""
    if url is None:
        url = os.environ.get("DATABASE_URL") or "sqlite:///ingest_stats.sqlite3"
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresStats.open(url)
    if url.startswith("sqlite:///"):
        return await SqliteStats.open(url.removeprefix("sqlite:///"))
    raise ValueError(f"DATABASE_URL must be postgresql://... or sqlite:///path, got {url!r}")


# -- the simulated ingest ---------------------------------------------------------


class SimulatedPipeline:
    """Stands in for LLM calls, writes and authorship statistics; writes its stats to ``db``.

    Args:
        db: where the stats go.
        steps: number of steps; progress is reported after each.
        step_seconds: how long each step takes.
    """

    def __init__(self, db: StatsDB, *, steps: int = 10, step_seconds: float = 0.5) -> None:
        self.db = db
        self.steps = steps
        self.step_seconds = step_seconds
        self.runs = 0
        """How many ingests were started (the expensive part the library saves)."""

    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        self.runs += 1
        for step in range(self.steps):
            phase = "LLM calls" if step < self.steps * 0.6 else "writing results"
            report_progress(step, self.steps, phase)
            await anyio.sleep(self.step_seconds)
            if run_id.startswith("fail") and step == self.steps // 2:
                raise RuntimeError("simulated LLM failure: 503 from the provider")
        digest = hashlib.sha256(f"{project_id}/{run_id}".encode()).digest()
        papers = 50 + digest[0]
        stats = {"papers": papers, "authors": papers * 3 + digest[1], "llm_calls": papers * 2}
        report_progress(self.steps, self.steps, "authorship statistics")
        await self.db.save(project_id, run_id, stats)
        return stats


# -- the web application -----------------------------------------------------------


STORE_VARIABLES = ("REDIS_URL", "POSTGRES_URL")
"""The environment variables that choose a shared store (at most one may be set)."""


def open_store(redis_url: str | None = None, postgres_url: str | None = None) -> SharedStore | None:
    """The Prefetcher's store: ``RedisStore`` for a Redis URL, ``PostgresStore`` for a
    PostgreSQL one; None (the runs kept in this process) when neither is given.

    An argument left None reads its environment variable (``REDIS_URL``,
    ``POSTGRES_URL``); unset or empty means "not this one". Both at once is an error.
    """
    if redis_url is None:
        redis_url = os.environ.get("REDIS_URL")
    if postgres_url is None:
        postgres_url = os.environ.get("POSTGRES_URL")
    if redis_url and postgres_url:
        raise ValueError("set REDIS_URL or POSTGRES_URL, not both: the runs live in one store")
    if redis_url:
        from prefetch_ingest.redis import RedisStore  # needs the 'redis' extra

        return RedisStore(redis_url)
    if postgres_url:
        from prefetch_ingest.postgres import PostgresStore  # needs the 'postgres' extra

        store: SharedStore = PostgresStore(postgres_url)
        return store
    return None


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{variable} must be a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{variable} must be a finite number of seconds >= 0, got {text!r}")
    return value


class Metrics:
    """This worker's Prefetcher as Prometheus text: OpenTelemetry's SDK with the
    Prometheus exporter's reader on a registry of its own (not the process-global one)."""

    def __init__(self, prefetcher: Any) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import CollectorRegistry

        from prefetch_ingest.otel import instrument

        self.registry = CollectorRegistry()
        self.provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=self.registry)]
        )
        instrument(prefetcher, meter_provider=self.provider)

    def scrape(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def aclose(self) -> None:
        self.provider.shutdown()


class WorkerPidHeader:
    """Adds ``X-Worker-Pid`` to every response: which worker process answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pid = str(os.getpid()).encode()

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"x-worker-pid", pid)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_pid)


class IngestBody(BaseModel):
    """Body of the Mapping click."""

    model_config = ConfigDict(extra="forbid", strict=True)
    force_refresh: bool = False


def _metrics_for(prefetcher: Any) -> Metrics | None:
    """Metrics when the SDK and the Prometheus exporter are installed, else None."""
    try:
        return Metrics(prefetcher)
    except ImportError:
        return None


def _error(status_code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status_code)


def _ingest_of(request: Request) -> IngestPrefetcher:
    ingest: IngestPrefetcher = request.app.state.ingest
    return ingest


def create_app(
    database_url: str | None = None,
    *,
    redis_url: str | None = None,
    postgres_url: str | None = None,
    pipeline_factory: Callable[[StatsDB], IngestPipeline] | None = None,
    query_seconds: float = 0.3,
) -> FastAPI:
    """The service.

    Args:
        database_url: where stats are persisted (see :func:`open_stats_db`);
            None reads ``DATABASE_URL`` when the app starts.
        redis_url, postgres_url: the shared store (see :func:`open_store`);
            None reads ``REDIS_URL`` / ``POSTGRES_URL`` when the app starts,
            and without either the runs are kept in this process.
        pipeline_factory: builds the ingest from the database; the default is
            :class:`SimulatedPipeline`.
        query_seconds: how long the simulated Query takes.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(redis_url, postgres_url)
        grace = _seconds("SHUTDOWN_GRACE", 10.0)
        step = _seconds("INGEST_STEP_SECONDS", 0.5)
        db = await open_stats_db(database_url)
        try:
            if pipeline_factory is None:
                pipeline: IngestPipeline = SimulatedPipeline(db, step_seconds=step)
            else:
                pipeline = pipeline_factory(db)
            app.state.pipeline = pipeline
            app.state.db = db
            app.state.store = (
                "memory" if store is None else type(store).__name__.removesuffix("Store").lower()
            )
            # Background ingests yield to demanded ones: at most 4 run at once
            # (in each worker). On shutdown, running ingests get `grace` seconds
            # to finish (and be stored) before they are cancelled.
            async with IngestPrefetcher(
                pipeline,
                persisted_stats=db.load,
                max_concurrency=4,
                store=store,
                shutdown_grace=grace,
                name="ingest",
            ) as ingest:
                app.state.ingest = ingest
                app.state.metrics = _metrics_for(ingest.prefetcher)
                try:
                    yield
                finally:
                    if app.state.metrics is not None:
                        app.state.metrics.aclose()
        finally:
            await db.aclose()  # after the Prefetcher: its ingests may still write

    app = FastAPI(title="prefetch_ingest example", lifespan=lifespan)
    app.add_middleware(WorkerPidHeader)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', '')}"
            for error in exc.errors()
        ]
        return _error(422, "invalid request", problems=problems)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(HERE / "static" / "index.html", media_type="text/html")

    @app.post(RUN + "/query")
    async def query(request: Request, project_id: Id, run_id: Id) -> dict[str, Any]:
        await anyio.sleep(query_seconds)  # the real Query
        started = _ingest_of(request).after_query(project_id, run_id)
        return {
            "project_id": project_id,
            "run_id": run_id,
            "results": [f"{run_id}-result-{n}" for n in range(3)],
            "ingest_started": started,
        }

    @app.post(RUN + "/ingest", response_model=None)
    async def ingest(
        request: Request, project_id: Id, run_id: Id, body: IngestBody | None = None
    ) -> dict[str, Any] | JSONResponse:
        force = body.force_refresh if body is not None else False
        try:
            result = await _ingest_of(request).ingest(project_id, run_id, force_refresh=force)
        except PrefetcherClosed:
            return _error(503, "the service is shutting down")
        except Exception as exc:
            return _error(502, f"ingest failed: {type(exc).__name__}: {exc}")
        return {"source": result.source, "persisted": result.persisted, "stats": result.stats}

    @app.post(RUN + "/ingest/cancel")
    async def cancel(request: Request, project_id: Id, run_id: Id) -> dict[str, Any]:
        # the user left: stop spending on a run nobody will read
        return {"cancelled": await _ingest_of(request).cancel(project_id, run_id)}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        # this worker's counters: hits, joins, time saved, and the speculation
        # nobody read (unclaimed, wasted_seconds); then which worker it is, its
        # store, and how many ingests its pipeline ran
        return {
            **_ingest_of(request).stats().as_dict(),
            "worker_pid": os.getpid(),
            "store": request.app.state.store,
            "pipeline_runs": getattr(request.app.state.pipeline, "runs", None),
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # this worker's counters and load durations, for Prometheus (each worker
        # serves its own: scrape every worker, and sum by prefetch_name)
        exposition: Metrics | None = request.app.state.metrics
        if exposition is None:
            return PlainTextResponse(
                "metrics need the SDK and the exporter: pip install 'prefetch-ingest[examples]'\n",
                status_code=501,
            )
        body, content_type = exposition.scrape()
        return Response(body, media_type=content_type)

    @app.get(RUN + "/ingest/status")
    async def status(request: Request, project_id: Id, run_id: Id) -> dict[str, Any]:
        return (await _ingest_of(request).status(project_id, run_id)).to_dict()

    @app.get(RUN + "/ingest/events")
    async def events(request: Request, project_id: Id, run_id: Id) -> StreamingResponse:
        ingest = _ingest_of(request)

        async def stream() -> AsyncIterator[str]:
            # aclosing: a client that goes away unregisters the watch at once.
            # The first event tells the browser to reconnect within a second if
            # the stream is cut; it may reach another worker, which follows the
            # same run.
            retry = f"retry: {SSE_RETRY_MS}\n"
            async with contextlib.aclosing(ingest.watch(project_id, run_id)) as states:
                async for state in states:
                    yield f"{retry}event: status\ndata: {json.dumps(state.to_dict())}\n\n"
                    retry = ""

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


app = create_app()
"""For ``uvicorn examples.fastapi_service.app:app`` (from the repository root, any
``--workers``) or ``uvicorn app:app --app-dir examples/fastapi_service``."""


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description="Run the prefetch_ingest example service.",
        epilog="Environment: REDIS_URL or POSTGRES_URL (share the runs between workers "
        "through Redis or PostgreSQL), DATABASE_URL (where the stats are stored), "
        "SHUTDOWN_GRACE (seconds running ingests get on shutdown, default 10).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1); set REDIS_URL or POSTGRES_URL so that they "
        "share the runs",
    )
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port)
        return
    if not any(os.environ.get(v) for v in STORE_VARIABLES):
        print(
            f"warning: {args.workers} workers without REDIS_URL or POSTGRES_URL: each "
            "worker keeps its own "
            "runs (a run started by one is not seen by the others)",
            file=sys.stderr,
        )
    # Several processes: uvicorn imports the app in each one, by name.
    uvicorn.run("app:app", app_dir=str(HERE), host=args.host, port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
