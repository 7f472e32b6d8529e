"""A hypothesis state machine over TWO Prefetchers sharing one Redis (same prefix), each with
its own RedisStore, against a small model (issue 6).

Rules: get (spawned, on either instance, plain or forced), prefetch, invalidate, fail next
(the next execution of a key raises at once), complete an execution (with a value or an
error), cancel a waiter, crash an instance (leave its ``async with`` block while its loads run:
its leases are handed back, its waiters end with ``PrefetcherClosed``; a fresh instance takes
its place), all in one event loop on a portal thread (as in ``test_state_machine.py``).

After each rule the machine waits (polling, bounded) until the system has settled where the
model says it must: the executions the model expects run (and no other), every call whose
outcome is decided has ended, every follower of a remote run is listening for it. Then it
checks: at most one execution per key runs at a time across both instances; both instances
report the status and result the model predicts (so a stale owner never overwrote a newer
result); and, at the end, every spawned get ended with a value, a typed error, its own
cancellation or ``PrefetcherClosed``.

Redis expiries are real time: ``ttl`` and ``failure_ttl`` are an hour and the lease is
handed back by the crash, so no expiry falls inside a run and there is no clock to advance.
A longer run: ``PREFETCH_STATEFUL_EXAMPLES=500``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import anyio
import attrs
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefetch_ingest import Prefetcher, PrefetcherClosed, RemoteLoadError, Status
from prefetch_ingest._redis_keys import digest_of
from prefetch_ingest.redis import RedisStore

from .redis_server import RedisServer, redis_server_fixture
from .test_redis_store import listening, until

pytestmark = [pytest.mark.redis]

redis_server = redis_server_fixture()

KEY_NAMES = ("a", "b", "c")
KEYS = st.sampled_from(KEY_NAMES)
INSTANCES = st.sampled_from((0, 1))
HOUR = 3600.0
PREFIX = "sm"
EXAMPLES = int(os.environ.get("PREFETCH_STATEFUL_EXAMPLES", "50"))
SETTLE_TIMEOUT = 20.0


class Boom(Exception):
    pass


@attrs.define(eq=False)
class Execution:
    key: str
    number: int
    instance: int
    gate: anyio.Event
    fail: bool = False


class Loader:
    """Shared by both instances: counts executions per key, each waits for the machine."""

    def __init__(self) -> None:
        self.running: list[Execution] = []
        self.counts: dict[str, int] = {}
        self.fail_next: set[str] = set()
        self.overlaps: list[str] = []  # a key that ran twice at once, if ever

    def for_instance(self, instance: int) -> Callable[[str], Any]:
        async def load(key: str) -> str:
            number = self.counts[key] = self.counts.get(key, 0) + 1
            if any(e.key == key for e in self.running):
                self.overlaps.append(f"{key}#{number}")
            if key in self.fail_next:
                self.fail_next.discard(key)
                raise Boom(f"{key}#{number}")
            execution = Execution(key, number, instance, anyio.Event())
            self.running.append(execution)
            try:
                await execution.gate.wait()
            finally:
                self.running.remove(execution)
            if execution.fail:
                raise Boom(f"{key}#{number}")
            return f"{key}#{number}"

        return load


# -- the model ------------------------------------------------------------------------


@attrs.define(eq=False)
class MExec:
    key: str
    number: int
    owner: int
    followers: set[int]  # instances with a local flight following this run (owner included)


@attrs.define(eq=False)
class Call:
    instance: int
    key: str
    box: list[Any]
    scope: anyio.CancelScope
    expect: Any  # ("value", v) | ("error", label) | ("exec", MExec) | ("closed",)


@attrs.define
class Model:
    # what Redis holds: the record ("done", v) / ("failed", label), and the run holding the lease
    record: dict[str, tuple[str, str]] = attrs.Factory(dict)
    lease: dict[str, MExec] = attrs.Factory(dict)
    executions: dict[str, int] = attrs.Factory(dict)
    fail_next: set[str] = attrs.Factory(set)
    # per instance: the run its local flight follows (and whether it was forced), local failures.
    # A local failure record answers only what the store cannot: ``get`` and ``status`` ask the
    # store first, so a newer result or an invalidation elsewhere wins (see
    # test_a_local_failure_gives_way_to_a_newer_result); ``prefetch`` (synchronous) still sees it.
    flights: list[dict[str, tuple[MExec, bool]]] = attrs.Factory(lambda: [{}, {}])
    failed: list[dict[str, str]] = attrs.Factory(lambda: [{}, {}])

    def status(self, instance: int, key: str) -> tuple[Status, str | None]:
        if key in self.flights[instance]:
            return Status.RUNNING, None
        # as the store reads an entry: a completed record, else a lease, else a failure
        rec = self.record.get(key)
        if rec is not None and rec[0] == "done":
            return Status.COMPLETED, rec[1]
        if key in self.lease:
            return Status.RUNNING, None
        if rec is not None:
            return Status.FAILED, None
        # A local failure the store no longer holds was invalidated elsewhere
        # (the store keeps failures for failure_ttl): status drops it.
        self.failed[instance].pop(key, None)
        return Status.NOT_STARTED, None


# -- the machine ----------------------------------------------------------------------


class TwoInstancesMachine(RuleBasedStateMachine):
    server: RedisServer

    def __init__(self) -> None:
        super().__init__()
        self.server.command("FLUSHALL")
        self.stack = ExitStack()
        self.portal: BlockingPortal = self.stack.enter_context(start_blocking_portal("asyncio"))
        self.loader = Loader()
        self.model = Model()
        self.calls: list[Call] = []
        self.pfs: list[Prefetcher[str, str]] = []
        self.stores: list[RedisStore] = []
        self.cms: list[AbstractContextManager[Any]] = []
        try:
            group = self.portal.call(anyio.create_task_group)  # made in the loop's thread
            self.tg: Any = self.stack.enter_context(self.portal.wrap_async_context_manager(group))
            for instance in (0, 1):
                self._open(instance)
        except BaseException:
            self._close()
            raise

    def _open(self, instance: int) -> None:
        store = RedisStore(self.server.url, prefix=PREFIX, lease=5.0, poll_interval=0.05)
        pf: Prefetcher[str, str] = Prefetcher(
            self.loader.for_instance(instance), ttl=HOUR, failure_ttl=HOUR, store=store
        )
        cm = self.portal.wrap_async_context_manager(pf)
        cm.__enter__()
        if instance < len(self.pfs):
            self.pfs[instance], self.stores[instance], self.cms[instance] = pf, store, cm
        else:
            self.pfs.append(pf)
            self.stores.append(store)
            self.cms.append(cm)

    def teardown(self) -> None:
        try:
            # finish every run, then every call whose outcome is decided must have ended
            while self.loader.running:
                execution = self.loader.running[0]
                self._finish(execution, fail=False)
            assert not self.loader.overlaps, self.loader.overlaps
            for call in self.calls:
                assert call.box, f"a get never ended: {call.instance} {call.key} {call.expect}"
            self.ended_calls_match_the_model()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            for cm in self.cms:
                cm.__exit__(None, None, None)
        finally:
            self.stack.close()

    # -- helpers ------------------------------------------------------------------

    def _settle(self, why: str) -> None:
        """Wait until the system matches the model where the model is decided."""

        def settled() -> str | None:
            m = self.model
            want = sorted((e.key, e.number, e.owner) for e in m.lease.values())
            have = sorted((e.key, e.number, e.instance) for e in self.loader.running)
            if want != have:
                return f"executions running {have}, model {want}"
            for call in self.calls:
                if call.expect[0] != "exec" and not call.box:
                    return f"a call still waiting: {call.instance} {call.key} {call.expect}"
            for instance, pf in enumerate(self.pfs):
                live = sorted(str(f.key) for f in pf._live)
                if live != sorted(m.flights[instance]):
                    return (
                        f"instance {instance} flights {live}, model {sorted(m.flights[instance])}"
                    )
                for key, (execution, _) in m.flights[instance].items():
                    if execution.owner != instance and (
                        digest_of(key) not in self.stores[instance]._signals
                    ):
                        return f"instance {instance} not yet listening for {key}"
            return None

        async def wait() -> str | None:
            with anyio.move_on_after(SETTLE_TIMEOUT):
                while True:
                    problem = settled()
                    if problem is None:
                        return None
                    await anyio.sleep(0.005)  # the state lives in Redis and other tasks
            return settled()

        problem = self.portal.call(wait)
        assert problem is None, f"after {why}: {problem}"

    def _start(self, instance: int, key: str, force: bool) -> MExec | tuple[str, str]:
        """The model of store.load on ``instance``: a run to follow, or an outcome."""
        m = self.model
        m.failed[instance].pop(key, None)
        rec = m.record.get(key)
        if rec is not None and not force:
            return ("value", rec[1]) if rec[0] == "done" else ("error", rec[1])
        if key in m.lease:
            execution = m.lease[key]
            execution.followers.add(instance)
            m.flights[instance][key] = (execution, force)
            return execution
        return self._execute(instance, key, {instance: force})

    def _execute(
        self, instance: int, key: str, flights: dict[int, bool]
    ) -> MExec | tuple[str, str]:
        m = self.model
        number = m.executions[key] = m.executions.get(key, 0) + 1
        execution = MExec(key, number, instance, set(flights))
        if key in m.fail_next:
            m.fail_next.discard(key)
            self._outcome(execution, fail=True)
            return ("error", f"{key}#{number}")
        m.lease[key] = execution
        for i, force in flights.items():
            m.flights[i][key] = (execution, force)
        return execution

    def _outcome(self, execution: MExec, fail: bool) -> None:
        """The model of a run ending: the record, the followers' flights, the waiters."""
        m = self.model
        key, label = execution.key, f"{execution.key}#{execution.number}"
        if m.lease.get(key) is execution:
            del m.lease[key]
        if not fail:
            m.record[key] = ("done", label)
        elif m.record.get(key, ("", ""))[0] != "done":  # a failed refresh keeps the value
            m.record[key] = ("failed", label)
        for instance in execution.followers:
            if m.flights[instance].get(key, (None,))[0] is execution:
                del m.flights[instance][key]
            if fail:
                m.failed[instance][key] = label
        for call in self.calls:
            if call.expect[0] == "exec" and call.expect[1] is execution:
                call.expect = ("error", label) if fail else ("value", label)

    def _spawn(self, instance: int, key: str, force: bool, expect: Any) -> None:
        call = Call(instance, key, [], self.portal.call(anyio.CancelScope), expect)
        self.calls.append(call)
        pf = self.pfs[instance]

        async def caller() -> None:
            with call.scope:
                try:
                    call.box.append(("value", await pf.get(key, force_refresh=force)))
                except (Boom, RemoteLoadError) as exc:
                    call.box.append(("error", str(exc)))
                except PrefetcherClosed:
                    call.box.append(("closed",))
            if call.scope.cancelled_caught:
                call.box.append(("cancelled",))

        async def spawn() -> None:
            self.tg.start_soon(caller)

        self.portal.call(spawn)

    def _finish(self, execution: Execution, fail: bool) -> None:
        m = self.model
        mexec = m.lease[execution.key]
        assert (mexec.number, mexec.owner) == (execution.number, execution.instance)
        self._outcome(mexec, fail)
        execution.fail = fail
        self.portal.call(self._open_gate, execution)
        self._settle(f"completing {execution.key}#{execution.number}")

    @staticmethod
    async def _open_gate(execution: Execution) -> None:
        execution.gate.set()

    # -- rules ----------------------------------------------------------------------

    @rule(instance=INSTANCES, key=KEYS, force=st.booleans())
    def get(self, instance: int, key: str, force: bool) -> None:
        m = self.model
        expect: Any
        if key in m.flights[instance]:
            expect = ("exec", m.flights[instance][key][0])
        elif key in m.record and not force:
            expect = m.record[key]
            expect = ("value", expect[1]) if expect[0] == "done" else ("error", expect[1])
            if expect[0] == "error" and key in m.lease:
                # the lookup saw a run (a lease wins over a failure record): a local flight
                # started, and it met the failure record
                m.failed[instance][key] = expect[1]
        else:
            started = self._start(instance, key, force)
            expect = ("exec", started) if isinstance(started, MExec) else started
        self._spawn(instance, key, force, expect)
        self._settle(f"get {key} on {instance}")

    @rule(instance=INSTANCES, key=KEYS)
    def prefetch(self, instance: int, key: str) -> None:
        m = self.model
        expected = key not in m.flights[instance] and key not in m.failed[instance]
        if expected:
            outcome = self._start(instance, key, False)
            if isinstance(outcome, tuple) and outcome[0] == "error":
                m.failed[instance][key] = outcome[1]  # the background flight failed
        assert self.portal.call(self.pfs[instance].prefetch, key) is expected
        self._settle(f"prefetch {key} on {instance}")

    @rule(instance=INSTANCES, key=KEYS)
    def invalidate(self, instance: int, key: str) -> None:
        m = self.model
        if key in m.flights[instance]:
            return  # detaching a local flight from a shared run is out of this model
        expected = key in m.record or key in m.failed[instance]
        m.record.pop(key, None)
        m.failed[instance].pop(key, None)
        assert self.portal.call(self.pfs[instance].invalidate, key) is expected
        self._settle(f"invalidate {key} on {instance}")

    @rule(key=KEYS)
    def fail_next(self, key: str) -> None:
        self.model.fail_next.add(key)
        self.loader.fail_next.add(key)

    @precondition(lambda self: bool(self.loader.running))
    @rule(data=st.data(), fail=st.booleans())
    def complete(self, data: st.DataObject, fail: bool) -> None:
        self._finish(data.draw(st.sampled_from(self.loader.running)), fail)

    @precondition(lambda self: any(not c.box for c in self.calls))
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from([c for c in self.calls if not c.box]))
        call.expect = ("cancelled",)
        self.portal.call(self._cancel, call.scope)
        self._settle("cancelling a waiter")

    @staticmethod
    async def _cancel(scope: anyio.CancelScope) -> None:
        scope.cancel()

    @precondition(lambda self: bool(self.loader.running))
    @rule(data=st.data())
    def crash_owner(self, data: st.DataObject) -> None:
        """Close the instance owning a run while it runs; a fresh instance replaces it."""
        m = self.model
        victim = data.draw(st.sampled_from(self.loader.running)).instance
        other = 1 - victim
        for call in self.calls:
            if call.instance == victim and not call.box and call.expect[0] != "cancelled":
                call.expect = ("closed",)
        for key, (execution, _) in list(m.flights[victim].items()):
            execution.followers.discard(victim)
            del m.flights[victim][key]
        m.failed[victim].clear()
        for key, execution in list(m.lease.items()):
            if execution.owner != victim:
                continue
            del m.lease[key]  # handed back on the way out
            follow = m.flights[other].get(key)
            if follow is None or follow[0] is not execution:
                continue
            del m.flights[other][key]
            rec = m.record.get(key)
            if rec is not None and not follow[1]:
                taken: Any = ("value", rec[1]) if rec[0] == "done" else ("error", rec[1])
                if taken[0] == "error":
                    m.failed[other][key] = rec[1]
            else:
                taken = self._execute(other, key, {other: follow[1]})
                if isinstance(taken, tuple):
                    m.failed[other][key] = taken[1]
            for call in self.calls:
                if call.expect[0] == "exec" and call.expect[1] is execution:
                    call.expect = ("exec", taken) if isinstance(taken, MExec) else taken
        self.cms[victim].__exit__(None, None, None)
        self._open(victim)
        self._settle(f"crashing instance {victim}")

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def one_execution_per_key_at_a_time(self) -> None:
        assert not self.loader.overlaps, self.loader.overlaps
        assert self.loader.counts == self.model.executions

    @invariant()
    def ended_calls_match_the_model(self) -> None:
        for call in self.calls:
            if not call.box:
                continue
            got, expect = call.box[0], call.expect
            if expect[0] == "error":
                label = expect[1]
                assert got[0] == "error", (call.instance, call.key, got, expect)
                assert got[1] == label or got[1].endswith(f"Boom: {label}"), (got, expect)
            else:
                assert got == expect, (call.instance, call.key, got, expect)

    @invariant()
    def statuses_agree_with_the_model(self) -> None:
        async def snapshots() -> list[Any]:
            return [await pf.status(key) for pf in self.pfs for key in KEY_NAMES]

        got = self.portal.call(snapshots)
        i = 0
        for instance in (0, 1):
            for key in KEY_NAMES:
                status, result = self.model.status(instance, key)
                assert got[i].status is status, (instance, key, got[i], status)
                if status is Status.COMPLETED:
                    assert got[i].result == result, (instance, key, got[i].result, result)
                i += 1


