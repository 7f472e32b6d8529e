"""Shared fixtures and the leak checks run after every test.

Every async test runs on asyncio and on trio. Two leak checks follow each test:

* **No task of ours left** (async tests): when the test coroutine returns, still
  inside its event loop, the loop's live tasks are listed (``asyncio.all_tasks()``
  on asyncio; the task tree from ``trio.lowlevel.current_root_task()`` on trio)
  and none may be one the library started: a task whose name starts with
  ``prefetch_ingest`` or whose coroutine (under anyio's task wrapper) is defined in
  the ``prefetch_ingest`` package, e.g. a load, the sweeper, a progress publisher,
  a watcher's remote wait, the Redis store's notification reader, its shared
  lookups and its lease-renewal loops. A task that belongs to a Prefetcher still
  open when the body returns is not a leak and is not reported. The check is
  :func:`check_no_task_of_ours`, wrapped around the test function by the
  ``pytest_pyfunc_call`` hook below; a failure names each task and the chain of
  coroutines where it is suspended. (Sync tests that run their own loop, and the
  state machines' portal threads, are not covered by this part.)
* **Nothing held** (every test, fixture ``no_leaks``): every Prefetcher the test
  closed holds no flight, queued load, waiter, watcher or background slot, and
  its Redis store, if any, is disconnected with no notification reader, shared
  lookup, owned lease (renewal loop) or listener left.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import anyio
import pytest
import structlog

import prefetch_ingest
from prefetch_ingest import Prefetcher
from prefetch_ingest._engine import _Watch
from prefetch_ingest.redis import RedisBackend
from prefetch_ingest.stores.lease import LeasedStore
from prefetch_ingest.stores.memory import MemoryBackend

# -- no task of ours left ----------------------------------------------------------------

_PACKAGE_DIR = Path(prefetch_ingest.__file__).resolve().parent
_ANYIO_DIR = Path(anyio.__file__).resolve().parent
_TASK_NAME_PREFIX = "prefetch_ingest"
_PREFETCHERS = pytest.StashKey[list[Prefetcher[Any, Any]]]()


@functools.cache
def _defined_in(directory: Path, filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(directory)


def _await_chain(coro: object) -> list[tuple[CodeType, FrameType | None]]:
    """The coroutines (and generators) ``coro`` is suspended in, outermost first."""
    chain: list[tuple[CodeType, FrameType | None]] = []
    while coro is not None and len(chain) < 100:
        for code_attr, frame_attr, next_attr in (
            ("cr_code", "cr_frame", "cr_await"),
            ("gi_code", "gi_frame", "gi_yieldfrom"),
            ("ag_code", "ag_frame", "ag_await"),
        ):
            code = getattr(coro, code_attr, None)
            if isinstance(code, CodeType):
                chain.append((code, getattr(coro, frame_attr, None)))
                coro = getattr(coro, next_attr, None)
                break
        else:
            break  # a future, or anything else that is not a coroutine: the end
    return chain


def _where(code: CodeType, frame: FrameType | None) -> str:
    line = frame.f_lineno if frame is not None else code.co_firstlineno
    path = Path(code.co_filename)
    return f"{code.co_qualname} ({path.parent.name}/{path.name}:{line})"


def _entry(chain: list[tuple[CodeType, FrameType | None]]) -> CodeType | None:
    """The task's own coroutine function: the first one not in anyio (its task wrapper)."""
    for code, _ in chain:
        if not _defined_in(_ANYIO_DIR, code.co_filename):
            return code
    return None


def _live_tasks() -> list[tuple[object, str, object]]:
    """(task, name, coroutine) of every task of the running loop but the current one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        import trio

        current: Any = trio.lowlevel.current_task()
        found: list[tuple[object, str, object]] = []
        stack = [trio.lowlevel.current_root_task()]
        while stack:
            task = stack.pop()
            if task is None:
                continue
            if task is not current:
                found.append((task, task.name, task.coro))
            for nursery in task.child_nurseries:
                stack.extend(nursery.child_tasks)
        return found
    me = asyncio.current_task()
    return [(t, t.get_name(), t.get_coro()) for t in asyncio.all_tasks() if t is not me]


def _owner(chain: list[tuple[CodeType, FrameType | None]]) -> object:
    """The Prefetcher (or RedisStore) a task of ours works for: its methods' ``self``."""
    for _, frame in chain:
        if frame is None or frame.f_code.co_argcount == 0:
            continue
        first = frame.f_locals.get(frame.f_code.co_varnames[0])
        if isinstance(first, Prefetcher | LeasedStore | RedisBackend | MemoryBackend):
            return first
        if isinstance(first, _Watch):
            return first._engine
    return None


def _still_open(owner: object, prefetchers: Iterable[Prefetcher[Any, Any]]) -> bool:
    return owner is not None and any(
        pf._state in ("open", "closing")
        and (owner is pf or owner is pf._remote or owner is getattr(pf._remote, "_backend", None))
        for pf in prefetchers
    )


