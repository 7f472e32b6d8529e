"""A hypothesis state machine drives two Prefetchers on one in-memory shared store
through random interleavings of get / prefetch / complete / fail / invalidate /
cancel on either instance, against a model of the shared truth, and checks after
every step: one current run per key across both instances, the same status on both,
and every caller's outcome (docs/contract.md, "Shared stores").

Fast (no server), so it runs many examples on asyncio and trio; the Redis machine
(tests/test_redis_state_machine.py) adds time, crashes and a real server. The same
machine also runs on PostgreSQL (a private cluster, a fresh table per example, asyncio):
there "settled" also means no statement in flight and every notification sent received
by both instances' listeners (counted by :class:`_CountedBackend`).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from contextlib import ExitStack
from typing import Any, ClassVar

import anyio
import attrs
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefetch_ingest import LoadCancelled, Prefetcher, RemoteLoadError, Status
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore
from tests.conftest import check_no_task_of_ours
from tests.postgres_server import PostgresServer, postgres_server

__all__ = ["postgres_server"]

KEYS = st.sampled_from(["a", "b"])
INSTANCES = st.sampled_from([0, 1])
EXAMPLES = int(os.environ.get("PREFETCH_STATEFUL_EXAMPLES", "60"))
PG_EXAMPLES = int(os.environ.get("PREFETCH_STATEFUL_PG_EXAMPLES", "12"))


class Boom(Exception):
    pass


@attrs.define(eq=False)
class Execution:
    key: str
    number: int
    owner: int  # the instance it runs on
    gate: anyio.Event
    fail: bool = False
    current: bool = True  # False once invalidated (detached) or cancelled
    ended: bool = False


class Loader:
    """Counts executions per key (on both instances); each waits for the machine."""

    def __init__(self) -> None:
        self.running: list[Execution] = []
        self.counts: dict[str, int] = {}
        self.instance_of: dict[int, int] = {}  # id(prefetcher) -> instance

    async def __call__(self, key: str, instance: int) -> list[Any]:
        number = self.counts[key] = self.counts.get(key, 0) + 1
        execution = Execution(key, number, instance, anyio.Event())
        self.running.append(execution)
        try:
            await execution.gate.wait()
        finally:
            self.running.remove(execution)
        if execution.fail:
            raise Boom(f"{key}#{number}")
        return [key, number]


@attrs.define
class Caller:
    instance: int
    expected: Any  # ("value", v) | ("run", Execution) | ("cancelled",)
    box: list[Any] = attrs.Factory(list)


class _Traffic:
    """Statements in flight, notifications sent and received (the PostgreSQL machine)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.sent = 0
        self.received = 0


def _postgres_store(dsn: str, table: str, traffic: _Traffic) -> Any:
    from prefetch_ingest.postgres import PostgresBackend, PostgresStore

    class _CountedBackend(PostgresBackend):
        async def _one(self, name: str, params: Any, *, retry: bool = True) -> Any:
            traffic.in_flight += 1
            try:
                row = await super()._one(name, params, retry=retry)
            finally:
                traffic.in_flight -= 1
            if name not in ("hit", "read") and row is not None:
                traffic.sent += int(row[-1])  # every primitive returns its NOTIFY count last
            return row

    store = PostgresStore(dsn, table=table, poll_interval=0.05)
    store._pg.__class__ = _CountedBackend
    notice = store._pg.on_notice
    assert notice is not None

    def counted(digest: str | None, event: str) -> None:
        if digest is not None:
            traffic.received += 1
        notice(digest, event)

    store._pg.on_notice = counted
    return store


