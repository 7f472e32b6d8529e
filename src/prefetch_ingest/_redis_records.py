"""The byte layouts the Redis store writes, and their strict parsing.

Record (the key's result), one Redis string, read with one ``GET``::

    b"PI2" | kind (b"c" completed, b"f" failed) | token (32 hex) | fence (16 digits)
          | header JSON | b"\\n" | payload

The header is ASCII JSON (no newline can occur in it): ``k`` the key's
digest (a record copied under another key is detected), ``t0``/``t1`` start
and end (epoch seconds), ``x`` expiry (epoch seconds or null), ``bg`` started
in the background, ``e`` the error text of a failure. The payload is the
codec's encoding of the value (empty for a failure).

Lease value::

    token (32 hex) | fence (16 digits) | JSON {"k": digest, "t0": started, "bg": bool,
                                               "p": progress or null}

The *fence* is the run's fencing number: 16 decimal digits, zero-padded, so
that comparing two fences as strings (as the Lua scripts do) compares them as
numbers. The acquire script chooses it (see :mod:`prefetch_ingest._redis_scripts`);
it only ever grows for a key, so a later run of a key holds a greater fence
than any earlier one, even across a Redis restart that lost every key.

Failure notice::

    token (32 hex) | error text (UTF-8)

Parsing never runs code and never trusts a length or a type it did not
check: anything unexpected raises :class:`CorruptRecord`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from ._types import Progress

__all__ = [
    "MAGIC",
    "CorruptRecord",
    "LeaseInfo",
    "RecordHeader",
    "dump_lease",
    "dump_lease_meta",
    "dump_notice",
    "dump_record",
    "fence_text",
    "parse_lease",
    "parse_notice",
    "parse_record",
]

MAGIC = b"PI2"
TOKEN_LEN = 32
FENCE_LEN = 16
_TOKEN_AT = len(MAGIC) + 1
_FENCE_AT = _TOKEN_AT + TOKEN_LEN
_HEAD = _FENCE_AT + FENCE_LEN


class CorruptRecord(ValueError):
    """Bytes found in Redis that this library did not write (or not for this key)."""


@attrs.frozen
class RecordHeader:
    kind: str  # "c" or "f"
    token: str
    fence: int
    digest: str
    started_at: float | None
    completed_at: float | None
    expires_at: float | None
    background: bool
    error: str | None


@attrs.frozen
class LeaseInfo:
    token: str
    fence: int
    started_at: float | None
    background: bool
    progress: Progress | None


def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


def _time(value: object) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise CorruptRecord(f"bad time {value!r}")
    return float(value)  # type: ignore[arg-type]


def _object(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptRecord(f"unreadable header: {exc}") from None
    if type(obj) is not dict:
        raise CorruptRecord("header is not an object")
    return obj


def _token(raw: bytes) -> str:
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptRecord("bad token") from None
    if len(token) != TOKEN_LEN:
        raise CorruptRecord("bad token")
    return token


def _fence(raw: bytes) -> int:
    if len(raw) != FENCE_LEN or not raw.isdigit():
        raise CorruptRecord("bad fence")
    return int(raw)


def fence_text(fence: int) -> bytes:
    """The fixed-width form of a fence, as the scripts write and compare it."""
    if not 0 <= fence < 10**FENCE_LEN:
        raise ValueError(f"fence out of range: {fence}")
    return b"%016d" % fence


def dump_record(
    kind: str,
    token: str,
    fence: int,
    digest: str,
    *,
    started_at: float | None,
    completed_at: float,
    expires_at: float | None,
    background: bool,
    error: str | None,
    payload: bytes,
) -> bytes:
    header = {
        "k": digest,
        "t0": started_at,
        "t1": completed_at,
        "x": expires_at,
        "bg": background,
        "e": error,
    }
    return b"".join(
        (
            MAGIC,
            kind.encode("ascii"),
            token.encode("ascii"),
            fence_text(fence),
            _compact(header),
            b"\n",
            payload,
        )
    )


def parse_record(data: bytes, digest: str) -> tuple[RecordHeader, bytes]:
    """The header and the payload (still encoded) of a record of the key ``digest``."""
    if len(data) < _HEAD or not data.startswith(MAGIC):
        raise CorruptRecord("not a record of this library")
    kind = chr(data[len(MAGIC)])
    if kind not in ("c", "f"):
        raise CorruptRecord(f"unknown record kind {kind!r}")
    token = _token(data[_TOKEN_AT:_FENCE_AT])
    fence = _fence(data[_FENCE_AT:_HEAD])
    end = data.find(b"\n", _HEAD)
    if end < 0:
        raise CorruptRecord("truncated record")
    obj = _object(data[_HEAD:end])
    if obj.get("k") != digest:
        raise CorruptRecord("record belongs to another key")
    error = obj.get("e")
    if error is not None and type(error) is not str:
        raise CorruptRecord("bad error text")
    if kind == "f" and error is None:
        raise CorruptRecord("failure without error text")
    background = obj.get("bg", False)
    if type(background) is not bool:
        raise CorruptRecord("bad background flag")
    header = RecordHeader(
        kind=kind,
        token=token,
        fence=fence,
        digest=digest,
        started_at=_time(obj.get("t0")),
        completed_at=_time(obj.get("t1")),
        expires_at=_time(obj.get("x")),
        background=background,
        error=error,
    )
    return header, data[end + 1 :]


def dump_lease_meta(
    digest: str,
    *,
    started_at: float,
    background: bool,
    progress: Progress | None = None,
) -> bytes:
    """The lease's JSON part (the acquire script puts the token and the fence before it)."""
    p = None
    if progress is not None:
        p = [progress.done, progress.total, progress.message, progress.eta]
    meta = {"k": digest, "t0": started_at, "bg": background, "p": p}
    return json.dumps(meta, separators=(",", ":")).encode("ascii")


def dump_lease(
    token: str,
    fence: int,
    digest: str,
    *,
    started_at: float,
    background: bool,
    progress: Progress | None = None,
) -> bytes:
    meta = dump_lease_meta(digest, started_at=started_at, background=background, progress=progress)
    return token.encode("ascii") + fence_text(fence) + meta


def _number(value: object, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if type(value) not in (int, float):
        raise CorruptRecord(f"bad number {value!r}")
    return float(value)  # type: ignore[arg-type]


def parse_lease(data: bytes, digest: str) -> LeaseInfo:
    token = _token(data[:TOKEN_LEN])
    fence = _fence(data[TOKEN_LEN : TOKEN_LEN + FENCE_LEN])
    obj = _object(data[TOKEN_LEN + FENCE_LEN :])
    if obj.get("k") != digest:
        raise CorruptRecord("lease belongs to another key")
    background = obj.get("bg", False)
    if type(background) is not bool:
        raise CorruptRecord("bad background flag")
    progress = None
    p = obj.get("p")
    if p is not None:
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
    return LeaseInfo(
        token=token,
        fence=fence,
        started_at=_time(obj.get("t0")),
        background=background,
        progress=progress,
    )


def dump_notice(token: str, error: str) -> bytes:
    return token.encode("ascii") + error.encode("utf-8", "backslashreplace")


def parse_notice(data: bytes) -> tuple[str, str]:
    """The token of the failed run and its error text."""
    token = _token(data[:TOKEN_LEN])
    return token, data[TOKEN_LEN:].decode("utf-8", "replace")
