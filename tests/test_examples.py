"""The examples: the FastAPI service (in-process, under uvicorn, in a browser) and the scripts.

The service is exercised with its real databases: a SQLite file, and a fresh
PostgreSQL database on the server at 127.0.0.1:5432 (or on a private cluster
started with ``initdb``/``pg_ctl`` when none is reachable). PostgreSQL and the
browser are skipped with the reason when unavailable, except under ``CI=true``
where their absence fails the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import html
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from .postgres_server import PostgresServer, postgres_server

__all__ = ["postgres_server"]  # the private cluster's fixture, used by postgres_admin_dsn
from .redis_server import RedisServer, redis_server_fixture
from .service_workers import PinningProxy, ServiceWorkers, pinned, worker_of

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SPEC_KEYS = {
    "status",
    "background_task",
    "started_at",
    "completed_at",
    "stats",
    "error",
    "progress",
}
IN_CI = os.environ.get("CI", "").lower() == "true"

pytestmark = pytest.mark.anyio
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required here)")
    pytest.skip(reason)


def _load_service() -> ModuleType:
    name = "prefetch_ingest_example_service"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "fastapi_service" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


service = _load_service()


# -- PostgreSQL ---------------------------------------------------------------------


def _run_coroutine_in_thread(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run admin work on its own event loop, in its own thread (outside the test's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


@pytest.fixture(scope="session")
def postgres_admin_dsn(postgres_server: PostgresServer) -> str:
    """The private PostgreSQL cluster of the session (``tests/postgres_server.py``), to
    create test databases in: never the machine's own server."""
    return postgres_server.dsn


