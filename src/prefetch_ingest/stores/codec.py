"""How values become bytes in a shared store, and back."""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

import attrs

__all__ = ["Codec", "JSONCodec"]


@runtime_checkable
class Codec(Protocol):
    """How values are turned into bytes for a shared store, and back.

    Any object with these two methods will do; for example, with msgspec::

        class MsgpackCodec:
            def encode(self, value: object) -> bytes:
                return msgspec.msgpack.encode(value)

            def decode(self, data: bytes) -> object:
                return msgspec.msgpack.decode(data)

    ``encode`` raises (any exception) for a value it cannot encode: that load
    then fails with :class:`~prefetch_ingest.CodecError`. ``decode`` raises for
    bytes it cannot read: the entry is reported as corrupt (logged) and loaded
    again. A codec must never execute code found in the data, which rules out
    ``pickle`` for any store that someone else can write to.
    """

    def encode(self, value: Any) -> bytes:
        """The bytes of ``value``."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value of ``data``."""
        ...


@attrs.frozen
class JSONCodec:
    """The default codec: UTF-8 JSON (stdlib :mod:`json`).

    JSON has no tuples and only string keys: a tuple comes back as a list, a
    dict's int keys as strings. Values that JSON cannot represent (sets,
    datetimes, arbitrary objects, NaN) fail their load with
    :class:`~prefetch_ingest.CodecError`; use another codec for them.
    """

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8"
        )

    def decode(self, data: bytes) -> Any:
        return json.loads(data)
