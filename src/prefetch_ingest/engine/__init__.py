"""The shell around the core: the Prefetcher, its watchers, its wrapper.

It awaits; the core (:mod:`prefetch_ingest.core`) decides.
"""

from __future__ import annotations

from .prefetcher import Prefetcher as Prefetcher
from .watch import Watch as Watch
from .wrap import Wrapped as Wrapped

__all__ = ["Prefetcher", "Watch", "Wrapped"]
