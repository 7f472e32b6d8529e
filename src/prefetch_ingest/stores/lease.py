"""The lease algorithm, written once for every shared store.

:class:`LeasedStore` is what the Prefetcher talks to (the engine's
:class:`~prefetch_ingest._store.SharedStore`); it drives a
:class:`~prefetch_ingest.stores.interface.Backend` that implements only
primitives. Here, and only here:

- **one run per key**: ``acquire``; while another instance holds the lease,
  follow its run (reporting its start, origin and progress), woken by the
  backend's notifications and at least every ``poll_interval``; take the lease
  over when it lapses;
- **the owner's side**: renew every ``lease / 3``; hand the run its fence
  (:func:`~prefetch_ingest.current_fence`); write the outcome fenced; if the
  store is unreachable then, give the value to the local waiters at once and
  retry the write while the lease may still be alive;
- **outages**: a follower of a live lease rides out store errors with
  back-off for up to ``lease`` seconds; otherwise a :class:`StoreError`, or
  with ``fallback="local"`` the load runs here; log lines about an outage are
  limited to one a second per operation, with a count of those suppressed;
- **progress**: written at most every ``progress_interval`` per key; the
  engine re-sends the latest after each write, so no trailing update is lost;
- **errors by structure**: outcomes carry the run's token, the error's type
  and message; nothing is compared by text.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, Literal

import anyio

from prefetch_ingest import _log
from prefetch_ingest._errors import (
    CodecError,
    LoadCancelled,
    PrefetcherClosed,
    RemoteLoadError,
    StoreError,
)
from prefetch_ingest._fence import fence_var
from prefetch_ingest._store import LoadOutcome, StoredEntry
from prefetch_ingest._types import Progress, Status
from prefetch_ingest._validate import check_duration as _check_duration
from prefetch_ingest._validate import error_text, key_text

from .codec import Codec, JSONCodec
from .interface import Acquired, Backend, Completion, Outcome, Read, Run
from .keys import digest_of

__all__ = ["LeasedStore", "check_duration", "new_token", "poll_for"]

_RELEASE_TIMEOUT: Final = 2.0
"""How long a cancelled load may spend (shielded) releasing its lease."""

_DIGESTS_KEPT: Final = 4096
"""Digests kept for recently used short keys."""

_LOG_EVERY: Final = 1.0
"""At most one outage log line per operation per this many seconds."""

_RENEW_RETRY: Final = 0.02
"""The first delay before a failed renewal is tried again (doubling up to the next)."""

_RENEW_RETRY_MAX: Final = 0.25
"""The longest delay between tries of a failed renewal."""

_TTL0_KEEP: Final = 1.0
"""With ``ttl=0`` an outcome stays this long (at least), for the instances waiting on it."""


def check_duration(name: str, value: object, *, allow_zero: bool) -> float:
    """A finite duration argument (None not allowed), or a clear error naming it."""
    return _check_duration(name, value, allow_none=False, allow_zero=allow_zero)


def poll_for(lease: float, poll_interval: object) -> float:
    """How often a waiter re-reads a key without a notification: ``poll_interval``,
    or by default ``lease / 10`` clamped to 0.05 … 1 second."""
    if poll_interval is None:
        seconds = check_duration("lease", lease, allow_zero=False)
        return min(1.0, max(0.05, seconds / 10))
    return check_duration("poll_interval", poll_interval, allow_zero=False)


def new_token() -> str:
    """A random owner token: 16 hex characters (64 bits), never reused in practice."""
    return secrets.token_hex(8)


def _duration(o: Outcome) -> float:
    """How long the run of an outcome took, by its writer's times; 0 for times that
    make no duration (NaN, infinite, reversed: a corrupt or foreign record)."""
    d = o.completed_at - o.started_at
    return d if 0.0 <= d < math.inf else 0.0


class _Owned:
    """A run of a key in this instance that holds (or held) the key's lease."""

    __slots__ = ("alarmed", "completing", "last_progress", "lost", "renewed", "run")

    def __init__(self, run: Run, now: float) -> None:
        self.run = run
        self.renewed = now  # monotonic time of the last confirmed take or renewal
        self.lost = False
        # the completion is on its way: its own notification is no reason to read (the
        # fenced completion itself says whether the lease was still ours)
        self.completing = False
        # a notification that may have taken the lease away (an invalidation or a
        # cancel of the key, or the server's data lost) came since the loop last looked;
        # other notifications (this run's own start, progress, completion) need no read
        self.alarmed = False
        self.last_progress = -math.inf


