"""The ingest adapter: the origin workflow (Query, then a long ingest) on a :class:`Prefetcher`.

A web service answers in two steps: *Query* returns quickly, then *Mapping*
ingests the query's results, which takes minutes. With this adapter the
service starts the ingest in the background as soon as Query is answered
(:meth:`IngestPrefetcher.after_query`), and the Mapping click
(:meth:`IngestPrefetcher.ingest`) is served from that background run: at once
when it has completed, by awaiting it when it is still running, and by running
the ingest synchronously, as before, when it failed or never started.

Runs are keyed by ``(project_id, run_id)``: a run of one project is never
visible through another project's id.

Example::

    from prefetch_ingest.ingest import IngestPrefetcher

    async with IngestPrefetcher(pipeline, persisted_stats=db.load_stats) as ingest:
        ...
        ingest.after_query(project_id, run_id)  # in the Query handler
        ...
        result = await ingest.ingest(project_id, run_id)  # in the Mapping handler
        print(result.source, result.stats)
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self, runtime_checkable

import anyio
import attrs
import structlog

from ._errors import CodecError
from ._log import key_for_log
from ._types import Progress, Snapshot, Stats, Status
from ._validate import error_text, is_coroutine_function
from .engine import Prefetcher

__all__ = [
    "IngestKey",
    "IngestPipeline",
    "IngestPrefetcher",
    "IngestResult",
    "IngestStatus",
    "PersistedStats",
    "Source",
]

_log = structlog.get_logger("prefetch_ingest.ingest")

IngestKey = tuple[str, str]
"""The Prefetcher key of one run: ``(project_id, run_id)``."""

Source = Literal["hit", "joined", "ran"]
"""Where the stats returned by :meth:`IngestPrefetcher.ingest` came from."""

PersistedStats = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
"""``async (project_id, run_id) -> stats or None``: the stats a past run left in the database."""


@runtime_checkable
class IngestPipeline(Protocol):
    """What the application provides: the ingest itself.

    ``ingest_run`` does the slow work for one run (in the origin service: LLM
    calls, writes to PostgreSQL, authorship statistics) and returns its
    statistics as a mapping. It may call
    :func:`prefetch_ingest.report_progress` to report how far it got.
    Anything other than a mapping fails the run with a :class:`TypeError`.
    """

    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        """Ingest one run and return its statistics."""
        ...


@attrs.frozen
class IngestResult:
    """What :meth:`IngestPrefetcher.ingest` returns.

    Attributes:
        stats: the run's statistics.
        source: ``"hit"`` when a completed run was served without waiting
            (a background ingest had finished, or the stats were found in the
            database); ``"joined"`` when the call awaited a run that was
            already in flight; ``"ran"`` when the call had to run the ingest
            itself (it failed before, was never started, had expired, or
            ``force_refresh`` was given).
        persisted: True when the stats were read back from the database by
            ``persisted_stats`` rather than produced by a run of this process
            (or of another process sharing the store).
    """

    stats: Mapping[str, Any]
    source: Source
    persisted: bool = False


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@attrs.frozen
class IngestStatus:
    """The state of one run, as the status endpoint reports it.

    Attributes:
        project_id: the project.
        run_id: the run.
        status: see :class:`~prefetch_ingest.Status`.
        background_task: True when the run was started in the background (by
            :meth:`IngestPrefetcher.after_query`); False when it was started
            by a caller of :meth:`IngestPrefetcher.ingest`, or when the stats
            were found already persisted in the database, or when nothing is
            known.
        started_at: when the run started (aware UTC), or ``None``.
        completed_at: when it completed or failed (aware UTC), or ``None``.
        stats: the statistics, when ``COMPLETED``.
        error: ``"TypeName: message"``, when ``FAILED``.
        progress: the last progress the running ingest reported, if any.
        persisted: True when the answer comes from ``persisted_stats``.
    """

    project_id: str
    run_id: str
    status: Status
    background_task: bool = False
    started_at: datetime | None = None
    completed_at: datetime | None = None
    stats: Mapping[str, Any] | None = None
    error: str | None = None
    progress: Progress | None = None
    persisted: bool = False

    @classmethod
    def from_snapshot(cls, project_id: str, run_id: str, snapshot: Snapshot) -> IngestStatus:
        """The status of a run as the Prefetcher sees it."""
        completed = snapshot.status is Status.COMPLETED
        return cls(
            project_id=project_id,
            run_id=run_id,
            status=snapshot.status,
            background_task=snapshot.background,
            started_at=snapshot.started_at,
            completed_at=snapshot.completed_at,
            stats=snapshot.result if completed else None,
            error=snapshot.error if snapshot.status is Status.FAILED else None,
            progress=snapshot.progress,
        )

    def to_dict(self) -> dict[str, Any]:
        """The status JSON of the service (see docs/contract.md), ready for ``json.dumps``.

        Keys: ``status``, ``background_task``, ``started_at``, ``completed_at``
        (ISO-8601 strings or null), ``stats`` (an object when completed, else
        null), ``error`` (a string when failed, else null) and ``progress``
        (``{"done", "total", "message", "eta_s"}`` or null).
        """
        progress: dict[str, Any] | None = None
        if self.progress is not None:
            progress = {
                "done": self.progress.done,
                "total": self.progress.total,
                "message": self.progress.message or "",
                "eta_s": self.progress.eta,
            }
        return {
            "status": self.status.value,
            "background_task": self.background_task,
            "started_at": _iso(self.started_at),
            "completed_at": _iso(self.completed_at),
            "stats": None if self.stats is None else dict(self.stats),
            "error": self.error,
            "progress": progress,
        }


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a non-empty string, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _key(project_id: object, run_id: object) -> IngestKey:
    return (_check_id("project_id", project_id), _check_id("run_id", run_id))


def _json_ready(stats: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``stats`` as a dict that is valid JSON (no NaN or infinity), else :class:`CodecError`."""
    result = dict(stats)
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CodecError(f"{what} are not JSON-encodable: {error_text(exc)}") from exc
    return result