class SharedMachine(RuleBasedStateMachine):
    backend = "asyncio"
    postgres: ClassVar[str | None] = None  # the DSN of the cluster to run on, if any

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.portal: BlockingPortal = self.stack.enter_context(start_blocking_portal(self.backend))
        self.server = MemoryServer()
        self.traffic = _Traffic()
        table = "sm_" + uuid.uuid4().hex[:12]
        self.loader = Loader()
        self.pfs: list[Prefetcher[str, Any]] = []
        self.open = ExitStack()
        self.stack.enter_context(self.open)
        for i in range(2):
            store = (
                MemoryStore(self.server, poll_interval=0.05)
                if self.postgres is None
                else _postgres_store(self.postgres, table, self.traffic)
            )
            pf: Prefetcher[str, Any] = Prefetcher(store=store, name=f"i{i}")
            self.open.enter_context(self.portal.wrap_async_context_manager(pf))
            self.pfs.append(pf)
        # the model: the shared truth per key
        self.outcome: dict[str, tuple[str, Any]] = {}  # ("ok", value) | ("failed", Execution)
        self.run: dict[str, Execution] = {}  # the current run of a key
        self.callers: list[Caller] = []

    def teardown(self) -> None:
        try:
            self.portal.call(self._release_all)
            for c in self.callers:
                assert c.box, f"a get never ended (expected {c.expected!r})"
            self.open.close()
            self.portal.call(self._no_task_left)
        finally:
            self.stack.close()

    async def _no_task_left(self) -> None:
        check_no_task_of_ours(self.pfs)

    async def _release_all(self) -> None:
        while self.loader.running:
            for execution in list(self.loader.running):
                execution.gate.set()
            await self._settle()
        await self._settle()

    async def _settle(self) -> None:
        """Until every task waits. anyio's wait_all_tasks_blocked on asyncio sleeps 0.1 s
        whenever a task is ready; this yields instead (trio's own is exact)."""
        if self.backend != "asyncio":
            await anyio.wait_all_tasks_blocked()
            return
        if self.postgres is None:
            await self._tasks_blocked()
            return
        traffic = self.traffic
        with anyio.fail_after(10):
            while True:
                await self._tasks_blocked()
                if traffic.in_flight == 0 and traffic.received >= 2 * traffic.sent:
                    await self._tasks_blocked()
                    if traffic.in_flight == 0:
                        return
                # a statement is on its way to the server, or a notification back from it:
                # nothing in this loop to wait on but the socket
                await anyio.sleep(0.002)

    async def _tasks_blocked(self) -> None:
        me = asyncio.current_task()
        for _ in range(10_000):
            await asyncio.sleep(0)
            if all(
                t is me or (t._fut_waiter is not None and not t._fut_waiter.done())  # type: ignore[attr-defined]
                for t in asyncio.all_tasks()
            ):
                return
        raise AssertionError("the tasks never settled")

    # -- rules ----------------------------------------------------------------------

    @rule(instance=INSTANCES, key=KEYS)
    def get(self, instance: int, key: str) -> None:
        outcome = self.outcome.get(key)
        caller = Caller(instance, None)
        before = set(map(id, self.loader.running))
        self.portal.call(self._spawn_get, instance, key, caller.box)
        if key in self.run:
            caller.expected = ("run", self.run[key])
        elif outcome is not None and outcome[0] == "ok":
            caller.expected = ("value", outcome[1])
        else:
            started = [e for e in self.loader.running if id(e) not in before]
            assert len(started) == 1, f"a get of a key with no run starts exactly one: {started}"
            (execution,) = started
            assert execution.key == key and execution.owner == instance
            self.run[key] = execution
            caller.expected = ("run", execution)
        self.callers.append(caller)

    async def _spawn_get(self, instance: int, key: str, box: list[Any]) -> None:
        pf = self.pfs[instance]

        async def call() -> None:
            try:
                box.append(("value", await pf.get(key, self.loader, key, instance)))
            except (Boom, RemoteLoadError, LoadCancelled) as exc:
                box.append(("error", exc))

        pf._tg.start_soon(call)  # type: ignore[union-attr]
        await self._settle()

    @rule(instance=INSTANCES, key=KEYS)
    def prefetch(self, instance: int, key: str) -> None:
        before = set(map(id, self.loader.running))
        self.portal.call(self._prefetch, instance, key)
        started = [e for e in self.loader.running if id(e) not in before]
        outcome = self.outcome.get(key)
        if key in self.run or (outcome is not None and outcome[0] == "ok"):
            assert not started, "a prefetch of a running or completed key runs nothing"
        else:
            assert len(started) == 1
            self.run[key] = started[0]

    async def _prefetch(self, instance: int, key: str) -> None:
        self.pfs[instance].prefetch(key, self.loader, key, instance)
        await self._settle()

    @precondition(lambda self: bool(self.loader.running))
    @rule(data=st.data(), fail=st.booleans())
    def complete(self, data: st.DataObject, fail: bool) -> None:
        execution = data.draw(st.sampled_from(self.loader.running))
        execution.fail = fail
        self.portal.call(self._release, execution)
        execution.ended = True
        key = execution.key
        if execution.current and self.run.get(key) is execution:
            del self.run[key]
            old = self.outcome.get(key)
            if not fail:
                self.outcome[key] = ("ok", [key, execution.number])
            elif old is None or old[0] != "ok":
                self.outcome[key] = ("failed", execution)
        self._check_callers_of(execution)

    async def _release(self, execution: Execution) -> None:
        execution.gate.set()
        await self._settle()

    def _check_callers_of(self, execution: Execution) -> None:
        for c in self.callers:
            if c.expected != ("run", execution):
                continue
            assert c.box, "every waiter of a finished run ends"
            kind, got = c.box[0]
            if execution.fail:
                assert kind == "error"
                if c.instance == execution.owner:
                    assert (
                        isinstance(got, Boom) and str(got) == f"{execution.key}#{execution.number}"
                    )
                else:
                    assert isinstance(got, RemoteLoadError)
                    assert got.error_type == "Boom"
                    assert got.message == f"{execution.key}#{execution.number}"
            else:
                assert (kind, list(got)) == ("value", [execution.key, execution.number])

    @rule(instance=INSTANCES, key=KEYS)
    def invalidate(self, instance: int, key: str) -> None:
        had = key in self.outcome or key in self.run
        self.outcome.pop(key, None)
        run = self.run.pop(key, None)
        before = set(map(id, self.loader.running))
        forgot = self.portal.call(self._invalidate, instance, key)
        assert forgot is had or (run is not None and not forgot)
        if run is None:
            return
        run.current = False  # detached: it goes on for its owner's waiters, is never stored
        # Callers in the other instance were following it: its value can never reach
        # them through the store, so their flight runs the key afresh (once), and it is
        # the key's run now.
        followers = [
            c for c in self.callers if c.expected == ("run", run) and c.instance != run.owner
        ]
        started = [e for e in self.loader.running if id(e) not in before]
        if followers:
            assert len(started) == 1, "the followers of a detached run run it afresh, once"
            (fresh,) = started
            assert fresh.key == key and fresh.owner == followers[0].instance, (fresh, followers)
            self.run[key] = fresh
            for c in followers:
                c.expected = ("run", fresh)
        else:
            assert not started

    async def _invalidate(self, instance: int, key: str) -> bool:
        result = await self.pfs[instance].invalidate(key)
        await self._settle()
        return result

    @rule(instance=INSTANCES, key=KEYS)
    def cancel(self, instance: int, key: str) -> None:
        run = self.run.pop(key, None)
        cancelled = self.portal.call(self._cancel, instance, key)
        assert cancelled is (run is not None)
        if run is not None:
            run.current = False
            for c in self.callers:
                if c.expected == ("run", run):
                    c.expected = ("cancelled",)
                    assert c.box and c.box[0][0] == "error"
                    assert isinstance(c.box[0][1], LoadCancelled)

    async def _cancel(self, instance: int, key: str) -> bool:
        result = await self.pfs[instance].cancel(key)
        await self._settle()
        return result

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def one_current_run_per_key(self) -> None:
        for key in ("a", "b"):
            current = [e for e in self.loader.running if e.key == key and e.current]
            assert len(current) <= 1, f"two current runs of {key!r}: {current}"

    @invariant()
    def both_instances_tell_the_same_story(self) -> None:
        for key in ("a", "b"):
            if key in self.run:
                want = Status.RUNNING
            elif key not in self.outcome:
                want = Status.NOT_STARTED
            else:
                want = Status.COMPLETED if self.outcome[key][0] == "ok" else Status.FAILED
            snaps = [self.portal.call(pf.status, key) for pf in self.pfs]
            assert [s.status for s in snaps] == [want, want], (key, snaps)
            if want is Status.RUNNING:
                assert snaps[0].started_at == snaps[1].started_at
                assert snaps[0].background == snaps[1].background
            if want is Status.COMPLETED:
                assert list(snaps[0].result) == list(snaps[1].result) == self.outcome[key][1]

    @invariant()
    def hits_were_served_at_once(self) -> None:
        for c in self.callers:
            if c.expected is not None and c.expected[0] == "value":
                assert c.box, "a hit is served without waiting"
                kind, got = c.box[0]
                assert kind == "value" and list(got) == c.expected[1]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_two_instances_on_one_shared_store_follow_the_model(backend: str) -> None:
    machine: type[SharedMachine] = type(
        f"SharedMachine_{backend}", (SharedMachine,), {"backend": backend}
    )
    _run(machine, EXAMPLES)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_instances_on_one_postgres_store_follow_the_model(
    postgres_server: PostgresServer,
) -> None:
    machine: type[SharedMachine] = type(
        "SharedMachine_postgres", (SharedMachine,), {"postgres": postgres_server.dsn}
    )
    _run(machine, PG_EXAMPLES)


def _run(machine: type[SharedMachine], examples: int) -> None:
    machine.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
