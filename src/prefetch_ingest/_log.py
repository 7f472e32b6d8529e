"""structlog plumbing: one logger, level checks done once, and safe renderings of user data.

Events are named ``prefetch.<transition>``. The hit event is DEBUG; the engine
asks :func:`levels` once when it is entered and, when DEBUG is off, the hit
path does not even build the event's arguments.

structlog's out-of-the-box configuration prints every level, DEBUG included,
to stdout. A library must not flood an application that never configured
logging, so until structlog is configured (``structlog.is_configured()``)
only WARNING and above (``prefetch.failed``) are emitted; once the
application configures structlog, its level filtering decides.

Keys and identifiers come from users (a run id from a URL): they are logged
through :func:`key_for_log`, which escapes control characters (a newline
could forge a second line in a plain-text log) and bounds the length.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import structlog

from ._validate import key_text

__all__ = ["MAX_LOGGED", "Levels", "key_for_log", "levels", "logger"]

logger: Any = structlog.get_logger("prefetch_ingest")

MAX_LOGGED = 200
"""Longest rendering of a key or identifier in a log event, in characters."""


@attrs.frozen
class Levels:
    """Which of the library's log levels are enabled, read once."""

    debug: bool
    info: bool
    warning: bool


def _enabled(level: int) -> bool:
    bound = structlog.get_logger("prefetch_ingest").bind()
    check = getattr(bound, "is_enabled_for", None)
    if check is None:
        check = getattr(bound, "isEnabledFor", None)
    if check is None:
        return True
    return bool(check(level))


def levels() -> Levels:
    """The enabled levels under the current structlog configuration."""
    if not structlog.is_configured():
        return Levels(debug=False, info=False, warning=True)
    return Levels(
        debug=_enabled(logging.DEBUG),
        info=_enabled(logging.INFO),
        warning=_enabled(logging.WARNING),
    )


_INT_LOGGED = 10 ** (MAX_LOGGED - 1)
"""Ints are logged as they are below this (at most MAX_LOGGED characters with the sign)."""


def _bounded(text: str) -> str:
    if len(text) > MAX_LOGGED:
        return text[: MAX_LOGGED - 1] + "…"
    return text


def key_for_log(key: object) -> object:
    """A key (or identifier) as it goes into a log event: escaped, and at most MAX_LOGGED long.

    Printable strings and plain numbers (ints of fewer than MAX_LOGGED digits)
    are logged as they are; anything else
    as :func:`~prefetch_ingest._validate.key_text` renders it in messages (its
    ``repr``, control characters escaped, truncated; a ``repr`` that raises
    gives the type name).
    """
    cls = key.__class__
    if cls is str and key.isprintable():  # type: ignore[attr-defined]
        return key if len(key) <= MAX_LOGGED else _bounded(key)  # type: ignore[arg-type]
    if cls is int:  # (str() of an int over 4300 digits raises: it never gets that far)
        return key if -_INT_LOGGED < key < _INT_LOGGED else key_text(key, MAX_LOGGED)
    if cls is float or cls is bool or key is None:
        return key
    return key_text(key, MAX_LOGGED)