@pytest.fixture
def postgres_url(postgres_admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    import asyncpg

    name = f"prefetch_ingest_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(postgres_admin_dsn, timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    _run_coroutine_in_thread(lambda: admin(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        _run_coroutine_in_thread(lambda: admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database the example supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stats.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stats.sqlite3'}"


# -- running the service --------------------------------------------------------------


class Gate:
    """Holds each ingest of the example's pipeline until released."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.started = anyio.Event()
        self.release = anyio.Event()

    @property
    def runs(self) -> int:
        runs: int = self.inner.runs
        return runs

    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        self.started.set()
        await self.release.wait()
        stats: Mapping[str, Any] = await self.inner.ingest_run(project_id, run_id)
        return stats


def quick_pipeline(db: Any) -> Any:
    return service.SimulatedPipeline(db, steps=4, step_seconds=0.01)


def gated_pipeline(db: Any) -> Gate:
    return Gate(quick_pipeline(db))


def make_app(url: str, factory: Callable[[Any], Any] = quick_pipeline) -> Any:
    return service.create_app(url, pipeline_factory=factory, query_seconds=0.0)


@contextlib.asynccontextmanager
async def in_process(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered, behind httpx's ASGI transport."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield client


def run_path(project_id: str, run_id: str) -> str:
    return f"/api/projects/{project_id}/runs/{run_id}"


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The ``status`` events of a server-sent-events body, decoded."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        assert fields["event"] == "status"
        events.append(json.loads(fields["data"]))
    return events


async def follow_to_the_end(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    with anyio.fail_after(30):
        response = await client.get(path + "/ingest/events")
    assert response.status_code == 200
    return parse_sse(response.text)


# -- the service, in process -------------------------------------------------------------


@asyncio_only
async def test_query_starts_the_ingest_and_the_click_after_it_finished_is_a_hit(
    database_url: str,
) -> None:
    app = make_app(database_url)
    async with in_process(app) as client:
        query = await client.post(run_path("p", "r") + "/query")
        assert query.status_code == 200
        assert query.json()["ingest_started"] is True
        events = await follow_to_the_end(client, run_path("p", "r"))
        assert events[-1]["status"] == "completed"
        mapping = await client.post(run_path("p", "r") + "/ingest", json={"force_refresh": False})
        assert mapping.status_code == 200
        body = mapping.json()
        assert body["source"] == "hit"
        status = (await client.get(run_path("p", "r") + "/ingest/status")).json()
        assert status["status"] == "completed"
        assert status["background_task"] is True
        assert status["stats"] == body["stats"]
        assert app.state.pipeline.runs == 1
        assert await app.state.db.load("p", "r") == body["stats"]


@asyncio_only
async def test_stats_show_the_hit_and_the_speculation_nobody_read(sqlite_url: str) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        for run in ("read", "unread"):
            await client.post(run_path("p", run) + "/query")
            await follow_to_the_end(client, run_path("p", run))
        assert (await client.post(run_path("p", "read") + "/ingest")).json()["source"] == "hit"
        await app.state.ingest.prefetcher.invalidate(("p", "unread"))  # nobody will read it
        stats = (await client.get("/stats")).json()
    assert stats["prefetches"] == 2 and stats["hits"] == 1
    assert stats["unclaimed"] == 1 and stats["wasted_seconds"] > 0
    assert stats["saved_seconds"] > 0


@asyncio_only
async def test_cancel_stops_a_running_ingest_and_the_click_reports_it(sqlite_url: str) -> None:
    app = make_app(sqlite_url, gated_pipeline)
    async with in_process(app) as client:
        await client.post(run_path("p", "r") + "/query")
        with anyio.fail_after(30):
            await app.state.pipeline.started.wait()  # the ingest runs (held at its gate)
        answer = await client.post(run_path("p", "r") + "/ingest/cancel")
        assert answer.json() == {"cancelled": True}
        status = (await client.get(run_path("p", "r") + "/ingest/status")).json()
        assert status["status"] == "not_started"
        again = await client.post(run_path("p", "r") + "/ingest/cancel")
        assert again.json() == {"cancelled": False}


@asyncio_only
async def test_a_click_while_the_ingest_runs_joins_it(database_url: str) -> None:
    app = make_app(database_url, gated_pipeline)
    async with in_process(app) as client:
        await client.post(run_path("p", "r") + "/query")
        gate: Gate = app.state.pipeline
        answers: list[httpx.Response] = []

        async def click() -> None:
            answers.append(await client.post(run_path("p", "r") + "/ingest", json={}))

        with anyio.fail_after(30):
            await gate.started.wait()
            running = (await client.get(run_path("p", "r") + "/ingest/status")).json()
            async with anyio.create_task_group() as tg:
                tg.start_soon(click)
                await anyio.wait_all_tasks_blocked()
                gate.release.set()
        assert running["status"] == "running"
        assert [a.json()["source"] for a in answers] == ["joined"]
        assert gate.runs == 1


@asyncio_only
async def test_force_refresh_runs_the_ingest_again(database_url: str) -> None:
    app = make_app(database_url)
    async with in_process(app) as client:
        first = await client.post(run_path("p", "r") + "/ingest")
        again = await client.post(run_path("p", "r") + "/ingest", json={"force_refresh": True})
        cached = await client.post(run_path("p", "r") + "/ingest", json={"force_refresh": False})
    assert [r.json()["source"] for r in (first, again, cached)] == ["ran", "ran", "hit"]
    assert app.state.pipeline.runs == 2


@asyncio_only
async def test_a_restarted_service_reports_a_persisted_run_completed_without_background_task(
    database_url: str,
) -> None:
    before = make_app(database_url)
    async with in_process(before) as client:
        ran = (await client.post(run_path("p", "r") + "/ingest")).json()
    after = make_app(database_url)
    async with in_process(after) as client:
        status = (await client.get(run_path("p", "r") + "/ingest/status")).json()
        events = await follow_to_the_end(client, run_path("p", "r"))
        mapping = (await client.post(run_path("p", "r") + "/ingest")).json()
        other = (await client.get(run_path("p", "other") + "/ingest/status")).json()
    assert status == {
        "status": "completed",
        "background_task": False,
        "started_at": None,
        "completed_at": None,
        "stats": ran["stats"],
        "error": None,
        "progress": None,
    }
    assert events == [status]
    assert mapping == {"source": "hit", "persisted": True, "stats": ran["stats"]}
    assert other["status"] == "not_started"
    assert after.state.pipeline.runs == 0


@asyncio_only
async def test_the_events_stream_reports_progress_then_completion(sqlite_url: str) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        await client.post(run_path("p", "r") + "/query")
        with anyio.fail_after(30):
            response = await client.get(run_path("p", "r") + "/ingest/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = parse_sse(response.text)
    assert all(set(e) == SPEC_KEYS for e in events)
    assert [e["status"] for e in events][-1] == "completed"
    assert all(e["status"] in ("pending", "running") for e in events[:-1])
    progress = [e["progress"] for e in events if e["progress"] is not None]
    assert progress
    assert all(p["total"] == 4 for p in progress)


@asyncio_only
async def test_a_failed_run_is_reported_failed_and_the_click_answers_502(sqlite_url: str) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        await client.post(run_path("p", "fail-1") + "/query")
        events = await follow_to_the_end(client, run_path("p", "fail-1"))
        status = (await client.get(run_path("p", "fail-1") + "/ingest/status")).json()
        mapping = await client.post(run_path("p", "fail-1") + "/ingest")
        healthy = await client.post(run_path("p", "fine") + "/ingest")
    assert events[-1]["status"] == "failed"
    assert status["status"] == "failed"
    assert status["error"] == "RuntimeError: simulated LLM failure: 503 from the provider"
    assert status["stats"] is None
    assert mapping.status_code == 502
    assert mapping.json() == {
        "error": "ingest failed: RuntimeError: simulated LLM failure: 503 from the provider"
    }
    assert healthy.status_code == 200


@asyncio_only
async def test_a_run_of_one_project_is_invisible_through_another_project(
    sqlite_url: str,
) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        await client.post(run_path("alpha", "r1") + "/query")
        await follow_to_the_end(client, run_path("alpha", "r1"))
        beta = (await client.get(run_path("beta", "r1") + "/ingest/status")).json()
        beta_run = (await client.post(run_path("beta", "r1") + "/ingest")).json()
        alpha_run = (await client.post(run_path("alpha", "r1") + "/ingest")).json()
    assert beta["status"] == "not_started"
    assert beta_run["source"] == "ran"
    assert alpha_run["source"] == "hit"
    assert beta_run["stats"] != alpha_run["stats"]
    assert app.state.pipeline.runs == 2


@asyncio_only
async def test_status_still_answers_when_the_database_is_gone(sqlite_url: str) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        await app.state.db.aclose()  # the real connection, closed under the service
        status = await client.get(run_path("p", "r") + "/ingest/status")
        mapping = await client.post(run_path("p", "r") + "/ingest")
    assert status.status_code == 200
    assert status.json()["status"] == "not_started"
    assert mapping.status_code == 502  # the ingest could not write its stats
    assert mapping.json()["error"].startswith("ingest failed: ")


@asyncio_only
async def test_the_database_comes_from_database_url_or_defaults_to_a_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'from_env.sqlite3'}")
    async with in_process(service.create_app(query_seconds=0.0)) as client:
        assert (await client.get("/api/projects/p/runs/r/ingest/status")).status_code == 200
    monkeypatch.delenv("DATABASE_URL")
    async with in_process(service.create_app(query_seconds=0.0)) as client:
        assert (await client.get("/api/projects/p/runs/r/ingest/status")).status_code == 200
    assert sorted(os.listdir(tmp_path)) == ["from_env.sqlite3", "ingest_stats.sqlite3"]
    monkeypatch.setenv("DATABASE_URL", "mysql://nope")
    with pytest.raises(ValueError, match="DATABASE_URL"):
        async with in_process(service.create_app(query_seconds=0.0)):
            pass


BAD_IDS = ["a b", "x" * 65, "-leading-dash", "semi;colon", "caf\u00e9"]


@asyncio_only
@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("POST", "/query"), ("POST", "/ingest"), ("GET", "/ingest/status"), ("GET", "/ingest/events")],
)
async def test_bad_ids_answer_422_with_a_json_error(
    sqlite_url: str, bad: str, method: str, suffix: str
) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        for path in (run_path(bad, "r"), run_path("p", bad)):
            response = await client.request(method, path + suffix)
            assert response.status_code == 422, (path, response.text)
            assert response.json()["error"] == "invalid request"
    assert app.state.pipeline.runs == 0


@asyncio_only
@pytest.mark.parametrize(
    "body",
    [
        b'{"force_refresh": "yes"}',
        b'{"force_refresh": 1}',
        b'{"force_refresh": null}',
        b'{"force_refresh": true, "extra": 1}',
        b"[true]",
        b'"true"',
        b"{",
    ],
)
async def test_bad_bodies_answer_422_with_a_json_error(sqlite_url: str, body: bytes) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        response = await client.post(
            run_path("p", "r") + "/ingest",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid request"
    assert response.json()["problems"]
    assert app.state.pipeline.runs == 0


@asyncio_only
async def test_the_page_is_served_with_its_progress_bar_and_event_stream(
    sqlite_url: str,
) -> None:
    app = make_app(sqlite_url)
    async with in_process(app) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<progress id="bar"' in response.text
    assert "new EventSource(" in response.text


# -- the service under uvicorn, and in a browser ---------------------------------------------


@contextlib.asynccontextmanager
async def under_uvicorn(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # listening already: clients may connect before uvicorn accepts
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


@asyncio_only
async def test_the_service_under_uvicorn_streams_events_and_serves_the_hit(
    sqlite_url: str,
) -> None:
    app = make_app(sqlite_url)
    with anyio.fail_after(60):
        async with under_uvicorn(app) as base, httpx.AsyncClient(base_url=base) as client:
            query = await client.post(run_path("p", "r") + "/query")
            assert query.json()["ingest_started"] is True
            statuses = []
            async with client.stream("GET", run_path("p", "r") + "/ingest/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        statuses.append(json.loads(line.removeprefix("data: "))["status"])
            mapping = (await client.post(run_path("p", "r") + "/ingest")).json()
            bad = await client.post(run_path("p", "r") + "/ingest", content=b"{")
    assert statuses[-1] == "completed"
    assert mapping["source"] == "hit"
    assert bad.status_code == 422
    assert app.state.pipeline.runs == 1


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found is not None:
            return found
    return None


async def _dump_dom(browser: str, url: str, profile: Path) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium loads ``url`` and prints the DOM once no request is pending any
    more (virtual time: the page's own timers run at once, up to 60 s of them)."""
    return await anyio.run_process(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=60000",
            "--dump-dom",
            url,
        ],
        check=False,
    )


