"""Shared stores: the backend interface, the lease algorithm written once, the backends.

- :mod:`~prefetch_ingest.stores.interface`: the primitives a backend implements;
- :mod:`~prefetch_ingest.stores.lease`: the lease algorithm over them (:class:`LeasedStore`);
- :mod:`~prefetch_ingest.stores.memory`: the in-memory backend (reference and test fake);
- :mod:`~prefetch_ingest.stores.testing`: the contract suite every backend passes;
- Redis: :mod:`prefetch_ingest.redis`.
"""

from __future__ import annotations

from .codec import Codec as Codec
from .codec import JSONCodec as JSONCodec
from .interface import Backend as Backend
from .lease import LeasedStore as LeasedStore
from .memory import MemoryServer as MemoryServer
from .memory import MemoryStore as MemoryStore

__all__ = ["Backend", "Codec", "JSONCodec", "LeasedStore", "MemoryServer", "MemoryStore"]
