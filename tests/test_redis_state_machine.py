"""A hypothesis state machine over TWO Prefetchers sharing one Redis (same prefix), each with
its own RedisStore, against a small model (issue 6).

Rules: get (spawned, on either instance, plain or forced), prefetch, invalidate, fail next
(the next execution of a key raises at once), complete an execution (with a value or an
error), cancel a waiter, advance time, crash the instance owning a run, close the instance
owning a run; all in one event loop on a portal thread (as in ``test_state_machine.py``).

Time is logical. ``ttl``, ``failure_ttl`` and the lease are logical seconds (``TTL``,
``FAILURE_TTL``, ``LEASE``); the model keeps the logical time, and what is written at ``t``
expires at ``t + ttl`` (a completed record), ``t + failure_ttl`` (a failed record),
``t + max(failure_ttl, lease)`` (the failure notice, as the store writes it), and a crashed
owner's lease lapses ``lease`` after the crash. Both engines share one ``FakeClock``, the
logical clock: it decides their local failure records (``prefetch`` skips a key for
``failure_ttl`` after a failure; ``status`` reports a local failure the store no longer has
until ``ttl``, except within ``failure_ttl``, where it means another instance invalidated
it; ``get`` re-raises the original exception while the store holds the same failure).
Redis counts real time, so the store is given the same numbers as real seconds: hundreds
of seconds, far longer than a run, so nothing in Redis expires by itself and a live owner
never even renews its lease. "Advance time by d" enacts, in time order, every expiry the
model predicts up to ``now + d``: the clock is set to that instant, the key is expired for
real (``PEXPIRE 1``, then polled until Redis no longer holds that value) and the machine
settles; so a run that takes a lapsed lease over starts at the lapse, and its failure can
expire later in the same step. (``refresh_after`` is left out: with a shared store, the age
of a stored value is wall-clock time, which no injected clock moves.)

Crash: the instance owning a run dies. Its Redis client goes through its own TCP proxy
(``tests/tcp_proxy.py``); the proxy is cut (every connection aborted, new ones refused) and
the instance leaves its ``async with`` block in the same instant: its loads are cancelled,
its waiters get ``PrefetcherClosed``, handing its leases back fails (logged as
``prefetch.redis_release_failed``), so the leases stay in Redis. A fresh instance takes its
place. Followers of the dead run, on the other instance and on the fresh one, keep waiting
until advance time lapses the lease; then exactly one of them takes it and runs the key
once, and the other follows that run (when both wait, the machine draws which one looks
first and holds the other back until then, so that no run depends on the scheduler).
Close: the instance owning a run leaves its block with Redis reachable: its leases are
handed back, and a follower on the other instance takes over at once.

After each rule the machine waits (polling, bounded) until the system has settled where the
model says it must: the executions the model expects run (and no other), every call whose
outcome is decided has ended, every follower of a remote run is listening for it. Then it
checks: at most one execution per key runs at a time across both instances; Redis holds
exactly the records, failure notices and leases the model says; both instances report the
status (and result or error) the model predicts, so a stale owner never overwrote a newer
result; and every call that ended got exactly what the model says: the value, the original
exception (on the instance that ran the load) or ``RemoteLoadError`` (elsewhere) with the
failing run's label, its own cancellation or ``PrefetcherClosed``. A longer run (nightly):
``PREFETCH_STATEFUL_EXAMPLES=500`` (and ``PREFETCH_STATEFUL_STEPS``, 35 by default).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs
import pytest
import redis
import redis.asyncio as aioredis
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from structlog.testing import capture_logs

from prefetch_ingest import Prefetcher, PrefetcherClosed, RemoteLoadError, Status
from prefetch_ingest._redis_keys import Names, digest_of, names_for
from prefetch_ingest.redis import RedisStore

from .helpers import FakeClock
from .redis_server import RedisServer, redis_server_fixture
from .tcp_proxy import TcpProxy
from .test_redis_store import listening, until

pytestmark = [pytest.mark.redis]

redis_server = redis_server_fixture()

T = TypeVar("T")

KEY_NAMES = ("a", "b", "c")
KEYS = st.sampled_from(KEY_NAMES)
INSTANCES = st.sampled_from((0, 1))
HOUR = 3600.0
PREFIX = "sm"
EXAMPLES = int(os.environ.get("PREFETCH_STATEFUL_EXAMPLES", "40"))
SETTLE_TIMEOUT = 20.0
STEPS = int(os.environ.get("PREFETCH_STATEFUL_STEPS", "35"))

# Logical seconds (and, for Redis, the same numbers of real seconds).
TTL = 1000.0
FAILURE_TTL = 300.0
LEASE = 500.0
NOTICE_TTL = max(FAILURE_TTL, LEASE)  # the store keeps a failure notice this long
# Steps within failure_ttl, between failure_ttl and ttl (and past a lease when added to the
# first), and past everything.
ADVANCE = st.sampled_from((100.0, 400.0, 2000.0))
POLL = 0.05


class Boom(Exception):
    pass


@attrs.define(eq=False)
class Execution:
    key: str
    number: int
    instance: int
    gate: anyio.Event
    fail: bool = False
    cancelled: bool = False


class Loader:
    """Shared by both instances: counts executions per key, each waits for the machine."""

    def __init__(self) -> None:
        self.running: list[Execution] = []
        self.counts: dict[str, int] = {}
        self.started: list[tuple[str, int, int]] = []  # (key, number, instance), in order
        self.fail_next: set[str] = set()
        self.overlaps: list[str] = []  # a key that ran twice at once, if ever

    def for_instance(self, instance: int) -> Callable[[str], Any]:
        async def load(key: str) -> str:
            number = self.counts[key] = self.counts.get(key, 0) + 1
            self.started.append((key, number, instance))
            if any(e.key == key for e in self.running):
                self.overlaps.append(f"{key}#{number}")
            if key in self.fail_next:
                self.fail_next.discard(key)
                raise Boom(f"{key}#{number}")
            execution = Execution(key, number, instance, anyio.Event())
            self.running.append(execution)
            try:
                await execution.gate.wait()
            except anyio.get_cancelled_exc_class():
                execution.cancelled = True
                raise
            finally:
                self.running.remove(execution)
            if execution.fail:
                raise Boom(f"{key}#{number}")
            return f"{key}#{number}"

        return load

    def executed(self, key: str, number: int) -> int | None:
        """The instance that ran execution ``number`` of ``key``, if it has started."""
        return next((i for k, n, i in self.started if (k, n) == (key, number)), None)


async def _call(function: Callable[[], T]) -> T:
    return function()


@contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """``structlog.testing.capture_logs``, leaving structlog unconfigured if it was: it counts
    as configured afterwards, and the instances opened later would log at every level."""
    configured = structlog.is_configured()
    with capture_logs() as logs:
        yield logs
    if not configured:
        structlog.reset_defaults()


async def _unstick(instance: Instance) -> None:
    """After a failure only: cancel the stores' notification readers until ``instance`` has
    left its block (so that the machine fails rather than hangs)."""
    with anyio.move_on_after(SETTLE_TIMEOUT):
        while not instance.stopped.is_set():
            for task in asyncio.all_tasks():
                if task.get_name().startswith("prefetch_ingest redis notifications"):
                    task.cancel()
            await anyio.sleep(0.01)


class WatchedStore(RedisStore):
    """A RedisStore that counts, per key digest, the acquire round trips it has completed,
    and that the machine can hold back before its next acquire.

    The machine waits on these counts where nothing else shows it: a follower that has
    looked again since a new run took the lease has seen that run (and will accept its
    result rather than force another run). Holding a follower back decides which of two
    followers of a lapsed lease looks first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquires: Counter[str] = Counter()
        self.acquiring = 0  # acquires sent and not answered yet
        self._go: anyio.Event | None = None  # set: acquires may go

    def hold(self) -> None:
        self._go = anyio.Event()

    def release(self) -> None:
        if self._go is not None:
            self._go.set()

    async def _acquire(self, names: Names, *args: Any, **kwargs: Any) -> Any:
        while self._go is not None and not self._go.is_set():
            await self._go.wait()
        self.acquiring += 1
        try:
            reply = await super()._acquire(names, *args, **kwargs)
        finally:
            self.acquiring -= 1
        self.acquires[names.digest] += 1
        return reply