@asyncio_only
async def test_the_page_in_headless_chromium_ends_with_a_full_progress_bar(
    sqlite_url: str, tmp_path: Path
) -> None:
    browser = _browser()
    if browser is None:
        _skip_or_fail("no Chromium installed (apt-get install -y chromium)")
        return
    app = service.create_app(
        sqlite_url,
        pipeline_factory=lambda db: service.SimulatedPipeline(db, steps=5, step_seconds=0.05),
        query_seconds=0.0,
    )
    with anyio.fail_after(120):
        async with under_uvicorn(app) as base:
            # The page runs the Query, follows the event stream and closes it on
            # completion; with a virtual-time budget, headless Chromium dumps the
            # DOM only once no request is pending any more.
            done = await _dump_dom(
                browser, f"{base}/?project=browser&run=run-1&auto=1", tmp_path / "profile"
            )
            async with httpx.AsyncClient(base_url=base) as client:
                status = (await client.get(run_path("browser", "run-1") + "/ingest/status")).json()
    dom = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert re.search(r'<progress id="bar" max="100" value="100">', dom), dom[-2000:]
    assert 'data-final="completed"' in dom
    assert '<output id="state">completed</output>' in dom
    # the worker's counters, speculation included, are on the page
    assert 'data-stats="loaded"' in dom
    assert re.search(
        r'<output id="stats">0 hit, 0 joined, 0 ran; .*1 background run\(s\), unclaimed 0', dom
    ), dom[-2000:]
    assert status["status"] == "completed"
    assert status["background_task"] is True


