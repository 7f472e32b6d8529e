"""The byte layouts the Redis store writes, and their strict parsing.

Outcome (the key's result), one Redis string, read with one ``GET`` on a hit::

    b"P" | kind (b"c" completed, b"f" failed) | token (16 hex) | fence (16 digits)
         | started, completed, expires (3 big-endian doubles; NaN: none)
         | background (1 byte) | payload

59 bytes in all before the payload (the contract allows 64). For a failure
the payload is the error: its type's name, a NUL byte, its message (UTF-8).
The token and fence sit at fixed offsets, where the Lua scripts read them.

Lease::

    token (16 hex) | fence (16 digits) | started (double) | background (1 byte)
          | progress: JSON [done, total, message, eta] or nothing

Note (one per key, kept briefly): ``x`` and the 16-character token of a run that was
cancelled; or ``f``, the token, and the error (type, NUL, message) of a failed run that
did not replace the stored value (a failed refresh), for the run's followers.

Parsing never runs code and never trusts a length or a type it did not
check: anything unexpected raises :class:`CorruptRecord`.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Final

from ._types import Progress
from .stores.interface import Outcome, Run

__all__ = [
    "CorruptRecord",
    "dump_lease",
    "dump_lease_meta",
    "dump_progress",
    "dump_failure_note",
    "dump_outcome",
    "fence_text",
    "parse_lease",
    "parse_note",
    "parse_outcome",
]

MAGIC: Final = b"P"
TOKEN_LEN: Final = 16
FENCE_LEN: Final = 16
_TIMES = struct.Struct(">ddd?")
_LEASE_TIMES = struct.Struct(">d?")
_HEAD: Final = 2 + TOKEN_LEN + FENCE_LEN
OVERHEAD: Final = _HEAD + _TIMES.size
"""Bytes of an outcome before the payload."""

_NAN = math.nan


class CorruptRecord(ValueError):
    """Bytes found in Redis that this library did not write."""


def fence_text(fence: int) -> bytes:
    """The fixed-width form of a fence, as the scripts write and compare it."""
    if not 0 <= fence < 10**FENCE_LEN:
        raise ValueError(f"fence out of range: {fence}")
    return b"%016d" % fence


def _token(raw: bytes) -> str:
    if len(raw) != TOKEN_LEN:
        raise CorruptRecord("bad token")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptRecord("bad token") from None


def _fence(raw: bytes) -> int:
    if len(raw) != FENCE_LEN or not raw.isdigit():
        raise CorruptRecord("bad fence")
    return int(raw)


def _opt(t: float) -> float | None:
    return None if t != t else t  # NaN: none


def dump_outcome(o: Outcome) -> bytes:
    if o.ok:
        kind, payload = b"c", o.payload
    else:
        kind = b"f"
        payload = (
            (o.error_type or "Exception").encode("utf-8", "backslashreplace")
            + b"\0"
            + (o.error_message or "").encode("utf-8", "backslashreplace")
        )
    expires = _NAN if o.expires_at is None else o.expires_at
    return b"".join(
        (
            MAGIC,
            kind,
            o.token.encode("ascii"),
            fence_text(o.fence),
            _TIMES.pack(o.started_at, o.completed_at, expires, o.background),
            payload,
        )
    )


def parse_outcome(data: bytes) -> Outcome:
    if len(data) < OVERHEAD or data[:1] != MAGIC:
        raise CorruptRecord("not a record of this library")
    kind = data[1:2]
    if kind not in (b"c", b"f"):
        raise CorruptRecord(f"unknown record kind {kind!r}")
    token = _token(data[2 : 2 + TOKEN_LEN])
    fence = _fence(data[2 + TOKEN_LEN : _HEAD])
    started, completed, expires, background = _TIMES.unpack_from(data, _HEAD)
    if not (math.isfinite(started) and math.isfinite(completed)):
        raise CorruptRecord("bad times")
    payload = data[OVERHEAD:]
    if kind == b"c":
        return Outcome(
            True, token, fence, started, completed, background, payload, None, None, _opt(expires)
        )
    error_type, sep, message = payload.partition(b"\0")
    if not sep:
        raise CorruptRecord("failure without an error")
    return Outcome(
        False,
        token,
        fence,
        started,
        completed,
        background,
        b"",
        error_type.decode("utf-8", "replace"),
        message.decode("utf-8", "replace"),
        _opt(expires),
    )


def dump_progress(p: Progress) -> bytes:
    """A lease's progress part (the renew script writes it after the lease's head)."""
    return json.dumps(
        [p.done, p.total, p.message, p.eta], separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def dump_lease_meta(run: Run) -> bytes:
    """The lease after its token and fence (the acquire script puts those before it)."""
    meta = _LEASE_TIMES.pack(run.started_at, run.background)
    return meta if run.progress is None else meta + dump_progress(run.progress)


def dump_lease(run: Run) -> bytes:
    return run.token.encode("ascii") + fence_text(run.fence) + dump_lease_meta(run)


def _number(value: object, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if type(value) not in (int, float):
        raise CorruptRecord(f"bad number {value!r}")
    return float(value)  # type: ignore[arg-type]


def parse_lease(data: bytes) -> Run:
    head = TOKEN_LEN + FENCE_LEN
    if len(data) < head + _LEASE_TIMES.size:
        raise CorruptRecord("not a lease of this library")
    token = _token(data[:TOKEN_LEN])
    fence = _fence(data[TOKEN_LEN:head])
    started, background = _LEASE_TIMES.unpack_from(data, head)
    if not math.isfinite(started):
        raise CorruptRecord("bad start time")
    rest = data[head + _LEASE_TIMES.size :]
    progress = None
    if rest:
        try:
            p = json.loads(rest)
        except (ValueError, RecursionError):
            raise CorruptRecord("bad progress") from None
        if type(p) is not list or len(p) != 4:
            raise CorruptRecord("bad progress")
        done = _number(p[0], optional=False)
        assert done is not None
        message = p[2]
        if message is not None and type(message) is not str:
            raise CorruptRecord("bad progress message")
        progress = Progress(
            done=done,
            total=_number(p[1], optional=True),
            message=message,
            eta=_number(p[3], optional=True),
        )
    return Run(token, fence, started, background, progress)


def dump_failure_note(o: Outcome) -> bytes:
    """A failure that did not replace the stored value, for the run's followers."""
    return (
        b"f"
        + o.token.encode("ascii")
        + (o.error_type or "Exception").encode("utf-8", "backslashreplace")
        + b"\0"
        + (o.error_message or "").encode("utf-8", "backslashreplace")
    )


def parse_note(data: bytes) -> str | Outcome:
    """A cancel note (``x`` and the run's token: the token) or a failure note (an Outcome)."""
    kind = data[:1]
    token = _token(data[1 : 1 + TOKEN_LEN])
    if kind == b"x" and len(data) == 1 + TOKEN_LEN:
        return token
    if kind != b"f":
        raise CorruptRecord("not a note of this library")
    error_type, sep, message = data[1 + TOKEN_LEN :].partition(b"\0")
    if not sep:
        raise CorruptRecord("a failure note without an error")
    return Outcome(
        False,
        token,
        0,
        0.0,
        0.0,
        False,
        b"",
        error_type.decode("utf-8", "replace"),
        message.decode("utf-8", "replace"),
    )
