"""The library's exceptions: one small family under :class:`PrefetchError`."""

from __future__ import annotations

__all__ = [
    "CodecError",
    "LoadCancelled",
    "PrefetchError",
    "PrefetcherClosed",
    "ReentrantLoadError",
    "RemoteLoadError",
    "StoreError",
    "WrongThreadError",
]


class PrefetchError(Exception):
    """Base class of every error raised by prefetch_ingest itself.

    Errors raised *by a load* are passed to its waiters unchanged; they are
    never wrapped in a :class:`PrefetchError`.
    """


class PrefetcherClosed(PrefetchError):
    """The Prefetcher is not open: its ``async with`` block was left (or never entered).

    Waiters of loads that were still running when the block was left end with
    this error too.
    """

    def __init__(self, message: str = "the Prefetcher is closed") -> None:
        super().__init__(message)


class ReentrantLoadError(PrefetchError):
    """A load asked, directly or through loads it started, for its own key.

    Awaiting itself would never finish, so the call fails at once instead.
    """

    def __init__(self, key: object) -> None:
        from ._validate import key_text

        self.key = key
        super().__init__(
            f"re-entrant get: the load for key {key_text(key)} awaits its own key "
            "(it would wait for itself forever)"
        )


class StoreError(PrefetchError):
    """The store (for example Redis) could not be reached or answered wrongly.

    The underlying error is chained as ``__cause__``.
    """


class RemoteLoadError(PrefetchError):
    """A load that ran in another process (through a shared store) failed.

    Attributes:
        error: the failure as the other process recorded it, ``"TypeName: message"``.
        error_type: the exception's class name there (``"TimeoutError"``), if known.
        message: the exception's message there (may be empty), if known.
    """

    def __init__(
        self, error: str, *, error_type: str | None = None, message: str | None = None
    ) -> None:
        self.error = error
        self.error_type = error_type
        self.message = message
        super().__init__(f"the load failed in another process: {error}")


class LoadCancelled(PrefetchError):
    """The load this caller awaited was cancelled by :meth:`Prefetcher.cancel`.

    Every waiter of that load gets it; nothing was stored, and the key is as
    it was before that load started.
    """


class WrongThreadError(PrefetchError, RuntimeError):
    """A Prefetcher was called from a thread other than its event loop's.

    From a worker thread (a sync web handler), hop to the loop first, e.g.
    ``anyio.from_thread.run_sync(pf.prefetch, key)``.
    """


class CodecError(PrefetchError):
    """A load's value could not be encoded (by a shared store's codec, or as the ingest
    adapter's JSON stats), so it was not stored.

    The load counts as failed (``status`` reports this error); the codec's own
    exception is chained as ``__cause__``.
    """