def _state(owner: object) -> str:
    if isinstance(owner, Prefetcher):
        return f"in state {owner._state!r}"
    if isinstance(owner, LeasedStore):
        return "still open" if owner._open else "not open"
    if isinstance(owner, RedisBackend):
        return "not open" if owner._client is None else "still open"
    return ""


def _excused_tasks(prefetchers: Iterable[Prefetcher[Any, Any]]) -> set[int]:
    """Tasks with no `self` that an open Prefetcher's store still uses (none today)."""
    return set()


def tasks_of_ours_left(prefetchers: Iterable[Prefetcher[Any, Any]] = ()) -> list[str]:
    """Describe every live task of the running loop that the library started.

    Call it inside the event loop (asyncio or trio). Tasks of a Prefetcher in
    ``prefetchers`` that is still open are not listed: they end when it closes.
    """
    prefetchers = list(prefetchers)
    excused = _excused_tasks(prefetchers)
    left: list[str] = []
    for task, name, coro in _live_tasks():
        chain = _await_chain(coro)
        entry = _entry(chain)
        ours = str(name).startswith(_TASK_NAME_PREFIX) or (
            entry is not None and _defined_in(_PACKAGE_DIR, entry.co_filename)
        )
        if not ours or id(task) in excused:
            continue
        owner = _owner(chain)
        if _still_open(owner, prefetchers):
            continue
        suspended = " -> ".join(_where(code, frame) for code, frame in chain) or repr(coro)
        of = "" if owner is None else f" (of a {type(owner).__name__} {_state(owner)})"
        left.append(f"task {name!r}{of} suspended in {suspended}")
    return left


def check_no_task_of_ours(prefetchers: Iterable[Prefetcher[Any, Any]] = ()) -> None:
    """Fail, naming each one and where it waits, if a task of the library is still alive."""
    left = tasks_of_ours_left(prefetchers)
    assert not left, "tasks of prefetch_ingest still alive after the test:\n  " + "\n  ".join(left)


def _checked(
    test: Callable[..., Coroutine[Any, Any, Any]], item: pytest.Function
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(test)
    async def run_then_check(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        result = await test(*args, **kwargs)
        prefetchers: list[Prefetcher[Any, Any]] = item.stash.get(_PREFETCHERS, [])
        check_no_task_of_ours(prefetchers)
        return result

    run_then_check._leak_checked = True  # type: ignore[attr-defined]
    return run_then_check


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """Run the task check at the end of every async test, in the test's own event loop.

    anyio's plugin runs ``pyfuncitem.obj`` (or, for Hypothesis tests, the inner
    test) in the backend's runner: both are replaced, for this call only, by the
    same coroutine followed by :func:`check_no_task_of_ours`.
    """
    __tracebackhide__ = True
    if "anyio_backend" not in pyfuncitem.funcargs:
        return (yield)
    obj = pyfuncitem.obj
    hypothesis = getattr(obj, "hypothesis", None)
    if hypothesis is not None:
        inner = hypothesis.inner_test
        base = getattr(inner, "_anyio_original_func", inner)
        if not inspect.iscoroutinefunction(base) or getattr(base, "_leak_checked", False):
            return (yield)
        hypothesis.inner_test = _checked(base, pyfuncitem)
        try:
            return (yield)
        finally:
            hypothesis.inner_test = inner
    if not inspect.iscoroutinefunction(obj):
        return (yield)
    pyfuncitem.obj = _checked(obj, pyfuncitem)
    try:
        return (yield)
    finally:
        pyfuncitem.obj = obj


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that configures structlog does not leak its configuration into the next."""
    yield
    structlog.reset_defaults()


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After each test: every Prefetcher the test closed holds no flight, queued load,
    waiter, watcher or background slot, its watchers' iterators are gone, and its
    Redis store is closed with no task or listener left.

    The Prefetchers created are also handed to the task check (``pytest_pyfunc_call``).
    """
    created: list[Prefetcher[Any, Any]] = []
    request.node.stash[_PREFETCHERS] = created
    original = Prefetcher.__init__

    @functools.wraps(original)
    def recording_init(self: Prefetcher[Any, Any], *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(Prefetcher, "__init__", recording_init)
    yield
    gc.collect()
    for pf in created:
        if pf._state != "closed":
            continue  # never entered, or closed by another fixture's teardown later
        counts = pf._debug_counts()
        left = {
            name: counts[name]
            for name in ("live_flights", "queued", "waiters", "watchers", "bg_running")
            if counts[name]
        }
        assert not left, f"a closed Prefetcher still holds {left}"
        store = pf._remote
        if isinstance(store, LeasedStore):
            held = store._debug_counts()
            assert not any(held.values()), (
                f"the {type(store).__name__} of a closed Prefetcher still holds "
                f"{ {k: v for k, v in held.items() if v} }"
            )