@asyncio_only
async def test_the_page_opened_on_a_run_shows_its_state_without_a_click(
    sqlite_url: str, tmp_path: Path
) -> None:
    browser = _browser()
    if browser is None:
        _skip_or_fail("no Chromium installed (apt-get install -y chromium)")
        return
    app = make_app(sqlite_url)
    with anyio.fail_after(120):
        async with under_uvicorn(app) as base:
            async with httpx.AsyncClient(base_url=base) as client:
                await client.post(run_path("p", "linked") + "/ingest")  # it ran, before the page
            done = await _dump_dom(browser, f"{base}/?project=p&run=linked", tmp_path / "profile")
    dom = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    # completed by a click: no "found in the database" (that is for stats with no run)
    assert '<output id="state">completed</output>' in dom, dom[-2000:]
    assert 'data-stats="loaded"' in dom
    assert app.state.pipeline.runs == 1  # opening the page started nothing


# -- the scripts ----------------------------------------------------------------------------


def test_plain_asyncio_example_joins_then_hits_and_builds_once() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_asyncio.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "sales is running" in done.stdout
    assert "5 concurrent gets of stock, 1 build" in done.stdout
    assert done.stderr == "" or "prefetch." in done.stderr


def test_trio_example_follows_progress_and_survives_a_timeout() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "trio_example.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "b.png: b'<8px thumbnail of b.png>'" in done.stdout
    assert "d.png: gave up waiting; its render goes on" in done.stdout
    assert "d.png: completed b'<50px thumbnail of d.png>'" in done.stdout


