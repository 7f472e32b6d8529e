"""``report_progress``: a load tells the world how far it got, without threading an argument.

The engine sets a context variable to the running load before it awaits the
load's coroutine; :func:`report_progress` reads it. Outside a load it is a
documented no-op that returns ``False`` (so a pipeline can call it whether or
not it runs under a Prefetcher); bad values are a ``ValueError`` everywhere.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Protocol

__all__ = ["ProgressSink", "current_sink", "report_progress"]


class ProgressSink(Protocol):
    """What a running load's progress goes to (the engine's flight)."""

    def progress(self, done: float, total: float | None, message: str | None) -> None: ...


current_sink: ContextVar[ProgressSink | None] = ContextVar(
    "prefetch_ingest_current_load", default=None
)


def _check_amount(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return float(value)


def report_progress(done: float, total: float | None = None, message: str | None = None) -> bool:
    """Report the progress of the load that is running in the current task.

    Args:
        done: units of work done so far (finite, not negative).
        total: units of work in all, when known (finite, not negative, at
            least ``done``).
        message: free text shown with the progress.

    Returns:
        True when the progress was recorded; False when called outside a
        load (nothing happens then).

    Raises:
        ValueError: ``done`` or ``total`` negative, NaN or infinite, or
            ``done > total``.
        TypeError: a non-number amount or a non-string message.

    .. versionadded:: 0.1.0
    """
    done_f = _check_amount("done", done)
    total_f = None if total is None else _check_amount("total", total)
    if total_f is not None and done_f > total_f:
        raise ValueError(f"done ({done!r}) must not exceed total ({total!r})")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"message must be a str or None, got {type(message).__name__}")
    sink = current_sink.get()
    if sink is None:
        return False
    sink.progress(done_f, total_f, message)
    return True
