"""The ingest adapter: the origin workflow (Query, background ingest, Mapping click, status)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import anyio
import pytest
import structlog

from prefetch_ingest import PrefetcherClosed, Status, report_progress
from prefetch_ingest.ingest import (
    IngestPipeline,
    IngestPrefetcher,
    IngestResult,
    IngestStatus,
)

pytestmark = pytest.mark.anyio

SPEC_KEYS = {
    "status",
    "background_task",
    "started_at",
    "completed_at",
    "stats",
    "error",
    "progress",
}


class Pipeline:
    """A real (if tiny) ingest: counts its runs, can be held at a gate, can fail on purpose."""

    def __init__(
        self,
        *,
        gated: bool = False,
        fail_first: set[tuple[str, str]] | None = None,
        returns: Any = None,
    ) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gated = gated
        self.fail_first = set(fail_first or ())
        self.returns = returns
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = False

    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        self.calls.append((project_id, run_id))
        report_progress(3, 10, "llm calls")
        self.started.set()
        if self.gated:
            try:
                await self.release.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled = True
                raise
        if (project_id, run_id) in self.fail_first:
            self.fail_first.discard((project_id, run_id))
            raise RuntimeError(f"LLM quota exceeded for {run_id}")
        if self.returns is not None:
            return self.returns  # type: ignore[no-any-return]
        return {"project": project_id, "run": run_id, "call": len(self.calls)}


def test_pipeline_helper_satisfies_the_protocol() -> None:
    assert isinstance(Pipeline(), IngestPipeline)


async def test_background_ingest_finished_before_the_click_is_a_hit() -> None:
    pipeline = Pipeline()
    async with IngestPrefetcher(pipeline) as ingest:
        assert ingest.after_query("p", "r") is True
        with anyio.fail_after(5):
            await ingest.prefetcher.wait(("p", "r"))
        result = await ingest.ingest("p", "r")
        assert result == IngestResult(stats={"project": "p", "run": "r", "call": 1}, source="hit")
        assert pipeline.calls == [("p", "r")]
        assert ingest.stats().hits == 1


async def test_click_while_the_background_ingest_runs_joins_that_run() -> None:
    pipeline = Pipeline(gated=True)
    async with IngestPrefetcher(pipeline) as ingest:
        assert ingest.after_query("p", "r") is True
        results: list[IngestResult] = []

        async def click() -> None:
            results.append(await ingest.ingest("p", "r"))

        with anyio.fail_after(5):
            await pipeline.started.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(click)
                await anyio.wait_all_tasks_blocked()
                pipeline.release.set()
        assert [r.source for r in results] == ["joined"]
        assert pipeline.calls == [("p", "r")]
        assert ingest.stats().joins == 1


async def test_background_failure_falls_back_to_running_the_ingest_on_the_click() -> None:
    pipeline = Pipeline(fail_first={("p", "r")})
    async with IngestPrefetcher(pipeline) as ingest:
        ingest.after_query("p", "r")
        with anyio.fail_after(5):
            await ingest.prefetcher.wait(("p", "r"))
        failed = await ingest.status("p", "r")
        assert failed.status is Status.FAILED
        assert failed.error == "RuntimeError: LLM quota exceeded for r"
        result = await ingest.ingest("p", "r")
        assert result.source == "ran"
        assert result.stats["call"] == 2
        assert (await ingest.status("p", "r")).status is Status.COMPLETED


async def test_click_on_a_run_never_started_runs_it_synchronously() -> None:
    pipeline = Pipeline()
    async with IngestPrefetcher(pipeline) as ingest:
        result = await ingest.ingest("p", "r")
        assert result.source == "ran"
        assert result.persisted is False
        status = await ingest.status("p", "r")
        assert status.status is Status.COMPLETED
        assert status.background_task is False


async def test_concurrent_clicks_run_the_ingest_once_one_ran_the_others_joined() -> None:
    pipeline = Pipeline(gated=True)
    results: list[IngestResult] = []
    async with IngestPrefetcher(pipeline) as ingest:

        async def click() -> None:
            results.append(await ingest.ingest("p", "r"))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(click)
                await anyio.wait_all_tasks_blocked()
                pipeline.release.set()
    assert sorted(r.source for r in results) == ["joined"] * 4 + ["ran"]
    assert pipeline.calls == [("p", "r")]
    assert all(r.stats is results[0].stats for r in results)


async def test_force_refresh_runs_again_after_a_completed_run() -> None:
    pipeline = Pipeline()
    async with IngestPrefetcher(pipeline) as ingest:
        first = await ingest.ingest("p", "r")
        again = await ingest.ingest("p", "r", force_refresh=True)
        assert (first.stats["call"], again.stats["call"]) == (1, 2)
        assert again.source == "ran"
        assert (await ingest.ingest("p", "r")).stats["call"] == 2


async def test_force_refresh_joins_a_run_in_flight_instead_of_starting_another() -> None:
    pipeline = Pipeline(gated=True)
    results: list[IngestResult] = []
    async with IngestPrefetcher(pipeline) as ingest:
        ingest.after_query("p", "r")

        async def click() -> None:
            results.append(await ingest.ingest("p", "r", force_refresh=True))

        with anyio.fail_after(5):
            await pipeline.started.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(click)
                await anyio.wait_all_tasks_blocked()
                pipeline.release.set()
    assert [r.source for r in results] == ["joined"]
    assert pipeline.calls == [("p", "r")]


async def test_an_ingest_failure_reaches_every_waiting_click() -> None:
    pipeline = Pipeline(gated=True, fail_first={("p", "r")})
    errors: list[BaseException] = []
    async with IngestPrefetcher(pipeline) as ingest:

        async def click() -> None:
            try:
                await ingest.ingest("p", "r")
            except RuntimeError as exc:
                errors.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(click)
                await anyio.wait_all_tasks_blocked()
                pipeline.release.set()
    assert len(errors) == 3
    assert all(str(e) == "LLM quota exceeded for r" for e in errors)
    assert pipeline.calls == [("p", "r")]


async def test_status_of_an_unknown_run_is_exactly_the_not_started_json() -> None:
    async with IngestPrefetcher(Pipeline()) as ingest:
        status = await ingest.status("p", "r")
    assert status.to_dict() == {
        "status": "not_started",
        "background_task": False,
        "started_at": None,
        "completed_at": None,
        "stats": None,
        "error": None,
        "progress": None,
    }


async def test_status_of_a_completed_background_run_is_the_spec_json() -> None:
    async with IngestPrefetcher(Pipeline()) as ingest:
        ingest.after_query("p", "r")
        with anyio.fail_after(5):
            await ingest.prefetcher.wait(("p", "r"))
        data = (await ingest.status("p", "r")).to_dict()
    assert set(data) == SPEC_KEYS
    assert data["status"] == "completed"
    assert data["background_task"] is True
    assert data["stats"] == {"project": "p", "run": "r", "call": 1}
    assert data["error"] is None
    started = datetime.fromisoformat(data["started_at"])
    completed = datetime.fromisoformat(data["completed_at"])
    assert started.utcoffset() is not None
    assert completed >= started


async def test_status_of_a_running_ingest_reports_its_progress() -> None:
    pipeline = Pipeline(gated=True)
    async with IngestPrefetcher(pipeline) as ingest:
        ingest.after_query("p", "r")
        with anyio.fail_after(5):
            await pipeline.started.wait()
        data = (await ingest.status("p", "r")).to_dict()
        pipeline.release.set()
    assert data["status"] == "running"
    assert data["background_task"] is True
    assert data["completed_at"] is None
    assert data["stats"] is None
    progress = data["progress"]
    assert set(progress) == {"done", "total", "message", "eta_s"}
    assert (progress["done"], progress["total"], progress["message"]) == (3, 10, "llm calls")
    assert progress["eta_s"] is None or math.isfinite(progress["eta_s"])


async def test_status_of_a_failed_run_has_the_error_and_no_stats() -> None:
    async with IngestPrefetcher(Pipeline(fail_first={("p", "r")})) as ingest:
        ingest.after_query("p", "r")
        with anyio.fail_after(5):
            await ingest.prefetcher.wait(("p", "r"))
        data = (await ingest.status("p", "r")).to_dict()
    assert data["status"] == "failed"
    assert data["error"] == "RuntimeError: LLM quota exceeded for r"
    assert data["stats"] is None
    assert data["completed_at"] is not None


async def test_stats_found_in_the_database_are_completed_without_background_task() -> None:
    asked: list[tuple[str, str]] = []

    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        asked.append((project_id, run_id))
        return {"papers": 7} if run_id == "old" else None

    pipeline = Pipeline()
    async with IngestPrefetcher(pipeline, persisted_stats=persisted) as ingest:
        status = await ingest.status("p", "old")
        assert status.persisted is True
        assert status.to_dict() == {
            "status": "completed",
            "background_task": False,
            "started_at": None,
            "completed_at": None,
            "stats": {"papers": 7},
            "error": None,
            "progress": None,
        }
        assert (await ingest.status("p", "new")).status is Status.NOT_STARTED
        result = await ingest.ingest("p", "old")
        assert result == IngestResult(stats={"papers": 7}, source="hit", persisted=True)
    assert pipeline.calls == []
    assert asked == [("p", "old"), ("p", "new"), ("p", "old")]


async def test_force_refresh_ignores_stats_found_in_the_database() -> None:
    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        return {"papers": 7}

    pipeline = Pipeline()
    async with IngestPrefetcher(pipeline, persisted_stats=persisted) as ingest:
        result = await ingest.ingest("p", "r", force_refresh=True)
    assert result.source == "ran"
    assert pipeline.calls == [("p", "r")]


async def test_database_is_not_asked_about_a_run_known_in_memory() -> None:
    asked: list[tuple[str, str]] = []

    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        asked.append((project_id, run_id))
        return {"stale": True}

    async with IngestPrefetcher(Pipeline(), persisted_stats=persisted) as ingest:
        await ingest.ingest("p", "r", force_refresh=True)
        status = await ingest.status("p", "r")
    assert status.stats == {"project": "p", "run": "r", "call": 1}
    assert asked == []


async def test_status_still_answers_and_logs_when_persisted_stats_raises() -> None:
    async def broken(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        raise ConnectionError("database is down")

    async with IngestPrefetcher(Pipeline(), persisted_stats=broken) as ingest:
        with structlog.testing.capture_logs() as logs:
            status = await ingest.status("p", "r")
            result = await ingest.ingest("p", "r")
    assert status.status is Status.NOT_STARTED
    assert result.source == "ran"
    failures = [e for e in logs if e["event"] == "ingest.persisted_stats_failed"]
    assert len(failures) == 2
    assert failures[0]["log_level"] == "warning"
    assert failures[0]["error"] == "ConnectionError: database is down"
    assert (failures[0]["project_id"], failures[0]["run_id"]) == ("p", "r")


async def test_persisted_stats_returning_a_non_mapping_is_logged_and_ignored() -> None:
    async def odd(project_id: str, run_id: str) -> Any:
        return ["not", "a", "mapping"]

    async with IngestPrefetcher(Pipeline(), persisted_stats=odd) as ingest:
        with structlog.testing.capture_logs() as logs:
            status = await ingest.status("p", "r")
    assert status.status is Status.NOT_STARTED
    assert [e["event"] for e in logs] == ["ingest.persisted_stats_failed"]
    assert "returned list" in logs[0]["error"]


async def test_a_pipeline_returning_a_non_mapping_fails_that_run_with_a_clear_error() -> None:
    class Odd(Pipeline):
        async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
            if run_id == "bad":
                return 42  # type: ignore[return-value]
            return await super().ingest_run(project_id, run_id)

    async with IngestPrefetcher(Odd()) as ingest:
        with pytest.raises(TypeError, match=r"returned int, expected a mapping"):
            await ingest.ingest("p", "bad")
        status = await ingest.status("p", "bad")
        assert status.status is Status.FAILED
        assert status.error is not None
        assert status.error.startswith("TypeError: Odd.ingest_run('p', 'bad') returned int")
        assert (await ingest.ingest("p", "good")).source == "ran"
        assert (await ingest.status("p", "good")).status is Status.COMPLETED


async def test_a_run_of_one_project_is_never_visible_through_another_project() -> None:
    pipeline = Pipeline()
    async with IngestPrefetcher(pipeline) as ingest:
        ingest.after_query("alpha", "r1")
        with anyio.fail_after(5):
            await ingest.prefetcher.wait(("alpha", "r1"))
        assert (await ingest.status("beta", "r1")).status is Status.NOT_STARTED
        other = await ingest.ingest("beta", "r1")
        assert other.source == "ran"
        assert other.stats["project"] == "beta"
        mine = await ingest.ingest("alpha", "r1")
        assert mine.stats["project"] == "alpha"
        assert mine.source == "hit"
    assert pipeline.calls == [("alpha", "r1"), ("beta", "r1")]


BAD_IDS = [
    ("", "r", "project_id"),
    ("   ", "r", "project_id"),
    (7, "r", "project_id"),
    (None, "r", "project_id"),
    ("p", "", "run_id"),
    ("p", b"r", "run_id"),
    ("p", None, "run_id"),
]


@pytest.mark.parametrize(("project_id", "run_id", "named"), BAD_IDS)
async def test_empty_or_non_string_ids_are_a_value_error_naming_the_argument(
    project_id: Any, run_id: Any, named: str
) -> None:
    pipeline = Pipeline()
    async with IngestPrefetcher(pipeline) as ingest:
        with pytest.raises(ValueError, match=named):
            await ingest.ingest(project_id, run_id)
        with pytest.raises(ValueError, match=named):
            await ingest.status(project_id, run_id)
        with pytest.raises(ValueError, match=named):
            async for _ in ingest.watch(project_id, run_id):
                pass
    assert pipeline.calls == []


@pytest.mark.parametrize(("project_id", "run_id", "named"), BAD_IDS)
async def test_after_query_with_bad_ids_returns_false_and_logs_a_warning(
    project_id: Any, run_id: Any, named: str
) -> None:
    async with IngestPrefetcher(Pipeline()) as ingest:
        with structlog.testing.capture_logs() as logs:
            assert ingest.after_query(project_id, run_id) is False
    assert [(e["event"], e["log_level"]) for e in logs] == [("ingest.start_failed", "warning")]
    assert named in logs[0]["error"]


async def test_after_query_never_raises_when_the_prefetcher_is_closed() -> None:
    pipeline = Pipeline()
    ingest = IngestPrefetcher(pipeline)
    async with ingest:
        pass
    with structlog.testing.capture_logs() as logs:
        assert ingest.after_query("p", "r") is False
    assert logs[0]["event"] == "ingest.start_failed"
    assert logs[0]["error"].startswith("PrefetcherClosed")
    assert pipeline.calls == []
    with pytest.raises(PrefetcherClosed):
        await ingest.ingest("p", "r")


async def test_after_query_on_a_run_in_flight_starts_nothing() -> None:
    pipeline = Pipeline(gated=True)
    async with IngestPrefetcher(pipeline) as ingest:
        assert ingest.after_query("p", "r") is True
        assert ingest.after_query("p", "r") is False
        pipeline.release.set()
        with anyio.fail_after(5):
            result = await ingest.ingest("p", "r")
    assert result.source in ("joined", "hit")
    assert pipeline.calls == [("p", "r")]


async def test_watch_follows_a_run_until_it_completes() -> None:
    pipeline = Pipeline(gated=True)
    seen: list[IngestStatus] = []
    async with IngestPrefetcher(pipeline) as ingest:
        ingest.after_query("p", "r")

        async def follow() -> None:
            async for status in ingest.watch("p", "r"):
                seen.append(status)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await pipeline.started.wait()
                await anyio.wait_all_tasks_blocked()
                pipeline.release.set()
    assert seen[-1].status is Status.COMPLETED
    assert seen[-1].stats == {"project": "p", "run": "r", "call": 1}
    assert all(s.status.in_flight for s in seen[:-1])
    assert any(s.progress is not None and s.progress.done == 3 for s in seen)


async def test_closing_a_watch_early_unregisters_it_at_once() -> None:
    pipeline = Pipeline(gated=True)
    async with IngestPrefetcher(pipeline) as ingest:
        ingest.after_query("p", "r")
        with anyio.fail_after(5):
            async with contextlib.aclosing(ingest.watch("p", "r")) as statuses:
                async for status in statuses:
                    assert status.status.in_flight
                    assert ingest.stats().watchers == 1
                    break
        assert ingest.stats().watchers == 0
        pipeline.release.set()


async def test_watch_of_a_run_found_only_in_the_database_yields_one_completed_status() -> None:
    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        return {"papers": 1}

    async with IngestPrefetcher(Pipeline(), persisted_stats=persisted) as ingest:
        with anyio.fail_after(5):
            seen = [s async for s in ingest.watch("p", "r")]
    assert [(s.status, s.background_task, s.stats) for s in seen] == [
        (Status.COMPLETED, False, {"papers": 1})
    ]


async def test_leaving_the_block_cancels_a_running_ingest() -> None:
    pipeline = Pipeline(gated=True)
    async with IngestPrefetcher(pipeline) as ingest:
        ingest.after_query("p", "r")
        with anyio.fail_after(5):
            await pipeline.started.wait()
    assert pipeline.cancelled
    assert ingest.stats().running == 0


def test_constructor_rejects_what_is_not_a_pipeline() -> None:
    with pytest.raises(TypeError, match="ingest_run"):
        IngestPrefetcher(object())  # type: ignore[arg-type]


def test_constructor_rejects_a_non_callable_persisted_stats() -> None:
    with pytest.raises(TypeError, match="persisted_stats"):
        IngestPrefetcher(Pipeline(), persisted_stats={"a": 1})  # type: ignore[arg-type]


def test_constructor_rejects_a_loader_because_the_pipeline_is_the_loader() -> None:
    async def loader(key: object) -> object:
        return key

    with pytest.raises(TypeError, match="loader"):
        IngestPrefetcher(Pipeline(), loader=loader)


def test_constructor_passes_prefetcher_options_through() -> None:
    with pytest.raises(ValueError, match="ttl"):
        IngestPrefetcher(Pipeline(), ttl=-1)
