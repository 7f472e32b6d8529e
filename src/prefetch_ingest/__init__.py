"""prefetch_ingest: start expensive coroutines early, run each key once, serve the result.

The public API; everything else lives in private modules.
"""

from __future__ import annotations

from ._errors import CodecError as CodecError
from ._errors import LoadCancelled as LoadCancelled
from ._errors import PrefetcherClosed as PrefetcherClosed
from ._errors import PrefetchError as PrefetchError
from ._errors import ReentrantLoadError as ReentrantLoadError
from ._errors import RemoteLoadError as RemoteLoadError
from ._errors import StoreError as StoreError
from ._errors import WrongThreadError as WrongThreadError
from ._fence import current_fence as current_fence
from ._progress import report_progress as report_progress
from ._store import LoadOutcome as LoadOutcome
from ._store import SharedStore as SharedStore
from ._store import StoredEntry as StoredEntry
from ._types import Progress as Progress
from ._types import Served as Served
from ._types import Snapshot as Snapshot
from ._types import Source as Source
from ._types import Stats as Stats
from ._types import Status as Status
from .admission import Admission as Admission
from .admission import FixedAdmission as FixedAdmission
from .admission import LagAdmission as LagAdmission
from .engine import Prefetcher as Prefetcher
from .engine import Watch as Watch
from .engine import Wrapped as Wrapped

__all__ = [
    "Admission",
    "CodecError",
    "FixedAdmission",
    "LagAdmission",
    "LoadCancelled",
    "LoadOutcome",
    "PrefetchError",
    "Prefetcher",
    "PrefetcherClosed",
    "Progress",
    "Served",
    "ReentrantLoadError",
    "RemoteLoadError",
    "SharedStore",
    "Snapshot",
    "Source",
    "Stats",
    "Status",
    "StoreError",
    "StoredEntry",
    "Watch",
    "WrongThreadError",
    "Wrapped",
    "current_fence",
    "report_progress",
]

__version__ = "0.2.0"
