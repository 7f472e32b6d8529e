"""How a user's key becomes Redis key names: a canonical encoding, then a digest.

A user key (``str``, ``int``, ``float``, ``bool``, ``None`` and tuples of
them) is first written in a canonical, prefix-free byte encoding, then hashed
(BLAKE2b, 128 bits). Every Redis name of the entry is built from the
namespace prefix and that digest only, so

- no two different keys share a name (the encoding is unambiguous: a string is
  written with its length, a tuple with its number of items; ``("a:b", "c")``
  and ``("a", "b:c")`` encode differently);
- no key can reach another namespace or inject anything (the user's text never
  appears in a Redis name: ``:``, ``*``, ``{}``, newlines, NUL, the prefix
  itself are just bytes under the hash);
- a key of any size costs a fixed 32-character name (a 1 MB key is hashed,
  not refused);
- every name of one entry carries the digest as its Redis Cluster hash tag
  (``{...}``), so the entry's keys live in one slot and one Lua script may
  touch them all.

Keys equal in Python are equal here too, as they are for a ``dict``:
``True``, ``1`` and ``1.0`` are one key, as are ``-0.0`` and ``0``. So the
engine's local single-flight (a dict) and the store agree on what "the same
key" is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable

import attrs

__all__ = ["MAX_DEPTH", "Names", "digest_of", "encode_key", "names_for"]

MAX_DEPTH = 32
"""Deepest nesting of tuples accepted in a key."""

_KEY_TYPES = "str, int, float, bool, None or a (nested) tuple of them"


def _bad_key(key: object, detail: str) -> TypeError:
    return TypeError(f"key must be {_KEY_TYPES} to be kept in a shared store; {detail}")


def encode_key(key: object) -> bytes:
    """The canonical bytes of ``key``; ``TypeError`` naming ``key`` for an unsupported key."""
    out: list[bytes] = []
    # An explicit stack, not recursion: a deeply nested hostile key must not
    # blow the interpreter's stack.
    stack: list[tuple[object, int]] = [(key, 0)]
    while stack:
        item, depth = stack.pop()
        t = type(item)
        if t is str:
            data = item.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
            out.append(b"s%d:" % len(data))
            out.append(data)
        elif t is bool or t is int:
            out.append(b"i%x;" % int(item))  # type: ignore[call-overload]  # hex: no digit limit
        elif t is float:
            f: float = item  # type: ignore[assignment]
            if math.isfinite(f) and f == int(f):
                out.append(b"i%x;" % int(f))  # 1.0 == 1: one key, as in a dict
            else:
                out.append(b"f" + repr(f).encode("ascii") + b";")
        elif item is None:
            out.append(b"n")
        elif t is tuple:
            if depth >= MAX_DEPTH:
                raise _bad_key(key, f"tuples nested deeper than {MAX_DEPTH} levels")
            items: tuple[object, ...] = item  # type: ignore[assignment]
            out.append(b"t%d:" % len(items))
            stack.extend((x, depth + 1) for x in reversed(items))
        else:
            where = "" if item is key else " inside the tuple"
            raise _bad_key(key, f"got {t.__name__}{where}")
    return b"".join(out)


def digest_of(key: object) -> str:
    """32 hexadecimal characters identifying ``key`` (BLAKE2b-128 of its canonical bytes)."""
    return hashlib.blake2b(encode_key(key), digest_size=16).hexdigest()


@attrs.frozen
class Names:
    """The Redis names of one entry; all share the hash tag ``{digest}``."""

    digest: str
    record: str
    """The result: a completed value or a failure (absent while nothing is stored)."""
    lease: str
    """The lease (``SET NX PX``): present while some process runs the load."""
    notice: str
    """A short-lived note that a run failed, for the processes that were waiting on it."""


def names_for(prefix: str, key: Hashable) -> Names:
    """The names of ``key``'s entry under ``prefix`` (validated by the caller)."""
    d = digest_of(key)
    base = f"{prefix}:{{{d}}}:"
    return Names(d, base + "r", base + "l", base + "n")