# -- the service on Redis, under uvicorn --workers 2 ------------------------------------------

redis_server = redis_server_fixture()


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def shared_workers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceWorkers]:
    """The example as documented: ``REDIS_URL=... uvicorn ...app:app --workers 2``, or
    ``POSTGRES_URL=...`` instead.

    A private redis-server, or a fresh database on the private PostgreSQL cluster; the
    stats in a SQLite file both workers write; every process is stopped by its PID at
    the end, also when the test failed. ``.store`` names the store.
    """
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL")},
        "DATABASE_URL": f"sqlite:///{tmp_path / 'stats.sqlite3'}",
    }
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        env["REDIS_URL"] = server.url
    else:
        env["POSTGRES_URL"] = request.getfixturevalue("postgres_url")
    service_workers = ServiceWorkers(env, tmp_path / "uvicorn.log", workers=2)
    service_workers.store = request.param
    service_workers.start()
    try:
        yield service_workers
    finally:
        service_workers.stop()
    log = service_workers.log_tail(1_000_000)
    assert "Traceback" not in log and "ERROR" not in log, log[-4000:]


def _rank(state: Mapping[str, Any]) -> tuple[int, int]:
    """How far a run is: its status, then its progress (for "only moves forward")."""
    order = {"not_started": 0, "pending": 1, "running": 2, "completed": 3}
    progress = state["progress"]
    return order[state["status"]], -1 if progress is None else int(progress["done"])


def _check_one_run(states: Sequence[Mapping[str, Any]], started_at: str) -> None:
    """Every state is of that one background run, and it only moves forward to completed.

    A stream (or poll) that began before the run was in Redis may say
    ``not_started`` (or ``pending``) first: the Query answers before the run's
    lease is written.
    """
    states = list(itertools.dropwhile(lambda s: s["status"] in ("not_started", "pending"), states))
    assert states, "no state"
    for state in states:
        assert set(state) == SPEC_KEYS
        assert state["started_at"] == started_at, state
        assert state["background_task"] is True, state
    ranks = [_rank(state) for state in states]
    assert ranks == sorted(ranks), ranks
    assert states[-1]["status"] == "completed"


async def _stats_of_every_worker(workers: ServiceWorkers) -> dict[int, dict[str, Any]]:
    stats = {}
    for pid in workers.pids:
        async with pinned(workers.base, pid) as client:
            response = await client.get("/stats")
            scraped = await client.get("/metrics")
        assert worker_of(response) == pid and worker_of(scraped) == pid
        stats[pid] = response.json()
        stats[pid]["metrics"] = _scrape(scraped.text)
    return stats


