"""Test helpers: a clock the tests advance, and a gated loader that counts its executions."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import anyio


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class GatedLoader:
    """A loader that blocks until released, and counts how often it ran per key.

    ``started`` is set when any execution has begun; ``release()`` lets every
    execution (current and future) finish. ``fail`` makes it raise instead.
    """

    def __init__(self, *, gated: bool = True) -> None:
        self.calls: dict[Hashable, int] = {}
        self.gate = anyio.Event()
        if not gated:
            self.gate.set()
        self.started = anyio.Event()
        self.fail: BaseException | None = None
        self.running = 0
        self.max_running = 0

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, key: Hashable) -> Any:
        self.calls[key] = self.calls.get(key, 0) + 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        if self.fail is not None:
            raise self.fail
        return ("value", key, self.calls[key])
