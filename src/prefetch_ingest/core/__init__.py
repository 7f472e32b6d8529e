"""The pure core: records, the table, the counters and every decision. No I/O, no awaiting.

The engine (:mod:`prefetch_ingest.engine`) asks, then acts; the core is
unit-tested with no event loop (``tests/core``).
"""

from __future__ import annotations

from .counters import Counters as Counters
from .records import Done as Done
from .records import Failed as Failed
from .records import Flight as Flight
from .records import Unclaimed as Unclaimed
from .state import ASK_STORE as ASK_STORE
from .state import HIT as HIT
from .state import JOIN as JOIN
from .state import RAISE as RAISE
from .state import START as START
from .state import Core as Core
from .table import MemoryTable as MemoryTable

__all__ = [
    "ASK_STORE",
    "HIT",
    "JOIN",
    "RAISE",
    "START",
    "Core",
    "Counters",
    "Done",
    "Failed",
    "Flight",
    "MemoryTable",
    "Unclaimed",
]
