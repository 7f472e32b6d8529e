"""Bugs of the shared lease algorithm found by the attack on PostgresStore, reproduced on
the in-memory shared store (the algorithm is the same for every backend).

Each test failed on the code as the attack found it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from prefetch_ingest import Prefetcher
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore
from tests.stores.test_attack_shared import following, until

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a CancelledError made by hand
async def test_a_load_that_raises_cancelled_error_itself_fails_for_its_followers_too() -> None:
    """A CancelledError the Prefetcher did not cause is the load's failure (as with no
    store): recorded, so that a follower in another instance ends with a failure instead
    of taking the key over and running it a second time."""
    server = MemoryServer()
    started, release = anyio.Event(), anyio.Event()
    calls = 0

    async def self_cancelling(key: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await release.wait()
            raise asyncio.CancelledError("I cancel myself")
        return "second run"

    outcomes: list[Any] = []

    async def on_b(b: Prefetcher[Any, Any]) -> None:
        try:
            outcomes.append(await b.get("k"))
        except BaseException as exc:  # what B got is the assertion
            outcomes.append(exc)

    async with (
        Prefetcher(self_cancelling, store=MemoryStore(server)) as a,
        Prefetcher(self_cancelling, store=MemoryStore(server)) as b,
    ):
        a.prefetch("k")
        await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(on_b, b)
            await until(lambda: following(b, "k"))
            release.set()
    assert calls == 1, outcomes
    (o,) = outcomes
    assert isinstance(o, Exception), o
