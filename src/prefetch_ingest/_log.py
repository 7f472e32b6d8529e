"""structlog plumbing: one logger, and level checks done once, not per event.

Events are named ``prefetch.<transition>``. The hit event is DEBUG; the engine
asks :func:`levels` once when it is entered and, when DEBUG is off, the hit
path does not even build the event's arguments.

structlog's out-of-the-box configuration prints every level, DEBUG included,
to stdout. A library must not flood an application that never configured
logging, so until structlog is configured (``structlog.is_configured()``)
only WARNING and above (``prefetch.failed``) are emitted; once the
application configures structlog, its level filtering decides.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import structlog

__all__ = ["Levels", "key_for_log", "levels", "logger"]

logger: Any = structlog.get_logger("prefetch_ingest")


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


def key_for_log(key: object) -> object:
    """A key as it goes into a log event.

    Strings with control characters (a newline could forge a second log line
    in a plain-text log) are logged as their ``repr``; everything else as is
    (renderers already ``repr`` tuples and numbers).
    """
    if type(key) is str and not key.isprintable():
        return repr(key)
    return key
