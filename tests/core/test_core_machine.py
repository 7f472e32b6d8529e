"""A hypothesis state machine driving the pure core (no event loop) against a model.

The model is written independently of the core, in plain dicts: per key a
value, a failure or a flight; a FIFO of pending background flights; and the
speculation accounting (a background value is claimed the first time a
caller is served it, by a hit or a join; one that leaves the table unclaimed
counts in ``unclaimed``/``wasted``).
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefetch_ingest import Status
from prefetch_ingest.core import HIT, JOIN, RAISE, START, Core, Flight

KEYS = st.sampled_from(["a", "b", "c"])
TTL = 10.0
FAILURE_TTL = 3.0
REFRESH_AFTER = 4.0
LIMIT = 1


async def _fn(*args: Any) -> Any:  # the core only holds it
    return None


@attrs.define
class MFlight:
    key: str
    background: bool
    stale: tuple[Any, ...] | None  # the model's "done" entry served meanwhile
    status: Status = Status.PENDING
    claimed: bool = False
    started: float = 0.0
    real: Flight | None = None


@attrs.define
class Model:
    now: float = 0.0
    entries: dict[str, Any] = attrs.Factory(dict)
    # "done": ("done", value, t, background, claimed, duration); "failed": ("failed", t)
    queue: list[MFlight] = attrs.Factory(list)
    running_bg: int = 0
    unclaimed: int = 0
    wasted: float = 0.0
    values: int = 0

    def drop(self, entry: Any) -> None:
        if isinstance(entry, tuple) and entry[0] == "done" and entry[3] and not entry[4]:
            self.unclaimed += 1
            self.wasted += entry[5]

    def current(self, key: str) -> Any:
        entry = self.entries.get(key)
        if isinstance(entry, tuple) and self.now - entry[2 if entry[0] == "done" else 1] >= TTL:
            del self.entries[key]
            self.drop(entry)
            return None
        return entry

    def run(self, flight: MFlight, slot: bool) -> None:
        flight.status = Status.RUNNING
        flight.started = self.now
        if slot:
            self.running_bg += 1

    def start(self, key: str, background: bool, stale: Any) -> MFlight:
        flight = MFlight(key, background, stale, claimed=not background)
        self.entries[key] = flight
        if not background:
            self.run(flight, slot=False)
        elif self.running_bg < LIMIT:
            self.run(flight, slot=True)
        else:
            self.queue.append(flight)
        return flight


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = Core(
            ttl=TTL,
            failure_ttl=FAILURE_TTL,
            refresh_after=REFRESH_AFTER,
            max_entries=None,
            limit=lambda: LIMIT,
        )
        self.m = Model()
        self.flights: list[MFlight] = []  # running or pending, current or detached

    def _start(self, key: str, background: bool, prior: Any, stale: Any) -> None:
        mf = self.m.start(key, background, stale)
        real = self.core.start(
            key,
            _fn,
            (),
            background=background,
            force=False,
            prior=prior,
            chain=(),
            now=self.m.now,
        )
        mf.real = real
        self.flights.append(mf)
        assert real.status is mf.status

    @rule(key=KEYS)
    def prefetch(self, key: str) -> None:
        m = self.m
        entry = m.current(key)
        started, prior = self.core.on_prefetch(key, m.now)
        if isinstance(entry, MFlight):
            expected = False
        elif isinstance(entry, tuple) and entry[0] == "done":
            expected = m.now - entry[2] >= REFRESH_AFTER
        elif isinstance(entry, tuple):
            expected = m.now - entry[1] >= FAILURE_TTL
        else:
            expected = True
        assert started is expected
        if started:
            stale = entry if isinstance(entry, tuple) and entry[0] == "done" else None
            self._start(key, True, prior, stale)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        m = self.m
        entry = m.current(key)
        action, record = self.core.on_get(key, m.now, False)
        if isinstance(entry, tuple) and entry[0] == "done":
            assert action == HIT and record.value == entry[1]
            m.entries[key] = (*entry[:4], True, entry[5])  # claimed
            if m.now - entry[2] >= REFRESH_AFTER:
                assert self.core.wants_refresh(record, m.now)
                self._start(key, True, record, m.entries[key])
        elif isinstance(entry, tuple):
            if m.now - entry[1] < FAILURE_TTL:
                assert action == RAISE
            else:
                assert action == START
                self._start(key, False, record, None)
        elif isinstance(entry, MFlight):
            if entry.stale is not None and m.now - entry.stale[2] < TTL:
                assert action == HIT and record.value == entry.stale[1]
                m.entries[key] = entry  # (the stale value is claimed with it)
                entry.stale = (*entry.stale[:4], True, entry.stale[5])
            else:
                assert action == JOIN and record is entry.real
                entry.claimed = True
                if entry.status is Status.PENDING:
                    assert entry.real is not None
                    assert self.core.promote(entry.real, m.now)
                    m.run(entry, slot=False)
                    m.queue.remove(entry)
        else:
            assert action == START
            self._start(key, False, record, None)

    @precondition(lambda self: any(f.status is Status.RUNNING for f in self.flights))
    @rule(data=st.data(), fail=st.booleans())
    def finish(self, data: st.DataObject, fail: bool) -> None:
        m = self.m
        mf = data.draw(st.sampled_from([f for f in self.flights if f.status is Status.RUNNING]))
        real = mf.real
        assert real is not None
        current = m.entries.get(mf.key) is mf
        duration = m.now - mf.started
        if fail:
            changed = self.core.fail(real, ValueError(mf.key), None, m.now)
        else:
            changed = self.core.complete(real, mf.key, m.now)
        assert changed is current
        self.flights.remove(mf)
        if current:
            stale = mf.stale
            if not fail:
                if stale is not None:
                    m.drop(stale)
                m.entries[mf.key] = ("done", mf.key, m.now, mf.background, mf.claimed, duration)
            elif stale is not None and m.now - stale[2] < TTL:
                m.entries[mf.key] = stale
            else:
                if stale is not None:
                    m.drop(stale)
                m.entries[mf.key] = ("failed", m.now)
        was_bg_slot = real.holds_slot
        nxt = self.core.release_slot(real, m.now)
        if was_bg_slot:
            m.running_bg -= 1
        expected_next = []
        while m.queue and m.running_bg < LIMIT:
            f = m.queue.pop(0)
            m.run(f, slot=True)
            expected_next.append(f.real)
        assert nxt == expected_next

    @rule(key=KEYS)
    def invalidate(self, key: str) -> None:
        m = self.m
        entry = m.entries.pop(key, None)
        forgotten, dropped = self.core.invalidate(key, m.now)
        assert forgotten is (entry is not None)
        if isinstance(entry, MFlight):
            if entry.stale is not None:
                m.drop(entry.stale)
            if entry.status is Status.PENDING:
                assert dropped is entry.real
                m.queue.remove(entry)
                self.flights.remove(entry)
            else:
                assert dropped is None
        else:
            m.drop(entry)

    @rule(seconds=st.sampled_from([0.5, 2.0, 4.5, 11.0]))
    def advance(self, seconds: float) -> None:
        self.m.now += seconds

    @rule()
    def sweep(self) -> None:
        m = self.m
        before = dict(m.entries)
        for key in list(before):
            m.current(key)
        expired = len(before) - len(m.entries)
        assert len(self.core.sweep(m.now)) == expired

    @invariant()
    def statuses_and_counts_agree(self) -> None:
        m, core = self.m, self.core
        for key in ("a", "b", "c"):
            entry = m.entries.get(key)
            real: Any = core.entries.get(key)
            if entry is None:
                assert real is None or (
                    not isinstance(real, Flight) and m.now - real.done >= TTL
                ), key
            elif isinstance(entry, MFlight):
                assert entry.real is not None and real is entry.real, key
                assert real.status is entry.status, key
            elif entry[0] == "done":
                assert real.value == entry[1] and real.done == entry[2], key
            else:
                assert real.text == f"ValueError: {key}", key
        current = [f for f in self.flights if m.entries.get(f.key) is f]
        assert core.n_running == sum(f.status is Status.RUNNING for f in current)
        assert core.n_pending == sum(f.status is Status.PENDING for f in current)
        assert core.bg_running == m.running_bg <= LIMIT
        assert core.table.unclaimed == m.unclaimed
        assert abs(core.table.wasted - m.wasted) < 1e-9


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
