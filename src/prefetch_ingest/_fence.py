"""``current_fence()``: the fencing number of the load running in the current task."""

from __future__ import annotations

import contextvars

__all__ = ["current_fence", "fence_var"]

fence_var: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "prefetch_ingest_fence", default=None
)


def current_fence() -> int | None:
    """The fencing number of the shared-store lease the calling load runs under, else ``None``.

    Call it inside a load (the function the Prefetcher runs for a key, or a
    task it starts). Each run of a key that takes the key's lease gets a fence
    greater than every earlier run of that key, across instances and even
    across a restart of the store that lost every key. Hand it to the system
    the load writes to, and have that system refuse a write whose fence is
    lower than the one it already holds::

        INSERT INTO run_stats (project_id, run_id, stats, fence)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (project_id, run_id) DO UPDATE
           SET stats = EXCLUDED.stats, fence = EXCLUDED.fence
         WHERE run_stats.fence < EXCLUDED.fence

    so that a run that lost its lease (paused, partitioned, outlived by a
    store restart) cannot overwrite the result of the run that replaced it.

    ``None`` outside a load, with the in-process store (``store=None``: a
    counter that restarts with the process would make such a check refuse
    every write after a restart), and when a load runs locally because the
    store was unreachable (``fallback="local"``).

    .. versionadded:: 0.1.0
    """
    return fence_var.get()
