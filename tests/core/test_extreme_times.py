"""Times no datetime can hold (found by the attack on PostgresStore, on the core itself)."""

from __future__ import annotations

import anyio
import pytest

from prefetch_ingest import Prefetcher, Status
from prefetch_ingest.ingest import IngestPrefetcher

pytestmark = pytest.mark.anyio


async def test_a_ttl_beyond_any_date_reports_no_expiry_instead_of_crashing() -> None:
    """ttl=1e15 s is a legal duration (in effect: never); status raised ValueError
    ("year 31690765 is out of range") from datetime.fromtimestamp."""

    async def load(key: str) -> int:
        return 1

    async with Prefetcher(load, ttl=1e15) as pf:
        await pf.get("k")
        snap = await pf.status("k")
    assert snap.status is Status.COMPLETED
    assert snap.expires_at is None
    assert snap.completed_at is not None


async def test_the_ingest_status_json_of_such_a_run_is_served() -> None:
    class Pipeline:
        async def ingest_run(self, project_id: str, run_id: str) -> dict[str, int]:
            await anyio.lowlevel.checkpoint()
            return {"papers": 1}

    async with IngestPrefetcher(Pipeline(), ttl=1e15) as ingest:
        await ingest.ingest("p", "r")
        state = (await ingest.status("p", "r")).to_dict()
    assert state["status"] == "completed" and state["stats"] == {"papers": 1}