@attrs.define(eq=False)
class Instance:
    """One Prefetcher, its store, and the client and proxy through which it reaches Redis."""

    pf: Prefetcher[str, str]
    store: WatchedStore
    client: aioredis.Redis
    proxy: TcpProxy
    stop: anyio.Event = attrs.Factory(anyio.Event)
    stopped: anyio.Event = attrs.Factory(anyio.Event)
    crash: bool = False


# -- the model ------------------------------------------------------------------------


@attrs.define(eq=False)
class MExec:
    key: str
    number: int
    owner: int
    followers: set[int]  # instances with a local flight following this run (owner included)
    crashed_at: float | None = None  # its owner died at this time; the lease lapses LEASE later

    @property
    def label(self) -> str:
        return f"{self.key}#{self.number}"


@attrs.frozen
class Record:
    kind: str  # "done" | "failed"
    label: str
    at: float

    @property
    def expires(self) -> float:
        return self.at + (TTL if self.kind == "done" else FAILURE_TTL)


@attrs.frozen
class LocalFailure:
    """A failure an engine keeps (its table, on the engine's clock)."""

    label: str
    at: float
    here: bool  # the load ran in this instance: the record holds the original exception


@attrs.define(eq=False)
class Call:
    instance: int
    key: str
    box: list[Any]
    scope: anyio.CancelScope
    # ("value", v) | ("error", label, "here" | "remote") | ("exec", MExec) | ("closed",)
    # | ("cancelled",)
    expect: Any


