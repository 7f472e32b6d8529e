"""Argument checks shared by every entry point (the same check on every path, hit included)."""

from __future__ import annotations

import functools
import inspect
import math
from types import CoroutineType

__all__ = [
    "check_duration",
    "check_fn",
    "check_limit",
    "error_text",
    "is_coroutine_function",
    "key_text",
    "reject_fn",
]

_INF = math.inf


def check_duration(name: str, value: object, *, allow_none: bool, allow_zero: bool) -> float:
    """A duration in seconds, as a float; ``inf`` stands for None where None is allowed."""
    if value is None:
        if allow_none:
            return _INF
        raise TypeError(f"{name} must be a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        hint = " (use None for no limit)" if allow_none else ""
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}{hint}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    return float(value)


def check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be at least 1 (or None for no limit), got {value!r}")
    return value


def is_coroutine_function(fn: object) -> bool:
    """True for ``async def`` functions, methods, partials of them, and async ``__call__``."""
    for _ in range(16):
        if inspect.iscoroutinefunction(fn):
            return True
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            fn = wrapped
            continue
        call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's own __call__
        if call is not None and not inspect.isfunction(fn) and not inspect.ismethod(fn):
            return inspect.iscoroutinefunction(call)
        return False
    return False


def reject_fn(name: str, fn: object) -> None:
    """Raise the TypeError for a bad ``fn``/``loader``; close a coroutine object first."""
    if isinstance(fn, CoroutineType):
        fn.close()  # so that no "coroutine ... was never awaited" warning escapes
        raise TypeError(
            f"{name} must be a coroutine function (async def), got a coroutine object; "
            f"pass the function and its arguments instead, e.g. get(key, fetch, arg) "
            f"rather than get(key, fetch(arg))"
        )
    if inspect.isawaitable(fn):
        raise TypeError(f"{name} must be a coroutine function, got an awaitable object")
    if not callable(fn):
        raise TypeError(f"{name} must be a coroutine function, got {type(fn).__name__}")
    raise TypeError(
        f"{name} must be a coroutine function (async def), got the plain callable "
        f"{getattr(fn, '__qualname__', type(fn).__name__)}"
    )


def check_fn(name: str, fn: object) -> None:
    if not is_coroutine_function(fn):
        reject_fn(name, fn)


def error_text(exc: BaseException) -> str:
    """``"TypeName: message"`` (or ``"TypeName"``), even for an exception whose ``str()`` raises."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # a hostile __str__ must not break the reporting of the failure
        text = "<str() of the exception raised>"
    return f"{name}: {text}" if text else name


def key_text(key: object, limit: int = 200) -> str:
    """``repr(key)`` for a message, bounded, and safe from a ``repr`` that raises."""
    try:
        text = repr(key)
    except Exception:
        return f"<{type(key).__name__} whose repr() raised>"
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 1] + "…"
