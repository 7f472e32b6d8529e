"""The ingest adapter on a shared store: after_query, status and outages (memory store)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest

from prefetch_ingest import Status, StoreError
from prefetch_ingest.ingest import IngestPrefetcher
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore

pytestmark = pytest.mark.anyio


class _Pipeline:
    def __init__(self) -> None:
        self.calls = 0

    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        self.calls += 1
        return {"rows": 3}


@contextlib.asynccontextmanager
async def _two(server: MemoryServer, pipeline: _Pipeline) -> AsyncIterator[Any]:
    async with (
        IngestPrefetcher(pipeline, store=MemoryStore(server)) as a,
        IngestPrefetcher(pipeline, store=MemoryStore(server)) as b,
    ):
        yield a, b


async def test_after_query_is_false_for_a_run_fresh_in_the_shared_store() -> None:
    server = MemoryServer()
    pipeline = _Pipeline()
    async with _two(server, pipeline) as (a, b):
        await a.ingest("p", "r")
        assert (await b.status("p", "r")).status is Status.COMPLETED  # B has seen it
        assert b.after_query("p", "r") is False
        assert a.after_query("p", "r") is False  # the instance that ran it, too
    assert pipeline.calls == 1


async def test_after_query_is_false_with_the_store_down_and_no_fallback() -> None:
    server = MemoryServer()
    pipeline = _Pipeline()
    async with _two(server, pipeline) as (a, _):
        server.down = True
        with pytest.raises(StoreError):  # a click fails clearly
            await a.ingest("p", "other")
        assert a.after_query("p", "r") is False  # known down: nothing started
        server.down = False
        await a.status("p", "r")  # the store answers again
        assert a.after_query("p", "r") is True
        await a._prefetcher.wait(("p", "r"))
    assert pipeline.calls == 1


async def test_status_json_of_a_followed_run_is_the_runs_own() -> None:
    server = MemoryServer()
    gate = anyio.Event()
    started = anyio.Event()

    class Slow(_Pipeline):
        async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
            started.set()
            await gate.wait()
            return await super().ingest_run(project_id, run_id)

    pipeline = Slow()
    async with _two(server, pipeline) as (a, b), anyio.create_task_group() as tg:
        assert a.after_query("p", "r")
        await started.wait()
        tg.start_soon(b.ingest, "p", "r")
        await anyio.wait_all_tasks_blocked()  # B's click now follows A's run
        assert b._prefetcher._entries[("p", "r")].remote is not None
        ja, jb = (await a.status("p", "r")).to_dict(), (await b.status("p", "r")).to_dict()
        assert jb["background_task"] is True  # the run's origin: A's after_query
        assert jb["started_at"] == ja["started_at"]
        assert jb["status"] == "running"
        gate.set()
    assert pipeline.calls == 1
