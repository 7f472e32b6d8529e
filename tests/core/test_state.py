"""The pure core, with no event loop: every decision and transition, synchronously."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from prefetch_ingest import LoadCancelled, Status
from prefetch_ingest.core import (
    ASK_STORE,
    HIT,
    JOIN,
    RAISE,
    START,
    Core,
    Done,
    Failed,
    Flight,
    Unclaimed,
)

INF = float("inf")


async def _fn(*args: Any) -> Any:  # never awaited: the core only holds it
    return None


def make(
    *,
    ttl: float = 100.0,
    failure_ttl: float = 0.0,
    refresh_after: float = INF,
    max_entries: int | None = None,
    limit: int | None = None,
) -> Core:
    return Core(
        ttl=ttl,
        failure_ttl=failure_ttl,
        refresh_after=refresh_after,
        max_entries=max_entries,
        limit=lambda: limit,
    )


def start(core: Core, key: Any, now: float, *, background: bool = False, **kw: Any) -> Flight:
    prior = core.current(key, now)
    return core.start(
        key, _fn, (), background=background, force=False, prior=prior, chain=(), now=now, **kw
    )


def test_a_cold_get_starts_and_a_demanded_load_runs_at_once() -> None:
    core = make()
    assert core.on_get("k", 0.0, False) == (START, None)
    flight = start(core, "k", 0.0)
    assert flight.status is Status.RUNNING
    action, record = core.on_get("k", 1.0, False)
    assert (action, record) == (JOIN, flight)
    assert core.counters.joins == 1 and core.counters.saved_seconds == 1.0


def test_a_completion_stores_a_value_that_is_then_a_hit_until_ttl() -> None:
    core = make(ttl=10)
    flight = start(core, "k", 0.0)
    assert core.complete(flight, "v", 2.0) is True
    action, record = core.on_get("k", 5.0, False)
    assert action == HIT and record.value == "v" and record.__class__ is Done
    assert core.on_get("k", 12.0, False) == (START, None)
    assert core.counters.expirations == 1


def test_a_background_value_is_unclaimed_until_its_first_hit() -> None:
    core = make()
    flight = start(core, "k", 0.0, background=True)
    core.complete(flight, "v", 1.0)
    assert core.entries["k"].__class__ is Unclaimed
    core.on_get("k", 2.0, False)
    assert core.entries["k"].__class__ is Done
    other = start(core, "j", 0.0, background=True)
    core.complete(other, "w", 3.0)
    core.invalidate("j", 4.0)
    assert core.table.unclaimed == 1 and core.table.wasted == 3.0


def test_a_failure_past_failure_ttl_holds_no_exception_and_is_not_re_raised() -> None:
    core = make(failure_ttl=5)
    flight = start(core, "k", 0.0)
    error = ValueError("x")
    core.fail(flight, error, None, 1.0)
    action, record = core.on_get("k", 2.0, False)
    assert action == RAISE and record.error is error
    action, record = core.on_get("k", 7.0, False)
    assert action == START and record.error is None and record.text == "ValueError: x"


def test_with_the_default_failure_ttl_no_exception_is_kept_at_all() -> None:
    core = make()
    flight = start(core, "k", 0.0)
    core.fail(flight, KeyError("x"), None, 1.0)
    record = core.entries["k"]
    assert isinstance(record, Failed) and record.error is None and record.tb is None


def test_a_failed_refresh_keeps_the_old_value() -> None:
    core = make(refresh_after=5)
    first = start(core, "k", 0.0)
    core.complete(first, "old", 0.0)
    action, record = core.on_get("k", 6.0, False)
    assert action == HIT and core.wants_refresh(record, 6.0)
    reload = start(core, "k", 6.0, background=True)
    assert core.on_get("k", 7.0, False) == (HIT, record)  # served stale while it runs
    core.fail(reload, ValueError("no"), None, 8.0)
    assert core.entries["k"] is record and core.table.n_done == 1 and core.table.n_failed == 0


def test_cancel_restores_the_record_the_load_replaced() -> None:
    core = make(refresh_after=5)
    first = start(core, "k", 0.0)
    core.complete(first, "old", 0.0)
    old = core.entries["k"]
    reload = start(core, "k", 6.0, background=True)
    assert core.cancel(reload, 7.0, reason="cancel") is True
    assert core.entries["k"] is old
    assert isinstance(reload.error, LoadCancelled)
    assert core.counters.cancelled == 1 and not core.live


def test_invalidate_detaches_a_running_flight_and_drops_a_pending_one() -> None:
    core = make(limit=1)
    running = start(core, "a", 0.0, background=True)
    pending = start(core, "b", 0.0, background=True)
    assert (running.status, pending.status) == (Status.RUNNING, Status.PENDING)
    assert core.invalidate("a", 1.0) == (True, None)
    assert core.invalidate("b", 1.0) == (True, pending)
    assert core.complete(running, "v", 2.0) is False  # detached: nothing stored
    assert "a" not in core.entries and not core.live
    assert core.release_slot(running, 2.0) == []  # the dropped one never runs


def test_background_loads_queue_behind_the_limit_and_a_get_promotes_one() -> None:
    core = make(limit=1)
    a = start(core, "a", 0.0, background=True)
    b = start(core, "b", 0.0, background=True)
    c = start(core, "c", 0.0, background=True)
    assert [f.status for f in (a, b, c)] == [Status.RUNNING, Status.PENDING, Status.PENDING]
    assert core.on_get("c", 1.0, False) == (JOIN, c)
    assert core.promote(c, 1.0) is True and not c.holds_slot
    core.complete(a, 1, 2.0)
    assert core.release_slot(a, 2.0) == [b]


def test_failures_are_evicted_before_values_and_flights_never() -> None:
    core = make(max_entries=2)
    v = start(core, "v", 0.0)
    core.complete(v, 1, 0.0)
    f = start(core, "f", 0.0)
    core.fail(f, ValueError(), None, 0.0)
    running = start(core, "r", 1.0)  # a load starting evicts nothing
    assert set(core.entries) == {"v", "f", "r"} and core.counters.evictions == 0
    core.complete(running, 2, 2.0)  # a third result: the failure goes first
    assert set(core.entries) == {"v", "r"} and core.counters.evictions == 1


def test_a_shared_store_is_asked_when_nothing_usable_is_here() -> None:
    core = make()
    assert core.on_get("k", 0.0, False, remote=True) == (ASK_STORE, None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["start_bg", "start", "complete", "fail", "cancel", "invalidate", "get"]
            ),
            st.sampled_from(["a", "b", "c"]),
        ),
        max_size=40,
    )
)
def test_counts_by_status_always_match_the_table(ops: list[tuple[str, str]]) -> None:
    core = make(limit=1, max_entries=2)
    now = 0.0
    for op, key in ops:
        now += 1.0
        entry = core.current(key, now)
        if op in ("start", "start_bg"):
            if entry.__class__ is not Flight:
                start(core, key, now, background=op == "start_bg")
        elif op == "complete" and entry.__class__ is Flight and entry.status is Status.RUNNING:
            core.complete(entry, key, now)
            core.release_slot(entry, now)
        elif op == "fail" and entry.__class__ is Flight and entry.status is Status.RUNNING:
            core.fail(entry, ValueError(key), None, now)
            core.release_slot(entry, now)
        elif op == "cancel" and entry.__class__ is Flight:
            core.cancel(entry, now, reason="cancel")
            core.release_slot(entry, now)
        elif op == "invalidate":
            core.invalidate(key, now)
        elif op == "get":
            action, record = core.on_get(key, now, False)
            if action == JOIN and record.status is Status.PENDING:
                core.promote(record, now)
        values = [r for r in core.entries.values() if isinstance(r, Done)]
        failures = [r for r in core.entries.values() if isinstance(r, Failed)]
        assert core.table.n_done == len(values)
        assert core.table.n_failed == len(failures)
        live = [f for f in core.live if not f.detached]
        assert core.n_pending == sum(f.status is Status.PENDING for f in live)
        assert core.n_running == sum(f.status is Status.RUNNING for f in live)
        assert core.bg_running == sum(f.holds_slot for f in core.live)
        assert core.bg_running <= 1
        assert len([r for r in core.entries.values() if not isinstance(r, Flight)]) <= 2


def test_the_core_awaits_nothing_and_imports_no_event_loop_or_logging() -> None:
    import ast
    from pathlib import Path

    import prefetch_ingest.core as core_pkg

    banned = {"anyio", "asyncio", "trio", "structlog", "logging", "_log"}
    files = sorted(Path(core_pkg.__file__).parent.glob("*.py"))
    assert len(files) >= 4
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Await | ast.AsyncFunctionDef | ast.AsyncWith), path
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned, path
            if isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")[-1]
                assert module not in banned and (node.module or "").split(".")[0] not in banned, (
                    path
                )
