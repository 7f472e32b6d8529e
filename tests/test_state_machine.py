"""A hypothesis state machine drives the Prefetcher through random interleavings of
prefetch / get / force refresh / completion / failure / invalidate / clock advance,
against a small reference model, and checks status, counters and executions after
every step (docs/contract.md).

The Prefetcher lives in an event loop on a portal thread (asyncio or trio); the
machine's rules call into it. Every load waits on a gate that only a
``complete`` rule opens, so the machine decides when each execution ends.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import attrs
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefetch_ingest import Prefetcher, Status

from .conftest import check_no_task_of_ours
from .helpers import FakeClock

TTL = 10.0
FAILURE_TTL = 3.0
REFRESH_AFTER = 6.0
KEYS = st.sampled_from(["a", "b", "c"])
EXAMPLES = int(os.environ.get("PREFETCH_STATEFUL_EXAMPLES", "30"))


class Boom(Exception):
    pass


@attrs.define
class Execution:
    key: str
    number: int
    gate: anyio.Event
    fail: bool = False


class Loader:
    """Counts executions per key; each waits until the machine completes it."""

    def __init__(self) -> None:
        self.running: list[Execution] = []
        self.counts: dict[str, int] = {}

    async def __call__(self, key: str) -> tuple[str, int]:
        number = self.counts[key] = self.counts.get(key, 0) + 1
        execution = Execution(key, number, anyio.Event())
        self.running.append(execution)
        try:
            await execution.gate.wait()
        finally:
            self.running.remove(execution)
        if execution.fail:
            raise Boom(f"{key}#{number}")
        return (key, number)


# -- the reference model -------------------------------------------------------


@attrs.define
class MFlight:
    key: str
    background: bool
    stale: tuple[Any, float] | None  # (value, completed at) served meanwhile
    status: Status = Status.PENDING
    holds_slot: bool = False
    execution: int | None = None  # execution number, once running


@attrs.define
class Model:
    limit: int | None
    refresh: bool
    now: float = 1000.0
    entries: dict[str, Any] = attrs.Factory(dict)  # key -> MFlight | ("done", v, t) | ("failed", t)
    flights: list[MFlight] = attrs.Factory(list)  # every flight not finished, detached ones too
    queue: list[MFlight] = attrs.Factory(list)
    executions: dict[str, int] = attrs.Factory(dict)
    slots: int = 0

    def current(self, key: str) -> Any:
        entry = self.entries.get(key)
        if isinstance(entry, tuple) and self.now - entry[-1] >= TTL:
            del self.entries[key]
            return None
        return entry

    def launch(self, flight: MFlight, holds_slot: bool) -> None:
        flight.status = Status.RUNNING
        flight.holds_slot = holds_slot
        if holds_slot:
            self.slots += 1
        number = self.executions[flight.key] = self.executions.get(flight.key, 0) + 1
        flight.execution = number

    def start(self, key: str, background: bool, stale: tuple[Any, float] | None) -> MFlight:
        flight = MFlight(key, background, stale)
        self.entries[key] = flight
        self.flights.append(flight)
        if background and self.limit is not None and self.slots >= self.limit:
            self.queue.append(flight)
        else:
            self.launch(flight, holds_slot=background and self.limit is not None)
        return flight

    def finish(self, flight: MFlight, value: Any, failed: bool) -> None:
        self.flights.remove(flight)
        flight.status = Status.FAILED if failed else Status.COMPLETED
        if self.entries.get(flight.key) is flight:
            if not failed:
                self.entries[flight.key] = ("done", value, self.now)
            elif flight.stale is not None and self.now - flight.stale[1] < TTL:
                self.entries[flight.key] = ("done", flight.stale[0], flight.stale[1])
            else:
                self.entries[flight.key] = ("failed", self.now)
        if flight.holds_slot:
            self.slots -= 1
            while self.queue and self.limit is not None and self.slots < self.limit:
                nxt = self.queue.pop(0)
                if nxt.status is Status.PENDING:
                    self.launch(nxt, holds_slot=True)

    def status(self, key: str) -> Status:
        entry = self.current(key)
        if entry is None:
            return Status.NOT_STARTED
        if isinstance(entry, MFlight):
            return entry.status
        return Status.COMPLETED if entry[0] == "done" else Status.FAILED


# -- the machine --------------------------------------------------------------------


class PrefetcherMachine(RuleBasedStateMachine):
    limit: int | None = None
    refresh: bool = False
    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.portal: BlockingPortal = self.stack.enter_context(start_blocking_portal(self.backend))
        self.clock = FakeClock()
        self.loader = Loader()
        self.pf: Prefetcher[str, tuple[str, int]] = Prefetcher(
            self.loader,
            ttl=TTL,
            failure_ttl=FAILURE_TTL,
            refresh_after=REFRESH_AFTER if self.refresh else None,
            max_concurrency=self.limit,
            clock=self.clock,
        )
        self.open = ExitStack()  # the Prefetcher's block, closed before the portal
        self.stack.enter_context(self.open)
        self.open.enter_context(self.portal.wrap_async_context_manager(self.pf))
        self.model = Model(limit=self.limit, refresh=self.refresh, now=self.clock.now)
        self.calls: list[tuple[Any, Any]] = []  # (expected, outcome box)
        self.ids = itertools.count()

    def teardown(self) -> None:
        try:
            self.portal.call(self.release_all)
            for expected, box in self.calls:
                assert box, f"a get never ended (expected {expected!r})"
            self.open.close()
            self.portal.call(self.no_task_of_ours_left)
        finally:
            self.stack.close()

    async def no_task_of_ours_left(self) -> None:
        """The leak check of every async test, here in the portal's own loop."""
        check_no_task_of_ours([self.pf])

    async def release_all(self) -> None:
        for execution in list(self.loader.running):
            execution.gate.set()
        await anyio.wait_all_tasks_blocked()

    # -- rules --------------------------------------------------------------

    @rule(key=KEYS)
    def prefetch(self, key: str) -> None:
        m = self.model
        entry = m.current(key)
        if isinstance(entry, MFlight):
            expected = False
        elif isinstance(entry, tuple) and entry[0] == "done":
            expected = self.refresh and m.now - entry[2] >= REFRESH_AFTER
            if expected:
                m.start(key, background=True, stale=(entry[1], entry[2]))
        elif isinstance(entry, tuple) and m.now - entry[1] < FAILURE_TTL:
            expected = False
        else:
            expected = True
            m.start(key, background=True, stale=None)
        started = self.portal.call(self._prefetch, key)
        assert started is expected

    async def _prefetch(self, key: str) -> bool:
        started = self.pf.prefetch(key)
        await anyio.wait_all_tasks_blocked()
        return started

    @rule(key=KEYS, force=st.booleans())
    def get(self, key: str, force: bool) -> None:
        m = self.model
        entry = m.current(key)
        expected: Any
        if isinstance(entry, tuple) and entry[0] == "done" and not force:
            expected = ("value", entry[1])
            if self.refresh and m.now - entry[2] >= REFRESH_AFTER:
                m.start(key, background=True, stale=(entry[1], entry[2]))
        elif isinstance(entry, tuple) and entry[0] == "done":
            expected = ("flight", m.start(key, background=False, stale=(entry[1], entry[2])))
        elif isinstance(entry, tuple) and not force and m.now - entry[1] < FAILURE_TTL:
            expected = ("error", None)
        elif isinstance(entry, MFlight):
            stale = entry.stale
            if stale is not None and not force and m.now - stale[1] < TTL:
                expected = ("value", stale[0])
            else:
                if entry.status is Status.PENDING:
                    m.launch(entry, holds_slot=False)
                expected = ("flight", entry)
        else:
            expected = ("flight", m.start(key, background=False, stale=None))
        box: list[Any] = []
        self.calls.append((expected, box))
        self.portal.call(self._spawn_get, key, force, box)
        if expected[0] != "flight":
            assert box, "a hit or a remembered failure must answer without waiting"
            if expected[0] == "value":
                assert box[0] == ("value", expected[1])
            else:
                assert box[0][0] == "error"

    async def _spawn_get(self, key: str, force: bool, box: list[Any]) -> None:
        async def caller() -> None:
            try:
                box.append(("value", await self.pf.get(key, force_refresh=force)))
            except Boom as exc:
                box.append(("error", str(exc)))

        self._tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()

    @precondition(lambda self: bool(self.loader.running))
    @rule(data=st.data(), fail=st.booleans())
    def complete(self, data: st.DataObject, fail: bool) -> None:
        execution = data.draw(st.sampled_from(self.loader.running))
        m = self.model
        flight = next(
            f for f in m.flights if f.key == execution.key and f.execution == execution.number
        )
        m.finish(flight, (execution.key, execution.number), fail)
        execution.fail = fail
        self.portal.call(self._release, execution)
        for expected, box in self.calls:
            if expected[0] == "flight" and expected[1] is flight:
                assert box, "every waiter of a finished load ends"
                if fail:
                    assert box[0] == ("error", f"{execution.key}#{execution.number}")
                else:
                    assert box[0] == ("value", (execution.key, execution.number))

    async def _release(self, execution: Execution) -> None:
        execution.gate.set()
        await anyio.wait_all_tasks_blocked()

    @rule(key=KEYS)
    def invalidate(self, key: str) -> None:
        m = self.model
        expected = m.current(key) is not None
        entry = m.entries.pop(key, None)
        if isinstance(entry, MFlight) and entry.status is Status.PENDING:
            # a pending load is dropped with nothing run (a running one is only detached)
            m.flights.remove(entry)
            entry.status = Status.FAILED
        assert self.portal.call(self.pf.invalidate, key) is expected

    @rule(seconds=st.sampled_from([0.5, 2.0, 4.0, 7.0, 11.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.model.now = self.clock.now

    @rule()
    def sweep(self) -> None:
        m = self.model
        expired = [k for k in list(m.entries) if m.current(k) is None]
        assert self.portal.call(self._sweep) == len(expired)

    async def _sweep(self) -> int:
        return self.pf.sweep()

    # -- invariants -----------------------------------------------------------

    @invariant()
    def statuses_agree(self) -> None:
        for key in ("a", "b", "c"):
            expected = self.model.status(key)
            assert self.portal.call(self.pf.status, key).status is expected, key

    @invariant()
    def executions_agree(self) -> None:
        assert self.loader.counts == self.model.executions

    @invariant()
    def counters_agree(self) -> None:
        stats = self.pf.stats()
        flights = self.model.flights
        # a running load detached by invalidate runs on, but is no key's state (v2)
        current = [f for f in flights if self.model.entries.get(f.key) is f]
        assert stats.running == sum(f.status is Status.RUNNING for f in current)
        assert stats.pending == sum(f.status is Status.PENDING for f in current)
        running = sum(f.status is Status.RUNNING for f in flights)
        assert len(self.loader.running) == running
        assert stats.load_successes + stats.load_failures == sum(self.loader.counts.values()) - (
            running
        )

    @property
    def _tg(self) -> Any:
        return self.pf._tg


def _machine(limit: int | None, refresh: bool, backend: str) -> type[PrefetcherMachine]:
    return type(
        f"Machine_{backend}_{limit}_{refresh}",
        (PrefetcherMachine,),
        {"limit": limit, "refresh": refresh, "backend": backend},
    )


def _cases() -> Iterator[Any]:
    for backend in ("asyncio", "trio"):
        for limit, refresh in ((None, False), (1, True)):
            yield pytest.param(
                limit, refresh, backend, id=f"{backend}-limit{limit}-refresh{refresh}"
            )


@pytest.mark.parametrize(("limit", "refresh", "backend"), list(_cases()))
def test_the_prefetcher_follows_the_model(limit: int | None, refresh: bool, backend: str) -> None:
    machine = _machine(limit, refresh, backend)
    machine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
