"""Misuse gets a clear exception at the call, naming the argument (docs/contract.md)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import pytest

from prefetch_ingest import Prefetcher, PrefetcherClosed, PrefetchError, report_progress

from .helpers import GatedLoader

pytestmark = pytest.mark.anyio


async def fetch(x: int) -> int:
    return x


async def test_a_coroutine_object_instead_of_a_function_is_a_type_error() -> None:
    async with Prefetcher() as pf:
        coro = fetch(1)
        with pytest.raises(TypeError, match=r"fn must be a coroutine function.*coroutine object"):
            await pf.get("k", coro)  # type: ignore[arg-type]
        coro2 = fetch(2)
        with pytest.raises(TypeError, match="coroutine object"):
            pf.prefetch("k", coro2)  # type: ignore[arg-type]
        # the rejected coroutines were closed: no "never awaited" warning escapes
        assert inspect.getcoroutinestate(coro) == inspect.getcoroutinestate(coro2) == "CORO_CLOSED"


async def test_a_coroutine_object_is_rejected_on_the_hit_path_too() -> None:
    async with Prefetcher() as pf:
        await pf.get("k", fetch, 1)
        coro = fetch(1)
        with pytest.raises(TypeError, match="coroutine object"):
            await pf.get("k", coro)  # type: ignore[arg-type]


def test_a_coroutine_object_as_loader_is_a_type_error() -> None:
    coro = fetch(1)
    with pytest.raises(TypeError, match="loader must be a coroutine function"):
        Prefetcher(coro)  # type: ignore[call-overload]


async def test_non_callables_and_plain_functions_are_type_errors() -> None:
    def plain(x: int) -> int:
        return x

    async with Prefetcher() as pf:
        with pytest.raises(TypeError, match="fn must be a coroutine function, got int"):
            await pf.get("k", 42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn must be a coroutine function"):
            await pf.get("k", plain, 1)  # type: ignore[arg-type]


async def test_partials_methods_and_async_callables_are_accepted() -> None:
    class Service:
        async def load(self, x: int) -> int:
            return x + 1

        async def __call__(self, x: int) -> int:
            return x + 2

    service = Service()
    async with Prefetcher() as pf:
        assert await pf.get("p", functools.partial(fetch, 5)) == 5
        assert await pf.get("m", service.load, 5) == 6
        assert await pf.get("c", service, 5) == 7


async def test_a_miss_with_neither_fn_nor_loader_names_both() -> None:
    async with Prefetcher() as pf:
        with pytest.raises(PrefetchError, match=r"fn.*loader"):
            await pf.get("k")
        with pytest.raises(PrefetchError, match=r"fn.*loader"):
            pf.prefetch("k")
        assert pf.stats().total == 0


@pytest.mark.parametrize("key", [["list"], {"a": 1}, {1, 2}])
async def test_an_unhashable_key_is_a_type_error(key: Any) -> None:
    async with Prefetcher(fetch) as pf:
        with pytest.raises(TypeError, match="key must be hashable"):
            await pf.get(key)
        with pytest.raises(TypeError, match="key must be hashable"):
            pf.prefetch(key)
        with pytest.raises(TypeError, match="key must be hashable"):
            await pf.status(key)


@pytest.mark.parametrize("name", ["ttl", "failure_ttl", "refresh_after", "cleanup_interval"])
@pytest.mark.parametrize("value", [-1, math.nan, math.inf, -math.inf])
def test_bad_durations_are_value_errors_naming_the_argument(name: str, value: float) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=name):
        Prefetcher(**kwargs)


@pytest.mark.parametrize("name", ["refresh_after", "cleanup_interval"])
def test_zero_is_not_a_valid_interval(name: str) -> None:
    kwargs: dict[str, Any] = {name: 0}
    with pytest.raises(ValueError, match=name):
        Prefetcher(**kwargs)


@pytest.mark.parametrize("name", ["ttl", "failure_ttl", "cleanup_interval"])
def test_a_duration_of_the_wrong_type_is_a_type_error(name: str) -> None:
    kwargs: dict[str, Any] = {name: "10"}
    with pytest.raises(TypeError, match=name):
        Prefetcher(**kwargs)


@pytest.mark.parametrize("name", ["max_entries", "max_concurrency"])
@pytest.mark.parametrize("value", [0, -1])
def test_limits_of_zero_or_below_are_value_errors(name: str, value: int) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=name):
        Prefetcher(**kwargs)


@pytest.mark.parametrize("name", ["max_entries", "max_concurrency"])
def test_a_limit_that_is_not_an_int_is_a_type_error(name: str) -> None:
    kwargs: dict[str, Any] = {name: 2.5}
    with pytest.raises(TypeError, match=name):
        Prefetcher(**kwargs)


@pytest.mark.parametrize("value", [-1, math.nan, math.inf])
async def test_a_bad_timeout_is_a_value_error(value: float) -> None:
    async with Prefetcher(fetch) as pf:
        with pytest.raises(ValueError, match="timeout"):
            await pf.get(1, timeout=value)
        with pytest.raises(ValueError, match="timeout"):
            await pf.wait(1, timeout=value)


def test_a_store_that_is_not_a_store_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="store"):
        Prefetcher(store="redis://localhost")  # type: ignore[call-overload]


async def test_every_call_after_close_raises_prefetcher_closed() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        await pf.get("k")
    with pytest.raises(PrefetcherClosed):
        await pf.get("k")
    with pytest.raises(PrefetcherClosed):
        pf.prefetch("k")
    with pytest.raises(PrefetcherClosed):
        await pf.wait("k")
    with pytest.raises(PrefetcherClosed):
        await pf.status("k")
    with pytest.raises(PrefetcherClosed):
        await pf.invalidate("k")
    with pytest.raises(PrefetcherClosed):
        pf.watch("k")
    with pytest.raises(PrefetcherClosed):
        async with pf:
            pass  # pragma: no cover
    assert pf.stats().hits == 0  # stats stay readable after close


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1,), ValueError),
        ((math.nan,), ValueError),
        ((1, -5), ValueError),
        ((11, 10), ValueError),
        ((math.inf, None), ValueError),
        (("3",), TypeError),
    ],
)
def test_report_progress_rejects_bad_values(args: tuple[Any, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        report_progress(*args)


def test_report_progress_outside_a_load_is_a_no_op() -> None:
    assert report_progress(1, 2, "half") is False
