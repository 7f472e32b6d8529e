"""The shared-store interface: the primitives a backend implements, and its records.

A backend (Redis, PostgreSQL, the in-memory reference) implements only
:class:`Backend`: eight small operations on one key's entry, each atomic on
the server. Everything else — waiting, taking over, renewing, retrying a
completion, riding out outages, falling back, rate-limiting progress — is the
lease algorithm of :mod:`prefetch_ingest.stores.lease`, written once.

An entry is addressed by its *digest* (32 hex characters, from
:func:`prefetch_ingest.stores.keys.digest_of`), never by the user's key, so no
user key can collide with or inject into another.

An entry holds at most:

- an :class:`Outcome`: the result of the last run (completed value or
  failure), with the expiry the writer asked for, measured by the server's
  clock;
- a :class:`Run`: the lease of the run in progress (owner token, fence, start,
  origin, last progress), with its own expiry;
- a *cancel note*: the token of a run cancelled by :meth:`Backend.cancel`, kept
  briefly so that the instances following that run learn why it ended.

Fences: every lease gets a number that only grows for a key — greater than
the fence of the outcome it may replace, and greater than any fence handed
out before a restart of the store that lost the key (backends use the
server's clock in microseconds as the floor).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import attrs

from prefetch_ingest._types import Progress

__all__ = ["Acquired", "Backend", "Completion", "Outcome", "Read", "Run"]


@attrs.frozen(slots=True)
class Run:
    """A lease: the run of a key in progress, as its owner recorded it."""

    token: str
    fence: int
    started_at: float
    """Epoch seconds (the owner's wall clock; shown, never used for expiry)."""
    background: bool
    progress: Progress | None = None


@attrs.frozen(slots=True)
class Outcome:
    """What the last run of a key left: a value (``ok``) or a failure."""

    ok: bool
    token: str
    fence: int
    started_at: float
    completed_at: float
    background: bool
    payload: bytes = b""
    """The codec's encoding of the value (empty for a failure)."""
    error_type: str | None = None
    error_message: str | None = None
    expires_at: float | None = None
    """Epoch seconds, for display; the server's own expiry decides when it goes."""


@attrs.frozen(slots=True)
class Read:
    """An entry as one read saw it."""

    outcome: Outcome | None = None
    run: Run | None = None
    cancelled: str | None = None
    """The token of a run recently ended by :meth:`Backend.cancel`."""
    failed: Outcome | None = None
    """A failure recently reported by :meth:`Backend.complete` that did not replace the
    stored value (a failed refresh), kept for the instances that followed that run."""


EMPTY = Read()


@attrs.frozen(slots=True)
class Acquired:
    """The answer of :meth:`Backend.acquire`: the lease's fence if taken, else what is there."""

    fence: int | None
    read: Read = EMPTY


class Completion(enum.IntEnum):
    """The answer of :meth:`Backend.complete`."""

    LOST = 0
    """The lease no longer holds the writer's token: nothing written."""
    WRITTEN = 1
    """Written (a failure over a completed value keeps the value), lease dropped."""
    SUPERSEDED = 2
    """An outcome of a greater fence is stored: nothing written, lease dropped."""


@runtime_checkable
class Backend(Protocol):
    """The primitives of a shared store. Every method but ``where`` may raise any of
    ``errors`` when the server is unreachable; the lease algorithm decides what then.

    Durations are seconds (floats); ``keep`` ``None`` means no expiry.
    """

    @property
    def where(self) -> str:
        """The server's address for messages and logs, with no secret in it."""

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions meaning "the server is unreachable or failing"."""

    on_notice: Callable[[str | None, str], None] | None
    """Set by the lease algorithm: the backend calls it for every notification it
    receives (whether or not anyone waits for that key), with the digest (None: every
    key, e.g. after the server lost its data) and the event: ``s`` started, ``p``
    progress, ``c`` completed, ``f`` failed, ``r`` released, ``i`` invalidated,
    ``x`` cancelled."""

    async def open(self) -> None:
        """Connect, check that the server answers, and start receiving notifications."""

    async def aclose(self) -> None:
        """Disconnect; close only what the backend itself created."""

    async def read(self, digest: str, *, outcome_only: bool = False) -> Read:
        """The entry, in one round trip. With ``outcome_only`` the caller needs only the
        outcome (a ``get`` looking for a value): a backend may then skip the rest."""

    async def acquire(
        self, digest: str, run: Run, lease: float, *, force: bool, accept: frozenset[str]
    ) -> Acquired:
        """Atomically: take the lease for ``run`` (its ``fence`` is ignored: the
        backend chooses it) unless the entry has an outcome to use — a value
        (when not ``force``), or any outcome or cancel note of a run in
        ``accept`` — or a live lease. Taking it notifies the key's listeners."""

    async def renew(self, digest: str, token: str, lease: float, progress: Progress | None) -> bool:
        """Extend the lease if it still holds ``token`` (and with ``progress``, record
        it and notify). False: the lease is lost."""

    async def complete(self, digest: str, outcome: Outcome, keep: float | None) -> Completion:
        """Fenced completion: write ``outcome`` (kept ``keep`` seconds) only while the
        lease holds ``outcome.token`` and no greater fence is stored; drop the
        lease; notify. A failure never replaces a stored value: it is left as a note
        (``Read.failed``, kept briefly) for the instances that followed the run."""

    async def release(self, digest: str, token: str) -> bool:
        """Compare-and-delete the lease; notify. False: it was not ours."""

    async def invalidate(self, digest: str) -> bool:
        """Delete the outcome *and* the lease (a running run is detached: its
        completion will be refused); notify. True if an outcome was deleted."""

    async def cancel(self, digest: str, keep: float) -> str | None:
        """Delete the lease and leave a cancel note with its token (kept ``keep``
        seconds); notify. The token of the cancelled run, or None."""

    async def wait_change(self, digest: str, timeout: float) -> None:
        """Return on the next notification about the entry, or after ``timeout``."""
