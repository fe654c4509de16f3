"""Consistent hashing of shard keys to shard aliases, and the router built on it.

``HashRing`` maps a shard key (int, str, bytes or uuid.UUID, encoded as
specified in :mod:`shardkit.ring._keys`) to an alias, as a classic ring with
virtual nodes or as a fixed set of logical buckets.  ``HashRingRouter`` plugs
a ring into shardkit's router chain.

The lookup runs in C (``shardkit.ring._speedups``) when the extension is
built, else in pure Python (``_lookup_py``, the specification); the
environment variable ``SHARDKIT_RING_IMPL=c|python`` forces one, and
:data:`IMPLEMENTATION` records the choice (``"c"`` or ``"python"``).
"""

from __future__ import annotations

from ._keys import INT_MAX, INT_MIN
from ._ring import DEFAULT_BUCKETS, DEFAULT_VNODES, IMPLEMENTATION, HashRing, _impl
from .router import HashRingRouter

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_VNODES",
    "IMPLEMENTATION",
    "INT_MAX",
    "INT_MIN",
    "HashRing",
    "HashRingRouter",
    "encode_key",
    "hash_key",
]

encode_key = _impl.encode_key
"""The canonical bytes of a shard key (the selected implementation of ``_keys.encode_key``)."""

hash_key = _impl.hash_key
"""MurmurHash3 x86 32-bit (seed 0, unsigned) of :func:`encode_key`."""
