"""Compatibility: the table and its records moved to :mod:`prefetch_ingest.core`."""

from __future__ import annotations

from .core.records import Done as Done
from .core.records import Failed as Failed
from .core.records import Unclaimed as Unclaimed
from .core.table import MemoryTable as MemoryTable

__all__ = ["Done", "Failed", "MemoryTable", "Unclaimed"]