class _Retry(Exception):
    """The answer of a shared read whose reader could not answer: read again yourself."""


class _SharedRead:
    """One read of a key in flight in this instance, which other lookups may share."""

    __slots__ = ("answer", "closed", "done", "scope")

    def __init__(self, deadline: float) -> None:
        # one scope for both ends of a read: the store's close (closed set first) and
        # the bound on an unanswered read (deadline)
        self.scope = anyio.CancelScope(deadline=deadline)
        self.closed = False
        self.answer: object = _Retry()
        self.done: anyio.Event | None = None  # made by the first caller that shares it


class _Backoff:
    __slots__ = ("delay",)

    def __init__(self) -> None:
        self.delay = 0.02

    async def sleep(self) -> None:
        await anyio.sleep(self.delay)
        self.delay = min(self.delay * 2, 1.0)


class _Limiter:
    """One log line per operation per second, counting the ones held back."""

    __slots__ = ("last", "suppressed")

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, op: str) -> int | None:
        """None: hold this line back; else the number held back since the last one."""
        now = time.monotonic()
        if now - self.last.get(op, -math.inf) < _LOG_EVERY:
            self.suppressed[op] = self.suppressed.get(op, 0) + 1
            return None
        self.last[op] = now
        return self.suppressed.pop(op, 0)


