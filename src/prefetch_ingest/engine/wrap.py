"""``Prefetcher.wrap``: a coroutine function whose calls go through ``get``."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Hashable
from types import MethodType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prefetch_ingest._types import Served, Snapshot
from prefetch_ingest._validate import check_fn

if TYPE_CHECKING:
    from .prefetcher import Prefetcher

__all__ = ["Wrapped", "default_key", "make_wrapper"]

T = TypeVar("T")

KeyFn = Callable[[tuple[Any, ...], dict[str, Any]], Hashable]


def default_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """The positional arguments, then the keyword items sorted by name, as one tuple.

    ``f(1, 2)`` is the key ``(1, 2)``; ``f(1, b=2)`` is ``(1, ("b", 2))``.
    """
    if not kwargs:
        return args
    return (*args, *sorted(kwargs.items()))


async def _call(
    fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> T:
    return await fn(*args, **kwargs)


class Wrapped(Generic[T]):
    """What ``@pf.wrap`` returns: call it like the function; it has the Prefetcher's verbs too.

    It carries the function's ``__name__``, ``__doc__``, ``__wrapped__`` (and
    so its signature for ``inspect.signature``). On a method it is bound like
    the function (the descriptor protocol): ``obj.method(x)`` calls the
    function with ``obj`` first, and ``obj`` is part of the key.
    """

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Awaitable[T]]

    def __init__(
        self,
        pf: Prefetcher[Any, Any],
        fn: Callable[..., Awaitable[T]],
        key: KeyFn,
        bound: tuple[Any, ...] = (),
    ) -> None:
        self._pf = pf
        self._fn = fn
        self._key = key
        self._bound = bound  # what the key has before the arguments: a bound method's self
        functools.update_wrapper(self, fn)

    def __get__(self, obj: object, objtype: type[Any] | None = None) -> Wrapped[T]:
        """Bound as the function would be: ``fn.__get__`` gives what is called, and a bound
        method's ``__self__`` (the instance, or the class of a classmethod) leads the key."""
        get = getattr(type(self._fn), "__get__", None)
        if get is None:
            return self  # not a descriptor (a callable object): never bound, like itself
        fn = get(self._fn, obj, type(obj) if objtype is None else objtype)
        if fn is self._fn:
            return self  # a function looked up on its class
        bound = (fn.__self__,) if isinstance(fn, MethodType) else ()
        return Wrapped(self._pf, fn, self._key, bound)

    def key_of(self, *args: Any, **kwargs: Any) -> Hashable:
        """The Prefetcher key these arguments map to."""
        return self._key(self._bound + args, kwargs)

    async def __call__(self, *args: Any, **kwargs: Any) -> T:
        key = self._key(self._bound + args, kwargs)
        return await self._pf.get(key, _call, self._fn, args, kwargs)  # type: ignore[no-any-return]

    async def serve(self, *args: Any, **kwargs: Any) -> Served[T]:
        key = self._key(self._bound + args, kwargs)
        return await self._pf.serve(key, _call, self._fn, args, kwargs)

    def prefetch(self, *args: Any, **kwargs: Any) -> bool:
        key = self._key(self._bound + args, kwargs)
        return self._pf.prefetch(key, _call, self._fn, args, kwargs)

    async def status(self, *args: Any, **kwargs: Any) -> Snapshot:
        return await self._pf.status(self._key(self._bound + args, kwargs))

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        return await self._pf.invalidate(self._key(self._bound + args, kwargs))

    async def cancel(self, *args: Any, **kwargs: Any) -> bool:
        return await self._pf.cancel(self._key(self._bound + args, kwargs))

    def __repr__(self) -> str:
        return f"<prefetched {getattr(self._fn, '__qualname__', self._fn)!r}>"


def make_wrapper(
    pf: Prefetcher[Any, Any], fn: Callable[..., Awaitable[T]], key: KeyFn | None
) -> Wrapped[T]:
    check_fn("fn", fn)
    return Wrapped(pf, fn, default_key if key is None else key)