@pytest.mark.slow
@asyncio_only
async def test_two_workers_on_a_shared_store_report_one_run_and_run_it_once(
    shared_workers: ServiceWorkers, tmp_path: Path
) -> None:
    base, path = shared_workers.base, run_path("p", "shared-1")
    with anyio.fail_after(90):
        async with httpx.AsyncClient(base_url=base) as client:
            query = await client.post(path + "/query")  # whichever worker accepts
        assert query.json()["ingest_started"] is True
        owner = worker_of(query)
        other = next(pid for pid in shared_workers.pids if pid != owner)

        streams: dict[int, list[dict[str, Any]]] = {}
        clicks: list[tuple[int, httpx.Response]] = []
        polled: list[tuple[int, dict[str, Any]]] = []

        async def stream_on(pid: int) -> None:
            async with (
                pinned(base, pid) as client,
                client.stream("GET", path + "/ingest/events") as response,
            ):
                assert worker_of(response) == pid
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            streams[pid] = parse_sse(body.decode())

        async def click_on(pid: int) -> None:
            async with pinned(base, pid) as client:
                response = await client.post(path + "/ingest", json={"force_refresh": False})
            assert worker_of(response) == pid
            clicks.append((pid, response))

        async with anyio.create_task_group() as tg:
            for pid in (owner, other):
                tg.start_soon(stream_on, pid)
            # status over new connections, each worker in turn, until both say completed
            completed: set[int] = set()
            clicking = False
            for turn in itertools.count():
                pid = (owner, other)[turn % 2]
                async with pinned(base, pid) as client:
                    response = await client.get(path + "/ingest/status")
                assert worker_of(response) == pid
                state = response.json()
                polled.append((pid, state))
                progress = state["progress"]
                if not clicking and progress is not None and progress["done"] >= 2:
                    clicking = True
                    for clicker in (owner, other):  # Mapping on each worker, mid-run
                        tg.start_soon(click_on, clicker)
                if state["status"] == "completed":
                    completed.add(pid)
                    if completed == {owner, other}:
                        break
                await anyio.sleep(0.05)  # the next poll
        joined = list(clicks)
        clicks.clear()
        for pid in (owner, other, owner, other):  # Mapping again, after the run
            await click_on(pid)
        stats = await _stats_of_every_worker(shared_workers)

    started_at = next(s["started_at"] for _, s in polled if s["status"] == "running")
    assert started_at is not None
    _check_one_run([state for _, state in polled], started_at)
    for pid in (owner, other):
        mine = [state for worker, state in polled if worker == pid]
        assert any(s["status"] == "running" and s["progress"] for s in mine), (pid, mine)
        stream = streams[pid]
        _check_one_run(stream, started_at)
        assert any(s["status"] == "running" and s["progress"] for s in stream), stream
    assert sorted(pid for pid, _ in joined) == sorted((owner, other))
    assert [r.json()["source"] for _, r in joined] == ["joined", "joined"]
    assert [r.json()["source"] for _, r in clicks] == ["hit"] * 4
    final = polled[-1][1]["stats"]
    assert all(r.json()["stats"] == final for _, r in joined + clicks)
    # one execution of the pipeline in all, by the worker that answered the Query
    assert {pid: s["pipeline_runs"] for pid, s in stats.items()} == {owner: 1, other: 0}
    assert {s["store"] for s in stats.values()} == {shared_workers.store}
    assert stats[owner]["prefetches"] == 1 and stats[other]["prefetches"] == 0
    # each worker's /metrics (a Prometheus scrape) says what its /stats says
    name = (("prefetch_name", "ingest"),)
    for s in stats.values():
        for field in ("hits", "joins", "misses", "load_successes"):
            assert s["metrics"][(f"prefetch_{field}_total", name)] == s[field], field
    assert sum(s["metrics"][("prefetch_load_successes_total", name)] for s in stats.values()) == 1
    with contextlib.closing(sqlite3.connect(tmp_path / "stats.sqlite3")) as db:
        rows = db.execute("SELECT project_id, run_id, stats FROM ingest_stats").fetchall()
    assert [(p, r, json.loads(s)) for p, r, s in rows] == [("p", "shared-1", final)]


