"""Scenario 7: the Redis store (written below)."""

from __future__ import annotations

from ._results import ScenarioResult
from ._scenarios import Progress, Sizes


async def redis_scenario(sizes: Sizes, say: Progress) -> ScenarioResult:
    return ScenarioResult("redis", "7. Redis store", "µs/hit", [], skipped="not written yet")