class LeasedStore:
    """A shared store: the lease algorithm over a backend's primitives.

    Backends' public classes (``RedisStore``, ``PostgresStore``) are this class
    with their backend built in; the in-memory reference is
    :class:`prefetch_ingest.stores.memory.MemoryStore`.
    """

    kind = "store"
    """The store's name in messages and log events (``"Redis"``, ``"PostgreSQL"``)."""

    def __init__(
        self,
        backend: Backend,
        *,
        lease: float = 30.0,
        codec: Codec | None = None,
        fallback: Literal["local"] | None = None,
        poll_interval: float | None = None,
        progress_interval: float = 0.25,
    ) -> None:
        self._backend = backend
        self._lease = check_duration("lease", lease, allow_zero=False)
        # how long one operation may go unanswered before it counts as an outage
        self._op_timeout = max(self._lease / 3, 0.05)
        if codec is None:
            codec = JSONCodec()
        elif not isinstance(codec, Codec):
            raise TypeError(
                "codec must have encode(value) -> bytes and decode(bytes) -> value methods, "
                f"got {type(codec).__name__}"
            )
        self._codec: Codec = codec
        if fallback not in (None, "local"):
            raise ValueError(f'fallback must be None or "local", got {fallback!r}')
        self._fallback = fallback
        self._poll = poll_for(self._lease, poll_interval)
        self._progress_interval = check_duration(
            "progress_interval", progress_interval, allow_zero=True
        )
        self._errors: tuple[type[BaseException], ...] = backend.errors
        # an error, or no answer within _op_timeout: an outage either way
        self._unanswered: tuple[type[BaseException], ...] = (*backend.errors, TimeoutError)
        backend.on_notice = self._notice
        self._ttl: float | None = None
        self._open = False
        self._digests: dict[Hashable, str] = {}
        self._owned: dict[str, _Owned] = {}
        self._reads: dict[str, _SharedRead] = {}
        # digest -> (fresh until, completed at), by this process's monotonic clock
        self._fresh: dict[str, tuple[float, float]] = {}
        self._down_at = -math.inf  # when an operation last failed (monotonic)
        self._limiter = _Limiter()
        self.reachable = True
        """False after an operation failed because the store was unreachable, until one
        succeeds again (read by the engine for ``fallback="local"``)."""
        self.on_reachable: Callable[[], None] | None = None
        """Called when the store answers again after an outage (the engine's hook)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._backend.where!r}, lease={self._lease!r}, "
            f"codec={self._codec!r}, fallback={self._fallback!r})"
        )

    @property
    def lease(self) -> float:
        return self._lease

    @property
    def fallback(self) -> Literal["local"] | None:
        return self._fallback

    # -- life cycle ------------------------------------------------------------

    async def open(self, *, ttl: float | None, failure_ttl: float) -> None:
        """Connect, and remember how long outcomes are kept.

        An outcome (value or failure) is kept ``ttl`` seconds (``None``: until
        invalidated or replaced); ``failure_ttl`` is the engine's business (what
        ``get`` does with a failure), not the store's.
        """
        if self._open:
            raise RuntimeError(
                f"this {type(self).__name__} is already open; one Prefetcher uses one store"
            )
        if ttl is None:
            self._ttl = None
        else:
            seconds = check_duration("ttl", ttl, allow_zero=True)
            self._ttl = seconds if seconds else max(_TTL0_KEEP, 2 * self._poll)
        check_duration("failure_ttl", failure_ttl, allow_zero=True)
        try:
            await self._backend.open()
        except self._errors as exc:
            if self._fallback is None:
                with anyio.CancelScope(shield=True):
                    await self._backend.aclose()
                raise self._unavailable("open", exc) from exc
            self._down("open", exc)
        self._open = True

    async def aclose(self) -> None:
        self._open = False
        for shared in list(self._reads.values()):
            shared.closed = True
            shared.scope.cancel()
        await self._backend.aclose()

    def _debug_counts(self) -> dict[str, int]:
        """What the store still holds (the suite's leak checks read it after close)."""
        counts = {
            "open": int(self._open),
            "owned leases (renewal loops)": len(self._owned),
            "shared lookups": len(self._reads),
        }
        more = getattr(self._backend, "debug_counts", None)
        if more is not None:
            counts.update(more())
        return counts

    # -- keys --------------------------------------------------------------------

    def check_key(self, key: Hashable) -> None:
        """Raise ``TypeError`` (naming ``key``) for a key the store cannot hold."""
        self._digest(key)

    def _digest(self, key: Hashable) -> str:
        cache = self._digests
        try:
            d = cache.get(key)
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        if d is None:
            d = digest_of(key)
            if (type(key) is str and len(key) <= 256) or type(key) in (int, float, bool):
                if len(cache) >= _DIGESTS_KEPT:
                    cache.clear()
                cache[key] = d
        return d

    # -- reading -----------------------------------------------------------------

    async def lookup(self, key: Hashable, *, for_get: bool = False) -> StoredEntry | None:
        """The key's state, in one round trip; None when the store knows nothing of it.

        ``for_get``: only a stored outcome matters (a ``get`` serves a value, re-raises
        a failure, or else starts a load whose acquire reads the rest atomically), so
        the backend may read less. With ``fallback="local"`` and the store
        unreachable: None (logged).
        """
        digest = self._digest(key)
        slot = digest + "/o" if for_get else digest
        shared = self._reads.get(slot)
        if shared is not None:
            # a read of this key is in flight here: share its answer (a stampede on a
            # cold key costs one round trip per instance, not one per caller)
            if shared.done is None:
                shared.done = anyio.Event()
            await shared.done.wait()
            answer = shared.answer
            if isinstance(answer, Read):
                return self._entry(key, answer, digest)
            if isinstance(answer, BaseException) and not isinstance(answer, _Retry):
                raise answer
            # the caller that read was cancelled (or the read failed): read ourselves
        shared = self._reads[slot] = _SharedRead(anyio.current_time() + self._op_timeout)
        try:
            try:
                # cancelled by aclose (no read outlives the store), and bounded: a server
                # that does not answer (a partition) is an outage
                with shared.scope:
                    read = await self._backend.read(digest, outcome_only=for_get)
                if shared.scope.cancelled_caught:
                    if not shared.closed:
                        raise TimeoutError(f"no answer in {self._op_timeout:g} s")
                    closed = PrefetcherClosed("the store was closed while this lookup waited")
                    shared.answer = closed
                    raise closed
            except self._unanswered as exc:
                if self._fallback is None:
                    error = self._unavailable("read", exc, key)
                    error.__cause__ = exc
                    shared.answer = error
                    raise error from exc
                self._down("read", exc, key)
                shared.answer = _Retry()
                return None
            shared.answer = read
        finally:
            if self._reads.get(slot) is shared:
                del self._reads[slot]
            if shared.done is not None:
                shared.done.set()
        if not self.reachable:
            self._up()
        return self._entry(key, read, digest)

    def _entry(self, key: Hashable, read: Read, digest: str) -> StoredEntry | None:
        """What the engine sees of a read: the run if one is going, with the value kept."""
        o = read.outcome
        value: Any = None
        has_value = False
        if o is not None and o.ok:
            try:
                value = self._codec.decode(o.payload)
            except Exception as exc:
                self._corrupt(key, exc)
                o = None
            else:
                has_value = True
                self._seen_fresh(digest, o)
        duration = _duration(o) if o is not None else 0.0
        run = read.run
        if run is not None:
            return StoredEntry(
                status=Status.RUNNING,
                value=value,
                started_at=run.started_at,
                background=run.background,
                progress=run.progress,
                token=run.token,
                has_value=has_value,
                value_duration=duration if has_value else 0.0,
                value_at=o.completed_at if has_value and o is not None else None,
            )
        if o is None:
            return None
        if o.ok:
            return StoredEntry(
                status=Status.COMPLETED,
                value=value,
                started_at=o.started_at,
                completed_at=o.completed_at,
                expires_at=o.expires_at,
                background=o.background,
                token=o.token,
                has_value=True,
                value_duration=duration,
                value_at=o.completed_at,
            )
        return StoredEntry(
            status=Status.FAILED,
            error=_error_of(o),
            started_at=o.started_at,
            completed_at=o.completed_at,
            expires_at=o.expires_at,
            background=o.background,
            token=o.token,
            error_type=o.error_type,
            error_message=o.error_message,
        )

    # -- the lease algorithm -------------------------------------------------------

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
        """See :meth:`prefetch_ingest.SharedStore.load`."""
        backend = self._backend
        digest = self._digest(key)
        accept: set[str] = set()
        backoff = _Backoff()
        live_until = -math.inf  # a followed lease may be alive until then (monotonic)
        while True:
            me = Run(
                token=new_token(),
                fence=0,
                started_at=time.time() if started_at is None else started_at,
                background=background,
            )
            try:
                if accept and wanted is not None and not wanted():
                    # nobody demands this load: look, but never take the key over
                    with anyio.fail_after(self._op_timeout):
                        got = Acquired(None, await backend.read(digest))
                    if got.read.run is None and not _ends_with(got.read, accept, force):
                        raise _abandoned(key)
                else:
                    try:
                        with anyio.fail_after(self._op_timeout):
                            got = await backend.acquire(
                                digest, me, self._lease, force=force, accept=frozenset(accept)
                            )
                    except BaseException:
                        # cancelled (or failed, or unanswered) while the acquire was on its
                        # way: it may have landed, so the lease is handed back
                        # (compare-and-delete)
                        await self._release(key, digest, me.token)
                        raise
            except self._unanswered as exc:
                if anyio.current_time() < live_until:
                    # another instance holds a live lease: ride the outage out
                    self._down("follow", exc, key)
                    await backoff.sleep()
                    continue
                self._fail_or_fall_back("acquire", exc, key)
                value = await run()
                return LoadOutcome(value, True, stored=False)
            if not self.reachable:
                self._up()
            if got.fence is not None:
                mine = Run(me.token, got.fence, me.started_at, background)
                if took is not None:
                    took(mine.token)
                return await self._own(key, digest, mine, run, deliver, lost)
            read = got.read
            o = read.outcome
            if o is not None and ((o.ok and not force) or o.token in accept):
                used = self._use(key, o)
                if used is not None:
                    return used
                force = True  # undecodable: load it again, past the bad value
                continue
            if (
                o is None
                and read.run is None
                and read.cancelled is None
                and read.failed is None
                and not accept
            ):
                # not taken, yet nothing usable came back: bytes the backend could not
                # read (corrupt, foreign) stand in the way: load again, past them
                force = True
                continue
            if read.failed is not None and read.failed.token in accept:
                raise RemoteLoadError(  # a failed refresh of a value: its followers' answer
                    _error_of(read.failed),
                    error_type=read.failed.error_type,
                    message=read.failed.error_message,
                )
            if read.cancelled is not None and read.cancelled in accept:
                cancelled = LoadCancelled(
                    f"the load of key {key_text(key)} was cancelled (in another instance)"
                )
                cancelled.cancelled_run = read.cancelled  # type: ignore[attr-defined]
                raise cancelled
            if read.run is not None:
                accept.add(read.run.token)
                live_until = anyio.current_time() + self._lease
                if follow is not None:
                    entry = self._entry(key, Read(run=read.run), digest)
                    if entry is not None:
                        follow(entry)
            await backend.wait_change(digest, self._poll)

    def _use(self, key: Hashable, o: Outcome) -> LoadOutcome | None:
        """The outcome of a run in another instance, as this caller's result (None: the
        stored value cannot be decoded; the caller loads the key again)."""
        duration = _duration(o)
        if not o.ok:
            raise RemoteLoadError(_error_of(o), error_type=o.error_type, message=o.error_message)
        try:
            value = self._codec.decode(o.payload)
        except Exception as exc:
            self._corrupt(key, exc)
            return None
        self._seen_fresh(self._digest(key), o)
        return LoadOutcome(value, False, token=o.token, duration=duration)

    async def _own(
        self,
        key: Hashable,
        digest: str,
        mine: Run,
        run: Callable[[], Awaitable[Any]],
        deliver: Callable[[Any], None] | None,
        lost: Callable[[bool], None] | None,
    ) -> LoadOutcome:
        """Run the load under the lease; write its outcome fenced."""
        own = _Owned(mine, anyio.current_time())
        self._owned[digest] = own
        settled = False  # the lease was dropped by a completion
        try:
            failure: BaseException | None = None
            value: Any = None
            cancelled_exc = anyio.get_cancelled_exc_class()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew_loop, key, digest, own, lost)
                fence_set = fence_var.set(mine.fence)
                try:
                    value = await run()
                except cancelled_exc as exc:
                    if anyio.current_effective_deadline() == -math.inf:
                        raise  # a scope around us was cancelled: this run is being ended
                    # no scope of ours was cancelled: the load raised it on its own,
                    # which is its failure (as with no store), recorded like any other
                    failure = exc
                except BaseException as exc:  # recorded, then re-raised as itself
                    failure = exc
                finally:
                    fence_var.reset(fence_set)
                tg.cancel_scope.cancel()
            if isinstance(failure, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise failure  # nothing recorded: the lease is handed back below
            now = time.time()
            duration = max(now - mine.started_at, 0.0)
            if failure is None:
                try:
                    payload = self._codec.encode(value)
                    if not isinstance(payload, bytes | bytearray | memoryview):
                        raise TypeError(f"encode returned {type(payload).__name__}, not bytes")
                except Exception as exc:
                    failure = CodecError(
                        f"the value of the load for key {key_text(key)} cannot be stored: "
                        f"{type(self._codec).__name__} cannot encode a "
                        f"{type(value).__name__} ({error_text(exc)})"
                    )
                    failure.__cause__ = exc
                else:
                    outcome = self._outcome(mine, now, ok=True, payload=bytes(payload))
                    stored, settled = await self._finish(key, digest, own, outcome, value, deliver)
                    return LoadOutcome(
                        value, True, stored=stored, token=mine.token, duration=duration
                    )
            outcome = self._outcome(mine, now, ok=False, error=failure)
            _, settled = await self._finish(key, digest, own, outcome, None, None, retry=False)
            raise failure
        finally:
            if self._owned.get(digest) is own:
                del self._owned[digest]
            if not settled:
                await self._release(key, digest, mine.token)

    def _outcome(
        self,
        run: Run,
        now: float,
        *,
        ok: bool,
        payload: bytes = b"",
        error: BaseException | None = None,
    ) -> Outcome:
        error_type = error_message = None
        if error is not None:
            error_type = type(error).__name__
            text = error_text(error)
            error_message = text[len(error_type) + 2 :] if text != error_type else ""
        return Outcome(
            ok=ok,
            token=run.token,
            fence=run.fence,
            started_at=run.started_at,
            completed_at=now,
            background=run.background,
            payload=payload,
            error_type=error_type,
            error_message=error_message,
            expires_at=None if self._ttl is None else now + self._ttl,
        )

    async def _finish(
        self,
        key: Hashable,
        digest: str,
        own: _Owned,
        outcome: Outcome,
        value: Any,
        deliver: Callable[[Any], None] | None,
        *,
        retry: bool = True,
    ) -> tuple[bool, bool]:
        """Write the outcome; (stored, lease dropped).

        While the store is unreachable, the value goes to ``deliver`` at once and
        the write is retried as long as the lease may still be alive.
        """
        backoff = _Backoff()
        delivered = False
        attempted = False
        own.completing = True
        while True:
            try:
                # bounded: a server that does not answer must not hold the value back
                with anyio.fail_after(self._op_timeout):
                    answer = await self._backend.complete(digest, outcome, self._ttl)
                if answer is Completion.LOST and attempted:
                    # an earlier attempt may have landed before its answer was lost
                    with anyio.fail_after(self._op_timeout):
                        there = (await self._backend.read(digest)).outcome
                    if there is not None and there.token == outcome.token:
                        answer = Completion.WRITTEN
            except self._unanswered as exc:
                attempted = True
                self._down("complete", exc, key)
                if not delivered and deliver is not None:
                    delivered = True
                    deliver(value)
                if retry and anyio.current_time() - own.renewed < self._lease:
                    await backoff.sleep()
                    continue
                self._log_once(
                    "not_stored",
                    "prefetch.store_result_not_stored",
                    key=key,
                    error=error_text(exc),
                    detail="the store stayed unreachable while the lease could live: the "
                    "result went to this instance's waiters only",
                )
                return False, False
            if not self.reachable:
                self._up()
            if answer is Completion.WRITTEN:
                if outcome.ok:
                    self._seen_fresh(digest, outcome)
                return True, True
            if answer is Completion.SUPERSEDED:
                _log.logger.warning(
                    "prefetch.store_superseded",
                    store=self.kind,
                    key=key_text(key),
                    fence=outcome.fence,
                    detail="a result of a later run (a greater fence) is stored: "
                    "this run's result is not stored",
                )
                return False, True
            self._lease_lost(key, "completion")
            return False, True

    async def _renew_loop(
        self, key: Hashable, digest: str, own: _Owned, lost: Callable[[bool], None] | None
    ) -> None:
        """Renew every ``lease / 3``; between renewals, notice at once (by the key's
        notifications) a lease taken away by another instance's cancel or invalidate.

        A renewal that fails (the store unreachable: a failover, a restart) is tried
        again soon, with back-off from 20 ms up to 250 ms (at most ``lease / 3``), not
        a whole interval later: a renewal lands within 250 ms of the store answering
        again, so the lease outlives any outage shorter than ``2 * lease / 3 - 0.25``
        seconds (it had to be shorter than ``lease / 3`` when the next try waited for
        the next interval)."""
        backend = self._backend
        interval = self._lease / 3
        token = own.run.token
        due = anyio.current_time() + interval
        retry_in = _RENEW_RETRY
        while True:
            await backend.wait_change(digest, max(due - anyio.current_time(), 0.0))
            cancelled = False
            if anyio.current_time() >= due:
                due = anyio.current_time() + interval
                try:
                    with anyio.fail_after(interval):
                        ok = await backend.renew(digest, token, self._lease, None)
                except self._unanswered as exc:
                    self._down("renew", exc, key)
                    due = min(due, anyio.current_time() + retry_in)
                    retry_in = min(retry_in * 2, _RENEW_RETRY_MAX, interval)
                    continue
                retry_in = _RENEW_RETRY
                if not self.reachable:
                    self._up()
                if ok:
                    own.renewed = anyio.current_time()
                    continue
                with (
                    contextlib.suppress(*self._unanswered),
                    anyio.fail_after(self._op_timeout),
                ):
                    cancelled = (await backend.read(digest)).cancelled == token
            else:
                if own.completing or not own.alarmed:
                    continue  # nothing that could take the lease: no read (see _Owned)
                own.alarmed = False
                # a notification about the key: is the lease still ours?
                try:
                    with anyio.fail_after(self._op_timeout):  # never stalls the renewals
                        read = await backend.read(digest)
                except self._unanswered:
                    continue
                if read.run is not None and read.run.token == token:
                    continue
                if read.run is None and read.outcome is not None and read.outcome.token == token:
                    continue  # our own completion landed (the loop is being stopped)
                cancelled = read.cancelled == token
            own.lost = True
            if not cancelled:
                self._lease_lost(key, "renewal")
            if lost is not None:
                lost(cancelled)
            return

    async def _release(self, key: Hashable, digest: str, token: str) -> None:
        """Compare-and-delete the lease, shielded and bounded (it expires anyway)."""
        # the lease lapses by itself after `lease`: no point waiting longer than that
        with anyio.move_on_after(min(_RELEASE_TIMEOUT, self._lease), shield=True):
            try:
                await self._backend.release(digest, token)
            except self._errors as exc:
                self._down("release", exc, key)

    # -- other operations ------------------------------------------------------------

    def probe_due(self) -> bool:
        """Reachable, or unreachable for a second since the last failure: worth asking."""
        return self.reachable or time.monotonic() - self._down_at >= _LOG_EVERY

    def worth_starting(self, key: Hashable, refresh_after: float = math.inf) -> str:
        """See :meth:`prefetch_ingest.SharedStore.worth_starting` (no round trip)."""
        if not self.reachable and self._fallback is None and not self.probe_due():
            return "no"
        seen = self._fresh.get(self._digest(key))
        if seen is None:
            return "load"
        until, completed = seen
        now = time.monotonic()
        if now >= until:
            return "load"
        if now - completed >= refresh_after:
            return "reload"
        return "no"

    def _notice(self, digest: str | None, event: str) -> None:
        """A notification: an invalidation (of a key, or of everything) ends what this
        instance knew fresh; nothing else removes a stored value. An invalidation or a
        cancel alarms the key's renewal loop (the lease may be gone)."""
        if event == "x" or event == "i":
            if digest is None:
                for owned in self._owned.values():
                    owned.alarmed = True
            else:
                one = self._owned.get(digest)
                if one is not None:
                    one.alarmed = True
        if event != "i":
            return
        if digest is None:
            self._fresh.clear()
        else:
            self._fresh.pop(digest, None)

    def _seen_fresh(self, digest: str, o: Outcome) -> None:
        fresh = self._fresh
        if len(fresh) >= _DIGESTS_KEPT:
            fresh.clear()
        # The times are the writer's wall clock. A completion "in the future" is a
        # writer whose clock runs ahead: its age (and so the time left) is unknown
        # here, so nothing is assumed (the next prefetch asks the store). A writer
        # whose clock lags makes a value look older than it is: a round trip more.
        wall = time.time()
        age = wall - o.completed_at
        left = math.inf if o.expires_at is None else o.expires_at - wall
        if not (age >= 0.0 and left > 0.0):  # NaN times (a corrupt record) included
            fresh.pop(digest, None)
            return
        now = time.monotonic()
        fresh[digest] = (now + left, now - age)

    async def invalidate(self, key: Hashable) -> bool:
        """Forget the key's outcome and detach its run (whichever instance runs it)."""
        digest = self._digest(key)
        self._fresh.pop(digest, None)
        try:
            with anyio.fail_after(self._op_timeout):
                return await self._backend.invalidate(digest)
        except self._unanswered as exc:
            self._fail_or_fall_back("invalidate", exc, key)
            return False

    async def cancel(self, key: Hashable) -> bool:
        """Cancel the key's run in whichever instance runs it; True if there was one."""
        digest = self._digest(key)
        try:
            with anyio.fail_after(self._op_timeout):
                return await self._backend.cancel(digest, max(self._lease, 5.0)) is not None
        except self._unanswered as exc:
            self._fail_or_fall_back("cancel", exc, key)
            return False

    async def publish_progress(self, key: Hashable, progress: Progress) -> None:
        """Record a running load's progress, at most once per ``progress_interval``.

        Waits out the rest of the interval rather than dropping the update: the
        caller sends the latest progress again once this returns, so the last
        one always arrives. Best effort: store errors are logged, not raised.
        """
        digest = self._digest(key)
        own = self._owned.get(digest)
        if own is None or own.lost:
            return
        wait = own.last_progress + self._progress_interval - anyio.current_time()
        if wait > 0:
            await anyio.sleep(wait)
            if own.lost or self._owned.get(digest) is not own:
                return
        own.last_progress = anyio.current_time()
        try:
            with anyio.fail_after(self._op_timeout):
                ok = await self._backend.renew(digest, own.run.token, self._lease, progress)
        except self._unanswered as exc:
            self._down("progress", exc, key)
            return
        if ok:
            own.renewed = anyio.current_time()

    async def wait_change(self, key: Hashable, timeout: float) -> None:
        """Return on the next notification about ``key``, or after ``timeout`` seconds."""
        await self._backend.wait_change(self._digest(key), timeout)

    # -- errors and logs ---------------------------------------------------------------

    def _fail_or_fall_back(self, op: str, exc: BaseException, key: object = None) -> None:
        """The store failed ``op``: raise :class:`StoreError` (cause chained), or with
        ``fallback="local"`` log it (rate-limited) and let the caller go on locally."""
        if self._fallback is None:
            raise self._unavailable(op, exc, key) from exc
        self._down(op, exc, key)

    def _unavailable(self, op: str, exc: BaseException, key: object = None) -> StoreError:
        self._down(op, exc, key)
        return StoreError(
            f"{self.kind} at {self._backend.where} is unreachable or failing ({op}): "
            f"{error_text(exc)}"
        )

    def _down(self, op: str, exc: BaseException, key: object = None) -> None:
        """Note an outage; log it (at most once a second per operation)."""
        self.reachable = False
        self._down_at = time.monotonic()
        level = "warning" if self._fallback == "local" else "error"
        self._log_once(
            op,
            "prefetch.store_unavailable",
            level=level,
            operation=op,
            key=key,
            error=error_text(exc),
            fallback=self._fallback,
        )

    def _up(self) -> None:
        self.reachable = True
        self._log_once("available", "prefetch.store_available", level="info")
        hook = self.on_reachable
        if hook is not None:
            hook()

    def _log_once(
        self, op: str, event: str, *, level: str = "error", key: object = None, **fields: Any
    ) -> None:
        held = self._limiter.allow(op)
        if held is None:
            return
        log = getattr(_log.logger, level)
        log(
            event,
            store=self.kind,
            where=self._backend.where,
            key=None if key is None else key_text(key),
            suppressed=held,
            **fields,
        )

    def _lease_lost(self, key: Hashable, when: str) -> None:
        _log.logger.warning(
            "prefetch.store_lease_lost",
            store=self.kind,
            key=key_text(key),
            when=when,
            detail="the lease lapsed or was taken away (invalidate, cancel, expiry): "
            "this run's result is not stored",
        )

    def _corrupt(self, key: Hashable, exc: BaseException) -> None:
        _log.logger.warning(
            "prefetch.store_corrupt_entry",
            store=self.kind,
            key=key_text(key),
            error=error_text(exc),
            detail="ignored: the key will be loaded again",
        )


def _ends_with(read: Read, accept: set[str], force: bool) -> bool:
    """Does ``read`` hold what a follower of the runs in ``accept`` ends with?"""
    o = read.outcome
    if o is not None and ((o.ok and not force) or o.token in accept):
        return True
    if read.failed is not None and read.failed.token in accept:
        return True
    return read.cancelled is not None and read.cancelled in accept


def _abandoned(key: Hashable) -> LoadCancelled:
    """The run a load nobody demands was following is gone (detached): it ends too."""
    error = LoadCancelled(
        f"the run of key {key_text(key)} this background load followed was detached "
        "(invalidated) in another instance"
    )
    error.cancelled_run = "detached"  # type: ignore[attr-defined]
    return error


def _error_of(o: Outcome) -> str:
    name = o.error_type or "Exception"
    return f"{name}: {o.error_message}" if o.error_message else name