@pytest.mark.slow
@asyncio_only
async def test_the_page_in_headless_chromium_follows_a_run_across_two_workers(
    shared_workers: ServiceWorkers, tmp_path: Path
) -> None:
    browser = _browser()
    if browser is None:
        _skip_or_fail("no Chromium installed (apt-get install -y chromium)")
        return
    # In front of the workers, as nginx would be: each request to the next worker,
    # and each event stream cut after two events, so that the page reconnects it
    # (to the other worker) all along the run.
    proxy = PinningProxy(shared_workers.base, shared_workers.pids, cut_streams_after=2)
    with anyio.fail_after(120):
        async with under_uvicorn(proxy) as front:
            done = await _dump_dom(
                browser,
                f"{front}/?project=browser&run=shared-run&auto=1&mapping=1",
                tmp_path / "profile",
            )
        stats = await _stats_of_every_worker(shared_workers)
    dom = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert '<progress id="bar" max="100" value="100">' in dom, dom[-2000:]
    assert 'data-final="completed"' in dom and 'data-mapping="hit"' in dom, dom[-2000:]
    assert '<output id="state">completed</output>' in dom
    # the bar advanced step by step, never back
    found = re.search(r'data-trail="([a-z_:\d,]+)"', dom)
    assert found is not None, dom[-2000:]
    shown = [(status, int(p)) for status, p in (item.split(":") for item in found[1].split(","))]
    percents = [p for _, p in shown]
    assert percents == sorted(percents) and shown[-1] == ("completed", 100), found[1]
    assert len([p for p in percents if 0 < p < 100]) >= 3, found[1]
    # Mapping showed the run's stats
    out = re.search(r'<pre id="out">(.*?)</pre>', dom, re.DOTALL)
    assert out is not None, dom[-2000:]
    mapping = json.loads(html.unescape(out[1]))
    assert mapping["source"] == "hit"
    assert set(mapping["stats"]) == {"papers", "authors", "llm_calls"}
    assert 'data-stats="loaded"' in dom
    assert f'<output id="store">{shared_workers.store}</output>' in dom

    # what the page asked, and which worker answered
    query = next(x for x in proxy.exchanges if x.path.endswith("/query"))
    owner = query.worker
    streams = [x for x in proxy.exchanges if x.path.endswith("/ingest/events")]
    assert sum(x.cut for x in streams) >= 3, [(x.worker, x.cut) for x in streams]
    assert json.loads(query.body)["ingest_started"] is True
    running_on: set[int] = set()
    every_state = []
    for stream in streams:
        states = parse_sse(stream.body.decode())
        every_state += states
        if any(s["status"] == "running" and s["progress"] for s in states):
            running_on.add(stream.worker)
    assert running_on == set(shared_workers.pids), [(x.worker, x.body) for x in streams]
    started_at = next(s["started_at"] for s in every_state if s["status"] == "running")
    assert started_at is not None
    _check_one_run(every_state, started_at)
    (click,) = [x for x in proxy.exchanges if x.path.endswith("/ingest") and x.method == "POST"]
    assert json.loads(click.body) == mapping
    # one execution in all, by the worker that answered the Query
    assert {pid: s["pipeline_runs"] for pid, s in stats.items()} == {
        pid: int(pid == owner) for pid in shared_workers.pids
    }


# -- shutdown under uvicorn's SIGTERM, and the metrics it serves -------------------------------


def _serve_alone(tmp_path: Path, **env: str) -> ServiceWorkers:
    """The example under ``uvicorn`` (one process, the in-memory store), started."""
    environment = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL")},
        "DATABASE_URL": f"sqlite:///{tmp_path / 'stats.sqlite3'}",
        # uvicorn ends by re-raising SIGTERM: a buffered stdout would lose the last logs
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    service_workers = ServiceWorkers(environment, tmp_path / "uvicorn.log", workers=1)
    service_workers.start()
    return service_workers


async def _sigterm_mid_run(service_workers: ServiceWorkers, path: str) -> tuple[int, float]:
    """Start a background ingest, wait until it has made progress, SIGTERM uvicorn;
    (its exit code, seconds from the signal to the exit)."""
    async with httpx.AsyncClient(base_url=service_workers.base) as client:
        assert (await client.post(path + "/query")).json()["ingest_started"] is True
        with anyio.fail_after(30):
            while True:
                state = (await client.get(path + "/ingest/status")).json()
                if state["progress"] is not None and state["progress"]["done"] >= 1:
                    break
                await anyio.sleep(0.05)  # the next poll
    process = service_workers.process
    assert process is not None
    signalled = time.monotonic()
    process.terminate()  # what a process manager (systemd, Kubernetes) sends
    rc = await anyio.to_thread.run_sync(lambda: process.wait(timeout=60))
    return rc, time.monotonic() - signalled