class IngestPrefetcher:
    """Background ingests for ``(project_id, run_id)`` runs, served to the Mapping click.

    Use it as an async context manager: it owns a
    :class:`~prefetch_ingest.Prefetcher`, which owns the running ingests.
    Leaving the block cancels the ingests still running.

    Args:
        pipeline: the ingest (see :class:`IngestPipeline`).
        persisted_stats: optional ``async (project_id, run_id) -> mapping or
            None`` that reads the stats of a past run from the database. It is
            asked when the Prefetcher knows nothing of a run, so that a run
            ingested before a restart (or by an instance that does not share
            the store) is reported ``completed`` with ``background_task:
            false`` and served without running it again. If it raises, the
            error is logged and the call goes on as if nothing were persisted.
        **prefetcher_options: passed to :class:`~prefetch_ingest.Prefetcher`
            (``ttl``, ``failure_ttl``, ``max_concurrency``, ``store`` ...).

    Raises:
        TypeError: ``pipeline`` has no ``ingest_run`` method, or
            ``persisted_stats`` is not callable.
    """

    def __init__(
        self,
        pipeline: IngestPipeline,
        *,
        persisted_stats: PersistedStats | None = None,
        **prefetcher_options: Any,
    ) -> None:
        ingest_run = getattr(pipeline, "ingest_run", None)
        if not callable(ingest_run):
            raise TypeError(
                f"pipeline must have an async ingest_run(project_id, run_id) method, "
                f"got {type(pipeline).__name__}"
            )
        if not is_coroutine_function(ingest_run):
            raise TypeError(
                f"pipeline.ingest_run must be a coroutine function (async def), "
                f"got a plain callable on {type(pipeline).__name__}"
            )
        if persisted_stats is not None and not callable(persisted_stats):
            raise TypeError(
                f"persisted_stats must be an async callable or None, "
                f"got {type(persisted_stats).__name__}"
            )
        if "loader" in prefetcher_options:
            raise TypeError(
                "loader cannot be given to IngestPrefetcher: the pipeline is the loader"
            )
        self._pipeline = pipeline
        self._persisted_stats = persisted_stats
        self._prefetcher: Prefetcher[IngestKey, Mapping[str, Any]] = Prefetcher(
            self._load_demanded, **prefetcher_options
        )

    @property
    def prefetcher(self) -> Prefetcher[IngestKey, Mapping[str, Any]]:
        """The underlying Prefetcher (for its ``stats()``, ``watch`` or ``invalidate``)."""
        return self._prefetcher

    async def __aenter__(self) -> Self:
        await self._prefetcher.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._prefetcher.__aexit__(exc_type, exc, tb)

    async def _load_demanded(self, key: IngestKey) -> Mapping[str, Any]:
        return await self._load(key, False)

    async def _load(self, key: IngestKey, background: bool) -> Mapping[str, Any]:
        """The load the Prefetcher runs for a run: the pipeline, checked and JSON-ready.

        A background run (``after_query``) asks ``persisted_stats`` first, so
        that stats already in the database complete it without running the
        pipeline again (no second LLM bill after a restart).
        """
        project_id, run_id = key
        if background:
            persisted = await self._lookup_persisted(project_id, run_id)
            if persisted is not None:
                return persisted
        stats = await self._pipeline.ingest_run(project_id, run_id)
        if not isinstance(stats, Mapping):
            raise TypeError(
                f"{type(self._pipeline).__name__}.ingest_run({project_id!r}, {run_id!r}) "
                f"returned {type(stats).__name__}, expected a mapping of statistics"
            )
        return _json_ready(stats, f"the stats of run ({project_id!r}, {run_id!r})")

    def after_query(self, project_id: str, run_id: str) -> bool:
        """Start the run's ingest in the background, once its Query has been answered.

        Synchronous and never raises: a failure to start (bad ids, the
        Prefetcher closed, a store error ...) is logged as the warning
        ``ingest.start_failed`` and returns False, so that it can never break
        the Query response.

        Returns:
            True if a background ingest was started (or queued behind
            ``max_concurrency``); False if one was already in flight or
            completed and fresh, or if starting failed.
        """
        try:
            key = _key(project_id, run_id)
            return self._prefetcher.prefetch(key, self._load, key, True)
        except Exception as exc:
            _log.warning(
                "ingest.start_failed",
                name=self._prefetcher.name,
                project_id=key_for_log(project_id),
                run_id=key_for_log(run_id),
                error=error_text(exc),
                exc_info=exc,
            )
            return False

    async def ingest(
        self, project_id: str, run_id: str, *, force_refresh: bool = False
    ) -> IngestResult:
        """The Mapping click: the run's stats, from the background ingest when there is one.

        - a completed background run → its stats at once (``source="hit"``);
        - a run in flight → awaits that same run (``"joined"``);
        - failed, expired or never started → runs the ingest now and awaits
          it (``"ran"``), unless ``persisted_stats`` finds the run's stats in
          the database (``"hit"``, ``persisted=True``);
        - ``force_refresh=True`` → ignores completed and persisted stats and
          runs again (joining a run already in flight rather than starting a
          second one).

        Concurrent calls for one run share one execution: one of them reports
        ``"ran"`` and the others ``"joined"``.

        The source is :meth:`Prefetcher.serve`'s: a click served the value a
        ``refresh_after`` reload is replacing is a ``"hit"``; a run executed
        by another instance sharing the store is ``"joined"``.

        Raises:
            ValueError: an id is empty or not a string.
            Exception: whatever the ingest raised (every caller awaiting that
                run gets the same exception), or ``TypeError`` when the
                pipeline returned something other than a mapping.
        """
        key = _key(project_id, run_id)
        before = await self._prefetcher.status(key)
        if not force_refresh and before.status is Status.NOT_STARTED:
            persisted = await self._lookup_persisted(project_id, run_id)
            if persisted is not None:
                return IngestResult(stats=persisted, source="hit", persisted=True)
        served = await self._prefetcher.serve(
            key, self._load, key, False, force_refresh=force_refresh
        )
        source: Source = served.source.value  # the same three strings
        return IngestResult(stats=served.value, source=source)

    async def cancel(self, project_id: str, run_id: str) -> bool:
        """Cancel the run's pending or running ingest (the user left); True if there was one.

        Every click awaiting it gets :class:`~prefetch_ingest.LoadCancelled`;
        nothing is stored.

        Raises:
            ValueError: an id is empty or not a string.
        """
        return await self._prefetcher.cancel(_key(project_id, run_id))

    async def status(self, project_id: str, run_id: str) -> IngestStatus:
        """The run's state, for the status endpoint (see :meth:`IngestStatus.to_dict`).

        When the Prefetcher (or its shared store) knows nothing of the run,
        ``persisted_stats`` is asked: stats found there are reported as
        ``completed`` with ``background_task: false``. If it raises, the
        error is logged (``ingest.persisted_stats_failed``) and the run is
        reported ``not_started``.

        Raises:
            ValueError: an id is empty or not a string.
        """
        key = _key(project_id, run_id)
        snapshot = await self._prefetcher.status(key)
        if snapshot.status is Status.NOT_STARTED:
            persisted = await self._lookup_persisted(project_id, run_id)
            if persisted is not None:
                return IngestStatus(
                    project_id=project_id,
                    run_id=run_id,
                    status=Status.COMPLETED,
                    background_task=False,
                    stats=persisted,
                    persisted=True,
                )
        return IngestStatus.from_snapshot(project_id, run_id, snapshot)

    async def watch(self, project_id: str, run_id: str) -> AsyncGenerator[IngestStatus, None]:
        """Every change of the run's status or progress, ending after ``completed`` or ``failed``.

        The basis of a server-sent-events endpoint. A run found only in the
        database yields one ``completed`` status. A run nobody started yields
        ``not_started`` first, then waits until it starts. Close it early with
        ``contextlib.aclosing`` (or break out of the loop) to unregister it at
        once rather than when it is garbage-collected.

        Raises:
            ValueError: an id is empty or not a string.
        """
        key = _key(project_id, run_id)
        first = await self.status(project_id, run_id)
        if first.persisted:
            yield first
            return
        async with self._prefetcher.watch(key) as snapshots:
            async for snapshot in snapshots:
                yield IngestStatus.from_snapshot(project_id, run_id, snapshot)

    def stats(self) -> Stats:
        """The underlying Prefetcher's counters (hits, joins, misses, time saved ...)."""
        return self._prefetcher.stats()

    async def _lookup_persisted(self, project_id: str, run_id: str) -> Mapping[str, Any] | None:
        """The stats ``persisted_stats`` finds, JSON-ready; None (and a warning) otherwise."""
        if self._persisted_stats is None:
            return None
        try:
            found: object = await self._persisted_stats(project_id, run_id)
            if found is None:
                return None
            if not isinstance(found, Mapping):
                raise TypeError(
                    f"persisted_stats returned {type(found).__name__}, expected a mapping or None"
                )
            return _json_ready(found, "the persisted stats")
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # any error of the application's database code
            _log.warning(
                "ingest.persisted_stats_failed",
                name=self._prefetcher.name,
                project_id=key_for_log(project_id),
                run_id=key_for_log(run_id),
                error=error_text(exc),
                exc_info=exc,
            )
            return None
