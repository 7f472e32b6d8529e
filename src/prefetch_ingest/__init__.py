"""prefetch_ingest: start expensive coroutines early, run each key once, serve the result.

The public API; everything else lives in private modules.
"""

from __future__ import annotations

from ._engine import Prefetcher as Prefetcher
from ._errors import PrefetcherClosed as PrefetcherClosed
from ._errors import PrefetchError as PrefetchError
from ._errors import ReentrantLoadError as ReentrantLoadError
from ._errors import RemoteLoadError as RemoteLoadError
from ._errors import StoreError as StoreError
from ._progress import report_progress as report_progress
from ._store import LoadOutcome as LoadOutcome
from ._store import SharedStore as SharedStore
from ._store import StoredEntry as StoredEntry
from ._types import Progress as Progress
from ._types import Snapshot as Snapshot
from ._types import Stats as Stats
from ._types import Status as Status

__all__ = [
    "LoadOutcome",
    "PrefetchError",
    "Prefetcher",
    "PrefetcherClosed",
    "Progress",
    "ReentrantLoadError",
    "RemoteLoadError",
    "SharedStore",
    "Snapshot",
    "Stats",
    "Status",
    "StoreError",
    "StoredEntry",
    "report_progress",
]

__version__ = "0.1.0"