def test_two_prefetchers_on_one_redis_follow_the_model(redis_server: RedisServer) -> None:
    machine: type[TwoInstancesMachine] = type(
        "TwoInstances", (TwoInstancesMachine,), {"server": redis_server}
    )
    machine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_local_failure_gives_way_to_a_newer_result(redis_server: RedisServer) -> None:
    """B follows A's run, which fails: B keeps a local failure. A invalidates and reloads: B's
    status says COMPLETED, so B's get must return that value (not re-raise the old failure)."""
    gate = anyio.Event()
    started = anyio.Event()
    calls: list[int] = []

    async def load(key: str) -> str:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            await gate.wait()
            raise Boom("first")
        return "second"

    store_b = RedisStore(redis_server.url, prefix=PREFIX, poll_interval=0.05)
    async with (
        Prefetcher(load, failure_ttl=HOUR, store=RedisStore(redis_server.url, prefix=PREFIX)) as a,
        Prefetcher(load, failure_ttl=HOUR, store=store_b) as b,
    ):
        a.prefetch("k")
        await started.wait()
        b.prefetch("k")  # follows a's run
        await until(lambda: listening(store_b))
        gate.set()
        assert (await b.wait("k")).status is Status.FAILED
        assert await a.invalidate("k")
        assert (await a.status("k")).status is Status.NOT_STARTED
        status_b = (await b.status("k")).status
        assert await a.get("k") == "second"
        assert (await b.status("k")).status is Status.COMPLETED
        got_b = await b.get("k")
    assert status_b is Status.NOT_STARTED
    assert got_b == "second"
