"""The contract suite every shared store passes (needs pytest and anyio's pytest plugin).

A backend's test module subclasses :class:`SharedStoreContract` and provides
one fixture, ``kit``, a :class:`StoreKit`: how to make another instance's store
on the same server, and how to make the server unreachable for a while::

    class TestMyStore(SharedStoreContract):
        @pytest.fixture
        def kit(self, my_server):
            return StoreKit(make=lambda **kw: MyStore(my_server.url, **kw),
                            outage=my_server.outage)

Every test drives real Prefetchers (two or three "instances" in one event
loop, each with its own store object, as separate processes would have) and
checks one guarantee of the shared-store contract (``docs/contract.md``,
"Stores"). The in-memory backend runs it on asyncio and trio; Redis and
PostgreSQL against real servers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import anyio
import attrs
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import (
    CodecError,
    LoadCancelled,
    Prefetcher,
    RemoteLoadError,
    Status,
    StoreError,
    current_fence,
    report_progress,
)

from .interface import Run
from .keys import digest_of
from .lease import LeasedStore, new_token

__all__ = ["SharedStoreContract", "StoreKit"]


@attrs.frozen
class StoreKit:
    """What the contract suite needs from a backend's test module."""

    make: Callable[..., LeasedStore]
    """A new store (another instance's) on the same server; keyword arguments as
    ``lease``, ``fallback``, ``poll_interval`` pass through."""
    outage: Callable[[], AbstractAsyncContextManager[None]]
    """Within it, the server does not answer; after it, it answers again (same data)."""


class _Gate:
    """A load that starts, reports progress on request, and ends when told."""

    def __init__(self, value: Any = "value") -> None:
        self.value = value
        self.calls = 0
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.error: BaseException | None = None
        self.fences: list[int | None] = []

    async def __call__(self, key: Hashable) -> Any:
        self.calls += 1
        self.fences.append(current_fence())
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def _until(condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0) -> None:
    """Re-check ``condition`` (after each store round trip) until it holds."""
    with anyio.fail_after(timeout):
        # the condition is a read of another instance's state (a store round trip):
        # there is no local event to wait for
        while True:
            if await condition():
                return
            await anyio.sleep(0.01)


@contextlib.asynccontextmanager
async def _instances(
    kit: StoreKit, load: Callable[..., Awaitable[Any]], n: int, **options: Any
) -> AsyncIterator[list[Prefetcher[Any, Any]]]:
    store_options = {
        k: options.pop(k) for k in ("lease", "fallback", "poll_interval") if k in options
    }
    async with contextlib.AsyncExitStack() as stack:
        pfs = [
            await stack.enter_async_context(
                Prefetcher(load, store=kit.make(**store_options), name=f"i{i}", **options)
            )
            for i in range(n)
        ]
        yield pfs