def _stored_runs(tmp_path: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(tmp_path / "stats.sqlite3")) as db:
        return db.execute("SELECT project_id, run_id FROM ingest_stats").fetchall()


@pytest.mark.slow
@asyncio_only
async def test_sigterm_lets_a_run_finish_within_shutdown_grace_and_it_is_stored(
    tmp_path: Path,
) -> None:
    # 10 steps of 0.2 s: the run has about 1.8 s left at the signal; the grace is 30 s
    service_workers = _serve_alone(tmp_path, SHUTDOWN_GRACE="30", INGEST_STEP_SECONDS="0.2")
    try:
        rc, took = await _sigterm_mid_run(service_workers, run_path("p", "graceful"))
    finally:
        service_workers.stop()
    # uvicorn ends a graceful shutdown by re-raising the signal (exit status -15)
    assert rc in (0, -signal.SIGTERM), service_workers.log_tail()
    assert "Application shutdown complete" in service_workers.log_tail()
    assert _stored_runs(tmp_path) == [("p", "graceful")]
    assert took < 30  # it left as soon as the run ended, not at the end of the grace
    log = service_workers.log_tail(1_000_000)
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.slow
@asyncio_only
async def test_sigterm_without_grace_cancels_the_run_and_stores_nothing(tmp_path: Path) -> None:
    service_workers = _serve_alone(tmp_path, SHUTDOWN_GRACE="0", INGEST_STEP_SECONDS="0.2")
    try:
        rc, _took = await _sigterm_mid_run(service_workers, run_path("p", "cut"))
    finally:
        service_workers.stop()
    assert rc in (0, -signal.SIGTERM), service_workers.log_tail()
    assert "Application shutdown complete" in service_workers.log_tail()
    assert _stored_runs(tmp_path) == []  # cancelled at once: its stats were never written
    log = service_workers.log_tail(1_000_000)
    assert "Traceback" not in log, log[-4000:]


def _scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, labels without otel_*): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_")))): (
            s.value
        )
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@asyncio_only
async def test_metrics_serve_the_workers_counters_to_a_prometheus_scrape(sqlite_url: str) -> None:
    app = make_app(sqlite_url)
    name = (("prefetch_name", "ingest"),)
    with anyio.fail_after(60):
        async with under_uvicorn(app) as base, httpx.AsyncClient(base_url=base) as client:
            await client.post(run_path("p", "m") + "/ingest")  # ran
            await client.post(run_path("p", "m") + "/ingest")  # a hit
            scraped = await client.get("/metrics")
            stats = (await client.get("/stats")).json()
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    samples = _scrape(scraped.text)
    assert samples[("prefetch_hits_total", name)] == stats["hits"] == 1
    assert samples[("prefetch_misses_total", name)] == stats["misses"] == 1
    assert samples[("prefetch_load_successes_total", name)] == 1
    success = (("outcome", "success"), *name)
    assert samples[("prefetch_load_duration_seconds_count", success)] == 1


async def test_the_store_comes_from_one_environment_variable_each(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    assert service.open_store() is None  # in memory, the default
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert type(service.open_store()).__name__ == "RedisStore"
    monkeypatch.setenv("POSTGRES_URL", "postgresql://127.0.0.1:1/db")
    with pytest.raises(ValueError, match="REDIS_URL or POSTGRES_URL, not both"):
        service.open_store()
    monkeypatch.setenv("REDIS_URL", "")
    assert type(service.open_store()).__name__ == "PostgresStore"
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.delenv("POSTGRES_URL")
    monkeypatch.setenv("SHUTDOWN_GRACE", "soon")
    app = service.create_app(sqlite_url)
    with pytest.raises(ValueError, match="SHUTDOWN_GRACE must be a number of seconds"):
        async with app.router.lifespan_context(app):
            pass
