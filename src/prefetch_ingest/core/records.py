"""What the table holds for a key: a value, a failure, or a load in flight.

Plain data, no behaviour beyond what a record says about itself. Kept small:
:class:`Done` is what every completed entry costs (the contract's target: under 128 bytes
beyond key and value), so it holds the value, two floats and one flag, and
everything a snapshot shows is derived from those.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any

from prefetch_ingest._types import Status

__all__ = ["Done", "Failed", "Flight", "Unclaimed"]


class Done:
    """A completed value that some caller has been served (or that a caller demanded)."""

    __slots__ = ("background", "done", "duration", "key", "value")

    def __init__(
        self, key: Hashable, value: Any, done: float, duration: float, background: bool
    ) -> None:
        self.key = key
        self.value = value
        self.done = done
        self.duration = duration
        self.background = background


class Unclaimed(Done):
    """A completed *background* value that no caller has been served yet.

    Its own class, so that the engine's hit path (``entry.__class__ is Done``)
    sends the first hit to the slow path, which claims it by switching its
    class to :class:`Done` (same slots, so this is allowed and costs nothing).
    Later hits are the plain fast path. Records still of this class when they
    leave the table are the speculation nobody used (``Stats.unclaimed``).
    """

    __slots__ = ()


class Failed:
    """A failure: its text always, the exception object only while ``failure_ttl`` lasts.

    ``error``/``tb`` are None once ``failure_ttl`` has passed (or from the
    start when it is 0): a failure record keeps no frames alive.
    """

    __slots__ = ("background", "done", "duration", "error", "key", "tb", "text", "token")

    def __init__(
        self,
        key: Hashable,
        text: str,
        error: BaseException | None,
        tb: TracebackType | None,
        done: float,
        duration: float,
        background: bool,
    ) -> None:
        self.key = key
        self.text = text
        self.error = error
        self.tb = tb
        self.done = done
        self.duration = duration
        self.background = background
        self.token: str | None = None  # the shared store's owner token of the run, if any


class Flight:
    """One load of one key, pending or running, and what its waiters need.

    The core decides its transitions; the shell fills ``event`` (what waiters
    await) and ``handle`` (the task or timer that runs it) and never decides
    anything from them.
    """

    __slots__ = (
        "__weakref__",
        "args",
        "background",
        "cancel_reason",
        "chain",
        "claimed",
        "counted",
        "detached",
        "done",
        "entered",
        "error",
        "event",
        "fence",
        "fn",
        "force",
        "handle",
        "holds_slot",
        "key",
        "not_before",
        "on_progress",
        "p_done",
        "p_message",
        "p_total",
        "prior",
        "publishing",
        "queued",
        "ran_here",
        "remote",
        "started",
        "status",
        "tb",
        "token",
        "value",
    )

    def __init__(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        *,
        background: bool,
        force: bool,
        prior: Done | Failed | None,
        chain: tuple[tuple[int, Hashable], ...],
        now: float,
        fence: int,
    ) -> None:
        self.key = key
        self.fn: Callable[..., Awaitable[Any]] | None = fn
        self.args = args
        self.background = background
        self.force = force
        self.prior = prior  # the record this load replaced: restored by cancel
        self.chain = chain
        self.status = Status.PENDING
        self.queued = now
        self.not_before = now
        self.started: float | None = None
        self.done: float | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.tb: TracebackType | None = None
        self.ran_here = True
        self.claimed = not background  # a demanded load's value is claimed by its caller
        self.fence = fence
        self.cancel_reason: str | None = None
        self.holds_slot = False
        self.counted = False  # told to the admission as started (and not yet as ended)
        self.detached = False  # taken out of the table by invalidate while it ran
        self.entered = False  # its task has begun running it (the shell sets it)
        self.p_done: float | None = None
        self.p_total: float | None = None
        self.p_message: str | None = None
        self.publishing = False
        self.token: str | None = None  # a shared store's owner token, once it holds the lease
        self.remote: Any = None  # the StoredEntry of the run followed in another instance
        self.event: Any = None
        self.handle: Any = None
        self.on_progress: Callable[[Flight], None] | None = None

    @property
    def stale(self) -> Done | None:
        """The value served while this load reloads it, if it replaced one."""
        prior = self.prior
        return prior if isinstance(prior, Done) else None

    # ProgressSink (report_progress)
    def progress(self, done: float, total: float | None, message: str | None) -> None:
        if self.done is not None:
            return
        self.p_done, self.p_total, self.p_message = done, total, message
        if self.on_progress is not None:
            self.on_progress(self)