class SharedStoreContract:
    """The guarantees of every shared store, as tests. Subclass it with a ``kit`` fixture
    (and an ``anyio_backend`` fixture if the store does not run on every backend)."""

    pytestmark: ClassVar[list[Any]] = [pytest.mark.anyio]

    # -- one run per key ---------------------------------------------------------------

    async def test_one_execution_per_key_across_three_instances(self, kit: StoreKit) -> None:
        load = _Gate({"n": 1})
        got: list[Any] = []
        async with _instances(kit, load, 3) as pfs, anyio.create_task_group() as tg:
            for pf in pfs:
                for _ in range(5):
                    tg.start_soon(_append, got, pf.get("k"))
            await load.started.wait()
            await _until(lambda: _all_running(pfs, "k"))
            load.release.set()
        assert load.calls == 1
        assert got == [{"n": 1}] * 15

    async def test_a_follower_reports_the_run_itself(self, kit: StoreKit) -> None:
        """status on every instance: the owner's start, origin and progress, not the follower's."""
        load = _Gate()

        async def reporting(key: Hashable) -> Any:
            report_progress(3, 10, "three")
            return await load(key)

        async with _instances(kit, reporting, 2) as (a, b), anyio.create_task_group() as tg:
            assert a.prefetch("k")  # a background run on A
            await load.started.wait()
            tg.start_soon(b.get, "k")  # a click on B follows it

            async def b_shows_progress() -> bool:
                snap = await b.status("k")
                return snap.progress is not None and snap.progress.done == 3

            await _until(b_shows_progress)
            await _until(lambda: _following(b, "k"))  # B's click follows A's run now
            sa, sb = await a.status("k"), await b.status("k")
            assert sb.status is Status.RUNNING
            assert sb.background is True  # the run's origin, not the click's
            assert sb.started_at == sa.started_at  # the run's start, not B's
            assert sb.progress is not None and sb.progress.total == 10
            assert sb.progress.message == "three"
            load.release.set()

    async def test_progress_reaches_other_instances_with_its_trailing_edge(
        self, kit: StoreKit
    ) -> None:
        """A burst of progress: the last value arrives, not only the first of the burst."""
        load = _Gate()

        async def bursting(key: Hashable) -> Any:
            for i in range(1, 11):
                report_progress(i, 10)
            return await load(key)

        async with _instances(kit, bursting, 2) as (a, b), anyio.create_task_group() as tg:
            a.prefetch("k")
            await load.started.wait()
            tg.start_soon(b.get, "k")

            async def b_at_ten() -> bool:
                snap = await b.status("k")
                return snap.progress is not None and snap.progress.done == 10

            await _until(b_at_ten)
            load.release.set()

    async def test_a_watch_on_a_follower_sees_progress_and_the_end(self, kit: StoreKit) -> None:
        load = _Gate()
        step = anyio.Event()
        began = anyio.Event()

        async def stepping(key: Hashable) -> Any:
            began.set()
            report_progress(1, 2)
            await step.wait()
            report_progress(2, 2)
            return await load(key)

        seen: list[tuple[Status, float | None]] = []
        async with _instances(kit, stepping, 2) as (a, b), anyio.create_task_group() as tg:
            a.prefetch("k")
            await began.wait()  # A holds the lease: B's click follows its run
            tg.start_soon(b.get, "k")
            await _until(lambda: _following(b, "k"))
            async with b.watch("k") as updates:
                async for snap in updates:
                    seen.append((snap.status, snap.progress.done if snap.progress else None))
                    if snap.progress is not None and snap.progress.done == 1:
                        step.set()
                    if snap.progress is not None and snap.progress.done == 2:
                        load.release.set()
        assert (Status.RUNNING, 1.0) in seen
        assert (Status.RUNNING, 2.0) in seen
        assert seen[-1][0] is Status.COMPLETED

    async def test_wait_on_another_instance_returns_when_the_run_ends(self, kit: StoreKit) -> None:
        load = _Gate(7)
        async with _instances(kit, load, 2) as (a, b), anyio.create_task_group() as tg:
            a.prefetch("k")
            await load.started.wait()
            done: list[Any] = []

            async def waiting() -> None:
                done.append(await b.wait("k", timeout=10))

            tg.start_soon(waiting)
            await _until(lambda: _running(b, "k"))
            assert not done  # still running: wait() has not returned
            load.release.set()
        (snap,) = done
        assert snap.status is Status.COMPLETED and snap.result == 7

    # -- failures --------------------------------------------------------------------------

    async def test_a_failure_is_reported_on_every_instance_and_the_next_get_reruns(
        self, kit: StoreKit
    ) -> None:
        load = _Gate()
        load.error = ValueError("bad input")
        load.release.set()
        async with _instances(kit, load, 2) as (a, b):
            with pytest.raises(ValueError, match="bad input"):
                await a.get("k")
            for pf in (a, b):
                snap = await pf.status("k")
                assert snap.status is Status.FAILED
                assert snap.error == "ValueError: bad input"
            load.error = None
            assert await b.get("k") == "value"  # failure_ttl 0: a click re-runs
            assert load.calls == 2
            assert (await a.status("k")).status is Status.COMPLETED

    async def test_within_failure_ttl_every_instance_raises_without_running(
        self, kit: StoreKit
    ) -> None:
        load = _Gate()
        load.error = TimeoutError()  # no message: compared by structure, never by text
        load.release.set()
        async with _instances(kit, load, 2, failure_ttl=60) as (a, b):
            with pytest.raises(TimeoutError) as first:
                await a.get("k")
            with pytest.raises(TimeoutError) as again:
                await a.get("k")
            assert again.value is first.value  # the owner: its exception object itself
            with pytest.raises(RemoteLoadError) as remote:
                await b.get("k")
            assert remote.value.error_type == "TimeoutError"
            assert remote.value.message == ""
            assert load.calls == 1

    async def test_a_follower_gets_the_owners_failure_as_remote_load_error(
        self, kit: StoreKit
    ) -> None:
        load = _Gate()
        load.error = KeyError("gone")
        async with _instances(kit, load, 2) as (a, b), anyio.create_task_group() as tg:
            errors: list[BaseException] = []

            async def on_b() -> None:
                try:
                    await b.get("k")
                except RemoteLoadError as exc:
                    errors.append(exc)

            a.prefetch("k")
            await load.started.wait()
            tg.start_soon(on_b)
            await _until(lambda: _following(b, "k"))
            load.release.set()
        (error,) = errors
        assert isinstance(error, RemoteLoadError) and error.error_type == "KeyError"
        assert load.calls == 1

    # -- detaching runs --------------------------------------------------------------------

    async def test_invalidate_on_another_instance_detaches_the_run(self, kit: StoreKit) -> None:
        old = _Gate("old")
        async with _instances(kit, old, 2) as (a, b), anyio.create_task_group() as tg:
            got: list[Any] = []
            tg.start_soon(lambda: _append(got, a.get("k")))
            await old.started.wait()
            await b.invalidate("k")
            new = _Gate("new")
            new.release.set()
            assert await b.get("k", new, "k") == "new"  # a fresh run, not the old one followed
            old.release.set()
        assert got == ["old"]  # the detached run's own waiters still get its value
        async with _instances(kit, old, 1) as (c,):
            assert await c.get("k") == "new"  # the old run's result was not stored
        assert (old.calls, new.calls) == (1, 1)

    async def test_cancel_on_another_instance_ends_the_run_everywhere(self, kit: StoreKit) -> None:
        load = _Gate()
        outcomes: dict[str, BaseException | Any] = {}

        async def call(name: str, pf: Prefetcher[Any, Any]) -> None:
            try:
                outcomes[name] = await pf.get("k")
            except LoadCancelled as exc:
                outcomes[name] = exc

        async with _instances(kit, load, 3) as (a, b, c), anyio.create_task_group() as tg:
            tg.start_soon(call, "a", a)
            await load.started.wait()
            tg.start_soon(call, "b", b)
            await _until(lambda: _following(b, "k"))
            assert await c.cancel("k")
        assert all(isinstance(v, LoadCancelled) for v in outcomes.values()), outcomes
        assert set(outcomes) == {"a", "b"}
        async with _instances(kit, load, 1) as (d,):
            assert (await d.status("k")).status is Status.NOT_STARTED
        assert load.calls == 1

    # -- fences, takeovers -------------------------------------------------------------------

    async def test_fences_grow_from_run_to_run(self, kit: StoreKit) -> None:
        load = _Gate()
        load.release.set()
        async with _instances(kit, load, 2) as (a, b):
            await a.get("k")
            await b.get("k", force_refresh=True)
            await a.get("k", force_refresh=True)
        fences = [f for f in load.fences if f is not None]
        assert len(fences) == 3  # every run had its fence
        assert fences == sorted(fences) and len(set(fences)) == 3

    async def test_a_lease_whose_owner_died_is_taken_over(self, kit: StoreKit) -> None:
        """An owner that stops renewing (its process died): the next caller runs the key
        once the lease lapses."""
        store = kit.make(lease=0.3)
        await store.open(ttl=None, failure_ttl=0.0)
        load = _Gate("taken over")
        load.release.set()
        try:
            async with _instances(kit, load, 1, lease=0.3) as (b,):
                dead = Run(new_token(), 0, 0.0, False)
                got = await store._backend.acquire(
                    digest_of("k"), dead, 0.3, force=False, accept=frozenset()
                )
                assert got.fence is not None
                assert await b.get("k") == "taken over"
        finally:
            await store.aclose()
        assert load.calls == 1

    # -- outages -----------------------------------------------------------------------------

    async def test_a_value_completed_while_the_store_is_down_reaches_its_waiters(
        self, kit: StoreKit
    ) -> None:
        load = _Gate("work done")
        async with _instances(kit, load, 1, lease=5.0) as (a,), anyio.create_task_group() as tg:
            got: list[Any] = []
            tg.start_soon(lambda: _append(got, a.get("k")))
            await load.started.wait()
            async with kit.outage():
                load.release.set()
                await _until(lambda: _true(bool(got)))
            assert got == ["work done"]
            # the store answers again while the lease may live: the write lands

            async def stored() -> bool:
                return (await a.status("k")).status is Status.COMPLETED

            await _until(stored)

    async def test_waiters_ride_out_an_outage_while_the_owner_holds_its_lease(
        self, kit: StoreKit
    ) -> None:
        load = _Gate("after the outage")
        async with (
            _instances(kit, load, 2, lease=5.0) as (a, b),
            anyio.create_task_group() as tg,
        ):
            got: list[Any] = []
            a.prefetch("k")
            await load.started.wait()
            tg.start_soon(lambda: _append(got, b.get("k")))
            await _until(lambda: _following(b, "k"))
            async with kit.outage():
                await anyio.sleep(0.3)  # an outage of some length: the waiter keeps going
            load.release.set()
        assert got == ["after the outage"]

    async def test_without_fallback_an_unreachable_store_is_a_store_error(
        self, kit: StoreKit
    ) -> None:
        load = _Gate()
        load.release.set()
        async with _instances(kit, load, 1) as (a,):
            async with kit.outage():
                with pytest.raises(StoreError) as caught:
                    await a.get("k")
            assert caught.value.__cause__ is not None
        assert load.calls == 0

    async def test_fallback_local_works_as_one_instance_during_an_outage(
        self, kit: StoreKit
    ) -> None:
        load = _Gate("v")
        load.release.set()
        async with _instances(kit, load, 1, fallback="local") as (a,):
            async with kit.outage():
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(a.get, "hot")
                assert await a.get("hot") == "v"
                assert (await a.status("hot")).status is Status.COMPLETED
                assert load.calls == 1  # one execution, and the value kept and served
            # the store answers again: it is the truth again (the value computed during
            # the outage was never written there, so the key runs again through it)
            assert (await a.status("hot")).status is Status.NOT_STARTED
            assert await a.get("hot") == "v"
            assert load.calls == 2
            assert (await a.status("hot")).status is Status.COMPLETED

    async def test_outage_logs_are_rate_limited(self, kit: StoreKit) -> None:
        """At most one line a second per operation, each with the count it held back."""
        load = _Gate()
        load.release.set()
        attempts = 0
        async with _instances(kit, load, 1, fallback="local") as (a,):
            with capture_logs() as logs:
                async with kit.outage():
                    began = anyio.current_time()
                    # 100 gets, or as many as 3 s allow (a real client retries each)
                    while attempts < 100 and anyio.current_time() - began < 3.0:
                        await a.get(("k", attempts))
                        attempts += 1
                    elapsed = anyio.current_time() - began
        lines = [e for e in logs if e["event"] == "prefetch.store_unavailable"]
        by_op: dict[str, list[Any]] = {}
        for line in lines:
            by_op.setdefault(line["operation"], []).append(line)
        assert by_op
        for op, op_lines in by_op.items():
            assert len(op_lines) <= elapsed + 1, (op, len(op_lines), elapsed)
        assert len(by_op["read"]) < attempts  # lines were held back

    # -- values, keys, counters ------------------------------------------------------------------

    async def test_remote_hits_and_joins_count_saved_seconds(self, kit: StoreKit) -> None:
        load = _Gate()
        async with _instances(kit, load, 2) as (a, b), anyio.create_task_group() as tg:
            a.prefetch("k")
            await load.started.wait()
            tg.start_soon(b.get, "k")
            await _until(lambda: _following(b, "k"))
            await anyio.sleep(0.05)
            load.release.set()
        async with _instances(kit, load, 1) as (c,):
            await c.get("k")
            assert c.stats().hits == 1 and c.stats().saved_seconds > 0

    async def test_a_value_the_codec_cannot_encode_fails_only_its_load(self, kit: StoreKit) -> None:
        async def unencodable(key: Hashable) -> Any:
            return {1, 2} if key == "bad" else "fine"

        async with _instances(kit, unencodable, 1) as (a,):
            with pytest.raises(CodecError):
                await a.get("bad")
            assert await a.get("good") == "fine"

    async def test_hostile_keys_never_collide(self, kit: StoreKit) -> None:
        async def echo(key: Hashable) -> Any:
            return repr(key)

        keys: list[Hashable] = [
            "a:b",
            ("a", "b"),
            ("a:b",),
            "{a}",
            "a\nb",
            "",
            ("", ""),
            (1, "1"),
            None,
            ("x" * 10_000,),
        ]
        async with _instances(kit, echo, 2) as (a, b):
            for k in keys:
                await a.get(k)
            for k in keys:
                assert await b.get(k) == repr(k)

    async def test_an_unsupported_key_is_a_type_error_naming_key(self, kit: StoreKit) -> None:
        async with _instances(kit, _Gate(), 1) as (a,):
            with pytest.raises(TypeError, match="key"):
                await a.get(frozenset({1}))

    async def test_read_your_writes(self, kit: StoreKit) -> None:
        load = _Gate(1)
        load.release.set()
        async with _instances(kit, load, 2) as (a, b):
            assert await a.get("k") == 1
            assert (await a.status("k")).result == 1
            assert await a.invalidate("k")
            assert (await a.status("k")).status is Status.NOT_STARTED
            assert (await b.status("k")).status is Status.NOT_STARTED


async def _append(into: list[Any], call: Awaitable[Any]) -> None:
    into.append(await call)


async def _true(value: bool) -> bool:
    return value


async def _running(pf: Prefetcher[Any, Any], key: Hashable) -> bool:
    return (await pf.status(key)).status is Status.RUNNING


async def _all_running(pfs: list[Prefetcher[Any, Any]], key: Hashable) -> bool:
    for pf in pfs:
        if not await _running(pf, key):
            return False
    return True


async def _following(pf: Prefetcher[Any, Any], key: Hashable) -> bool:
    """``pf`` has a flight for ``key`` that follows a run of another instance."""
    entry = pf._entries.get(key)
    return entry is not None and getattr(entry, "remote", None) is not None
