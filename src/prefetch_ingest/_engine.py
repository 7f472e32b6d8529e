"""Compatibility: the engine moved to :mod:`prefetch_ingest.engine` (the shell) and
:mod:`prefetch_ingest.core` (the decisions)."""

from __future__ import annotations

from .engine.prefetcher import Prefetcher as Prefetcher
from .engine.watch import Watch as _Watch

__all__ = ["Prefetcher", "_Watch"]