Outcome = MExec | tuple[str, ...]


@attrs.define
class Model:
    now: float
    # What Redis holds: the record, the failure notice (its write time), the run holding the
    # lease (alive, or crashed: then the lease stays until it lapses).
    record: dict[str, Record] = attrs.Factory(dict)
    notice: dict[str, float] = attrs.Factory(dict)
    lease: dict[str, MExec] = attrs.Factory(dict)
    executions: dict[str, int] = attrs.Factory(dict)
    fail_next: set[str] = attrs.Factory(set)
    # per instance: the run its local flight follows (and whether it was forced), local failures.
    # A local failure record answers only what the store cannot: ``get`` and ``status`` ask the
    # store first, so a newer result or an invalidation elsewhere wins (see
    # test_a_local_failure_gives_way_to_a_newer_result); ``prefetch`` (synchronous) still sees it.
    flights: list[dict[str, tuple[MExec, bool]]] = attrs.Factory(lambda: [{}, {}])
    failed: list[dict[str, LocalFailure]] = attrs.Factory(lambda: [{}, {}])

    def local_failure(self, instance: int, key: str) -> LocalFailure | None:
        """The local failure as the engine reads its table: dropped once ``ttl`` old."""
        failure = self.failed[instance].get(key)
        if failure is not None and self.now - failure.at >= TTL:
            del self.failed[instance][key]
            return None
        return failure

    def status(self, instance: int, key: str) -> tuple[Status, str | None]:
        if key in self.flights[instance]:
            return Status.RUNNING, None
        failure = self.local_failure(instance, key)
        # as the store reads an entry: a completed record, else a lease, else a failure
        rec = self.record.get(key)
        if rec is not None and rec.kind == "done":
            return Status.COMPLETED, rec.label
        if key in self.lease:
            return Status.RUNNING, None
        if rec is not None:
            return Status.FAILED, rec.label
        if failure is not None:
            if self.now - failure.at < FAILURE_TTL:
                # The store keeps failures for failure_ttl: this one was invalidated
                # elsewhere, and status drops it.
                del self.failed[instance][key]
                return Status.NOT_STARTED, None
            return Status.FAILED, failure.label  # the store's copy expired; ours is kept
        return Status.NOT_STARTED, None


# -- the machine ----------------------------------------------------------------------


