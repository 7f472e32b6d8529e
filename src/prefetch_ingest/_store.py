"""What the Prefetcher needs from a store shared by several processes.

The engine keeps its own in-process table (:mod:`prefetch_ingest._memory`)
for everything local: flights, waiters, progress, and, when no shared store
is given, the completed values themselves. A *shared* store such as
:class:`prefetch_ingest.redis.RedisStore` adds what one process cannot do
alone: results that outlive the process, and one execution per key across
every process that uses the same store.

The engine talks to a shared store only through :class:`SharedStore`, so the
engine knows nothing of Redis. Every method may raise :class:`StoreError`
(the backend's own error chained as ``__cause__``) when the backend is
unreachable and the store has no fallback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol, runtime_checkable

import attrs

from ._types import Progress, Status

__all__ = ["LoadOutcome", "SharedStore", "StoredEntry"]


@attrs.frozen
class StoredEntry:
    """The state of one key as a shared store holds it.

    Times are wall-clock seconds since the epoch (the store's own clock
    decides expiry, so no instance's clock matters for it).
    """

    status: Status
    value: Any = None
    error: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    background: bool = False
    progress: Progress | None = None
    token: str | None = None
    """The owner token of the run shown (the running one, else the one that ended)."""
    error_type: str | None = None
    error_message: str | None = None
    has_value: bool = False
    """A completed value is stored (``value``), served even while a reload runs."""
    value_duration: float = 0.0
    """How long the run that produced ``value`` took (seconds): what a hit saves."""
    value_at: float | None = None
    """When the run that produced ``value`` completed (epoch seconds)."""


@attrs.frozen
class LoadOutcome:
    """What :meth:`SharedStore.load` did: the value, and whether it ran the load here."""

    value: Any
    ran_here: bool
    stored: bool = True
    """False when the value could not be written (the store was unreachable)."""
    token: str | None = None
    """The owner token of the run whose value this is."""
    duration: float = 0.0


@runtime_checkable
class SharedStore(Protocol):
    """A store that several Prefetchers, in several processes, share.

    The Prefetcher opens it in ``__aenter__`` and closes it in ``__aexit__``.
    """

    async def open(self, *, ttl: float | None, failure_ttl: float) -> None:
        """Connect, and remember how long results and failures are kept."""

    async def aclose(self) -> None:
        """Disconnect; close only what the store itself created."""

    def check_key(self, key: Hashable) -> None:
        """Raise ``TypeError`` (naming the argument ``key``) if the store cannot hold this key."""

    async def lookup(self, key: Hashable, *, for_get: bool = False) -> StoredEntry | None:
        """The key's state, in one round trip; ``None`` when the store knows nothing of it.

        ``for_get``: only a stored value or failure matters (the store may read less)."""

    async def load(
        self,
        key: Hashable,
        run: Callable[[], Awaitable[Any]],
        *,
        background: bool,
        force: bool,
        started_at: float | None = None,
        follow: Callable[[StoredEntry], None] | None = None,
        deliver: Callable[[Any], None] | None = None,
        lost: Callable[[bool], None] | None = None,
        took: Callable[[str], None] | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> LoadOutcome:
        """Make sure the key has a result, running ``run`` here only if no other process does.

        - A completed, fresh result already stored (and ``force`` false):
          return it, ``ran_here=False``.
        - Another process holds the key's lease: wait for its result (woken
          by a notification, with a polling fallback), and take the lease
          over if it lapses.
        - Otherwise take the lease, await ``run()`` while renewing the lease,
          store the value (or the failure) only if the lease is still held
          (fencing), release the lease, notify other processes, and return
          ``ran_here=True``.

        A failure of ``run()`` is re-raised as is; a failure of a load run in
        another process is raised as :class:`RemoteLoadError`.

        Callbacks (all optional, all called on the event loop): ``follow(entry)``
        each time the run this call follows in another process is read
        (progress); ``deliver(value)`` when this run's value is ready but the
        store could not take it yet (local waiters need not wait for the
        retries); ``lost(cancelled)`` when this run's lease was taken away by
        another instance (``cancel``: True; ``invalidate`` or expiry: False);
        ``took(token)`` when this call takes the lease (the run's owner token);
        ``wanted()`` False: nobody demands this load (a background one, or one whose
        key was invalidated here), so once the run it follows is gone without an
        outcome, it ends with :class:`LoadCancelled` instead of taking the key over.
        """

    async def cancel(self, key: Hashable) -> bool:
        """Cancel the key's run in whichever instance runs it; True if there was one."""

    def worth_starting(self, key: Hashable, refresh_after: float = ...) -> str:
        """Synchronous and local: should ``prefetch`` start a background load of ``key``?

        ``"no"``: this instance has seen a fresh stored value of it (younger than
        ``refresh_after``), or the store is unreachable with no fallback (asked again
        at most once a second); ``"reload"``: a value seen fresh is older than
        ``refresh_after`` (a forced reload); ``"load"``: nothing known, start one."""

    def probe_due(self) -> bool:
        """Reachable, or unreachable long enough (a second) to be worth asking again."""

    async def invalidate(self, key: Hashable) -> bool:
        """Forget the key's stored result or failure; True if there was one."""

    async def publish_progress(self, key: Hashable, progress: Progress) -> None:
        """Best effort: share a running load's progress (the store may rate-limit it)."""

    async def wait_change(self, key: Hashable, timeout: float) -> None:
        """Return when the key's state may have changed, or after ``timeout`` seconds."""
