"""Pieces every networked backend shares: per-key wake-ups for ``wait_change`` and the
asyncio-only check."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["Signals", "require_asyncio"]


class _Signal:
    """Wake-ups for one key in this process: ``event`` is set, then replaced, per notification."""

    __slots__ = ("event", "users")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.users = 0

    def fire(self) -> None:
        self.event.set()
        self.event = anyio.Event()


class Signals:
    """The keys this process waits on, each woken by the backend's notifications.

    A key is registered while someone waits on it, and only then.
    """

    __slots__ = ("_by_digest",)

    def __init__(self) -> None:
        self._by_digest: dict[str, _Signal] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def __contains__(self, digest: object) -> bool:
        return digest in self._by_digest

    def waiters(self) -> int:
        """How many waits are in progress, over every key."""
        return sum(signal.users for signal in self._by_digest.values())

    async def wait(
        self,
        digest: str,
        timeout: float,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Return on the next :meth:`fire` of ``digest`` (or :meth:`fire_all`), or after
        ``timeout``. ``ready`` (e.g. "make sure the listener runs") is awaited within the
        timeout, after the key is registered, so that no notification is missed."""
        signal = self._by_digest.get(digest)
        if signal is None:
            signal = self._by_digest[digest] = _Signal()
        signal.users += 1
        try:
            with anyio.move_on_after(timeout):
                if ready is not None:
                    await ready()
                await signal.event.wait()
        finally:
            signal.users -= 1
            if signal.users <= 0 and self._by_digest.get(digest) is signal:
                del self._by_digest[digest]

    def fire(self, digest: str) -> None:
        signal = self._by_digest.get(digest)
        if signal is not None:
            signal.fire()

    def fire_all(self) -> None:
        for signal in list(self._by_digest.values()):
            signal.fire()


def require_asyncio(store: str, why: str) -> None:
    """Refuse to run under another event loop than asyncio (``why``: what needs it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{store} runs on asyncio only ({why}); this code runs under another event "
            "loop (trio?). Use the in-memory store (store=None) there."
        ) from None