class TwoInstancesMachine(RuleBasedStateMachine):
    server: RedisServer

    def __init__(self) -> None:
        super().__init__()
        self.server.command("FLUSHALL")
        self.stack = ExitStack()
        self.redis = redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=10)
        self.stack.callback(self.redis.close)
        self.portal: BlockingPortal = self.stack.enter_context(start_blocking_portal("asyncio"))
        self.clock = FakeClock()
        self.loader = Loader()
        self.model = Model(now=self.clock.now)
        self.calls: list[Call] = []
        self.instances: list[Instance] = []
        try:
            group = self.portal.call(anyio.create_task_group)  # made in the loop's thread
            self.tg: Any = self.stack.enter_context(self.portal.wrap_async_context_manager(group))
            for slot in (0, 1):
                self.instances.append(self.portal.call(self._start_instance, slot))
        except BaseException:
            self._close()
            raise

    # -- instances ------------------------------------------------------------------

    async def _start_instance(self, slot: int) -> Instance:
        proxy = TcpProxy("127.0.0.1", self.server.port)
        await proxy.start()
        client = aioredis.Redis(
            host="127.0.0.1",
            port=proxy.port,
            socket_connect_timeout=5.0,
            socket_timeout=10.0,
            retry=Retry(NoBackoff(), 0),  # a dead connection fails at once
        )
        store = WatchedStore(client, prefix=PREFIX, lease=LEASE, poll_interval=POLL)
        pf: Prefetcher[str, str] = Prefetcher(
            self.loader.for_instance(slot),
            ttl=TTL,
            failure_ttl=FAILURE_TTL,
            store=store,
            clock=self.clock,
        )
        instance = Instance(pf, store, client, proxy)
        try:
            await self.tg.start(self._host, instance)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await proxy.aclose()
            raise
        return instance

    @staticmethod
    async def _host(
        instance: Instance, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the instance's ``async with`` block open until it is told to stop."""
        try:
            async with instance.pf:
                task_status.started()
                await instance.stop.wait()
                if instance.crash:
                    # The proxy is cut and the block left with no checkpoint in between: no
                    # task of this instance sees Redis gone before it is cancelled.
                    instance.proxy.cut()
        finally:
            instance.stopped.set()

    @staticmethod
    async def _stop(instance: Instance, crash: bool) -> None:
        if not instance.stopped.is_set():
            instance.crash = crash
            instance.stop.set()
            with anyio.move_on_after(SETTLE_TIMEOUT):
                await instance.stopped.wait()
            if not instance.stopped.is_set():
                await _unstick(instance)
                raise AssertionError(
                    f"the instance did not leave its async with block in {SETTLE_TIMEOUT} s: "
                    "RedisStore.aclose waited for a notification reader that a swallowed "
                    "cancel() left running"
                )
        # the store never closes a client the application gave it
        await instance.client.aclose()
        await instance.proxy.aclose()

    def teardown(self) -> None:
        try:
            # let every crashed lease lapse and finish every run: then every call must have ended
            while True:
                if any(e.crashed_at is not None for e in self.model.lease.values()):
                    self._advance(LEASE)
                elif self.loader.running:
                    self._finish(self.loader.running[0], fail=False)
                else:
                    break
            assert not self.loader.overlaps, self.loader.overlaps
            for call in self.calls:
                assert call.box, f"a get never ended: {call.instance} {call.key} {call.expect}"
            self.ended_calls_match_the_model()
        finally:
            self._close()

    def _close(self) -> None:
        errors: list[BaseException] = []
        for instance in self.instances:
            try:
                self.portal.call(self._stop, instance, False)
            except Exception as exc:  # stop the others all the same
                errors.append(exc)
        try:
            for call in self.calls:  # (after a failure) so that the task group can end
                self.portal.call(self._cancel, call.scope)
        finally:
            self.stack.close()
        if errors:
            raise errors[0]

    # -- helpers ------------------------------------------------------------------

    def _names(self, key: str) -> Names:
        return self.instances[0].store._names(key)

    def _poll(self, condition: Callable[[], T | None]) -> T | None:
        """Poll ``condition`` in the event loop until it gives something (None: time out)."""

        async def wait() -> T | None:
            with anyio.move_on_after(SETTLE_TIMEOUT):
                while True:
                    found = condition()
                    if found is not None:
                        return found
                    await anyio.sleep(0.005)  # the state lives in Redis and other tasks
            return condition()

        return self.portal.call(wait)

    def _wait_for(self, what: str, condition: Callable[[], T | None]) -> T:
        found = self._poll(condition)
        assert found is not None, f"waited in vain for {what}"
        return found

    def _settle(self, why: str) -> None:
        """Wait until the system matches the model where the model is decided."""

        def problem() -> str | None:
            m = self.model
            want = sorted(
                (e.key, e.number, e.owner) for e in m.lease.values() if e.crashed_at is None
            )
            have = sorted((e.key, e.number, e.instance) for e in self.loader.running)
            if want != have:
                return f"executions running {have}, model {want}"
            for call in self.calls:
                if call.expect[0] != "exec" and not call.box:
                    return f"a call still waiting: {call.instance} {call.key} {call.expect}"
            for i, instance in enumerate(self.instances):
                live = sorted(str(f.key) for f in instance.pf._core.live)
                if live != sorted(m.flights[i]):
                    return f"instance {i} flights {live}, model {sorted(m.flights[i])}"
                for key, (execution, _) in m.flights[i].items():
                    remote = execution.owner != i or execution.crashed_at is not None
                    if remote and digest_of(key) not in instance.store._signals:
                        return f"instance {i} not yet listening for {key}"
            return None

        settled = self._poll(lambda: True if problem() is None else None)
        assert settled, f"after {why}: {self.portal.call(_call, problem)}"

    def _start(self, instance: int, key: str, force: bool) -> Outcome:
        """The model of a fresh local flight on ``instance`` calling store.load."""
        m = self.model
        m.failed[instance].pop(key, None)  # the flight takes the local failure's place
        rec = m.record.get(key)
        if rec is not None and not force:
            if rec.kind == "done":
                return ("value", rec.label)
            # the flight meets the failure record: RemoteLoadError, kept as a local failure
            m.failed[instance][key] = LocalFailure(rec.label, m.now, here=False)
            return ("error", rec.label, "remote")
        if key in m.lease:
            execution = m.lease[key]
            execution.followers.add(instance)
            m.flights[instance][key] = (execution, force)
            return execution
        return self._execute(instance, key, {instance: force})

    def _execute(self, instance: int, key: str, flights: dict[int, bool]) -> Outcome:
        m = self.model
        number = m.executions[key] = m.executions.get(key, 0) + 1
        execution = MExec(key, number, instance, set(flights))
        if key in m.fail_next:
            m.fail_next.discard(key)
            self._outcome(execution, fail=True)
            return ("error", execution.label, "here")
        m.lease[key] = execution
        for i, force in flights.items():
            m.flights[i][key] = (execution, force)
        return execution

    def _outcome(self, execution: MExec, fail: bool) -> None:
        """The model of a run ending: the record, the followers' flights, the waiters."""
        m = self.model
        key, label = execution.key, execution.label
        if m.lease.get(key) is execution:
            del m.lease[key]
        rec = m.record.get(key)
        if not fail:
            m.record[key] = Record("done", label, m.now)
        else:
            m.notice[key] = m.now
            if rec is None or rec.kind != "done":  # a failed refresh keeps the value
                m.record[key] = Record("failed", label, m.now)
        for instance in execution.followers:
            if m.flights[instance].get(key, (None,))[0] is execution:
                del m.flights[instance][key]
            if fail:
                here = instance == execution.owner
                m.failed[instance][key] = LocalFailure(label, m.now, here)
        for call in self.calls:
            if call.expect[0] == "exec" and call.expect[1] is execution:
                if fail:
                    where = "here" if call.instance == execution.owner else "remote"
                    call.expect = ("error", label, where)
                else:
                    call.expect = ("value", label)

    def _lease_ended(self, execution: MExec) -> dict[int, bool]:
        """The model of a lease ending with no result (handed back, or lapsed): the
        instances whose flights followed its run (with their force flag) look again."""
        m = self.model
        key = execution.key
        if m.lease.get(key) is execution:
            del m.lease[key]
        following = {
            i: m.flights[i][key][1]
            for i in (0, 1)
            if m.flights[i].get(key, (None,))[0] is execution
        }
        for i in following:
            del m.flights[i][key]
        execution.followers.clear()
        # Only the lease holder writes a record, and a follower that does not force found none
        # when it began to follow: so there is still none, and every follower takes the lease.
        assert key not in m.record or all(following.values()), (key, m.record, following)
        return following

    def _redirect(self, ended: MExec, outcomes: dict[int, Outcome]) -> None:
        """Calls that waited for ``ended`` now wait for (or got) their instance's outcome."""
        for call in self.calls:
            if call.expect[0] == "exec" and call.expect[1] is ended:
                outcome = outcomes[call.instance]
                call.expect = ("exec", outcome) if isinstance(outcome, MExec) else outcome

    def _running(self) -> list[Execution]:
        """The executions running, in an order that does not depend on timing."""
        return sorted(self.loader.running, key=lambda e: (e.key, e.number))

    def _has_flight(self, instance: int, key: str) -> bool:
        return any(f.key == key for f in self.instances[instance].pf._core.live)

    def _spawn(self, instance: int, key: str, force: bool, expect: Any) -> None:
        call = Call(instance, key, [], self.portal.call(anyio.CancelScope), expect)
        self.calls.append(call)
        pf = self.instances[instance].pf

        async def caller() -> None:
            with call.scope:
                try:
                    call.box.append(("value", await pf.get(key, force_refresh=force)))
                except Boom as exc:
                    call.box.append(("error", str(exc), "here"))
                except RemoteLoadError as exc:
                    call.box.append(("error", exc.error, "remote"))
                except PrefetcherClosed:
                    call.box.append(("closed",))
                except Exception as exc:  # checked (and reported) by the invariant
                    call.box.append(("unexpected", f"{type(exc).__name__}: {exc}"))
            if call.scope.cancelled_caught:
                call.box.append(("cancelled",))

        async def spawn() -> None:
            self.tg.start_soon(caller)

        self.portal.call(spawn)

    def _finish(self, execution: Execution, fail: bool) -> None:
        m = self.model
        mexec = m.lease[execution.key]
        assert mexec.crashed_at is None
        assert (mexec.number, mexec.owner) == (execution.number, execution.instance)
        self._outcome(mexec, fail)
        execution.fail = fail
        self.portal.call(self._open_gate, execution)
        self._settle(f"completing {execution.key}#{execution.number}")

    @staticmethod
    async def _open_gate(execution: Execution) -> None:
        execution.gate.set()

    def _instance_gone(self, victim: int) -> None:
        """The model of an instance leaving its block: its waiters end, its flights go."""
        m = self.model
        for call in self.calls:
            if call.instance == victim and not call.box and call.expect[0] != "cancelled":
                call.expect = ("closed",)
        for execution, _ in m.flights[victim].values():
            execution.followers.discard(victim)
        m.flights[victim].clear()
        m.failed[victim].clear()

    # -- time -----------------------------------------------------------------------

    def _set_time(self, now: float) -> None:
        assert now >= self.model.now
        self.model.now = now
        self.clock.now = now

    def _next_expiry(self, until: float) -> tuple[float, int, str] | None:
        """The first thing that expires by ``until``: (when, kind, key); records before
        notices before leases at one instant."""
        m = self.model
        due = [(rec.expires, 0, key) for key, rec in m.record.items()]
        due += [(at + NOTICE_TTL, 1, key) for key, at in m.notice.items()]
        due += [
            (e.crashed_at + LEASE, 2, key) for key, e in m.lease.items() if e.crashed_at is not None
        ]
        due = [d for d in due if d[0] <= until]
        return min(due) if due else None

    def _advance(self, seconds: float, choose: Callable[[list[int]], int] = min) -> None:
        m = self.model
        until = m.now + seconds
        while (due := self._next_expiry(until)) is not None:
            at, kind, key = due
            self._set_time(at)
            names = self._names(key)
            if kind == 0:
                del m.record[key]
                self._expire(names.record)
            elif kind == 1:
                del m.notice[key]
                self._expire(names.notice)
            else:
                self._lapse(key, choose)
            self._settle(f"expiring {('record', 'notice', 'lease')[kind]} {key} at {at}")
        self._set_time(until)

    def _expire(self, name: str) -> None:
        """Expire a Redis key for real, and wait until Redis no longer has it (or has a new
        value under that name: a follower may take a lapsed lease at once)."""
        value = self.redis.get(name)
        assert value is not None, f"{name} is not in Redis"
        assert self.redis.pexpire(name, 1)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while self.redis.get(name) == value:
            assert time.monotonic() < deadline, f"{name} did not expire"
            time.sleep(0.001)

    def _lapse(self, key: str, choose: Callable[[list[int]], int]) -> None:
        """A crashed owner's lease lapses: exactly one follower takes it over.

        When both instances follow the dead run, which one looks first is up to timing; the
        machine decides it (``choose``), so that a run does not depend on the scheduler: the
        other one is held back before it sends its next acquire, until the chosen one has
        taken the lease (and, if that run fails at once, until its failure is written).
        """
        m = self.model
        crashed = m.lease[key]
        following = self._lease_ended(crashed)
        winner = choose(sorted(following)) if len(following) > 1 else None
        loser = None if winner is None else 1 - winner
        if loser is not None:
            held = self.instances[loser].store
            self.portal.call(held.hold)
            self._wait_for(
                f"instance {loser} to be between two looks at {key}",
                lambda: True if held.acquiring == 0 else None,
            )
        self._expire(self._names(key).lease)
        if not following:
            return
        if winner is None:
            (winner,) = following
        won = self._execute(winner, key, {winner: following[winner]})
        outcomes = {winner: won}
        if loser is not None:
            number = m.executions[key]
            self._wait_for(
                f"instance {winner} to take {key} over",
                lambda: True if self.loader.executed(key, number) == winner else None,
            )
            if not isinstance(won, MExec):  # it failed at once: until its failure is written
                self._wait_for(
                    f"instance {winner}'s run of {key} to end",
                    lambda: True if not self._has_flight(winner, key) else None,
                )
            outcomes[loser] = self._loser(key, loser, following[loser], won)
        self._redirect(crashed, outcomes)

    def _loser(self, key: str, loser: int, force: bool, won: Outcome) -> Outcome:
        """The follower that was held back while the other took the lapsed lease over."""
        m = self.model
        store = self.instances[loser].store
        digest = digest_of(key)
        seen = store.acquires[digest]
        self.portal.call(store.release)
        if isinstance(won, MExec):
            # it follows the new run, once it has looked again and seen the new lease
            won.followers.add(loser)
            m.flights[loser][key] = (won, force)
            self._wait_for(
                f"instance {loser} to look at {key} again",
                lambda: True if store.acquires[digest] > seen else None,
            )
            return won
        # The winner's run failed at once, before the loser looked again. Forcing, it finds
        # no lease and a record that is not the result of a run it waited for: it runs the
        # key itself. Otherwise it takes the failure record.
        if force:
            return self._execute(loser, key, {loser: force})
        m.failed[loser][key] = LocalFailure(won[1], m.now, here=False)
        return ("error", won[1], "remote")

    # -- rules ----------------------------------------------------------------------

    @rule(instance=INSTANCES, key=KEYS, force=st.booleans())
    def get(self, instance: int, key: str, force: bool) -> None:
        m = self.model
        expect: Any
        rec = m.record.get(key)
        if key in m.flights[instance]:
            expect = ("exec", m.flights[instance][key][0])
        elif rec is not None and not force:
            failure = m.local_failure(instance, key)
            if rec.kind == "done":
                m.failed[instance].pop(key, None)  # a newer result stands
                expect = ("value", rec.label)
            elif key in m.lease:
                # the lookup saw a run (a lease wins over a failure record): a local flight
                # started, and it met the failure record
                expect = self._start(instance, key, False)
            else:
                # the store's failure; the original exception if it is the one that ran here
                here = failure is not None and failure.here and failure.label == rec.label
                expect = ("error", rec.label, "here" if here else "remote")
        else:
            m.local_failure(instance, key)
            started = self._start(instance, key, force)
            expect = ("exec", started) if isinstance(started, MExec) else started
        self._spawn(instance, key, force, expect)
        self._settle(f"get {key} on {instance}")

    @rule(instance=INSTANCES, key=KEYS)
    def prefetch(self, instance: int, key: str) -> None:
        m = self.model
        failure = m.local_failure(instance, key)
        recent_failure = failure is not None and m.now - failure.at < FAILURE_TTL
        expected = key not in m.flights[instance] and not recent_failure
        if expected:
            self._start(instance, key, False)
        assert self.portal.call(self.instances[instance].pf.prefetch, key) is expected
        self._settle(f"prefetch {key} on {instance}")

    @rule(instance=INSTANCES, key=KEYS)
    def invalidate(self, instance: int, key: str) -> None:
        m = self.model
        if key in m.flights[instance]:
            return  # detaching a local flight from a shared run is out of this model
        # The store deletes the record and the failure notice, and counts both. A notice
        # outlives its failure record (failure_ttl < lease here), so invalidate answers True
        # with nothing stored that get or status would see. The model follows the store as it
        # is; if invalidate stops counting the notice, drop ``key in m.notice`` here.
        expected = key in m.record or key in m.notice or key in m.failed[instance]
        m.record.pop(key, None)
        m.notice.pop(key, None)
        m.failed[instance].pop(key, None)
        assert self.portal.call(self.instances[instance].pf.invalidate, key) is expected
        self._settle(f"invalidate {key} on {instance}")

    @rule(key=KEYS)
    def fail_next(self, key: str) -> None:
        self.model.fail_next.add(key)
        self.loader.fail_next.add(key)

    @precondition(lambda self: bool(self.loader.running))
    @rule(data=st.data(), fail=st.booleans())
    def complete(self, data: st.DataObject, fail: bool) -> None:
        self._finish(data.draw(st.sampled_from(self._running())), fail)

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

    @rule(seconds=ADVANCE, data=st.data())
    def advance_time(self, seconds: float, data: st.DataObject) -> None:
        self._advance(seconds, lambda following: data.draw(st.sampled_from(following)))
        self._settle(f"advancing time by {seconds}")

    @precondition(lambda self: bool(self.loader.running))
    @rule(data=st.data())
    def crash_owner(self, data: st.DataObject) -> None:
        """The instance owning a run dies: its leases stay in Redis until they lapse."""
        m = self.model
        victim = data.draw(st.sampled_from(self._running())).instance
        owned = [e for e in self.loader.running if e.instance == victim]
        self._instance_gone(victim)
        for execution in m.lease.values():
            if execution.owner == victim and execution.crashed_at is None:
                execution.crashed_at = m.now
        with captured_logs() as logs:
            self.portal.call(self._stop, self.instances[victim], True)
        assert all(e.cancelled for e in owned), owned
        failed_releases = {
            e["digest"] for e in logs if e["event"] == "prefetch.redis_release_failed"
        }
        assert {digest_of(e.key) for e in owned} <= failed_releases, (owned, logs)
        self.instances[victim] = self.portal.call(self._start_instance, victim)
        self._settle(f"crashing instance {victim}")

    @precondition(lambda self: bool(self.loader.running))
    @rule(data=st.data())
    def close_owner(self, data: st.DataObject) -> None:
        """The instance owning a run closes: its leases are handed back on the way out."""
        m = self.model
        victim = data.draw(st.sampled_from(self._running())).instance
        self._instance_gone(victim)
        for execution in list(m.lease.values()):
            if execution.owner != victim or execution.crashed_at is not None:
                continue
            following = self._lease_ended(execution)
            assert set(following) <= {1 - victim}, following
            outcomes = {i: self._execute(i, execution.key, {i: f}) for i, f in following.items()}
            self._redirect(execution, outcomes)
        self.portal.call(self._stop, self.instances[victim], False)
        self.instances[victim] = self.portal.call(self._start_instance, victim)
        self._settle(f"closing instance {victim}")

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def one_execution_per_key_at_a_time(self) -> None:
        assert not self.loader.overlaps, self.loader.overlaps
        assert self.loader.counts == self.model.executions

    @invariant()
    def redis_holds_what_the_model_says(self) -> None:
        m = self.model
        pipe = self.redis.pipeline(transaction=False)
        for key in KEY_NAMES:
            names = names_for(PREFIX, key)
            for name in (names.record, names.notice, names.lease):
                pipe.exists(name)
        got = iter(pipe.execute())
        for key in KEY_NAMES:
            want = (key in m.record, key in m.notice, key in m.lease)
            have = (bool(next(got)), bool(next(got)), bool(next(got)))
            assert have == want, f"{key}: Redis has (record, notice, lease) {have}, model {want}"

    @invariant()
    def ended_calls_match_the_model(self) -> None:
        for call in self.calls:
            if not call.box:
                continue
            got, expect = call.box[0], call.expect
            if expect[0] == "error":
                _, label, where = expect
                text = label if where == "here" else f"Boom: {label}"
                expect = ("error", text, where)
            assert got == expect, (call.instance, call.key, got, expect)

    @invariant()
    def statuses_agree_with_the_model(self) -> None:
        async def snapshots() -> list[Any]:
            return [await i.pf.status(key) for i in self.instances for key in KEY_NAMES]

        got = iter(self.portal.call(snapshots))
        for instance in (0, 1):
            for key in KEY_NAMES:
                snap = next(got)
                status, label = self.model.status(instance, key)
                assert snap.status is status, (instance, key, snap, status)
                if status is Status.COMPLETED:
                    assert snap.result == label, (instance, key, snap.result, label)
                elif status is Status.FAILED:
                    assert snap.error.endswith(f"Boom: {label}"), (instance, key, snap, label)


def test_two_prefetchers_on_one_redis_follow_the_model(redis_server: RedisServer) -> None:
    machine: type[TwoInstancesMachine] = type(
        "TwoInstances", (TwoInstancesMachine,), {"server": redis_server}
    )
    machine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
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
