"""Compatibility: key encoding moved to :mod:`prefetch_ingest.stores.keys`."""

from __future__ import annotations

from .stores.keys import MAX_DEPTH as MAX_DEPTH
from .stores.keys import Names as Names
from .stores.keys import digest_of as digest_of
from .stores.keys import encode_key as encode_key
from .stores.keys import names_for as names_for

__all__ = ["MAX_DEPTH", "Names", "digest_of", "encode_key", "names_for"]
